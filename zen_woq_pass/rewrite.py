"""The pass: replace each quantized linear with the first kernel of the chain that proves itself.

Before (what dynamo captures from a kept-compressed Linear)::

    weight_packed ─> >> & - ─> q ─┐
    weight_scale ─────────────────┴─> (q - zp) * scale ─> W ─> linear(x, W, b)

After (constants packed here, once; the compiled code only calls the kernel)::

    zen_woq_<layer>_weight, _scales[, _zero_points] (get_attr) ─> zentorch_woq_linear(x, ..., b)

Unmatched or rejected linears are left as they are, for Inductor's default path.
"""

from __future__ import annotations

import logging
import re

import torch
import torch.fx as fx

from zen_woq_pass import packed_constants, selfcheck
from zen_woq_pass.match import Match, find_quantized_linears
from zen_woq_pass.options import DEFAULT, Options
from zen_woq_pass.report import DEFAULT_PATH, LayerDecision, Report

logger = logging.getLogger(__name__)


def rewrite(gm: fx.GraphModule, example_inputs, options: Options) -> tuple[fx.GraphModule, Report, tuple[int, ...]]:
    """Rewrite ``gm`` in place. Returns it, the report, and the indices of the graph inputs whose
    values were folded in (the compiled code is valid only for those same tensors)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    decisions, folded, module_bytes = [], set(), 0
    for match in find_quantized_linears(gm, values):
        kernel, reasons = _replace(gm, match, values, options)
        decisions.append(_decision(match, kernel, reasons))
        if kernel is not None:
            folded.update(placeholders.index(leaf) for leaf in match.constant_inputs if leaf.op == "placeholder")
            module_bytes += sum(t.nbytes for t in match.constant_values)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    for decision in decisions:
        logger.info("zen_woq: %s -> %s%s", decision.module_path, decision.kernel, f" ({decision.reason})" if decision.reasons else "")
    constant_bytes = sum(b.nbytes for name, b in gm.named_buffers() if name.startswith("zen_woq_"))
    return gm, Report(options.kernel, decisions, gm, module_bytes, constant_bytes), tuple(sorted(folded))


def _replace(gm, match: Match, values, options: Options):
    """Try each kernel on one layer; on the first that passes, splice it in. -> (kernel | None, reasons)."""
    if match.layer is None:
        return None, (match.reason,)
    bias = values.get(match.bias) if match.bias is not None else None
    if match.bias is not None and bias is None:
        bias = match.bias.meta["example_value"]  # a computed bias: the self-check needs a value
        bias = torch.zeros(bias.shape, dtype=bias.dtype)
    reasons = []
    if options.kernel == DEFAULT:
        reasons.append("kernel='default' was asked for")
    for kernel in options.kernels:
        reason = kernel.platform_reason(options.forced) or kernel.layer_reason(match.layer)
        if reason is None:
            key = (kernel.name, match.layer.activation_dtype)
            constants = packed_constants.packed(match.constant_values, key, lambda: kernel.pack(match.layer, match.weights))
            reason = selfcheck.self_check(kernel, match.layer, match.weights, constants, bias)
        if reason is not None:
            reasons.append(f"{kernel.name}: {reason}")
            continue
        _splice(gm, match, kernel, constants)
        return kernel, tuple(reasons)
    return None, tuple(reasons)


def _splice(gm: fx.GraphModule, match: Match, kernel, constants: dict[str, torch.Tensor]) -> None:
    prefix = base = "zen_woq_" + re.sub(r"\W", "_", match.module_path)
    calls = 0
    while any(hasattr(gm, f"{prefix}_{name}") for name in constants):  # a module called twice
        calls += 1
        prefix = f"{base}_call{calls}"
    with gm.graph.inserting_before(match.linear):
        nodes = {}
        for name, tensor in constants.items():
            attr = f"{prefix}_{name}"
            gm.register_buffer(attr, tensor)
            nodes[name] = gm.graph.get_attr(attr)
        call = kernel.emit(gm.graph, match.activation, nodes, match.bias)
    call.meta.update({k: v for k, v in match.linear.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value")})
    match.linear.replace_all_uses_with(call)
    gm.graph.erase_node(match.linear)


def _decision(match: Match, kernel, reasons) -> LayerDecision:
    layer = match.layer
    return LayerDecision(
        module_path=match.module_path,
        out_features=layer and layer.out_features,
        in_features=layer and layer.in_features,
        group_size=layer and layer.group_size,
        has_zero_point=layer and layer.has_zero_point,
        weight_form=layer and layer.weight_form,
        kernel=kernel.name if kernel is not None else DEFAULT_PATH,
        reasons=tuple(reasons),
    )
