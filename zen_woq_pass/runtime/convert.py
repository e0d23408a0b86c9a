"""Give each quantized Linear its plan, in the module itself: one copy of the weights, at 4 bits.

:func:`convert` reads every compressed-tensors Linear of a model -- kept packed, decompressed by
transformers' first forward, or in the fake-quant form right after calibration -- decides its
kernel once (:mod:`zen_woq_pass.planning.plan`), and makes the module call that kernel on the plan's
constants, held as the module's buffers; the checkpoint's tensors are dropped. The module stays a
Linear of its class, usable eagerly and by any compile, and dynamo traces its forward into the
kernel call with no graph break and nothing left to match: one graph serves every layer of a kind.
Inference only: the model can no longer be saved as a compressed-tensors checkpoint.
"""

from __future__ import annotations

import functools
from typing import Callable, cast

import torch

from zen_woq_pass.graph.keep_compressed import PACKED_TENSOR_NAMES, PackedForward, owner
from zen_woq_pass.graph.match import NotRecoverable, describe
from zen_woq_pass.kernels import KERNELS
from zen_woq_pass.kernels.base import Kernel
from zen_woq_pass.planning import plan as plans
from zen_woq_pass.planning import report as report_module
from zen_woq_pass.planning.options import Options
from zen_woq_pass.planning.report import LayerDecision, Report
from zen_woq_pass.runtime import layer_regions

# compressed-tensors' tensors on a Linear, besides the dense ``weight`` of the unpacked forms
CHECKPOINT_TENSOR_NAMES = (*PACKED_TENSOR_NAMES, "weight_shape")


class KernelForward:
    """Mixed in before a Linear class: the layer's kernel on its constants (buffers ``zen_woq_*``).

    Kernel, call target and constant names are class attributes, constants to dynamo, so the
    forward traces to one kernel call."""

    zen_woq_kernel: Kernel
    zen_woq_constant_names: tuple[str, ...]
    zen_woq_target: Callable[..., torch.Tensor]
    zen_woq_eager_target: Callable[..., torch.Tensor]
    zen_woq_decision: LayerDecision
    bias: torch.Tensor | None  # the Linear's (declared for the type checker)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.zen_woq_call(input, self.bias)

    def zen_woq_call(self, input: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        constants = {name: getattr(self, f"zen_woq_{name}") for name in self.zen_woq_constant_names}
        target = self.zen_woq_target if torch.compiler.is_compiling() else self.zen_woq_eager_target
        return target(*self.zen_woq_kernel.arguments(input, constants, bias))

    def __reduce_ex__(self, protocol):
        """Pickled (and deep-copied) as what :func:`kernel_class` made its class from, which pickle
        cannot find by name."""
        cls = type(self)
        kernel = cls.zen_woq_kernel
        kernel = kernel.name if KERNELS.get(kernel.name) is kernel else kernel  # the chain's by name
        made_from = (_base_class(cls), kernel, cls.zen_woq_constant_names, cls.__bases__[0])
        return _rebuilt, made_from, self.__getstate__()


def _rebuilt(base: type, kernel: Kernel | str, names: tuple[str, ...], forward: type):
    """An empty module of the class :func:`kernel_class` makes (``kernel``: a kernel, or the name
    of one in ``KERNELS``); pickle then sets its state."""
    cls: type[torch.nn.Module] = kernel_class(base, KERNELS[kernel] if isinstance(kernel, str) else kernel, names, forward)
    return cls.__new__(cls)


def _base_class(cls: type) -> type:
    return next(c for c in cls.__mro__ if not issubclass(c, (PackedForward, KernelForward)))


@functools.cache
def kernel_class(cls: type, kernel: Kernel, names: tuple[str, ...], forward: type = KernelForward) -> type:
    """``cls`` (less any forward we mixed in before) calling ``kernel`` through ``forward``."""
    base = _base_class(cls)
    attributes = {
        "zen_woq_kernel": kernel,
        "zen_woq_target": staticmethod(kernel.target),
        "zen_woq_eager_target": staticmethod(kernel.eager_target or kernel.target),
        "zen_woq_constant_names": names,
    }
    prefix = forward.__name__.removesuffix("Forward").replace("Kernel", "")
    return type(f"{prefix}{kernel.name.title().replace('-', '')}{base.__name__}", (forward, base), attributes)


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """A compressed-tensors weight-only quantized Linear (activation quantization, W8A8 and the like,
    lives in the forward we would replace: such layers are left to compressed-tensors)."""
    scheme = getattr(module, "quantization_scheme", None)
    return (
        isinstance(module, torch.nn.Linear)
        and scheme is not None
        and scheme.weights is not None
        and scheme.input_activations is None
        and scheme.output_activations is None
    )


def _tensors(module) -> dict[str, torch.Tensor]:
    """The layer's compressed-tensors tensors by role: packed, or a dense ``weight`` (decompressed
    by transformers, or calibrated: the fake-quant form)."""
    names: tuple[str, ...] = ("weight_packed",) if isinstance(module, PackedForward) else ("weight",)
    names += ("weight_scale", "weight_zero_point", "weight_g_idx")
    return {name: t for name in names if (t := getattr(module, name, None)) is not None}


def _dense_weight(module) -> torch.Tensor:
    """The weight the layer computes with."""
    if isinstance(module, PackedForward):
        return module.dequantized_weight()
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    with torch.no_grad():  # on the grid: the identity once decompressed
        zero_point = getattr(module, "weight_zero_point", None)
        return fake_quantize(module.weight, module.weight_scale, zero_point, module.quantization_scheme.weights)


def describe_module(name: str, module: torch.nn.Module, activation_dtype: torch.dtype):
    """(QuantizedLinear, QuantizedWeights) of a compressed-tensors Linear. Raises NotRecoverable."""
    return describe(
        name,
        _tensors(module),
        _dense_weight(module),
        has_bias=module.bias is not None,
        activation_dtype=activation_dtype,
        weights_require_grad=False,
        activation_requires_grad=False,
    )


def plan_module(name: str, module: torch.nn.Module, options: Options, activation_dtype: torch.dtype) -> plans.LayerPlan:
    """The module's plan, made once per (weights, options, activation dtype)."""

    def make():
        try:
            layer, weights = describe_module(name, module, activation_dtype)
        except NotRecoverable as error:
            return plans.refused(name, str(error))
        return plans.decide(layer, weights, module.bias, options)

    sources = tuple(_tensors(module).values())
    key = (options.kernel, activation_dtype, False, False, module.bias is not None)
    return plans.cached(sources, key, make)


def adopt(module: torch.nn.Module, plan: plans.LayerPlan, keep_weight: bool = False) -> None:
    """Make ``module`` run ``plan`` and empty the checkpoint's tensors (in place: code compiled
    before still finds the attributes it reads); ``keep_weight`` leaves a dense ``weight`` that
    another module shares (a tied lm_head's is the input embedding)."""
    for name in (*CHECKPOINT_TENSOR_NAMES, *(() if keep_weight else ("weight",))):
        tensor = getattr(module, name, None)
        if isinstance(tensor, torch.Tensor):
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    for name, tensor in plan.constants.items():
        module.register_buffer(f"zen_woq_{name}", tensor, persistent=False)
    module.__dict__.pop("forward", None)  # compressed-tensors' instance-patched forward
    module.__class__ = kernel_class(type(module), plan.kernel, tuple(plan.constants))  # type: ignore[arg-type]  # mypy: a class is not Hashable
    module.zen_woq_decision = plan.decision  # type: ignore[assignment]  # nn.Module's __setattr__ is typed Tensor | Module


def adopt_compiled(used) -> None:
    """After the pass replaced layers in a graph: let their kept modules hold the plans too, so
    the model keeps one copy (the next call recompiles once, onto the converted modules)."""
    for sources, plan in used:
        module = next((m for t in sources if (m := owner(t)) is not None), None)
        if isinstance(module, PackedForward):
            adopt(module, plan)
    layer_regions.refresh_structures()  # the decoder layers that hold them changed


def is_convertible(module: torch.nn.Module) -> bool:
    """A compressed-tensors Linear still holding its checkpoint's tensors (not converted yet)."""
    return is_quantized_linear(module) and any(hasattr(module, n) for n in ("weight_packed", "weight_scale"))


def activation_dtype_of(model: torch.nn.Module) -> torch.dtype:
    """The dtype a model's Linears are planned for when the caller names none: the model's own
    (one rule, so fused groups and single layers are planned alike)."""
    return cast(torch.dtype, getattr(model, "dtype", torch.bfloat16))


def convert(model: torch.nn.Module, options: Options, activation_dtype: torch.dtype | None = None) -> Report:
    """Plan and adopt every compressed-tensors Linear of ``model`` not converted yet (sibling
    groups :func:`zen_woq_pass.runtime.fuse.fuse_siblings` converted are reported as they are);
    layers left on the default path (``kernel="default"``, or nothing recoverable) keep their own
    tensors and forward."""
    activation_dtype = activation_dtype or activation_dtype_of(model)
    decisions = []
    for name, module in model.named_modules():
        if isinstance(module, KernelForward):
            decisions.append(module.zen_woq_decision)
            continue
        if not is_convertible(module):
            continue
        plan = plan_module(name, module, options, activation_dtype)
        if plan.kernel is not None:
            adopt(module, plan)
        decisions.append(plan.decision)
    layer_regions.refresh_structures()  # the decoder layers that hold them changed
    report_module.log(decisions)
    return Report(options.kernel, tuple(decisions))
