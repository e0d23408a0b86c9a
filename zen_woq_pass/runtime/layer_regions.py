"""The decode step's decoder layers traced once: dynamo traces the first layer and stamps it out.

Why: tracing was most of a warm first ``generate`` with ``compile=True`` (8-9 s of 12-14 on
SmolLM2's 30 layers), and every layer traces to the same graph but for its weights and its slot of
the KV cache. ``torch.compiler.nested_compile_region`` traces a function once and reuses the trace
for calls on other weights; for transformers' layers as they are it cannot, since each indexes the
cache by its own ``layer_idx``, a Python constant. So each layer calls the region with its own
cache tensors, and inside it the layer's attention sees a one-layer cache that ignores the index.

Dynamo would check a reuse with the guards of the first trace, and those hold the index, so the
region's hash says instead when two layers trace alike: the same classes, non-tensor attributes
(private ones too), tensor shapes and dtypes in every submodule, the layer index left out
(:func:`structure`). Any object it does not know (a hook, a per-layer helper) makes a layer its own.
The hash is kept on the layer (dynamo traces a reuse hash function, and cannot trace one that
reads configs) and taken again wherever the package changes layers' modules
(:func:`refresh_structures`): a layer converted since (its Linears given their kernels, fused, one
refused) must not reuse a trace of what it was, or of a layer converted otherwise.
Leaving the index out is right only while the layer's code reads it for nothing but the cache's
``update`` (which the region's one-layer cache ignores): that is checked by construction, on the
source of every method of the layer's classes and of the functions they call
(:func:`why_not_shared`); a layer whose code reads it otherwise, or whose source cannot be read,
keeps its own forward (dynamo traces it on its own), with a log line saying why.

Dynamo keeps the regions in the graph, so that Inductor also compiles one layer once, for all; its
C++ wrapper cannot call such a region, so the step runs from Python. With ``cpp_wrapper=True`` dynamo
inlines them back once traced, and Inductor compiles every layer (the README has what each gave).
"""

from __future__ import annotations

import ast
import functools
import inspect
import logging
import textwrap
import types
import weakref
from typing import cast

import torch
from transformers.cache_utils import StaticCache, StaticLayer

logger = logging.getLogger(__name__)

# attributes that differ between layers without changing what a layer traces to here
PER_LAYER = frozenset({"layer_idx", "zen_woq_layer_idx", "zen_woq_structure", "zen_woq_decision"})
# of those, the one the layer's own code reads: only as an argument of the cache's ``update``
INDEX = "layer_idx"
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)
# what every nn.Module holds (its tensors, children and hooks are compared apart)
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module()))
# code whose reads of the index we know: torch's, and this package's (the region itself)
_KNOWN_CODE = ("torch", "zen_woq_pass", "builtins", "typing", "functools", "contextlib", "abc")


class OneLayerCache:
    """A layer's slot of a static cache, as its attention calls it inside the region."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, cumulative_length: torch.Tensor):
        self.keys, self.values, self.cumulative_length = keys, values, cumulative_length
        self.is_initialized, self.device = True, keys.device

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        return StaticLayer.update(self, key_states, value_states, *args, **kwargs)


def _layer_step(layer, hidden_states, keys, values, cumulative_length, **kwargs):
    cache = OneLayerCache(keys, values, cumulative_length)
    return layer.zen_woq_layer_forward(hidden_states, past_key_values=cache, **kwargs)


_region = torch.compiler.nested_compile_region(
    _layer_step, max_reuse_entries=1024, reuse_hash_fn=lambda layer, *args, **kwargs: layer.zen_woq_structure
)
_region_layers: weakref.WeakSet = weakref.WeakSet()  # every layer made a region in this process


class RegionForward:
    """Mixed in before a decoder layer's class: under compile, with a static cache, the layer runs
    as the shared region on its own cache slot; anywhere else, as it is."""

    zen_woq_layer_idx: int
    zen_woq_structure: int

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        slot = None
        if torch.compiler.is_compiling() and not args and isinstance(past_key_values, StaticCache):
            layers = past_key_values.layers
            slot = layers[self.zen_woq_layer_idx] if self.zen_woq_layer_idx < len(layers) else None
            if type(slot) is StaticLayer and not slot.is_initialized:
                _allocate(slot, cast(torch.nn.Module, self), hidden_states)
        if type(slot) is not StaticLayer or not slot.is_initialized or not isinstance(slot.cumulative_length, torch.Tensor):
            return self.zen_woq_layer_forward(hidden_states, *args, past_key_values=past_key_values, **kwargs)
        return _region(self, hidden_states, slot.keys, slot.values, slot.cumulative_length, **kwargs)

    def __reduce_ex__(self, protocol):
        """Pickled (and deep-copied) as the plain layer: its class is made at run time, and its
        structure hash was taken of this layer's objects. The copy's own decode step traces its
        layers again (:func:`trace_layers_once`)."""
        plain = type(self).__bases__[1]  # _region_class: (RegionForward, the layer's class)
        state = {k: v for k, v in self.__getstate__().items() if k not in ("zen_woq_layer_idx", "zen_woq_structure")}
        return _plain_layer, (plain,), state


def _allocate(slot: StaticLayer, layer: torch.nn.Module, hidden_states: torch.Tensor) -> None:
    """A prompt's call, the slot still empty: allocate it as the layer's first ``update`` would, so
    that the prompt runs as the shared region too (else dynamo traces every layer of a prompt). Only
    where the layer's attention says its key/value heads and head size; else the layer runs as it is."""
    attention = getattr(layer, "self_attn", None)
    config = getattr(attention, "config", None)
    heads, head_dim = getattr(config, "num_key_value_heads", None), getattr(attention, "head_dim", None)
    if isinstance(heads, int) and isinstance(head_dim, int) and getattr(config, "v_head_dim", None) in (None, head_dim):
        empty = hidden_states.new_zeros(hidden_states.shape[0], heads, 0, head_dim)
        slot.lazy_initialization(empty, empty)


def _plain_layer(cls: type[torch.nn.Module]) -> torch.nn.Module:
    return cls.__new__(cls)


@functools.cache
def _region_class(cls: type[torch.nn.Module]) -> type:
    return type(f"Region{cls.__name__}", (RegionForward, cls), {"zen_woq_layer_forward": cls.forward})


def _attribute_key(value, reprs: dict[int, str]):
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return tuple(value)
    if callable(getattr(value, "zen_woq_trace_key", None)):  # fused siblings' hand-over (fuse.PendingOutputs)
        return value.zen_woq_trace_key()
    text = reprs.get(id(value))
    if text is None:  # a config or a quantization scheme shows its fields (a config, shared, once per pass)
        text = reprs[id(value)] = repr(value)
    if " at 0x" in text:
        return ("object", id(value))  # shared, or the layer is its own
    return (type(value), text)


def structure(layer: torch.nn.Module, reprs: dict[int, str] | None = None) -> int | None:
    """What the layer's trace depends on but its tensors' values and its index, as a hash; None
    where a module has hooks (their effect cannot be compared). ``reprs``: the objects' ``repr`` by
    ``id``, shared by one pass over many layers (a model's config is one object: its ``repr``, a
    copy and a JSON dump, took 90 % of a pass when made per layer)."""
    reprs = {} if reprs is None else reprs
    parts = []
    for name, module in layer.named_modules():
        if any(getattr(module, hooks, None) for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")):
            return None
        attributes = sorted(
            (key, _attribute_key(value, reprs)) for key, value in vars(module).items() if key not in _MODULE_INTERNALS and key not in PER_LAYER
        )
        tensors = [
            (kind, key, tuple(t.shape), t.dtype, t.stride())
            for kind, named in (("p", module._parameters), ("b", module._buffers))
            for key, t in named.items()
            if t is not None
        ]
        parts.append((name, type(module), tuple(attributes), tuple(tensors)))
    return hash(tuple(parts))


def _is_update_argument(node: ast.AST, parents: dict) -> bool:
    """``node`` is an argument of a call to some ``.update(...)`` (a cache's)."""
    parent = parents.get(node)
    if isinstance(parent, ast.keyword):
        parent = parents.get(parent)
    return isinstance(parent, ast.Call) and node is not parent.func and isinstance(parent.func, ast.Attribute) and parent.func.attr == "update"


def _index_reads(tree: ast.AST) -> list[int]:
    """Lines where ``tree`` reads the layer index but as an argument of ``.update(...)``
    (``getattr(x, "layer_idx")`` counts as a read)."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        read = (isinstance(node, ast.Attribute) and node.attr == INDEX and isinstance(node.ctx, ast.Load)) or (
            isinstance(node, ast.Constant) and node.value == INDEX
        )
        if read and not _is_update_argument(node, parents):
            lines.append(cast(ast.expr, node).lineno)  # read: an Attribute or a Constant
    return lines


def _known(function) -> bool:
    module = getattr(function, "__module__", None) or ""
    return module.split(".")[0] in _KNOWN_CODE


def _called_functions(function: types.FunctionType) -> list[types.FunctionType]:
    """The plain Python functions ``function`` names as globals or holds in its closure."""
    names: set[str] = set()
    codes = [function.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    found = [function.__globals__.get(name) for name in sorted(names)]
    found += [cell.cell_contents for cell in function.__closure__ or () if _cell_filled(cell)]
    return [f for f in found if isinstance(f, types.FunctionType)]


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:
        return False
    return True


@functools.cache
def _own_reason(function: types.FunctionType) -> str | None:
    """Why ``function``'s own code may read the layer index for more than the cache's update."""
    name = getattr(function, "__qualname__", repr(function))
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError) as error:
        return f"the source of {name} cannot be read ({type(error).__name__}), so its use of {INDEX} cannot be checked"
    lines = _index_reads(tree)
    if lines:
        first = function.__code__.co_firstlineno + lines[0] - 1
        return f"{name} ({function.__code__.co_filename}:{first}) reads {INDEX} for more than the cache's update"
    return None


CALL_DEPTH = 3  # how many calls down from a method the functions it names are read


@functools.cache
def _why_not(method: types.FunctionType) -> str | None:
    """Why ``method``, or a function it names (``CALL_DEPTH`` calls down), may read the layer
    index for more than the cache's update; None when none does."""
    seen, level = set(), [method]
    for _ in range(CALL_DEPTH + 1):
        following = []
        for function in level:
            function = inspect.unwrap(function)
            if function in seen or _known(function):
                continue
            seen.add(function)
            reason = _own_reason(function)
            if reason:
                return reason
            following += _called_functions(function)
        level = following
    return None


def _methods(cls: type) -> list[types.FunctionType]:
    found: list[types.FunctionType] = []
    for value in vars(cls).values():
        value = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if isinstance(value, property):
            found += [cast(types.FunctionType, f) for f in (value.fget, value.fset) if f is not None]
        elif isinstance(value, types.FunctionType):
            found.append(value)
    return found


@functools.cache
def _why_not_class(cls: type) -> str | None:
    for klass in cls.__mro__:
        if _known(klass):
            continue
        for method in _methods(klass):
            reason = _why_not(method)
            if reason:
                return reason
    return None


def why_not_shared(layer: torch.nn.Module) -> str | None:
    """Why ``layer`` may not run another layer's trace though their :func:`structure` is equal:
    the code of one of its modules' classes (every method in their MROs but torch's and ours, and
    the functions those call) reads the layer index for more than the cache's ``update``, or
    cannot be read. None when it may."""
    for cls in dict.fromkeys(type(module) for module in layer.modules()):
        reason = _why_not_class(cls)  # type: ignore[arg-type]  # mypy: a class is not Hashable
        if reason:
            return reason
    return None


def _layer_index(layer: torch.nn.Module) -> int | None:
    indices = {cast(int, m.layer_idx) for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
    return indices.pop() if len(indices) == 1 else None


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The longest ``ModuleList`` of one class whose members each hold one ``layer_idx``."""
    candidates = [
        list(modules)
        for modules in model.modules()
        if isinstance(modules, torch.nn.ModuleList)
        and len(modules) > 1
        and len({type(m) for m in modules}) == 1
        and all(_layer_index(m) is not None for m in modules)
    ]
    return max(candidates, key=len, default=[])


def _returns_a_tensor(cls: type[torch.nn.Module]) -> bool:
    """A region must return tensors (else dynamo raises at compile time); transformers 5's decoder
    layers say they return one."""
    return inspect.signature(cls.forward).return_annotation in (torch.Tensor, "torch.Tensor")


def trace_layers_once(model: torch.nn.Module) -> int:
    """Make the model's decoder layers share one trace under compile (in place; again on a model
    whose layers do already). Returns how many layers reuse another's trace as they are now."""
    keys: dict[int, int] = {}  # structure -> layers
    refused: dict[str, int] = {}  # reason -> layers
    reprs: dict[int, str] = {}
    for layer in decoder_layers(model):
        key = None  # a region layer's structure is taken again: its modules may have changed since
        if not isinstance(layer, RegionForward):
            reason = why_not_shared(layer) if _returns_a_tensor(type(layer)) else "its forward returns more than a tensor"
            if reason:
                refused[reason] = refused.get(reason, 0) + 1
                continue
            key = structure(layer, reprs)
            if key is None:
                continue
            layer.zen_woq_layer_idx = _layer_index(layer)  # type: ignore[assignment]  # nn.Module's __setattr__ is typed Tensor | Module
            layer.__class__ = _region_class(type(layer))  # type: ignore[arg-type]  # mypy: a class is not Hashable
            _region_layers.add(layer)
        key = _take_structure(cast(RegionForward, layer), reprs, key)
        keys[key] = keys.get(key, 0) + 1
    for reason, count in refused.items():
        if reason not in _logged:
            _logged.add(reason)
            logger.warning("zen_woq: %d decoder layer(s) traced each on its own under compile: %s", count, reason)
    return sum(count - 1 for count in keys.values())


_logged: set[str] = set()  # the reasons :func:`trace_layers_once` logged (once per process)


def _take_structure(layer: RegionForward, reprs: dict[int, str], key: int | None = None) -> int:
    """Store the layer's :func:`structure` (``key`` where the caller just took it) as its region's
    reuse hash (its own identity where it has hooks: it shares no trace) and return it."""
    key = structure(cast(torch.nn.Module, layer), reprs) if key is None else key
    layer.zen_woq_structure = hash(("own", id(layer))) if key is None else key
    return layer.zen_woq_structure


def refresh_structures() -> None:
    """Take every region layer's structure again: the package just changed modules, which may sit
    in them (``convert``, ``fuse_siblings``, a graph's layers adopting their kernels)."""
    reprs: dict[int, str] = {}
    for layer in list(_region_layers):
        _take_structure(layer, reprs)


def keep_cache_shapes_static(past_key_values) -> None:
    """Static cache dims but the length: a size that the step specializes inside a region after
    dynamo bound it on entry breaks the region's reuse (torch 2.13), and heads and head size are
    the model's constants anyway."""
    layers = getattr(past_key_values, "layers", None)
    if not layers or getattr(layers[0], "keys", None) is None or hasattr(layers[0].keys, "_dynamo_static_indices"):
        return
    for layer in layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 4:
                torch._dynamo.mark_static(tensor, 1)
                torch._dynamo.mark_static(tensor, 3)
