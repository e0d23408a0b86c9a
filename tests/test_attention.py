"""The optimized model's attention against references: the compiled decode step's one query (tensor
math) and the bf16 flash kernel against fp32 attention, as close as transformers' sdpa in bf16 is
(NaN where sdpa's is); sdpa itself for what neither covers and for an eager decode step; which form
a call takes and which keys the kernel is given; what ``use`` reports and ``restore`` undoes."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import zen_woq_pass
from zen_woq_pass.kernels import native
from zen_woq_pass.planning.report import Report
from zen_woq_pass.runtime import attention

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
        (1, 40, 9, 3, 64, True),  # one query over a filled cache (routed to sdpa, still right)
        (1, 40, 9, 3, 64, False),  # one query, no mask: every key
    ],
)
def test_the_kernel_is_as_close_to_fp32_as_sdpa(queries, length, heads, kv_heads, size, masked):
    q, k, v = _inputs(queries, length, heads=heads, kv_heads=kv_heads, size=size)
    module = types.SimpleNamespace(**{**vars(MODULE), "num_key_value_groups": heads // kv_heads})
    mask = _padded_mask(queries, length) if masked else None
    causal = queries > 1 and not masked  # as sdpa reads a prompt with no mask
    mine = torch.ops.zen_woq_native.prompt_attention(q, k, v, mask, causal, 0.125)
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


# NaN: the kernel against sdpa. A hidden key is never read: sdpa agrees under is_causal; under a
# boolean mask it adds -inf to the hidden key's NaN score and gives NaN (torch 2.13), which says how it
# masks, not what a weight of zero means (and an unfilled cache slot must not poison a prompt).
NAN = float("nan")


@needs_the_kernel
@pytest.mark.parametrize("masked", [False, True], ids=["causal prompt", "padded rows"])
@pytest.mark.parametrize("where", ["query", "visible key"])
def test_a_nan_the_kernel_reads_gives_nan_where_sdpa_does(where, masked):
    q, k, v = _inputs(40, 40)
    mask = _padded_mask(40, 40) if masked else None
    expected = torch.zeros(2, 40, 9, 64, dtype=torch.bool)  # [B, q, H, D]: where sdpa's output is NaN
    if where == "query":
        q[1, 4, 7, 5] = NAN  # batch 1, head 4, query 7: that row alone
        expected[1, 7, 4] = True
    else:
        k[0, 1, 10, 3] = NAN  # batch 0, kv head 1 (heads 3-5), key 10: every query of row 0 sees it (mask), queries 10.. (causal)
        expected[0, (0 if masked else 10) :, 3:6] = True
    mine = torch.ops.zen_woq_native.prompt_attention(q, k, v, mask, not masked, 0.125)
    theirs, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=0.125)
    assert torch.equal(mine.isnan(), expected)
    assert torch.equal(theirs.isnan(), expected), "sdpa's NaN are not where they were (torch 2.13)"
    # the rest as close as in test_the_kernel_is_as_close_to_fp32_as_sdpa: outputs below 4, bf16
    assert (mine.float() - theirs.float())[~expected].abs().max() <= 2**-6


@needs_the_kernel
@pytest.mark.parametrize("key", [1, 35], ids=["left padding", "past the last visible key"])
def test_a_nan_in_a_key_no_query_sees_changes_nothing(key):
    """Row 1 of the padded mask sees keys 3..29: key 1 shares a block of 64 with them (its score is
    computed, then masked), key 35 lies past them."""
    q, k, v = _inputs(40, 40)
    mask = _padded_mask(40, 40)
    clean = torch.ops.zen_woq_native.prompt_attention(q, k, v, mask, False, 0.125)
    k[1, :, key] = NAN
    assert torch.equal(torch.ops.zen_woq_native.prompt_attention(q, k, v, mask, False, 0.125), clean)


@needs_the_kernel
def test_a_prompt_over_a_static_cache_is_as_close_to_fp32_as_sdpa(kernel_on):
    q, k, v = _inputs(37, 300)
    mask = _padded_mask(37, 300)  # 30 of 300 slots filled, as a static cache after a prompt
    assert attention.route(MODULE, q, k, v, mask) == attention.KERNEL
    mine, _ = attention.attention(MODULE, q, k, v, mask, scaling=0.125)
    theirs, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=0.125)
    ours, sdpas = _errors(mine, theirs, q, k, v, mask, False)
    assert ours <= max(2 * sdpas, 2**-7), (ours, sdpas)


@needs_the_kernel
@pytest.mark.parametrize("far", [17, 64, 69])  # within the first block of 64 keys, the first of the next, the last
def test_the_keys_packed_reach_the_farthest_any_row_sees(far):
    """Rows see keys 0..9, and row 2 also key ``far``: the packed keys end past it, whichever row
    sees it (the kernel scans the rows from the last)."""
    q, k, v = _inputs(6, 70, batch=1)
    mask = torch.zeros(1, 1, 6, 70, dtype=torch.bool)
    mask[..., :10] = True
    mask[0, 0, 2, far] = True
    out = torch.ops.zen_woq_native.prompt_attention(q, k, v, mask, False, 0.125)
    # as in test_the_kernel_reads_only_what_the_mask_allows: without key ``far`` row 2 would be off by far more
    assert (out.float() - _fp32(q, k, v, mask, False, 0.125)).abs().max() <= 2**-6


def _recording_kernel(monkeypatch) -> list:
    """The kernel, loaded as ``optimize`` leaves it, played by fp32 attention: the calls it gets."""
    calls = []

    def kernel(q, k, v, mask, causal, scale):
        calls.append(types.SimpleNamespace(queries=q.shape[2], keys=k.shape[2], mask=mask, causal=causal))
        return _fp32(q, k, v, mask, causal, scale).nan_to_num(0.0).to(q.dtype)  # a row that sees nothing: 0

    monkeypatch.setattr(attention, "_native_kernel", True)
    monkeypatch.setattr(torch.ops, "zen_woq_native", types.SimpleNamespace(prompt_attention=kernel), raising=False)
    return calls


# x 3 heads a kv head: 3, 15 and 18 rows of queries, against attention.FEW_QUERY_ROWS = 16
@pytest.mark.parametrize("queries, few", [(1, True), (5, True), (6, False)])
def test_few_queries_go_to_sdpa(monkeypatch, queries, few):
    calls = _recording_kernel(monkeypatch)
    q, k, v = _inputs(queries)
    mask = _padded_mask(queries, 40)
    mine, _ = attention.attention(MODULE, q, k, v, mask, scaling=0.125)
    theirs, _ = sdpa_attention_forward(MODULE, q, k, v, mask, scaling=0.125)
    if few:  # packing up to 30 keys for so few rows cannot pay
        assert not calls and torch.equal(mine, theirs)
        assert attention.route(MODULE, q, k, v, mask) == attention.SDPA
    else:
        assert [(call.queries, call.keys) for call in calls] == [(queries, 40)]
        assert attention.route(MODULE, q, k, v, mask) == attention.KERNEL


@needs_the_kernel
def test_the_kernel_packs_only_the_keys_some_query_sees():
    """A prompt over a static cache of 4096 slots, 30 filled: the kernel's scratch (keys and values
    packed, freed within the call) is what it is over 64 slots, and so is its output."""
    q, k, v = _inputs(32, 4096)
    mask = torch.zeros(2, 1, 32, 4096, dtype=torch.bool)
    mask[..., :30] = torch.ones(32, 30, dtype=torch.bool).tril(2)  # causal, after 2 tokens cached

    def call(slots):
        with torch.profiler.profile(profile_memory=True) as profile:
            out = torch.ops.zen_woq_native.prompt_attention(q, k[:, :, :slots], v[:, :, :slots], mask[..., :slots], False, 0.125)
        return out, [-event.self_cpu_memory_usage for event in profile.events() if event.name == "zen_woq_native::prompt_attention"]

    (small, small_scratch), (big, big_scratch) = call(64), call(4096)
    assert small_scratch == big_scratch and small_scratch[0] > 0, (small_scratch, big_scratch)
    assert torch.equal(small, big)


@pytest.fixture
def tiny_llama(monkeypatch):
    """A 2-layer Llama on sdpa, bf16, 4 heads of 16 over 2 kv heads; ``use`` may set the flag."""
    monkeypatch.setattr(attention, "_native_kernel", attention._native_kernel)

    def make(cls=LlamaForCausalLM):
        config = LlamaConfig(
            vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
        )  # fmt: skip
        torch.manual_seed(0)
        return cls(config).to(torch.bfloat16).eval()

    return make


IDS = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(0))


def test_an_eager_generate_calls_the_kernel_for_its_prompt_alone(tiny_llama, monkeypatch):
    model = tiny_llama()
    attention.use(model)
    calls = _recording_kernel(monkeypatch)
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :3] = 0
    cache = StaticCache(config=model.config, max_cache_len=64)
    with torch.no_grad():
        model.generate(IDS, attention_mask=padding, past_key_values=cache, max_new_tokens=4, do_sample=False, pad_token_id=0)
    # the prompt's call in each layer (over the cache's 64 slots, 12 of them seen); none for the 3 decode steps
    assert [(call.queries, call.keys, call.mask.shape) for call in calls] == [(12, 64, (2, 1, 12, 64))] * 2


class _KeepsItsAttention(LlamaForCausalLM):
    """As transformers treats a class it cannot switch (its attention not called through
    AttentionInterface): it warns and keeps the attention the model has."""

    def set_attn_implementation(self, attn_implementation, **kwargs):
        pass


def _routed(monkeypatch) -> list:
    """The calls that reach this package's attention."""
    calls, route = [], attention.route
    monkeypatch.setattr(attention, "route", lambda *args, **kwargs: calls.append(args[1].shape) or route(*args, **kwargs))
    return calls


def test_the_report_says_sdpa_where_the_model_keeps_it(tiny_llama, monkeypatch):
    model = tiny_llama(_KeepsItsAttention)
    line = attention.use(model)
    assert line.startswith("attention: transformers' 'sdpa'") and "_KeepsItsAttention kept it" in line, line
    calls = _routed(monkeypatch)
    with torch.no_grad():
        model(IDS)
    assert not calls


def test_the_report_names_the_modules_that_keep_a_config_of_their_own(tiny_llama, monkeypatch):
    model = tiny_llama()
    model.model.layers[1].self_attn.config = copy.deepcopy(model.config)
    line = attention.use(model)
    assert "model.layers.1.self_attn read a config of their own that kept transformers' 'sdpa'" in line, line
    calls = _routed(monkeypatch)
    with torch.no_grad():
        model(IDS)
    assert len(calls) == 1  # layer 0's


def test_restore_gives_the_model_its_own_attention_back(tiny_llama, monkeypatch):
    model = tiny_llama()
    attention.use(model)
    model.zen_woq_report = Report(kernel_option="auto", layers=(), attention="attention: zen_woq's")
    line = attention.restore(model)
    calls = _routed(monkeypatch)
    with torch.no_grad():
        model(IDS)
    assert not calls and model.config._attn_implementation == "sdpa"
    assert model.zen_woq_report.attention == line == "attention: transformers' 'sdpa', the model's own"


def test_optimize_can_leave_the_attention_alone(tiny_llama, monkeypatch):
    model = zen_woq_pass.optimize(tiny_llama(), attention=False)
    assert model.config._attn_implementation == "sdpa"
    assert model.zen_woq_report.attention == "attention: transformers' 'sdpa', the model's own"
    calls = _routed(monkeypatch)
    with torch.no_grad():
        model(IDS)
    assert not calls


def _outcome(attention, *args, **kwargs):
    """The output, or the error: transformers 5.23's sdpa refuses soft-capping, 5.17's ignores it."""
    try:
        return attention(*args, **kwargs)[0]
    except Exception as error:
        return f"{type(error).__name__}: {error}"
