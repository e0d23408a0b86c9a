"""The pass: replace each quantized linear with the kernel its plan chose.

Before (what dynamo captures from a kept-compressed Linear)::

    weight_packed ─> >> & - ─> q ─┐
    weight_scale ─────────────────┴─> (q - zp) * scale ─> W ─> linear(x, W, b)

After (constants packed once per layer, shared by every graph; the compiled code only calls the kernel)::

    zen_woq_<layer>_weight, _scales[, _zero_points] (get_attr) ─> zentorch_woq_linear(x, ..., b)

A layer's plan (:mod:`zen_woq_pass.planning.plan`) is made the first time its weights are seen and read by
every later graph: the sub-graph is evaluated, the self-check run and the weights packed once per
layer, not once per graph. Layers on the default path are left as they are, for Inductor.

A graph may also call kernels with nothing left to match: modules that hold their plan already
(converted by ``optimize``, or by an earlier graph of this backend, which dynamo then recompiles).
Their constants reach the graph as inputs, and each constant remembers the decisions of the layers
that read it (:func:`remember`, weakly), so the graph's report lists those layers too.
"""

from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from zen_woq_pass.graph.match import Match, NotRecoverable, find_quantized_linears, recover
from zen_woq_pass.planning import plan as plans
from zen_woq_pass.planning import report as report_module
from zen_woq_pass.planning.options import Options
from zen_woq_pass.planning.report import LayerDecision, Report

# a kernel's constant (by identity, weakly) -> the decisions of the layers that read it (fused
# siblings share their constants)
_decisions_of = WeakIdKeyDictionary()


def remember(constants, decision: LayerDecision) -> None:
    """``constants`` (tensors) are what the layer ``decision`` describes calls its kernel on."""
    for tensor in constants:
        known = _decisions_of.get(tensor, ())
        if not any(d is decision for d in known):
            _decisions_of[tensor] = (*known, decision)


def remember_model(model: torch.nn.Module) -> None:
    """Remember the constants of every module of ``model`` that holds its plan (``zen_woq_decision``
    and its ``zen_woq_*`` buffers)."""
    for module in model.modules():
        decision = getattr(module, "zen_woq_decision", None)
        if isinstance(decision, LayerDecision):
            remember([t for name, t in module.named_buffers(recurse=False) if name.startswith("zen_woq_")], decision)


def _planned_before(example_inputs) -> list[LayerDecision]:
    """The decisions of the layers whose kernel constants the graph takes as inputs, in order."""
    decisions: list[LayerDecision] = []
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            for decision in _decisions_of.get(value, ()):
                if not any(d is decision for d in decisions):
                    decisions.append(decision)
    return decisions


def rewrite(gm: fx.GraphModule, example_inputs, options: Options) -> tuple[fx.GraphModule, Report, tuple, tuple]:
    """Rewrite ``gm`` in place. Returns it, the report, the indices of the graph inputs whose
    values were folded in (the compiled code is valid only for those same tensors), and the
    (source tensors, plan) of every replaced layer."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = dict(zip(placeholders, example_inputs))
    decisions, used, unpacking = [], [], set()
    folded: set[int] = set()
    for match in find_quantized_linears(gm, values):
        plan = _plan(gm, match, values, options)
        decisions.append(plan.decision)
        if plan.kernel is not None:
            unpacking |= _computing(match.weight)
            _splice(gm, match, plan)
            folded.update(placeholders.index(leaf) for leaf in match.constant_inputs if leaf.op == "placeholder")
            used.append((match.constant_values, plan))
            remember(plan.constants.values(), plan.decision)
    # Erase only the unpacking the kernels replaced, users first. FX's dead-code pass would also drop
    # in-place writes nobody reads, such as a static KV cache's update, here and (it recurses) in
    # the subgraphs of nested compile regions.
    for node in reversed(gm.graph.nodes):
        if node in unpacking and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    report_module.log(decisions)
    decisions += [d for d in _planned_before(example_inputs) if not any(d is mine for mine in decisions)]
    return gm, Report(options.kernel, tuple(decisions), _calls(gm)), tuple(sorted(folded)), tuple(used)


def _calls(gm: fx.GraphModule) -> tuple[str, ...]:
    """The targets ``gm`` calls, in order; a nested compile region's, each time it is called."""
    calls: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.higher_order.invoke_subgraph:
            calls += _calls(getattr(gm, node.args[0].target))
        elif node.op == "call_function":
            calls.append(str(node.target))
    return tuple(calls)


def _computing(weight: fx.Node) -> set[fx.Node]:
    """The nodes ``weight`` is computed from, less the graph's inputs."""
    found, todo = set(), [weight]
    while todo:
        node = todo.pop()
        if node not in found and node.op != "placeholder":
            found.add(node)
            todo.extend(node.all_input_nodes)
    return found


def _plan(gm, match: Match, values, options: Options) -> plans.LayerPlan:
    activation = match.activation.meta["example_value"]
    key = (options.kernel, activation.dtype, match.weights_require_grad, match.activation_requires_grad, match.bias is not None)

    def make():
        try:
            layer, weights = recover(gm, match)
        except NotRecoverable as error:
            return plans.refused(match.module_path, str(error))
        bias = values.get(match.bias) if match.bias is not None else None
        if match.bias is not None and bias is None:  # a computed bias: the self-check needs a value
            bias = torch.zeros(match.bias.meta["example_value"].shape, dtype=match.bias.meta["example_value"].dtype)
        return plans.decide(layer, weights, bias, options)

    return plans.cached(match.constant_values, key, make)


def _splice(gm: fx.GraphModule, match: Match, plan: plans.LayerPlan) -> None:
    assert plan.kernel is not None  # rewrite splices only layers given a kernel
    prefix = base = "zen_woq_" + re.sub(r"\W", "_", match.module_path)
    calls = 0
    while any(hasattr(gm, f"{prefix}_{name}") for name in plan.constants):  # a module called twice
        calls += 1
        prefix = f"{base}_call{calls}"
    with gm.graph.inserting_before(match.linear):
        nodes = {}
        for name, tensor in plan.constants.items():
            attr = f"{prefix}_{name}"
            gm.register_buffer(attr, tensor)
            nodes[name] = gm.graph.get_attr(attr)
        call = plan.kernel.emit(gm.graph, match.activation, nodes, match.bias)
    call.meta.update({k: v for k, v in match.linear.meta.items() if k in ("nn_module_stack", "stack_trace", "example_value")})
    match.linear.replace_all_uses_with(call)
    gm.graph.erase_node(match.linear)
