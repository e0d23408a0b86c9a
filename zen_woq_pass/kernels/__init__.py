"""The kernel chain: tried in order for each quantized layer, like vLLM's mixed-precision selector.

Each kernel is one module with the same small interface (:class:`~zen_woq_pass.kernels.base.Kernel`).
The two 4-bit kernels come first; ``dense`` (dequantize once into a constant) takes whatever they
refuse, so no layer is slower than transformers' own dense model.
"""

from zen_woq_pass.kernels.dense import DenseKernel
from zen_woq_pass.kernels.int4pack import Int4PackKernel
from zen_woq_pass.kernels.zentorch import ZentorchKernel

DENSE = DenseKernel()
CHAIN = (ZentorchKernel(), Int4PackKernel(), DENSE)
KERNELS = {kernel.name: kernel for kernel in CHAIN}
