"""Dense Linears left unquantized (the lm_head): a faster one-row kernel, where one is measured faster.

At decode a Linear multiplies one row, and SmolLM2's tied bf16 head (49152x576, 57 MB) is half the
bytes read per token. Three ways to compute it, chosen per shape by a race from memory (the cache
flushed before each call: a decode step reads the head after the rest of the model's weights):
- ``F.linear`` (a GEMM call);
- ``torch.mv``: on the Xeon this was first written on it took 4.2 ms from memory where ``F.linear``
  took 5.8 ms, with the same bits (both accumulate in fp32 and round once);
- the package's ``packed-bf16`` kernel (:mod:`zen_woq_pass.kernels.packed_bf16`): the same bf16
  values held in 12 bits instead of 16, losslessly, so a quarter fewer bytes to read (AVX512-BF16
  CPUs, bf16 weights whose rows' exponents are close enough, which SmolLM2's are). It is used up to
  ``PACKED_MAX_ROWS`` rows; more rows go to ``F.linear`` on the bf16 weight, which stays.
Each shape is timed once per machine (:mod:`zen_woq_pass.timings`), on its own weight, and the
report says what was measured and chosen. In a compiled graph ``mv`` is an opaque op
(``zen_woq::mv``): Inductor would otherwise fuse it into a C++ reduction of its own, which took
5.8 ms there (aten's ``mm`` 4.9 ms).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from zen_woq_pass import native, timings
from zen_woq_pass.convert import KernelForward, is_quantized_linear
from zen_woq_pass.keep_compressed import PackedForward
from zen_woq_pass.kernels import packed_bf16
from zen_woq_pass.measure import best_ms_from_memory

PACKED_MAX_ROWS = 2  # in cache, 2 rows took 1.7 ms against F.linear's 2.0 ms, 4 rows 2.5 against 2.1


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


class PackedBf16Forward:
    """Mixed in before a Linear class: up to ``PACKED_MAX_ROWS`` rows through the packed-bf16
    kernel (buffers ``zen_woq_packed``, ``zen_woq_tops``), anything else through F.linear."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // input.shape[-1]
        if rows > PACKED_MAX_ROWS or input.dtype != torch.bfloat16:
            return F.linear(input, self.weight, self.bias)
        x = input.reshape(rows, input.shape[-1]).contiguous()
        y = torch.ops.zen_woq_native.packed_bf16_linear(x, self.zen_woq_packed, self.zen_woq_tops, self.bias)
        return y.reshape(*input.shape[:-1], self.weight.shape[0])


@functools.cache
def _gemv_class(cls: type) -> type:
    return type(f"Gemv{cls.__name__}", (GemvForward, cls), {})


@functools.cache
def _packed_class(cls: type) -> type:
    return type(f"PackedBf16{cls.__name__}", (PackedBf16Forward, cls), {})


def use_packed_bf16(module: torch.nn.Linear, packed: torch.Tensor, tops: torch.Tensor) -> None:
    """Make ``module`` compute through the packed-bf16 kernel on :func:`packed_bf16.pack`'s output
    (in place; its bf16 weight stays for more rows)."""
    module.register_buffer("zen_woq_packed", packed, persistent=False)
    module.register_buffer("zen_woq_tops", tops, persistent=False)
    module.__class__ = _packed_class(type(module))


_timings: dict[tuple, dict[str, float]] = {}


def _timed(weight: torch.Tensor, packed: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None) -> dict[str, float]:
    """ms per way to compute one row from memory, on this weight; once per shape and dtype.
    ``packed`` gives the packed-bf16 kernel's tensors (cached: packed once, and only if needed)."""
    key = (tuple(weight.shape), weight.dtype, packed is not None)
    if key not in _timings:
        x = torch.randn(1, weight.shape[1]).to(weight.dtype)
        ways = {"F.linear": lambda: F.linear(x, weight), "torch.mv": lambda: torch.mv(weight, x[0])}
        if packed is not None:
            ways["packed-bf16"] = lambda: torch.ops.zen_woq_native.packed_bf16_linear(x, *packed(), None)

        def measure():
            if packed is not None:
                packed()  # packed before any clock runs
            return best_ms_from_memory(list(ways.values()))

        _timings[key] = dict(zip(ways, timings.remembered("one dense row from memory", key, measure)))
    return _timings[key]


def _is_plain_dense(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, torch.nn.Linear)
        and not is_quantized_linear(module)
        and not isinstance(module, (GemvForward, PackedBf16Forward, KernelForward, PackedForward))
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.is_floating_point()
        and weight.device.type == "cpu"
    )


def convert_dense_linears(model: torch.nn.Module) -> tuple[str, ...]:
    """Switch every plain dense Linear to the way measured fastest at one row; one sentence per
    layer saying what was measured and chosen."""
    notes = []
    for name, module in model.named_modules():
        if not _is_plain_dense(module):
            continue
        why_not_packed = native.unavailable_reason() or packed_bf16.why_not(module.weight)
        packed = None if why_not_packed else functools.cache(functools.partial(packed_bf16.pack, module.weight))
        ms = _timed(module.weight, packed)
        chosen = min(ms, key=ms.get)
        if chosen == "torch.mv":
            module.__class__ = _gemv_class(type(module))
        elif chosen == "packed-bf16":
            use_packed_bf16(module, *packed())
        out_features, in_features = module.weight.shape
        measured = ", ".join(f"{way} {t:.2f} ms" for way, t in ms.items())
        rows = f"up to {PACKED_MAX_ROWS} rows" if chosen == "packed-bf16" else "one row"
        note = f"{name} {out_features}x{in_features} {str(module.weight.dtype).removeprefix('torch.')}, not quantized: "
        note += f"{chosen} at {rows} (from memory: {measured})"
        if chosen == "packed-bf16":
            note += f"; holds {module.zen_woq_packed.nbytes / 1e6:.1f} MB packed beside the bf16 weight"
        if why_not_packed:
            note += f"; packed-bf16 not tried: {why_not_packed}"
        notes.append(note)
    return tuple(notes)


def clear() -> None:
    _timings.clear()
