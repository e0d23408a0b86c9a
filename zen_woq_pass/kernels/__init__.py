"""The kernel chain: tried in order for each quantized layer, like vLLM's mixed-precision selector;
the first that can run here, takes the layer and passes its self-check wins.

The order is the rule ``auto`` follows, fastest first as measured at one row (a decode step, what
generation repeats), and never a timing in the user's process: the kernels compute different bits,
and a race made numbers depend on the machine's load (issue 26). Measured at M=1, 2 threads:
our ``avx512-int4`` 1.8-2.4x faster than aten's on a Xeon (``benchmarks/kernel_rounds.py``) and
the fastest on every SmolLM2 layer on a Zen 4; ``aten-int4`` 1.3-2x faster than zentorch's on a
Zen 4; ``zentorch`` then takes what aten's refuses (group sizes not a multiple of 32). ``dense``
(dequantize once into a constant) takes whatever they all refuse, so no layer is slower than
transformers' own dense model. ``avx512-int8``, the same kernel on 8-bit weights, is outside the
chain: the opt-in int8 lm_head names it.
"""

from zen_woq_pass.kernels.avx512_int4 import Avx512Int4Kernel, Avx512Int8Kernel
from zen_woq_pass.kernels.dense import DenseKernel
from zen_woq_pass.kernels.int4pack import Int4PackKernel
from zen_woq_pass.kernels.zentorch import ZentorchKernel

DENSE = DenseKernel()
CHAIN = (Avx512Int4Kernel(), Int4PackKernel(), ZentorchKernel(), DENSE)  # what ``auto`` walks, in order
INT8 = Avx512Int8Kernel()
KERNELS = {kernel.name: kernel for kernel in (*CHAIN, INT8)}
