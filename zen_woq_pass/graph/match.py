"""Find compressed-tensors quantized linears in a captured graph, by meaning, not by op sequence.

For every linear we slice out the sub-graph that computes its weight. When that sub-graph reads
only constants of this compile (module parameters and buffers) and some of them carry
compressed-tensors names (``weight_packed``, ``weight_scale``, ``weight_zero_point``,
``weight_g_idx``, or a float ``weight`` beside a scale: the fake-quant form), we

1. recover integer values, scales and zero points from those constants, and
2. run the sub-graph on them, here, at compile time, and accept the layer only if our own
   dequantization of the recovered values reproduces its output bit for bit.

So whatever ops a compressed-tensors version (or our own ``keep_compressed``) traces into, the
match holds exactly when the linear computes ``x @ dequantize(q, scale, zp).T + bias``.
"""

from __future__ import annotations

import dataclasses
import operator
import re
from typing import cast

import torch
import torch.fx as fx
import torch.nn.functional as F

from zen_woq_pass.graph import ct_format
from zen_woq_pass.graph.layer import FAKE_QUANT, PACKED, QuantizedLinear, QuantizedWeights

LINEAR_TARGETS = (torch._C._nn.linear, F.linear, torch.ops.aten.linear.default)
ROLES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape", "weight")
_ROLE_AT_END = re.compile(r"(" + "|".join(ROLES) + r")_*$")


class NotRecoverable(Exception):
    """The constants feeding a linear are not a usable compressed-tensors weight; says why."""


@dataclasses.dataclass
class Match:
    """A linear whose weight is computed from compressed-tensors constants (found cheaply;
    :func:`recover` reads the layer out of it, once per layer).

    ``constant_inputs`` are the graph inputs the weight is computed from, ``constant_values``
    their tensors in this compile: the compiled code is valid only while the same tensors are
    passed there.
    """

    linear: fx.Node
    weight: fx.Node
    module_path: str
    slice_nodes: tuple[fx.Node, ...]
    constant_inputs: tuple[fx.Node, ...]
    constant_values: tuple[torch.Tensor, ...]

    @property
    def activation(self) -> fx.Node:
        return cast(fx.Node, self.linear.args[0] if self.linear.args else self.linear.kwargs["input"])

    @property
    def bias(self) -> fx.Node | None:
        args = self.linear.args
        return cast("fx.Node | None", args[2] if len(args) > 2 else self.linear.kwargs.get("bias"))

    @property
    def weights_require_grad(self) -> bool:
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.constant_values)

    @property
    def activation_requires_grad(self) -> bool:
        return torch.is_grad_enabled() and self.activation.meta["example_value"].requires_grad


def find_quantized_linears(gm: fx.GraphModule, values: dict[fx.Node, object]) -> list[Match]:
    """Every linear of ``gm`` fed by compressed-tensors constants; ``values`` maps placeholders
    to this compile's example inputs (real tensors for parameters). Evaluates nothing."""
    matches = []
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in LINEAR_TARGETS:
            continue
        weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        if not isinstance(weight, fx.Node) or weight.op in ("placeholder", "get_attr"):
            continue  # a dense weight: not ours
        slice_nodes, leaves = _weight_slice(weight)
        if not ({"weight_packed", "weight_scale"} & {_role(leaf) for leaf in leaves}):
            continue  # some other computed weight: not compressed-tensors
        if not all(_is_constant(leaf, values) for leaf in leaves):
            continue  # weight depends on runtime inputs: not a constant quantized weight
        leaf_values = tuple(_value(leaf, gm, values) for leaf in leaves)
        matches.append(Match(node, weight, _module_path(node, weight), tuple(slice_nodes), tuple(leaves), leaf_values))
    return matches


def recover(gm: fx.GraphModule, match: Match) -> tuple[QuantizedLinear, QuantizedWeights]:
    """Run the weight's sub-graph on this compile's constants and read the layer out of its
    named constants, accepting it only if our dequantization reproduces the sub-graph bit for
    bit. Raises NotRecoverable with the reason."""
    dense = _evaluate(gm, match)
    tensors = {role: value for leaf, value in zip(match.constant_inputs, match.constant_values) if (role := _role(leaf))}
    activation = match.activation.meta["example_value"]
    return describe(
        match.module_path,
        tensors,
        dense,
        has_bias=match.bias is not None,
        activation_dtype=activation.dtype,
        weights_require_grad=match.weights_require_grad,
        activation_requires_grad=match.activation_requires_grad,
    )


def describe(module_path: str, tensors: dict[str, torch.Tensor], dense: torch.Tensor, **context):
    """(QuantizedLinear, QuantizedWeights) of one layer from its compressed-tensors tensors by
    role and ``dense``, the weight they compute; ``context``: has_bias, activation_dtype and the
    grad flags. Raises NotRecoverable."""
    form, num_bits, per_word, packed_dim, weights = _recover(tensors, dense)
    layer = QuantizedLinear(
        module_path=module_path,
        out_features=dense.shape[0],
        in_features=dense.shape[1],
        weight_form=form,
        num_bits=num_bits,
        values_per_word=per_word,
        packed_dim=packed_dim,
        num_groups=tensors["weight_scale"].shape[-1],
        has_zero_point=weights.zero_point is not None,
        has_g_idx=weights.g_idx is not None,
        **context,
    )
    return layer, weights


def _weight_slice(weight: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The nodes computing ``weight`` (in graph order) and the graph inputs they read."""
    seen: set[fx.Node] = set()
    stack = [weight]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    leaves = [n for n in seen if n.op in ("placeholder", "get_attr")]
    order = {n: i for i, n in enumerate(weight.graph.nodes)}
    return sorted((n for n in seen if n not in leaves), key=order.__getitem__), sorted(leaves, key=order.__getitem__)


def _role(leaf: fx.Node) -> str | None:
    found = _ROLE_AT_END.search(str(leaf.target))
    return found.group(1) if found else None


def _is_constant(leaf: fx.Node, values: dict[fx.Node, object]) -> bool:
    """Parameters and buffers (dynamo marks them static) and graph attributes are constants."""
    if leaf.op == "get_attr":
        return True
    static = "_dynamo_static_input_type" in leaf.meta.get("tensor_dict", {})
    return static or isinstance(values.get(leaf), torch.nn.Parameter)


def _value(leaf: fx.Node, gm: fx.GraphModule, values: dict[fx.Node, object]) -> torch.Tensor:
    value = operator.attrgetter(cast(str, leaf.target))(gm) if leaf.op == "get_attr" else values[leaf]  # a get_attr's target: a str
    return cast(torch.Tensor, value)


def _module_path(linear: fx.Node, weight: fx.Node) -> str:
    """``model.layers.0.self_attn.q_proj``, from dynamo's module stack of the linear."""
    stack = linear.meta.get("nn_module_stack") or weight.meta.get("nn_module_stack")
    path = list(stack.values())[-1][0] if stack else ""
    return re.sub(r"^L\['\w+'\]\.?", "", path) or "<root>"


def _evaluate(gm: fx.GraphModule, match: Match) -> torch.Tensor:
    """Run the weight's sub-graph on this compile's constants."""
    graph = fx.Graph()
    env = {leaf: graph.placeholder(f"leaf_{i}") for i, leaf in enumerate(match.constant_inputs)}
    for node in match.slice_nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
    graph.output(env[match.weight])
    with torch.no_grad():
        dense = fx.GraphModule(gm, graph)(*match.constant_values)
    if not isinstance(dense, torch.Tensor) or dense.dim() != 2:
        raise NotRecoverable("the weight sub-graph does not produce a 2-D weight")
    return dense


def _recover(tensors: dict[str, torch.Tensor], dense: torch.Tensor):
    """(form, num_bits, values_per_word, packed_dim, QuantizedWeights) from the named constants,
    checked against ``dense``, the weight the graph computes. Raises NotRecoverable."""
    out_features, in_features = dense.shape
    scale = tensors.get("weight_scale")
    if scale is None:
        raise NotRecoverable("no weight_scale among the weight's constants")
    if scale.dim() != 2 or scale.shape[0] != out_features:
        raise NotRecoverable(f"weight_scale has shape {tuple(scale.shape)}, expected [{out_features}, groups]")
    if not torch.isfinite(scale).all():
        raise NotRecoverable("weight_scale holds NaN or Inf")
    g_idx = tensors.get("weight_g_idx")
    if g_idx is None and in_features % scale.shape[-1]:
        raise NotRecoverable(f"in_features {in_features} is not divisible by the {scale.shape[-1]} scale groups")
    if g_idx is not None and (g_idx.shape != (in_features,) or g_idx.min() < 0 or g_idx.max() >= scale.shape[-1]):
        raise NotRecoverable(f"weight_g_idx is not a map of {in_features} columns to {scale.shape[-1]} groups")
    if "weight_packed" in tensors:
        form, num_bits, per_word, packed_dim, q = _unpack(tensors["weight_packed"], out_features, in_features)
        zero_point = _packed_zero_point(tensors.get("weight_zero_point"), num_bits, scale.shape)
    elif "weight" in tensors:
        form, per_word, packed_dim = FAKE_QUANT, None, None
        zero_point = _plain_zero_point(tensors.get("weight_zero_point"), scale.shape)
        num_bits, q = _round_to_grid(dense, scale, zero_point, g_idx)
    else:
        raise NotRecoverable("neither weight_packed nor a float weight among the weight's constants")
    if zero_point is not None and not zero_point.any():
        zero_point = None  # an all-zero zero point is the symmetric scheme
    ours = ct_format.dequantize(q, scale, zero_point, g_idx).to(dense.dtype)
    if not torch.equal(ours, dense):
        diff = (ours.float() - dense.float()).abs().max().item()
        raise NotRecoverable(f"the weight sub-graph is not compressed-tensors dequantization of its constants (max |diff| {diff:.3g})")
    return form, num_bits, per_word, packed_dim, QuantizedWeights(q, scale, zero_point, g_idx)


def _unpack(packed: torch.Tensor, out_features: int, in_features: int):
    if packed.dtype != torch.int32:
        raise NotRecoverable(f"weight_packed is stored as {packed.dtype}, expected int32")
    if packed.dim() != 2:
        raise NotRecoverable(f"weight_packed is {packed.dim()}-D, expected 2-D")
    if packed.shape[0] != out_features:
        raise NotRecoverable(
            f"weight_packed {tuple(packed.shape)} is packed along the output dim (AWQ layout), compressed-tensors GPTQ packs along the input dim"
        )
    words = packed.shape[1]
    widths = [b for b in range(1, 9) if -(-in_features * b // 32) == words]
    if not widths:
        raise NotRecoverable(f"weight_packed has {words} int32 columns, which fits no bit width for {in_features} inputs")
    num_bits = widths[0]
    if 32 % num_bits:
        raise NotRecoverable(f"{num_bits}-bit values straddle int32 words")
    q = ct_format.unpack_weight(packed, num_bits, in_features)
    return PACKED, num_bits, 32 // num_bits, 1, q


def _packed_zero_point(zero_point, num_bits, scale_shape):
    if zero_point is None:
        return None
    out_features, groups = scale_shape
    rows = -(-out_features * num_bits // 32)
    if zero_point.dtype != torch.int32 or tuple(zero_point.shape) != (rows, groups):
        raise NotRecoverable(
            f"weight_zero_point is {zero_point.dtype} {tuple(zero_point.shape)}, expected int32 [{rows}, {groups}] packed along the output dim"
        )
    return ct_format.unpack_zero_point(zero_point, num_bits, out_features)


def _plain_zero_point(zero_point, scale_shape):
    if zero_point is None:
        return None
    if tuple(zero_point.shape) != tuple(scale_shape):
        raise NotRecoverable(f"weight_zero_point has shape {tuple(zero_point.shape)}, expected {tuple(scale_shape)}")
    if zero_point.is_floating_point() and not torch.equal(zero_point, zero_point.round()):
        raise NotRecoverable("weight_zero_point holds non-integer values")
    if zero_point.float().abs().max() > 128:  # compare in float: int8 would wrap 128 to -128
        raise NotRecoverable("weight_zero_point is out of the 8-bit range")
    return zero_point.to(torch.int8)


def _round_to_grid(dense, scale, zero_point, g_idx):
    """The fake-quant form: the graph's weight is (q - zp) * scale; read q back off it.

    Exact: |q - zp| <= 255 and the product was rounded once, so the rounding error is far
    below half a step. The bit width is the one the values actually span.
    """
    groups = g_idx.long() if g_idx is not None else torch.arange(dense.shape[1]) // (dense.shape[1] // scale.shape[1])
    steps = dense.float() / scale.float()[:, groups]
    if zero_point is not None:
        steps = steps + zero_point.float()[:, groups]
    if not torch.isfinite(steps).all():
        raise NotRecoverable("weight / weight_scale is not finite (zero scales?)")
    q = steps.round()
    low, high = int(q.min().item()), int(q.max().item())
    num_bits = next((b for b in range(1, 9) if -(1 << (b - 1)) <= low and high < 1 << (b - 1)), None)
    if num_bits is None:
        raise NotRecoverable(f"fake-quant values span [{low}, {high}], more than 8 bits")
    return num_bits, q.to(torch.int8)
