"""One decision per layer, made once and held once: the kernel and its packed constants.

vLLM's ``process_weights_after_loading`` and torchao's ``quantize_`` decide a layer's kernel once,
when its weights are known, and keep only what that kernel reads. So do we. A plan is made the
first time a layer's weights are seen -- from the module by :func:`zen_woq_pass.optimize`, or from
a captured graph by the pass -- and holds the constants of the kernel that passed its self-check,
nothing else: a packing whose self-check failed is dropped on the spot, so a refused kernel can
never run. Every later graph, the converted module and the report read the plan. Plans are keyed
weakly by the layer's first source tensor: they go when the model goes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

from zen_woq_pass.graph.layer import QuantizedLinear, QuantizedWeights
from zen_woq_pass.kernels.base import Kernel
from zen_woq_pass.planning import selfcheck
from zen_woq_pass.planning.options import DEFAULT, Options
from zen_woq_pass.planning.report import DEFAULT_PATH, LayerDecision

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerPlan:
    """What runs for one layer: ``kernel`` on ``constants`` ({name: tensor}), or the default
    path (``kernel`` None: nothing replaced, the module's own tensors and math)."""

    decision: LayerDecision
    layer: QuantizedLinear | None
    kernel: Kernel | None = None
    constants: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def _decision(module_path: str, layer: QuantizedLinear | None, kernel, reasons, constants) -> LayerDecision:
    return LayerDecision(
        module_path=module_path,
        out_features=layer.out_features if layer is not None else None,
        in_features=layer.in_features if layer is not None else None,
        group_size=layer.group_size if layer is not None else None,
        has_zero_point=layer.has_zero_point if layer is not None else None,
        weight_form=layer.weight_form if layer is not None else None,
        kernel=kernel.name if kernel is not None else DEFAULT_PATH,
        reasons=tuple(reasons),
        held_bytes=sum(t.nbytes for t in constants.values()),
    )


def refused(module_path: str, reason: str) -> LayerPlan:
    """A layer whose weights could not be read as compressed-tensors: the default path."""
    return LayerPlan(_decision(module_path, None, None, (reason,), {}), None)


def decide(
    layer: QuantizedLinear,
    weights: QuantizedWeights,
    bias: torch.Tensor | None,
    options: Options,
    skip: tuple[str, ...] = (),
) -> LayerPlan:
    """Walk the chain (less the kernels named in ``skip``) in its order: the first kernel that can
    run here, takes the layer and passes its self-check on the layer's own packed constants wins
    (a forced kernel first, then the dense fallback). The order is a fixed rule, never a timing: the
    kernels compute different bits, and a race made the same model's numbers depend on how busy
    the machine was when it ran (issue 26). Each "no" is kept as a sentence."""
    reasons = ["kernel='default' was asked for"] if options.kernel == DEFAULT else []
    for kernel in (k for k in options.kernels if k.name not in skip):
        reason = kernel.platform_reason(options.forced) or kernel.layer_reason(layer)
        if reason is None:
            try:
                constants = kernel.pack(layer, weights)
            except Exception as error:  # a kernel that cannot pack this layer is a "no", not a crash
                reason = f"packing raised {type(error).__name__}: {error}"
            else:
                reason = selfcheck.self_check(kernel, layer, weights, constants, bias)
        if reason is None:
            return LayerPlan(_decision(layer.module_path, layer, kernel, reasons, constants), layer, kernel, constants)
        reasons.append(f"{kernel.name}: {reason}")
    return LayerPlan(_decision(layer.module_path, layer, None, reasons, {}), layer)


# first source tensor (by identity, weakly) -> {key: LayerPlan}
_plans = WeakIdKeyDictionary()


def cached(sources: tuple[torch.Tensor, ...], key: tuple, make: Callable[[], LayerPlan]) -> LayerPlan:
    """The plan for these source tensors and ``key`` (options, activation dtype, ...), made once
    while they live."""
    per_source = _plans.setdefault(sources[0], {})
    full_key = (*key, tuple(id(t) for t in sources[1:]))
    if full_key not in per_source:
        per_source[full_key] = make()
    return per_source[full_key]


def held_bytes() -> int:
    """Bytes of all kernel constants that plans hold in this process (shared storages once)."""
    storages = {}
    for per_source in _plans.values():
        for plan in per_source.values():
            for tensor in plan.constants.values():
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def clear() -> None:
    _plans.clear()
