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

import torch
import torch.nn.functional as F

from zen_woq_pass import ct_format

logger = logging.getLogger(__name__)



class PackedForward:
    """Mixed in before a Linear class: unpack, dequantize and multiply on every call.

    A class, not a ``forward`` patched onto the instance (what compressed-tensors does): dynamo
    treats instance-patched forwards as dynamic modules and mis-binds them on a root module.
    """

    zen_woq_num_bits: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        q = ct_format.unpack_weight(self.weight_packed, self.zen_woq_num_bits, self.in_features)
        zero_point = getattr(self, "weight_zero_point", None)
        if zero_point is not None:
            zero_point = ct_format.unpack_zero_point(zero_point, self.zen_woq_num_bits, self.out_features)
        weight = ct_format.dequantize(q, self.weight_scale, zero_point, getattr(self, "weight_g_idx", None))
        return F.linear(input, weight.to(input.dtype), self.bias)


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


def keep_compressed(model: torch.nn.Module) -> torch.nn.Module:
    """Stop compressed-tensors' decompress-on-first-forward; compute from packed weights instead.

    Idempotent, in place, returns ``model``. Packed tensors are inference constants: their
    ``requires_grad`` is cleared. Layers whose bit width does not divide 32 (3, 5, 6, 7 bits:
    values straddle words) are decompressed by compressed-tensors itself, with a log line.
    Raises ``ValueError`` naming the layer when it is already decompressed.
    """
    if _remove_decompress_hook(model):
        logger.info("zen_woq: removed compressed-tensors' decompress-on-first-forward hook")
    for name, module in model.named_modules():
        if isinstance(module, PackedForward) or not hasattr(module, "weight_packed"):
            continue
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, torch.nn.Linear) or scheme is None or scheme.weights is None:
            raise ValueError(f"{name}: has weight_packed but is not a compressed-tensors quantized Linear")
        num_bits = scheme.weights.num_bits
        if 32 % num_bits:
            from compressed_tensors.compressors import decompress_module

            logger.info("zen_woq: %s: %d-bit values straddle int32 words; decompressing it", name, num_bits)
            decompress_module(module)
            continue
        for tensor_name in ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx"):
            tensor = getattr(module, tensor_name, None)
            if tensor is not None:
                tensor.requires_grad_(False)
        module.zen_woq_num_bits = num_bits
        module.__dict__.pop("forward", None)  # compressed-tensors' instance-patched forward
        module.__class__ = _packed_class(type(module))
    return model
