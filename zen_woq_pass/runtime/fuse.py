"""Horizontal fusion: sibling projections that read one input (q/k/v, gate/up) share one kernel call.

A 4-bit call has a fixed cost (about 35 us on 2 threads) that dwarfs a small model's weights: on
SmolLM2's shapes q/k/v took 69 us as three calls and 35 us as one, gate/up 89 us and 72 us. So the
siblings' weights are concatenated along the output dim and planned as one layer (same chain, same
self-check), and held once. transformers' modeling code runs unchanged: the first sibling called
computes every sibling's output, and the others take theirs when called on the same input tensor
(on any other input, or on the same tensor edited in place since -- its ``_version`` moved -- they
compute again, so the answer never depends on the call order or on hooks; each thread has its own
hand-over). The input is held weakly and the pending outputs go with it, so a sibling never called
(cross-attention, layers sharing another's K/V) keeps no activations alive; the hand-over is no
part of a module's state, so a fused model deep-copies and pickles (the copy starts empty). Under
``torch.compile`` dynamo traces the same hand-over, so the graph holds one call per group (tested);
dynamo cannot branch on ``_version`` (an unbacked SymInt), so there the hand-over is by identity
within compiled code, and an output is taken only by the kind of code (compiled or eager) that
computed it. Inference tensors (``torch.inference_mode``) have no version counter: for them too
the hand-over is by identity alone.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import weakref
from typing import Any, cast

import torch

from zen_woq_pass.graph.layer import QuantizedLinear, QuantizedWeights
from zen_woq_pass.graph.match import NotRecoverable
from zen_woq_pass.planning import plan as plans
from zen_woq_pass.planning.options import DEFAULT, Options
from zen_woq_pass.runtime import layer_regions
from zen_woq_pass.runtime.convert import KernelForward, activation_dtype_of, adopt, describe_module, is_convertible, kernel_class

# children of one module that transformers' Llama-like models call on the same input
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _version(x: torch.Tensor) -> int:
    return -1 if x.is_inference() else x._version  # inference tensors count no versions


def _drop(outputs: list, _input_ref) -> None:
    outputs[:] = [None] * len(outputs)  # the input is gone: no call can take them


class PendingOutputs(threading.local):
    """Shared by one group's siblings, per thread: the last input computed (a weak reference), its
    ``_version`` then (None if computed in compiled code) and each sibling's output not yet taken,
    as one tuple, replaced whole (a weakref callback may clear the outputs from another thread)."""

    def __init__(self, columns: tuple[tuple[int, int], ...]):
        self.columns = columns
        self.entry: tuple[weakref.ref, int | None, list[torch.Tensor | None]] | None = None

    def __reduce__(self):
        return PendingOutputs, (self.columns,)  # per process and thread: a copy starts with none

    def zen_woq_trace_key(self) -> tuple:
        """What a trace of the group depends on (:func:`zen_woq_pass.runtime.layer_regions.structure`):
        its columns, not what is pending now."""
        return ("pending", self.columns)

    def take(self, index: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.entry is None:
            return None
        input_ref, version, outputs = self.entry
        if input_ref() is not x or outputs[index] is None:
            return None
        fresh = version is None if torch.compiler.is_compiling() else version == _version(x)
        if not fresh:  # edited in place since, or computed by the other kind of code
            self.entry = None
            return None
        output, outputs[index] = outputs[index], None
        if all(o is None for o in outputs):
            self.entry = None  # all taken: hold no activations between steps
        return output

    def keep(self, index: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor | None] = [y[..., start:stop] for start, stop in self.columns]
        if torch.compiler.is_compiling():
            self.entry = (weakref.ref(x), None, outputs)
        else:
            self.entry = (weakref.ref(x, functools.partial(_drop, outputs)), _version(x), outputs)
        return cast(torch.Tensor, self.take(index, x))  # just kept: there to take


class FusedForward(KernelForward):
    """Mixed in before a Linear class: one sibling of a fused group. Its buffers ``zen_woq_*``
    (shared by the group) compute every sibling's output; ``zen_woq_index`` says which is its own."""

    zen_woq_index: int
    zen_woq_pending: PendingOutputs
    zen_woq_fused_bias: torch.Tensor | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        mine = self.zen_woq_pending.take(self.zen_woq_index, input)
        if mine is not None:
            return mine
        y = self.zen_woq_call(input, self.zen_woq_fused_bias)
        return self.zen_woq_pending.keep(self.zen_woq_index, input, y)


def _concatenate(layers: list[QuantizedLinear], weights: list[QuantizedWeights], path: str) -> tuple[QuantizedLinear, QuantizedWeights] | None:
    """One layer whose output is the siblings' outputs side by side, or None when they differ in
    anything but out_features (input, groups, zero points, form, having a bias)."""
    first = layers[0]
    same: dict[str, Any] = {"out_features": 0, "module_path": ""}
    if any(dataclasses.replace(layer, **same) != dataclasses.replace(first, **same) for layer in layers):
        return None
    if first.has_g_idx:
        return None  # each sibling has its own column order
    fused_weights = QuantizedWeights(
        q=torch.cat([w.q for w in weights]),
        scale=torch.cat([w.scale for w in weights]),
        zero_point=torch.cat([cast(torch.Tensor, w.zero_point) for w in weights]) if first.has_zero_point else None,  # all alike, checked above
        g_idx=None,
    )
    fused_layer = dataclasses.replace(first, module_path=path, out_features=sum(layer.out_features for layer in layers))
    return fused_layer, fused_weights


def _fuse(parent_name: str, members: list[tuple[str, torch.nn.Linear]], options: Options, activation_dtype) -> bool:
    try:
        described = [describe_module(name, module, activation_dtype) for name, module in members]
    except NotRecoverable:
        return False  # each goes its own way, and its report row says why
    short = "+".join(name.rsplit(".", 1)[-1] for name, _ in members)
    fused = _concatenate([d[0] for d in described], [d[1] for d in described], f"{parent_name}.{{{short}}}")
    if fused is None:
        return False
    bias = torch.cat([module.bias.detach() for _, module in members]) if fused[0].has_bias else None
    plan = plans.decide(*fused, bias, options)
    if plan.kernel is None:
        return False
    assert plan.layer is not None  # decide's plans hold their layer
    sizes = [layer.out_features for layer, _ in described]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    columns = tuple((start, start + size) for start, size in zip(starts, sizes))
    pending = PendingOutputs(columns)
    for index, ((name, module), (layer, _)) in enumerate(zip(members, described)):
        share = layer.out_features / plan.layer.out_features
        decision = dataclasses.replace(
            plan.decision,
            module_path=name,
            out_features=layer.out_features,
            held_bytes=round(plan.decision.held_bytes * share),
            fused_with=short,
        )
        adopt(module, dataclasses.replace(plan, decision=decision))
        module.register_buffer("zen_woq_fused_bias", bias, persistent=False)
        # the ignore: mypy takes a class for not Hashable
        module.__class__ = kernel_class(type(module), plan.kernel, tuple(plan.constants), FusedForward)  # type: ignore[arg-type]
        module.zen_woq_index, module.zen_woq_pending = index, pending  # type: ignore[assignment]  # nn.Module's __setattr__ is typed Tensor | Module
    return True


def fuse_siblings(model: torch.nn.Module, options: Options, activation_dtype: torch.dtype | None = None) -> int:
    """Fuse every group of ``SIBLINGS`` whose members are all convertible and alike, and that one
    kernel takes as a whole; the rest is left for per-layer conversion (:func:`convert`, run
    after). Returns the groups fused."""
    if options.kernel == DEFAULT:
        return 0
    activation_dtype = activation_dtype or activation_dtype_of(model)
    fused = 0
    for parent_name, parent in model.named_modules():
        for names in SIBLINGS:
            members = [(f"{parent_name}.{n}", getattr(parent, n, None)) for n in names]
            if all(module is not None and is_convertible(module) for _, module in members):
                fused += _fuse(parent_name, cast("list[tuple[str, torch.nn.Linear]]", members), options, activation_dtype)  # convertible: Linears
    layer_regions.refresh_structures()  # the decoder layers that hold them changed
    return fused
