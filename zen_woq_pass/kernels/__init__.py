"""The kernel chain: tried in order for each quantized layer, like vLLM's mixed-precision selector.

Each kernel is one module with the same small interface (:class:`~zen_woq_pass.kernels.base.Kernel`).
The 4-bit kernels come first (zentorch's, our own AVX512-VNNI one, aten's); where more than one
passes its self-check, ``auto`` times them on the layer and keeps the fastest
(:mod:`zen_woq_pass.choose`). ``dense`` (dequantize once into a constant) takes whatever they all
refuse, so no layer is slower than transformers' own dense model. ``avx512-int8``, the same
kernel on 8-bit weights, is outside the chain: the opt-in int8 lm_head names it.
"""

from zen_woq_pass.kernels.avx512_int4 import Avx512Int4Kernel, Avx512Int8Kernel
from zen_woq_pass.kernels.dense import DenseKernel
from zen_woq_pass.kernels.int4pack import Int4PackKernel
from zen_woq_pass.kernels.zentorch import ZentorchKernel

DENSE = DenseKernel()
CHAIN = (ZentorchKernel(), Avx512Int4Kernel(), Int4PackKernel(), DENSE)  # what ``auto`` walks
INT8 = Avx512Int8Kernel()
KERNELS = {kernel.name: kernel for kernel in (*CHAIN, INT8)}
