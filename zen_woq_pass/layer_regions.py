"""The decode step's decoder layers traced once: dynamo traces the first layer and stamps it out.

Why: tracing was most of a warm first ``generate`` with ``compile=True`` (8-9 s of 12-14 on
SmolLM2's 30 layers), and every layer traces to the same graph but for its weights and its slot of
the KV cache. ``torch.compiler.nested_compile_region`` traces a function once and reuses the trace
for calls on other weights; for transformers' layers as they are it cannot, since each indexes the
cache by its own ``layer_idx``, a Python constant. So each layer calls the region with its own
cache tensors, and inside it the layer's attention sees a one-layer cache that ignores the index.

Dynamo would check a reuse with the guards of the first trace, and those hold the index, so the
region's hash says instead when two layers trace alike: the same classes, non-tensor attributes,
tensor shapes and dtypes in every submodule, the layer index left out (:func:`structure`). Any
object it does not know (a hook, a per-layer helper) makes a layer its own.

Dynamo keeps the regions in the graph, so that Inductor also compiles one layer once, for all; its
C++ wrapper cannot call such a region, so the step runs from Python. With ``cpp_wrapper=True`` dynamo
inlines them back once traced, and Inductor compiles every layer (the README has what each gave).
"""

from __future__ import annotations

import functools
import inspect

import torch
from transformers.cache_utils import StaticCache, StaticLayer

from zen_woq_pass.fuse import PendingOutputs

# attributes that differ between layers without changing what a layer traces to here
PER_LAYER = frozenset({"layer_idx", "zen_woq_layer_idx", "zen_woq_structure", "zen_woq_decision"})
_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


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
        if type(slot) is not StaticLayer or not slot.is_initialized or not isinstance(slot.cumulative_length, torch.Tensor):
            return self.zen_woq_layer_forward(hidden_states, *args, past_key_values=past_key_values, **kwargs)
        return _region(self, hidden_states, slot.keys, slot.values, slot.cumulative_length, **kwargs)


@functools.cache
def _region_class(cls: type) -> type:
    return type(f"Region{cls.__name__}", (RegionForward, cls), {"zen_woq_layer_forward": cls.forward})


def _attribute_key(value):
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return tuple(value)
    if isinstance(value, PendingOutputs):
        return ("pending", value.columns)
    text = repr(value)  # a config or a quantization scheme shows its fields
    if " at 0x" in text:
        return ("object", id(value))  # shared, or the layer is its own
    return (type(value), text)


def structure(layer: torch.nn.Module) -> int | None:
    """What the layer's trace depends on but its tensors' values and its index, as a hash; None
    where a module has hooks (their effect cannot be compared)."""
    parts = []
    for name, module in layer.named_modules():
        if any(getattr(module, hooks, None) for hooks in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")):
            return None
        attributes = sorted(
            (key, _attribute_key(value))
            for key, value in vars(module).items()
            if not key.startswith("_") and key not in PER_LAYER
        )
        tensors = [
            (kind, key, tuple(t.shape), t.dtype, t.stride())
            for kind, named in (("p", module._parameters), ("b", module._buffers))
            for key, t in named.items()
            if t is not None
        ]
        parts.append((name, type(module), tuple(attributes), tuple(tensors)))
    return hash(tuple(parts))


def _layer_index(layer: torch.nn.Module) -> int | None:
    indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
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


def _returns_a_tensor(cls: type) -> bool:
    """A region must return tensors (else dynamo raises at compile time); transformers 5's decoder
    layers say they return one."""
    return inspect.signature(cls.forward).return_annotation in (torch.Tensor, "torch.Tensor")


def trace_layers_once(model: torch.nn.Module) -> int:
    """Make the model's decoder layers share one trace under compile (in place). Returns how many
    layers reuse another's trace."""
    layers = decoder_layers(model)
    keys = {}
    for layer in layers:
        key = structure(layer)
        if key is None or isinstance(layer, RegionForward) or not _returns_a_tensor(type(layer)):
            continue
        layer.zen_woq_layer_idx, layer.zen_woq_structure = _layer_index(layer), key
        layer.__class__ = _region_class(type(layer))
        keys[key] = keys.get(key, 0) + 1
    return sum(count - 1 for count in keys.values())


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
