"""Keep a compressed-tensors model packed in memory, with a forward dynamo can trace.

transformers loads a pack-quantized checkpoint with its weights still packed, then a forward
pre-hook (``model.ct_decompress_hook``) decompresses the whole model to dense bf16 on the first
call -- under torch.compile too. :func:`keep_compressed` removes that hook and gives every
packed Linear a forward that computes from ``weight_packed`` / ``weight_scale`` /
``weight_zero_point`` on each call (by giving it a subclass of its class). In eager mode that forward *is* the reference: the same
dequantization compressed-tensors performs, bit for bit. Under ``backend="zen_woq"`` the pass
recognises it and replaces it with a kernel that reads the 4-bit weights directly.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import cast

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from zen_woq_pass.graph import ct_format, varying_sizes
from zen_woq_pass.runtime import layer_regions

logger = logging.getLogger(__name__)

PACKED_TENSOR_NAMES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx")

# a kept module's packed tensor -> (the module, the model it is kept in), both weakly: the pass
# sees tensors, not modules
_owners = WeakIdKeyDictionary()


def owner(tensor: torch.Tensor) -> torch.nn.Module | None:
    """The kept module that holds ``tensor``, if any."""
    found = _owners.get(tensor)
    return found[0]() if found is not None else None


def kept_model(tensor: torch.Tensor) -> torch.nn.Module | None:
    """The model ``keep_compressed`` was called on, if ``tensor`` is the packed weight of one of
    its modules that still computes from it (no kernel adopted yet)."""
    found = _owners.get(tensor)
    return found[1]() if found is not None and isinstance(found[0](), PackedForward) else None


class PackedForward:
    """Mixed in before a Linear class: unpack, dequantize and multiply on every call.

    A class, not a ``forward`` patched onto the instance (what compressed-tensors does): dynamo
    treats instance-patched forwards as dynamic modules and mis-binds them on a root module.
    """

    zen_woq_num_bits: int
    # the Linear's and compressed-tensors' attributes it reads (declared for the type checker)
    in_features: int
    out_features: int
    bias: torch.nn.Parameter  # as torch.nn.Linear types it (None where the layer has no bias)
    weight_packed: torch.Tensor
    weight_scale: torch.Tensor

    def dequantized_weight(self, scale_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense [out, in] weight, computed in ``scale_dtype`` (the checkpoint's scale dtype by
        default, as compressed-tensors does; float32 gives the exact reference)."""
        q = ct_format.unpack_weight(self.weight_packed, self.zen_woq_num_bits, self.in_features)
        zero_point = getattr(self, "weight_zero_point", None)
        if zero_point is not None:
            zero_point = ct_format.unpack_zero_point(zero_point, self.zen_woq_num_bits, self.out_features)
        scale = self.weight_scale if scale_dtype is None else self.weight_scale.to(scale_dtype)
        return ct_format.dequantize(q, scale, zero_point, getattr(self, "weight_g_idx", None))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.dequantized_weight().to(input.dtype), self.bias)


class PackedLinear(PackedForward, torch.nn.Linear):
    """``torch.nn.Linear`` kept packed (importable, so such models pickle)."""


@functools.cache
def _packed_class(cls: type) -> type:
    if cls is torch.nn.Linear:
        return PackedLinear
    return type(f"Packed{cls.__name__}", (PackedForward, cls), {})


def _remove_decompress_hook(model: torch.nn.Module) -> bool:
    hook = getattr(model, "ct_decompress_hook", None)
    if hook is None:
        return False
    hook.remove()
    delattr(model, "ct_decompress_hook")
    return True


def check_packed_tensors(name: str, module: torch.nn.Linear, args) -> None:
    """Raise ``ValueError`` naming the layer when its packed tensors do not fit its shape and its
    quantization args (``scheme.weights``): a bad checkpoint must fail here, with a reason, never
    deep in a kernel or as silent garbage."""
    out_features, in_features, num_bits = module.out_features, module.in_features, args.num_bits
    packed, scale = cast(torch.Tensor, module.weight_packed), cast(torch.Tensor, module.weight_scale)
    zero_point, g_idx = getattr(module, "weight_zero_point", None), getattr(module, "weight_g_idx", None)
    words = -(-in_features * num_bits // 32)
    problems = []
    if packed.dtype != torch.int32:
        problems.append(f"weight_packed is stored as {packed.dtype}, expected int32")
    if tuple(packed.shape) != (out_features, words):
        problems.append(f"weight_packed has shape {tuple(packed.shape)}, expected ({out_features}, {words})")
    shape = getattr(module, "weight_shape", None)
    if shape is not None and shape.numel() == 2 and tuple(shape.tolist()) != (out_features, in_features):
        problems.append(f"weight_shape says {tuple(shape.tolist())}, the layer is ({out_features}, {in_features})")
    if scale.dim() != 2 or scale.shape[0] != out_features:
        problems.append(f"weight_scale has shape {tuple(scale.shape)}, expected ({out_features}, groups)")
    elif args.strategy == "group" and scale.shape[1] != -(-in_features // args.group_size):
        problems.append(
            f"weight_scale has {scale.shape[1]} groups, group size {args.group_size} over {in_features} inputs makes "
            f"{-(-in_features // args.group_size)}"
        )
    elif args.strategy == "group" and g_idx is None and in_features % args.group_size:
        problems.append(
            f"in_features {in_features} is not a multiple of group size {args.group_size}, so the last group is partial "
            "(written with bypass_divisibility_checks?); compressed-tensors cannot dequantize such a layer either"
        )
    elif g_idx is None and in_features % scale.shape[1]:
        problems.append(f"in_features {in_features} is not divisible into {scale.shape[1]} scale groups")
    if scale.is_floating_point() and not torch.isfinite(scale).all():
        problems.append("weight_scale holds NaN or Inf")
    if zero_point is not None and scale.dim() == 2:
        rows = -(-out_features * num_bits // 32)
        if zero_point.dtype != torch.int32 or tuple(zero_point.shape) != (rows, scale.shape[1]):
            problems.append(f"weight_zero_point is {zero_point.dtype} {tuple(zero_point.shape)}, expected int32 ({rows}, {scale.shape[1]})")
    if g_idx is not None and scale.dim() == 2:
        if g_idx.shape != (in_features,) or g_idx.min() < 0 or g_idx.max() >= scale.shape[1]:
            problems.append(f"weight_g_idx is not a map of {in_features} input columns to {scale.shape[1]} groups")
    if problems:
        raise ValueError(f"{name or type(module).__name__}: bad compressed-tensors checkpoint: " + "; ".join(problems))


def _refuse_decompressed(model: torch.nn.Module) -> None:
    """A model that transformers already decompressed (it ran a forward) has nothing packed left
    to keep: say so and what to do, rather than compile it densely without a word."""
    decompressed = [
        name
        for name, module in model.named_modules()
        if getattr(getattr(module, "quantization_status", None), "value", None) == "decompressed" and not hasattr(module, "weight_packed")
    ]
    if decompressed:
        raise ValueError(
            f"{decompressed[0]} (and {len(decompressed) - 1} more): transformers already decompressed this model to dense "
            "weights on its first forward, so there is nothing packed to keep. Call keep_compressed(model) right after "
            "from_pretrained, before running the model; zen_woq_pass.optimize(model) takes it as it is (it re-reads "
            "decompressed layers at 4 bits)."
        )


def keep_compressed(model: torch.nn.Module) -> torch.nn.Module:
    """Stop compressed-tensors' decompress-on-first-forward; compute from packed weights instead.

    It also readies the model for ``torch.compile`` (eager calls unchanged): its decoder layers
    share one trace, and ``generate`` uses a static KV cache unless its config names another
    (:func:`_compile_friendly`). Idempotent, in place, returns ``model``. Packed tensors are inference constants: their
    ``requires_grad`` is cleared. Layers whose bit width does not divide 32 (3, 5, 6, 7 bits:
    values straddle words) are decompressed by compressed-tensors itself, with a log line.
    Raises ``ValueError`` naming the layer when its packed tensors do not fit it (a bad
    checkpoint), when a module holds ``weight_packed`` but is no compressed-tensors Linear, or
    when transformers already decompressed the model.
    """
    if _remove_decompress_hook(model):
        logger.info("zen_woq: removed compressed-tensors' decompress-on-first-forward hook")
    _refuse_decompressed(model)
    for name, module in model.named_modules():
        if hasattr(module, "zen_woq_num_bits") or not hasattr(module, "weight_packed"):
            continue  # kept already (or released), or not packed
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, torch.nn.Linear) or scheme is None or scheme.weights is None:
            raise ValueError(f"{name}: has weight_packed but is not a compressed-tensors quantized Linear")
        num_bits = scheme.weights.num_bits
        check_packed_tensors(name, module, scheme.weights)
        if 32 % num_bits:
            from compressed_tensors.compressors import decompress_module

            logger.info("zen_woq: %s: %d-bit values straddle int32 words; decompressing it", name, num_bits)
            decompress_module(module)
            continue
        for tensor_name in PACKED_TENSOR_NAMES:
            tensor = getattr(module, tensor_name, None)
            if tensor is not None:
                tensor.requires_grad_(False)
        module.zen_woq_num_bits = num_bits
        _owners[module.weight_packed] = (weakref.ref(module), weakref.ref(model))
        module.__dict__.pop("forward", None)  # compressed-tensors' instance-patched forward
        module.__class__ = _packed_class(type(module))  # type: ignore[arg-type]  # mypy: a class is not Hashable
    varying_sizes.mark_on_every_call(model)
    _compile_friendly(model)
    return model


def _compile_friendly(model: torch.nn.Module) -> None:
    """What makes a compile of the model fast, in place; eager calls are unchanged: its decoder
    layers traced once for all (:mod:`zen_woq_pass.runtime.layer_regions`), and ``generate`` on a
    static KV cache where its config names none, as transformers advises for ``torch.compile``
    (a dynamic cache's layers cannot share a trace)."""
    reused = layer_regions.trace_layers_once(model)
    config = getattr(model, "generation_config", None)
    if reused and config is not None and config.cache_implementation is None:
        config.cache_implementation = "static"
        logger.info("zen_woq: %d decoder layers reuse another's trace under compile; generate uses a static KV cache", reused)
