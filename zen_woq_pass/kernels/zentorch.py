"""zentorch's W4A16 kernel: ``torch.ops.zentorch.zentorch_woq_linear``, the seed of the chain.

The compile-time twin of vLLM's ``ZentorchWNA16LinearKernel``. Argument conventions (measured,
see FACTS.md): weights repacked once by ``zentorch_woq_repack_weight`` from int8 [N, K] (one
value per byte) to int32 [N, K/8] and passed transposed; scales [G, N]; activations bf16 only.
Symmetric weights go in signed ([-8, 7], no zero point). With a zero point, weights and zero
points both go in unsigned ([0, 15]): +8 on both leaves q - zp unchanged; signed weights with a
signed zero point give wrong results.

ZenDNN keeps each weight's reordered copy under the weight's address (with K, N, its leading
dimension and transposition; not its scales, zero points or group size: ZenDNN's source, read),
for weights that live as long as the process (vLLM's do). Ours go when a model goes or when
another kernel wins the layer; a later weight at a freed address then ran on the old weight's
copy: wrong results in about half of the test processes on a Zen 4 (2026-11-27). So no packed
weight takes an address that an earlier one had (``repack``), and none is ever moved.
"""

from __future__ import annotations

import torch

from zen_woq_pass.graph.layer import QuantizedLinear, QuantizedWeights
from zen_woq_pass.kernels.base import Kernel
from zen_woq_pass.planning import eligibility, platform

UNSIGNED_OFFSET = 8

# The address of every weight this process packed for zentorch.
_weight_addresses: set[int] = set()


def _at_a_new_address(weight: torch.Tensor) -> torch.Tensor:
    """``weight``, or a copy of it at an address no earlier packed weight had: while it lands on
    one, the copy is made again with the one before still held, so the allocator gives another."""
    held = []
    while weight.data_ptr() in _weight_addresses:
        held.append(weight)
        weight = weight.clone()
    _weight_addresses.add(weight.data_ptr())
    return weight


def repack(q: torch.Tensor) -> torch.Tensor:
    """zentorch's int32 [N, K/8] repack of int4 values held one a byte in ``q`` [N, K], at an
    address no earlier packed weight had. Every zentorch weight, a test's too, is made here: one
    made elsewhere could land where a later one goes and lend it its cached copy."""
    return _at_a_new_address(platform.zentorch_ops().zentorch_woq_repack_weight(q.to(torch.int8).contiguous()))


class ZentorchKernel(Kernel):
    name = "zentorch"
    constants_movable = False  # ZenDNN's copy of a weight is found by the weight's address

    def platform_reason(self, forced: bool) -> str | None:
        """Forced, the CPU gate gives way only to ZenDNN's reference algorithm: on CPUs the gate
        refuses, the default algorithm returns garbage always (Zen 3) or on some calls (seen on
        an Intel Xeon with AVX512-BF16: 10 % of calls), which no self-check can rule out."""
        unusable = platform.zentorch_unusable_reason()
        if unusable:
            return unusable
        cpu_reason = platform.zentorch_cpu_reason()
        if cpu_reason is None or not forced:
            return cpu_reason
        if platform.zendnn_reference_algorithm():
            return None  # the self-check decides
        return f"{cpu_reason}; forcing it here needs ZENDNNL_MATMUL_ALGO={platform.ZENDNN_REFERENCE_ALGO} (ZenDNN's slow reference algorithm)"

    def layer_reason(self, layer: QuantizedLinear) -> str | None:
        return eligibility.gptq_int4_reason(layer) or eligibility.zentorch_reason(layer)

    def pack(self, layer: QuantizedLinear, weights: QuantizedWeights) -> dict[str, torch.Tensor]:
        q, zero_point = weights.q, weights.zero_point
        if zero_point is not None:
            q = q.to(torch.int32) + UNSIGNED_OFFSET
            zero_point = (zero_point.to(torch.int32) + UNSIGNED_OFFSET).to(torch.int8).t().contiguous()
        constants = {"weight": repack(q).t(), "scales": weights.scale.t().contiguous()}
        if zero_point is not None:
            constants["zero_points"] = zero_point
        return constants

    @property
    def target(self):
        return platform.zentorch_ops().zentorch_woq_linear.default

    def arguments(self, x, constants, bias) -> tuple:
        return (x, constants["weight"], constants["scales"], constants.get("zero_points"), bias)
