"""Dense Linears left unquantized (the lm_head): a faster one-row kernel, by a fixed rule.

At decode a Linear multiplies one row, and SmolLM2's tied bf16 head (49152x576, 57 MB) is half the
bytes read per token. Two ways beat a plain ``F.linear`` call there, from memory (the cache flushed
before each call, as a decode step meets the head; 2 threads):
- the package's ``packed-bf16`` kernel (:mod:`zen_woq_pass.kernels.packed_bf16`): the same bf16
  values held in 12 bits instead of 16, losslessly, so a quarter fewer bytes to read (AVX512-BF16
  CPUs, bf16 weights whose rows' exponents are close enough, which SmolLM2's are): 3.0-3.8 ms
  against ``torch.mv``'s 3.5-6.3 and ``F.linear``'s 5.4 on a Zen 4. It is used up to
  ``PACKED_MAX_ROWS`` rows; more rows go to ``F.linear`` on the bf16 weight, which stays;
- elsewhere ``torch.mv``: 4.2 ms against ``F.linear``'s 5.8 on a Xeon.
The rule takes the first that applies; it is not raced in the user's process: the three compute
different bits (packed-bf16 differs from ``F.linear`` in 3 of SmolLM2's 49152 outputs), and a race
made greedy text depend on the machine's load (issue 26). In a compiled graph ``mv`` is an opaque
op (``zen_woq::mv``): Inductor would otherwise fuse it into a C++ reduction of its own, which took
5.8 ms there (aten's ``mm`` 4.9 ms).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from zen_woq_pass.graph.keep_compressed import PackedForward
from zen_woq_pass.kernels import native, packed_bf16
from zen_woq_pass.runtime import layer_regions
from zen_woq_pass.runtime.convert import KernelForward, is_quantized_linear

PACKED_MAX_ROWS = 2  # in cache, 2 rows took 1.7 ms against F.linear's 2.0 ms, 4 rows 2.5 against 2.1


@torch.library.custom_op("zen_woq::mv", mutates_args=())
def mv(weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """``torch.mv``, kept whole by Inductor."""
    return torch.mv(weight, vector)


@mv.register_fake
def _(weight: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return weight.new_empty(weight.shape[0])


def _rebuilt(make_class, base: type) -> torch.nn.Module:
    """An empty module of ``make_class(base)``; pickle then sets its state."""
    cls = make_class(base)
    return cls.__new__(cls)


class _PicklesByBase:
    """A class made at run time from a Linear class pickles (and deep-copies) as what it was made
    from: pickle cannot find it by name."""

    _make_class = None  # the function that made the class

    def __reduce_ex__(self, protocol):
        return _rebuilt, (type(self)._make_class, type(self).__bases__[1]), self.__getstate__()


class GemvForward(_PicklesByBase):
    """Mixed in before a Linear class: one row through ``torch.mv``, anything else through F.linear."""

    weight: torch.Tensor  # the Linear's (declared for the type checker)
    bias: torch.Tensor | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.numel() != input.shape[-1]:
            return F.linear(input, self.weight, self.bias)
        gemv = mv if torch.compiler.is_compiling() else torch.mv  # the op costs 15 us more eagerly
        y = gemv(self.weight, input.reshape(-1))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*input.shape[:-1], self.weight.shape[0])


class PackedBf16Forward(_PicklesByBase):
    """Mixed in before a Linear class: up to ``PACKED_MAX_ROWS`` rows through the packed-bf16
    kernel (buffers ``zen_woq_packed``, ``zen_woq_tops``), anything else through F.linear."""

    weight: torch.Tensor  # the Linear's (declared for the type checker)
    bias: torch.Tensor | None
    zen_woq_packed: torch.Tensor
    zen_woq_tops: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.numel() // input.shape[-1]
        if rows > PACKED_MAX_ROWS or input.dtype != torch.bfloat16:
            return F.linear(input, self.weight, self.bias)
        x = input.reshape(rows, input.shape[-1]).contiguous()
        y = torch.ops.zen_woq_native.packed_bf16_linear(x, self.zen_woq_packed, self.zen_woq_tops, self.bias)
        return y.reshape(*input.shape[:-1], self.weight.shape[0])


@functools.cache
def _gemv_class(cls: type) -> type:
    return type(f"Gemv{cls.__name__}", (GemvForward, cls), {"_make_class": staticmethod(_gemv_class)})


@functools.cache
def _packed_class(cls: type) -> type:
    return type(f"PackedBf16{cls.__name__}", (PackedBf16Forward, cls), {"_make_class": staticmethod(_packed_class)})


def use_packed_bf16(module: torch.nn.Linear, packed: torch.Tensor, tops: torch.Tensor) -> None:
    """Make ``module`` compute through the packed-bf16 kernel on :func:`packed_bf16.pack`'s output
    (in place; its bf16 weight stays for more rows)."""
    module.register_buffer("zen_woq_packed", packed, persistent=False)
    module.register_buffer("zen_woq_tops", tops, persistent=False)
    module.__class__ = _packed_class(type(module))  # type: ignore[arg-type]  # mypy: a class is not Hashable


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


def why_not_packed(weight: torch.Tensor) -> str | None:
    """Why the rule does not give this weight the packed-bf16 kernel (None: it does)."""
    return native.unavailable_reason() or packed_bf16.why_not(weight)


def rule() -> str:
    """The rule in force here, in words (``zen-woq doctor``)."""
    packed = "torch.mv" if native.unavailable_reason() else "packed-bf16 where the weight packs, else torch.mv"
    return f"{packed} at one row, F.linear for more"


def convert_dense_linears(model: torch.nn.Module) -> tuple[str, ...]:
    """Switch every plain dense Linear to its one-row path by the rule above; one sentence per
    layer saying which and why."""
    notes = []
    for name, module in model.named_modules():
        if not _is_plain_dense(module):
            continue
        why_not = why_not_packed(module.weight)
        out_features, in_features = module.weight.shape
        note = f"{name} {out_features}x{in_features} {str(module.weight.dtype).removeprefix('torch.')}, not quantized: "
        if why_not:
            module.__class__ = _gemv_class(type(module))  # type: ignore[arg-type]  # mypy: a class is not Hashable
            note += f"torch.mv at one row, F.linear above (packed-bf16 not used: {why_not})"
        else:
            use_packed_bf16(module, *packed_bf16.pack(module.weight))
            note += (
                f"packed-bf16 up to {PACKED_MAX_ROWS} rows, F.linear above; holds "
                f"{module.zen_woq_packed.nbytes / 1e6:.1f} MB packed beside the bf16 weight"
            )
        notes.append(note)
    layer_regions.refresh_structures()  # the decoder layers that hold them changed
    return tuple(notes)
