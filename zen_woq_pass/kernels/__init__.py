"""The kernel chain: tried in order for each quantized layer, like vLLM's mixed-precision selector.

Each kernel is one module with the same small interface (:class:`~zen_woq_pass.kernels.base.Kernel`).
The 4-bit kernels come first (zentorch's, aten's); ``dense`` (dequantize once into a constant)
takes whatever they refuse, so no layer is slower than transformers' own dense model. Our own
AVX512-BF16 kernel is opt-in (``kernel="avx512-int4"``): in a real decode on the Intel Xeon it was
measured on, it was slower than aten's (README, "What each decode lever gave"), so ``auto`` does not
try it until a CPU shows it faster.
"""

from zen_woq_pass.kernels.avx512_int4 import Avx512Int4Kernel
from zen_woq_pass.kernels.dense import DenseKernel
from zen_woq_pass.kernels.int4pack import Int4PackKernel
from zen_woq_pass.kernels.zentorch import ZentorchKernel

DENSE = DenseKernel()
CHAIN = (ZentorchKernel(), Int4PackKernel(), DENSE)  # what ``auto`` walks
OPT_IN = (Avx512Int4Kernel(),)  # by name only
KERNELS = {kernel.name: kernel for kernel in (*CHAIN, *OPT_IN)}
