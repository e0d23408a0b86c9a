"""The optimized model's attention against references: the compiled decode step's one query (tensor
math) and the bf16 flash kernel against fp32 attention, as close as transformers' sdpa in bf16 is;
sdpa itself for what neither covers."""

import types

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from zen_woq_pass import attention, native

MODULE = types.SimpleNamespace(training=False, num_key_value_groups=3, is_causal=True)
needs_the_kernel = pytest.mark.skipif(native.unavailable_reason() is not None, reason=f"prompt attention: {native.unavailable_reason()}")


@pytest.fixture
def kernel_on(monkeypatch):
    """The module as ``optimize`` leaves it where the package's kernels load."""
    monkeypatch.setattr(attention, "_native_kernel", native.unavailable_reason() is None)


def _inputs(queries, length=40, batch=2, heads=9, kv_heads=3, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # as transformers makes it: [B, q, H, D] transposed to [B, H, q, D]
    q = torch.randn(batch, queries, heads, size, generator=g).to(torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(batch, kv_heads, length, size, generator=g).to(torch.bfloat16) for _ in range(2))
    return q, k, v


def _padded_mask(queries, length):
    """Row 0: a cache filled to 17 slots; row 1: 3 slots of left padding, then 27 tokens."""
    mask = torch.zeros(2, 1, queries, length, dtype=torch.bool)
    mask[0, ..., :17] = True
    mask[1, ..., 3:30] = True
    return mask


def _fp32(q, k, v, mask, causal, scale):
    """Attention in fp32 on the same bf16 inputs, [B, q, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = (t.float().repeat_interleave(groups, 1) for t in (k, v))
    if causal:  # top-left: query i sees keys 0..i
        k, v = k[:, :, : q.shape[2]], v[:, :, : q.shape[2]]
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out.transpose(1, 2)


def _errors(mine, theirs, q, k, v, mask, causal):
    """Largest error of ours and of transformers' sdpa in bf16, each against fp32 attention."""
    exact = _fp32(q, k, v, mask, causal, 0.125)
    return (mine.float() - exact).abs().max().item(), (theirs.float() - exact).abs().max().item()


@pytest.mark.parametrize("shared_mask", [False, True], ids=["mask per row", "one mask for the batch"])
def test_the_compiled_steps_one_query_equals_sdpa_within_bf16_rounding(shared_mask):
    q, k, v = _inputs(1)
    mask = _padded_mask(1, 40)[: 1 if shared_mask else 2]
    traced = torch.compile(attention.attention, backend="eager", fullgraph=True)  # dynamo: compiling
    mine, weights = traced(MODULE, q, k, v, mask, scaling=0.125)
    theirs, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=0.125)
    assert weights is None and mine.shape == theirs.shape == (2, 1, 9, 64)
    # one bf16 rounding of outputs below 2 in magnitude: 2**-8 relative, 2**-7 absolute
    assert (mine.float() - theirs.float()).abs().max() <= 2**-7


@needs_the_kernel
@pytest.mark.parametrize(
    "queries, length, heads, kv_heads, size, masked",
    [
        (512, 512, 9, 3, 64, False),  # SmolLM2's 512-token prompt
        (37, 39, 9, 3, 64, False),  # a static cache longer than the prompt: its first 37 keys
        (70, 70, 4, 4, 128, False),  # no grouping, head size 128, queries not a multiple of 32
        (33, 40, 9, 3, 80, True),  # padded rows, head size 80 (a part-tile of dimensions)
        (1, 40, 9, 3, 64, True),  # one query over a filled cache (an eager decode step)
        (1, 40, 9, 3, 64, False),  # one query, no mask: every key
    ],
)
def test_the_kernel_is_as_close_to_fp32_as_sdpa(kernel_on, queries, length, heads, kv_heads, size, masked):
    q, k, v = _inputs(queries, length, heads=heads, kv_heads=kv_heads, size=size)
    module = types.SimpleNamespace(**{**vars(MODULE), "num_key_value_groups": heads // kv_heads})
    mask = _padded_mask(queries, length) if masked else None
    causal = queries > 1 and not masked  # as sdpa reads a prompt with no mask
    mine, _ = attention.attention(module, q, k, v, mask, scaling=0.125)
    theirs, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.125)
    assert mine.shape == theirs.shape == (2, queries, heads, size)
    ours, sdpas = _errors(mine, theirs, q, k, v, mask, causal)
    # bf16 outputs of magnitude below 4 (2**-7) plus the weights' rounding to bf16, as sdpa has
    assert ours <= max(2 * sdpas, 2**-7), (ours, sdpas)


@needs_the_kernel
def test_the_kernel_reads_only_what_the_mask_allows():
    """Keys a query must not see are NaN and their values 1000: a score or weight of them would show
    (a product with zero weight is read, as in any GEMM); a row that sees nothing is 0."""
    q, k, v = _inputs(6, 20, batch=1)
    mask = torch.zeros(1, 1, 6, 20, dtype=torch.bool)
    mask[0, 0, :, 2:9] = True
    mask[0, 0, 5] = False
    k[..., :2, :] = k[..., 9:, :] = float("nan")
    v[..., :2, :] = v[..., 9:, :] = 1000.0
    out = torch.ops.zen_woq_native.prompt_attention(q, k, v, mask, False, 0.125)
    assert torch.equal(out[0, 5], torch.zeros_like(out[0, 5]))
    exact = _fp32(q, k[..., 2:9, :], v[..., 2:9, :], None, False, 0.125)[0, :5]
    # the output's bf16 rounding (2**-8 of values below 2) and the weights' (2**-9 each): a weight
    # on a hidden value of 1000 would be off by far more
    assert (out[0, :5].float() - exact).abs().max() <= 2**-6


@pytest.mark.parametrize(
    "change",
    ["float mask", "training", "softcap", "dropout", "fp32 inputs", "head size 72", "one mask row for all queries"],
)
def test_the_rest_is_sdpa_itself(kernel_on, change):
    q, k, v = _inputs(5, size=72 if change == "head size 72" else 64)
    mask = _padded_mask(5, 40)
    module = types.SimpleNamespace(**{**vars(MODULE), "training": change == "training"})
    if change == "float mask":
        mask = torch.zeros(mask.shape, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
    if change == "one mask row for all queries":
        mask = mask[..., :1, :]
    if change == "fp32 inputs":
        q, k, v = q.float(), k.float(), v.float()
    extra = {"softcap": 30.0} if change == "softcap" else {}
    extra |= {"dropout": 0.5} if change == "dropout" else {}
    torch.manual_seed(0)
    mine = _outcome(attention.attention, module, q, k, v, mask, scaling=0.125, **extra)
    torch.manual_seed(0)
    theirs = _outcome(sdpa_attention_forward, module, q, k, v, mask, scaling=0.125, **extra)
    assert torch.equal(mine, theirs) if isinstance(theirs, torch.Tensor) else mine == theirs


def test_without_the_kernel_prompts_are_sdpa_itself(monkeypatch):
    monkeypatch.setattr(attention, "_native_kernel", False)
    q, k, v = _inputs(5)
    mine, _ = attention.attention(MODULE, q, k, v, None, scaling=0.125)
    theirs, _ = sdpa_attention_forward(MODULE, q, k, v, None, scaling=0.125)
    assert torch.equal(mine, theirs)


def _outcome(attention, *args, **kwargs):
    """The output, or the error: transformers 5.23's sdpa refuses soft-capping, 5.17's ignores it."""
    try:
        return attention(*args, **kwargs)[0]
    except Exception as error:
        return f"{type(error).__name__}: {error}"
