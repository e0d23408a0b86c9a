"""Dense Linears left unquantized (the lm_head): ``torch.mv`` for one row, where it is faster.

At decode a Linear multiplies one row, and SmolLM2's tied bf16 head (49152x576, 57 MB) is half the
bytes read per token. On the Xeon this was written on (2 threads) ``torch.mv`` computed it in 4.2 ms
from memory (cache flushed) where ``F.linear`` (a GEMM call) took 5.8 ms, and in 1.2 ms against
2.1 ms with the head in cache, with the same bits (both accumulate in fp32 and round once). Which
is faster depends on the CPU and the shape, so each shape is timed once per machine (in cache: a
cheap, fair race), on its own weight, and the layer switches only if ``mv`` wins. In a compiled
graph ``mv`` is an opaque op (``zen_woq::mv``): Inductor would otherwise fuse it into a C++
reduction of its own, which took 5.8 ms there (aten's ``mm`` 4.9 ms).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from zen_woq_pass import timings
from zen_woq_pass.convert import KernelForward, is_quantized_linear
from zen_woq_pass.keep_compressed import PackedForward
from zen_woq_pass.measure import best_ms


@torch.library.custom_op("zen_woq::mv", mutates_args=())
def mv(weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``torch.mv``, kept whole by Inductor."""
    return torch.mv(weight, vector)


@mv.register_fake
def _(weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


class GemvForward:
    """Mixed in before a Linear class: one row through ``torch.mv``, anything else through F.linear."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.numel() != input.shape[-1]:
            return F.linear(input, self.weight, self.bias)
        gemv = mv if torch.compiler.is_compiling() else torch.mv  # the op costs 15 us more eagerly
        y = gemv(self.weight, input.reshape(-1))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*input.shape[:-1], self.weight.shape[0])


@functools.cache
def _gemv_class(cls: type) -> type:
    return type(f"Gemv{cls.__name__}", (GemvForward, cls), {})


_timings: dict[tuple, tuple[float, float]] = {}


def _timed(weight: torch.Tensor) -> tuple[float, float]:
    """(F.linear ms, torch.mv ms) for one row, on this weight; once per shape and dtype."""
    key = (tuple(weight.shape), weight.dtype)
    if key not in _timings:
        x = torch.randn(1, weight.shape[1]).to(weight.dtype)

        def measure():
            with torch.no_grad():
                return best_ms(lambda: F.linear(x, weight)), best_ms(lambda: torch.mv(weight, x[0]))

        _timings[key] = timings.remembered("linear or mv", key, measure)
    return _timings[key]


def _is_plain_dense(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, torch.nn.Linear)
        and not is_quantized_linear(module)
        and not isinstance(module, (GemvForward, KernelForward, PackedForward))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.is_floating_point()
        and weight.device.type == "cpu"
    )


def convert_dense_linears(model: torch.nn.Module) -> tuple[str, ...]:
    """Switch every plain dense Linear where ``mv`` wins at one row; one sentence per layer
    saying what was measured and chosen."""
    notes = []
    for name, module in model.named_modules():
        if not _is_plain_dense(module):
            continue
        linear_ms, mv_ms = _timed(module.weight)
        chosen = "torch.mv" if mv_ms < linear_ms else "F.linear"
        if mv_ms < linear_ms:
            module.__class__ = _gemv_class(type(module))
        out_features, in_features = module.weight.shape
        notes.append(
            f"{name} {out_features}x{in_features} {str(module.weight.dtype).removeprefix('torch.')}, not quantized: "
            f"{chosen} at one row (F.linear {linear_ms:.2f} ms, torch.mv {mv_ms:.2f} ms)"
        )
    return tuple(notes)


def clear() -> None:
    _timings.clear()
