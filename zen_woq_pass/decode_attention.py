"""The decode step's attention as plain tensor math, which Inductor fuses into the step.

Why: in the compiled decode step of SmolLM2-135M (a Zen 4, 2 threads) transformers' sdpa attention
called ATen's CPU flash-attention kernel once per layer, about 95 us for one query over a
100-slot static cache: 2.8 ms of a 10 ms step. Written as products summed, a mask and a softmax,
one query's attention becomes one of Inductor's own C++ loops over the cache. Several queries (a
prompt), training, and what this math does not cover (no mask, soft-capping, attention sinks, a
float mask) keep transformers' sdpa. Scores, softmax and the weighted sum run in fp32, as the
flash kernel accumulates.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "zen_woq_sdpa"


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: query [B, H, q, D], key and value [B, Hkv, L, D], a
    boolean mask [B or 1, 1, q, L] (True: attend); returns [B, q, H, D] and no weights."""
    if (
        query.shape[2] != 1
        or module.training
        or attention_mask is None
        or attention_mask.dtype != torch.bool
        or attention_mask.shape[1] != 1
        or kwargs.get("softcap") is not None
        or kwargs.get("s_aux") is not None
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
        )
    batch, heads, _, size = query.shape
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else size**-0.5
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, 1, size).float()  # each kv head's queries
    # Products summed, not matmuls: Inductor fuses them with the cache's cast, the mask and the
    # softmax into one loop over the cache (a matmul is a call to ATen apart, on an fp32 copy).
    scores = (grouped * key.unsqueeze(2).float()).sum(-1) * scale  # [B, Hkv, groups, L]
    scores = scores.masked_fill(~attention_mask, float("-inf"))  # [B, 1, 1, L] on every head
    weights = torch.softmax(scores, dim=-1).unsqueeze(-1)  # [B, Hkv, groups, L, 1]
    output = (weights * value.unsqueeze(2).float()).sum(-2)  # [B, Hkv, groups, D]
    return output.reshape(batch, 1, heads, size).to(query.dtype), None


AttentionInterface.register(NAME, attention)
AttentionMaskInterface.register(NAME, sdpa_mask)


def use_for_decode(model: torch.nn.Module) -> bool:
    """Switch a model on transformers' sdpa attention to this one (prompts still run sdpa)."""
    if model.config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation(NAME)
    return True
