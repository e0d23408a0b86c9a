"""The kernel chain: tried in order for each eligible layer, like vLLM's mixed-precision selector.

Each kernel is one module with the same small interface (:class:`~zen_woq_pass.kernels.base.Kernel`).
"""

from zen_woq_pass.kernels.int4pack import Int4PackKernel
from zen_woq_pass.kernels.zentorch import ZentorchKernel

CHAIN = (ZentorchKernel(), Int4PackKernel())
KERNELS = {kernel.name: kernel for kernel in CHAIN}
