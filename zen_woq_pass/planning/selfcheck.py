"""Prove a kernel right on this machine before trusting it: run the real op, compare with the truth.

On a Zen 3 CPU zentorch's WOQ kernel returns garbage (1e38, NaN) without any error. So before a
kernel replaces a layer we run it on that layer's own packed constants and a seeded bf16 probe,
at M=1 (decode) and M=8, against the exact fp32 answer, within :mod:`zen_woq_pass.planning.numerics`'
bound. A kernel that rounds the activations (avx512-int4) is also probed at M=2 with a few
channels 10^4 times the rest (outlier activations, which real LLMs have). Where this CPU's prompts
take the dense GEMM (:mod:`zen_woq_pass.planning.prefill`), the eager call at that many rows is checked too,
so the dense path is proved before it serves a prompt. The verdict is cached per process for each
(kernel, layer signature).
"""

from __future__ import annotations

import logging

import torch

from zen_woq_pass.graph import ct_format
from zen_woq_pass.graph.layer import QuantizedLinear, QuantizedWeights
from zen_woq_pass.kernels.base import Kernel
from zen_woq_pass.planning import numerics, prefill

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


def _with_outliers(x: torch.Tensor, exact_weight: torch.Tensor) -> torch.Tensor:
    """``x`` [M, K] with one channel per row at 10^4 times the rest, as LLMs' "massive activations"
    are: the channel whose weight is exactly zero in the most output rows, where the bound holds only
    the other channels' share and a kernel that rounds x per group must keep the small ones."""
    zeros = (exact_weight == 0).sum(0)
    channels = zeros.topk(x.shape[0]).indices
    x = x.clone()
    x[torch.arange(x.shape[0]), channels] = 1e4
    return x


def _check(kernel, layer, weights, constants, bias) -> str | None:
    exact_weight = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point, weights.g_idx)
    generator = torch.Generator().manual_seed(0)
    probes = [(rows, kernel.run, torch.randn(rows, layer.in_features, generator=generator)) for rows in PROBE_ROWS]
    if kernel.rounds_activations:
        probes.append((2, kernel.run, _with_outliers(torch.randn(2, layer.in_features, generator=generator), exact_weight)))
    if kernel.eager_target is not None and (rows := prefill.dense_min_rows()) is not None:
        probes.append((rows, kernel.run_eager, torch.randn(rows, layer.in_features, generator=generator)))
    for rows, run, x in probes:
        x = x.to(layer.activation_dtype)
        try:
            with torch.no_grad():
                y = run(x, constants, bias)
        except Exception as error:  # a kernel that refuses the call is a failed check, not a crash
            return f"self-check: {kernel.name} raised {type(error).__name__}: {error}"
        excess = numerics.worst_excess(y, x, exact_weight, bias)
        if not excess <= 1.0:
            return (
                f"self-check failed: at M={rows} the kernel's error is {excess:.3g}x the bf16 bound "
                f"against the fp32 reference (wrong results on this CPU)"
            )
    return None
