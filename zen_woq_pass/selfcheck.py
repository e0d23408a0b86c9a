"""Prove a kernel right on this machine before trusting it: run the real op, compare with the truth.

On a Zen 3 CPU zentorch's WOQ kernel returns garbage (1e38, NaN) without any error. So before a
kernel replaces a layer we run it on that layer's own packed constants and a seeded bf16 probe,
at M=1 (decode) and M=8, against the exact fp32 answer, within :mod:`zen_woq_pass.numerics`'
bound. The verdict is cached per process for each (kernel, layer signature).
"""

from __future__ import annotations

import logging

import torch

from zen_woq_pass import ct_format, numerics
from zen_woq_pass.kernels.base import Kernel
from zen_woq_pass.layer import QuantizedLinear, QuantizedWeights

logger = logging.getLogger(__name__)

PROBE_ROWS = (1, 8)
_verdicts: dict[tuple, str | None] = {}


def self_check(
    kernel: Kernel,
    layer: QuantizedLinear,
    weights: QuantizedWeights,
    constants: dict[str, torch.Tensor],
    bias: torch.Tensor | None,
) -> str | None:
    """None when ``kernel`` computes ``layer`` right here; else why not."""
    key = (kernel.name, layer.signature, layer.activation_dtype)
    if key not in _verdicts:
        _verdicts[key] = _check(kernel, layer, weights, constants, bias)
        logger.info("zen_woq: self-check %s on %s: %s", kernel.name, key[1], _verdicts[key] or "passed")
    return _verdicts[key]


def clear() -> None:
    _verdicts.clear()


def _check(kernel, layer, weights, constants, bias) -> str | None:
    exact_weight = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point, weights.g_idx)
    generator = torch.Generator().manual_seed(0)
    for rows in PROBE_ROWS:
        x = torch.randn(rows, layer.in_features, generator=generator).to(layer.activation_dtype)
        try:
            with torch.no_grad():
                y = kernel.run(x, constants, bias)
        except Exception as error:  # a kernel that refuses the call is a failed check, not a crash
            return f"self-check: {kernel.name} raised {type(error).__name__}: {error}"
        excess = numerics.worst_excess(y, x, exact_weight, bias)
        if not excess <= 1.0:
            return (
                f"self-check failed: at M={rows} the kernel's error is {excess:.3g}x the bf16 bound "
                f"against the fp32 reference (wrong results on this CPU)"
            )
    return None
