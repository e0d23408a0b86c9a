"""How close a bf16 kernel must come to the exact answer: one bound, for the self-check and tests.

A W4A16 kernel multiplies bf16 activations by dequantized weights, accumulates in fp32 and rounds
the output to bf16. Against the exact fp32 product ``x @ W.T + b`` it may lose at most about
2**-9 relative on the weight (if it dequantizes to bf16) and 2**-9 on the output rounding, each
relative to ``|x| @ |W|.T + |b|``. We allow 2**-7 of that magnitude: twice the worst case, and
still about a thousand times below what a wrong zero-point offset, a wrong transpose or the
garbage of an unsupported ISA produce.
"""

from __future__ import annotations

import torch

BF16_KERNEL_RTOL = 2.0**-7


def error_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Allowed |error| per output element: x [..., K], weight [N, K] exact fp32, bias [N]."""
    magnitude = x.float().abs() @ weight.float().abs().t()
    if bias is not None:
        magnitude = magnitude + bias.float().abs()
    return BF16_KERNEL_RTOL * magnitude + 1e-6


def reference_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The exact answer in fp32: x [..., K], weight [N, K], bias [N] -> [..., N]."""
    y = x.float() @ weight.float().t()
    return y + bias.float() if bias is not None else y


def worst_excess(actual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
    """max(|actual - exact| / bound): <= 1 passes; inf for NaN/Inf outputs."""
    if not torch.isfinite(actual).all():
        return float("inf")
    error = (actual.float() - reference_linear(x, weight, bias)).abs()
    return (error / error_bound(x, weight, bias)).max().item()


def sqnr_db(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (torchao's ``compute_error``)."""
    reference = reference.float()
    noise = (actual.float() - reference).norm()
    return float("inf") if noise == 0 else (20 * torch.log10(reference.norm() / noise)).item()
