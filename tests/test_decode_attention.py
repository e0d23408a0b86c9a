"""The decode step's attention (one query as tensor math) against transformers' sdpa: the same
output within bf16 rounding for grouped heads and padded masks, and sdpa itself for the rest."""

import types

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from zen_woq_pass import decode_attention

MODULE = types.SimpleNamespace(training=False, num_key_value_groups=3, is_causal=True)


def _inputs(queries, length=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 9, queries, 64, generator=g).to(torch.bfloat16)
    k, v = (torch.randn(2, 3, length, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    mask = torch.zeros(2, 1, queries, length, dtype=torch.bool)
    mask[0, ..., :17] = True  # a cache filled to 17
    mask[1, ..., 3:30] = True  # left padding, then 27 tokens
    return q, k, v, mask


@pytest.mark.parametrize("shared_mask", [False, True], ids=["mask per row", "one mask for the batch"])
def test_one_query_equals_sdpa_within_bf16_rounding(shared_mask):
    q, k, v, mask = _inputs(1)
    mask = mask[:1] if shared_mask else mask
    mine, weights = decode_attention.attention(MODULE, q, k, v, mask, scaling=0.125)
    theirs, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=0.125)
    assert weights is None and mine.shape == theirs.shape == (2, 1, 9, 64)
    # one bf16 rounding of outputs below 2 in magnitude: 2**-8 relative, 2**-7 absolute
    assert (mine.float() - theirs.float()).abs().max() <= 2**-7


@pytest.mark.parametrize(
    "queries, change",
    [(5, {}), (1, {"float_mask": True}), (1, {"training": True}), (1, {"softcap": 30.0}), (1, {"no_mask": True})],
)
def test_the_rest_is_sdpa_itself(queries, change):
    q, k, v, mask = _inputs(queries)
    module = types.SimpleNamespace(**{**vars(MODULE), "training": change.get("training", False)})
    if change.get("float_mask"):
        mask = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
    if change.get("no_mask"):
        mask = None
    extra = {"softcap": change["softcap"]} if "softcap" in change else {}
    mine = _outcome(decode_attention.attention, module, q, k, v, mask, scaling=0.125, **extra)
    theirs = _outcome(sdpa_attention_forward, module, q, k, v, mask, scaling=0.125, **extra)
    assert torch.equal(mine, theirs) if isinstance(theirs, torch.Tensor) else mine == theirs


def _outcome(attention, *args, **kwargs):
    """The output, or the error: transformers 5.23's sdpa refuses soft-capping, 5.17's ignores it."""
    try:
        return attention(*args, **kwargs)[0]
    except Exception as error:
        return f"{type(error).__name__}: {error}"
