"""``auto`` picks the faster 4-bit kernel by measuring, once per layer shape.

The chain's order says which kernels to try, not which is faster: on a Zen 4 (issue 9) aten-int4
decoded 1.3-2x faster than zentorch, which the chain tries first. So where more than one 4-bit
kernel passes its self-check for a layer, each runs that layer's packed constants at M=1 (a decode
step: what generation repeats) and the fastest wins. Best of 20 calls, once per (kernels, layer
signature, activation dtype) per machine (:mod:`zen_woq_pass.timings`); the losers' times go in
the report.
"""

from __future__ import annotations

import torch

from zen_woq_pass import timings
from zen_woq_pass.layer import QuantizedLinear
from zen_woq_pass.measure import best_ms

_times: dict[tuple, tuple[float, ...]] = {}


def fastest(candidates: list, layer: QuantizedLinear, bias: torch.Tensor | None) -> tuple[int, list[str]]:
    """Index of the fastest of ``candidates`` ((kernel, constants) pairs) at M=1, and one sentence
    per slower kernel."""
    key = (tuple(kernel.name for kernel, _ in candidates), layer.signature, layer.activation_dtype)
    if key not in _times:
        x = torch.randn(1, layer.in_features, generator=torch.Generator().manual_seed(0)).to(layer.activation_dtype)
        _times[key] = timings.remembered(
            "M=1", key, lambda: [best_ms(lambda: kernel.run(x, constants, bias)) for kernel, constants in candidates]
        )
    times = _times[key]
    best = min(range(len(times)), key=times.__getitem__)
    winner = candidates[best][0].name
    slower = [
        f"{kernel.name}: slower at M=1 ({ms:.3f} ms against {winner}'s {times[best]:.3f} ms)"
        for i, ((kernel, _), ms) in enumerate(zip(candidates, times))
        if i != best
    ]
    return best, slower


def clear() -> None:
    _times.clear()
