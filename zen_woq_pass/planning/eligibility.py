"""Which quantized linears a 4-bit GPTQ kernel may take: vLLM's zentorch predicate, with reasons.

Each check returns a sentence a user can act on, or None. Kernel-independent rules first
(:func:`gptq_int4_reason`), then what zentorch's WOQ kernel adds (:func:`zentorch_reason`).
"""

from __future__ import annotations

import torch

from zen_woq_pass.graph.layer import PACKED, QuantizedLinear


def gptq_int4_reason(layer: QuantizedLinear) -> str | None:
    """4-bit, 8 values per int32, packed along the input dim, no g_idx, groups dividing K, frozen."""
    if layer.weight_form == PACKED and layer.values_per_word != 8:
        return f"{layer.num_bits}-bit weights ({layer.values_per_word} values per int32); 4-bit kernels take 8 per int32"
    if layer.num_bits > 4:
        return f"{layer.num_bits}-bit weights; 4-bit kernels take at most 4 bits"
    return grouped_frozen_reason(layer)


def grouped_frozen_reason(layer: QuantizedLinear) -> str | None:
    """What any weight-only kernel here needs beyond its bit width: packed along the input dim, no
    g_idx, groups dividing K, no gradients."""
    if layer.weight_form == PACKED and layer.packed_dim != 1:
        return "packed along the output dim (AWQ layout); GPTQ packs along the input dim"
    if layer.has_g_idx:
        return "activation re-ordering (weight_g_idx) is not supported"
    if layer.group_size is None:
        return f"in_features {layer.in_features} is not divisible by {layer.num_groups} groups"
    if layer.weights_require_grad:
        return "weights require grad in this compile (training?); compile under torch.no_grad() or inference_mode()"
    if layer.activation_requires_grad:
        return "activations require grad (training?): the weight-only kernels have no backward"
    return None


def zentorch_reason(layer: QuantizedLinear) -> str | None:
    """zentorch WOQ: bf16 activations only; even group size (ZenDNN)."""
    if layer.activation_dtype != torch.bfloat16:
        return f"activations are {layer.activation_dtype}; zentorch WOQ takes bfloat16 only"
    assert layer.group_size is not None  # callers ask gptq_int4_reason first, which refuses None
    if layer.group_size % 2:
        return f"group size {layer.group_size} is odd; ZenDNN WOQ needs an even group size"
    return None
