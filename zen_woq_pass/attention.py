"""The optimized model's attention: one query in the compiled decode step as tensor math, eager
calls (a prompt above all) on the package's own bf16 flash-attention kernel, the rest transformers'
sdpa.

Why the decode step's is tensor math: in the compiled decode step of SmolLM2-135M (a Zen 4, 2
threads) transformers' sdpa attention called ATen's CPU flash-attention kernel once per layer, about
95 us for one query over a 100-slot static cache: 2.8 ms of a 10 ms step. Written as products
summed, a mask and a softmax, one query's attention becomes one of Inductor's own C++ loops over the
cache, in fp32 as the flash kernel accumulates.

Why a kernel of our own for prompts (``csrc/prompt_attention.cpp``, AVX512-BF16 CPUs): ATen's
flash attention computed a causal 512-token prompt's masked half too, at a third of a bf16 GEMM's
speed: 4.3 ms a layer, 129 ms of SmolLM2's 500 ms to a first token; ours took 1.3 ms. Elsewhere,
and for what neither covers (training, dropout, a float mask, soft-capping, attention sinks, a
position bias), transformers' sdpa runs as it would have.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from zen_woq_pass import native

NAME = "zen_woq_sdpa"

# Whether the package's kernels loaded in this process, set by ``use`` (the prompts' kernel is one of them).
_native_kernel = False


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: query [B, H, q, D], key and value [B, Hkv, L, D], a
    boolean mask [B or 1, 1, q, L] (True: attend) or None; returns [B, q, H, D] and no weights."""
    if not _plain(module, attention_mask, dropout, kwargs):
        return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if torch.compiler.is_compiling():
        if query.shape[2] == 1 and attention_mask is not None:
            return _one_query(query, key, value, attention_mask, scale), None
    elif _native_kernel and _native_fits(query, key, value, attention_mask):
        # sdpa's reading of the arguments: causal only for several queries and no mask
        causal = query.shape[2] > 1 and attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        return torch.ops.zen_woq_native.prompt_attention(query, key, value, attention_mask, bool(causal), scale), None
    return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def _plain(module, attention_mask, dropout, kwargs) -> bool:
    """Inference with at most a boolean mask: what both our forms compute."""
    return (
        not module.training
        and not dropout
        and (attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.shape[1] == 1))
        and all(kwargs.get(name) is None for name in ("softcap", "s_aux", "position_bias"))
        and not kwargs.get("output_attentions")
    )


def _native_fits(query, key, value, attention_mask) -> bool:
    size = query.shape[-1]
    return (
        query.dtype == key.dtype == value.dtype == torch.bfloat16
        and key.shape[-1] == value.shape[-1] == size
        and size % 16 == 0
        and size <= 512
        and query.stride(-1) == key.stride(-1) == value.stride(-1) == 1
        and (attention_mask is None or _full_mask(attention_mask, query, key))
    )


def _full_mask(attention_mask, query, key) -> bool:
    """[B or 1, 1, q, L], contiguous along the keys: what the kernel reads (no broadcast rows)."""
    return (
        attention_mask.shape[0] in (1, query.shape[0])
        and attention_mask.shape[-2:] == (query.shape[2], key.shape[2])
        and attention_mask.stride(-1) == 1
    )


def _one_query(query, key, value, attention_mask, scale):
    batch, heads, _, size = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, 1, size).float()  # each kv head's queries
    # Products summed, not matmuls: Inductor fuses them with the cache's cast, the mask and the
    # softmax into one loop over the cache (a matmul is a call to ATen apart, on an fp32 copy).
    scores = (grouped * key.unsqueeze(2).float()).sum(-1) * scale  # [B, Hkv, groups, L]
    scores = scores.masked_fill(~attention_mask, float("-inf"))  # [B, 1, 1, L] on every head
    weights = torch.softmax(scores, dim=-1).unsqueeze(-1)  # [B, Hkv, groups, L, 1]
    output = (weights * value.unsqueeze(2).float()).sum(-2)  # [B, Hkv, groups, D]
    return output.reshape(batch, 1, heads, size).to(query.dtype)


def _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use(model: torch.nn.Module) -> str:
    """Switch a model on transformers' sdpa attention to this one; says what computes it."""
    global _native_kernel
    current = model.config._attn_implementation
    if current not in ("sdpa", NAME):
        return f"attention: transformers' {current!r}, as the model was loaded (zen_woq takes over only 'sdpa')"
    model.set_attn_implementation(NAME)
    reason = native.unavailable_reason()
    _native_kernel = reason is None
    if reason is None:
        return "attention: prompts and eager steps on zen_woq's bf16 flash-attention kernel, a compiled decode step's as tensor math"
    return f"attention: prompts on transformers' sdpa (zen_woq's kernel cannot run: {reason}), a compiled decode step's as tensor math"
