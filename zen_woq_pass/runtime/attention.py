"""The optimized model's attention: one query in the compiled decode step as tensor math, eager
prompts on the package's own bf16 flash-attention kernel, the rest (an eager decode step among them)
transformers' sdpa. ``use(model)`` switches a model to it and says what runs; ``restore(model)``
switches back.

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

Why an eager decode step is sdpa's: the kernel packs every key and value it reads, once per call, for
each kv head; a call of few queries (one, in an eager ``generate``'s step) would repack the whole
cache per layer and token, a cost that grows with the cache while the queries that share it stay
few. A prompt's call packs only the keys up to the last one some query sees: a static cache's mask
spans all ``max_cache_len`` slots, a prompt fills a few. The kernel finds that key in the mask, 8
keys a load; here, torch's reduction of a bool mask [2, 1, 512, 4096] took 4 ms (one core of a busy
Zen 3), against the kernel's 1.3 ms for a 512-token prompt's layer (a Zen 4).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from zen_woq_pass.kernels import native

NAME = "zen_woq_sdpa"

# Whether the package's kernels loaded in this process, set by ``use`` (the prompts' kernel is one of them).
_native_kernel = False

# Fewer query rows than this per kv head (queries x heads sharing it) go to sdpa: packing a key costs
# about what 16 to 32 query rows' products with it cost in the kernel (packing is scalar, the
# products VDPBF16PS), and ATen's kernel computes those products at about a third of our speed, so
# below some 16 rows packing cannot pay. An estimate from the instruction counts, not a measurement.
FEW_QUERY_ROWS = 16

KERNEL, ONE_QUERY, SDPA = "zen_woq kernel", "one query as tensor math", "sdpa"


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' attention signature: query [B, H, q, D], key and value [B, Hkv, L, D], a
    boolean mask [B or 1, 1, q, L] (True: attend) or None; returns [B, q, H, D] and no weights."""
    path = route(module, query, key, value, attention_mask, dropout, kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if path == ONE_QUERY:
        return _one_query(query, key, value, attention_mask, scale), None
    if path == KERNEL:
        # sdpa's reading of the arguments: causal only for several queries and no mask
        causal = query.shape[2] > 1 and attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        return torch.ops.zen_woq_native.prompt_attention(query, key, value, attention_mask, bool(causal), scale), None
    return _sdpa(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def route(module, query, key, value, attention_mask, dropout=0.0, kwargs=None) -> str:
    """Which form computes this call: ``ONE_QUERY`` (a compiled decode step), ``KERNEL`` (an eager
    prompt where the kernel loaded) or ``SDPA`` (the rest)."""
    if not _plain(module, attention_mask, dropout, kwargs or {}):
        return SDPA
    if torch.compiler.is_compiling():
        return ONE_QUERY if query.shape[2] == 1 and attention_mask is not None else SDPA
    if _native_kernel and _native_fits(query, key, value, attention_mask) and not _few_queries(query, key):
        return KERNEL
    return SDPA


def _few_queries(query, key) -> bool:
    """Too few query rows per kv head to pay for packing its keys (an eager decode step's one)."""
    return query.shape[2] * (query.shape[1] // key.shape[1]) < FEW_QUERY_ROWS


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
    """Switch a model on transformers' sdpa attention to this one; says what computes it, read back
    from the model: a class transformers cannot switch (its attention not called through
    AttentionInterface) keeps its own, and so does a module that holds a config of its own."""
    global _native_kernel
    current = model.config._attn_implementation
    if current not in ("sdpa", NAME):
        return f"attention: transformers' {current!r}, as the model was loaded (zen_woq takes over only 'sdpa')"
    model.set_attn_implementation(NAME)
    if model.config._attn_implementation != NAME:
        return (
            f"attention: transformers' {model.config._attn_implementation!r}, as the model was loaded: {type(model).__name__} "
            f"kept it when asked for {NAME!r} (transformers switches only models whose attention calls its AttentionInterface)"
        )
    reason = native.unavailable_reason()
    _native_kernel = reason is None
    if reason is None:
        line = "attention: prompts on zen_woq's bf16 flash-attention kernel, eager decode steps on transformers' sdpa, a compiled decode step's as tensor math"
    else:
        line = f"attention: prompts on transformers' sdpa (zen_woq's kernel cannot run: {reason}), a compiled decode step's as tensor math"
    kept = _kept(model, NAME)
    if kept:
        where = ", ".join(kept[:3]) + (f" and {len(kept) - 3} more" if len(kept) > 3 else "")
        line += f"; but {where} read a config of their own that kept transformers' {current!r}"
    return line


def restore(model: torch.nn.Module) -> str:
    """The model's own attention again (transformers' sdpa where ``use`` switched it), as
    ``optimize(..., attention=False)`` leaves it; says what computes it. A decode step compiled
    before (``optimize(compile=True)``) keeps the attention it was compiled with."""
    if model.config._attn_implementation == NAME:
        model.set_attn_implementation("sdpa")
    line = f"attention: transformers' {model.config._attn_implementation!r}, the model's own"
    if hasattr(model, "zen_woq_report"):
        model.zen_woq_report = dataclasses.replace(model.zen_woq_report, attention=line)
    return line


def _kept(model: torch.nn.Module, implementation: str) -> list[str]:
    """The modules whose config names another attention than ``implementation``: what they run."""
    return [
        path
        for path, module in model.named_modules()
        if getattr(getattr(module, "config", None), "_attn_implementation", implementation) != implementation
    ]
