"""``optimize(compile=True)``: ``generate`` decodes through one compiled graph (static cache, dynamic
length) and prefills eagerly. The same greedy tokens as the eager reference but for near-ties,
every 4-bit call of the step in that graph with no unpack, no recompile for new prompt lengths or
longer generations, the head's ``mv`` one opaque op in compiled code, and each 4-bit kernel in the
step: in a layer Inductor compiled once, or (``cpp_wrapper=True``) in one graph driven from
Inductor's C++ wrapper."""

import pytest
import torch
from torch._inductor.utils import run_and_get_code
from transformers.generation.configuration_utils import CompileConfig

import zen_woq_pass
from zen_woq_pass.kernels import native
from zen_woq_pass.models.measure import greedy
from zen_woq_pass.runtime import gemv

from helpers import INPUT_IDS, KERNEL_CALLS, NEW_TOKENS, assert_same_greedy, load, load_reference


def _graphs_compiled_by(fn) -> list:
    before = len(zen_woq_pass.recent_reports())
    fn()
    return zen_woq_pass.recent_reports()[before:]


def test_generate_decodes_through_one_graph_for_every_length(checkpoints):
    path = checkpoints("llama_sym_g128")
    reference = greedy(load_reference(path), INPUT_IDS[:1], NEW_TOKENS)
    model = zen_woq_pass.optimize(load(path, keep=False), compile=True)
    tokens = []
    graphs = _graphs_compiled_by(lambda: tokens.append(greedy(model, INPUT_IDS[:1], NEW_TOKENS)))
    assert_same_greedy(path, model, INPUT_IDS[:1], tokens[0], reference)
    assert len(graphs) == 1, [g.graph_calls for g in graphs]
    step = graphs[0]
    # 2 decoder layers: q/k/v fused, o, gate/up fused, down; the weights were unpacked once, before
    assert sum(step.count_calls(call) for call in KERNEL_CALLS.values()) == 8, "\n".join(step.graph_calls)
    assert step.count_calls("rshift") == 0 and step.count_calls("bitwise") == 0
    assert step.count_calls("scaled_dot_product") == 0, "\n".join(step.graph_calls)  # one query's attention as math
    # its report lists the layers it calls, though optimize planned them before any graph
    assert sorted(d.module_path for d in step.layers) == sorted(d.module_path for d in model.zen_woq_report.layers)

    def new_lengths():
        for length, new in ((5, 3), (12, 40), (23, 7)):
            ids = torch.randint(3, 256, (1, length), generator=torch.Generator().manual_seed(length))
            greedy(model, ids, new)

    assert _graphs_compiled_by(new_lengths) == []  # a longer static cache is the same graph
    with torch.no_grad():
        assert _graphs_compiled_by(lambda: model(INPUT_IDS)) == []  # a plain forward stays eager


def test_the_step_builds_its_causal_mask_from_the_padding_mask(checkpoints):
    """generate hands the step the 2-D mask padded to the cache's length, not a 4-D mask it built
    eagerly; the tokens are those of the step given transformers' 4-D mask, for a left-padded
    batch too."""
    path = checkpoints("llama_sym_g128")
    model = zen_woq_pass.optimize(load(path, keep=False), compile=True)
    masks, compiled_call = [], model.get_compiled_call

    def spying(config=None):
        step = compiled_call(config)

        def call(*args, **kwargs):
            masks.append(kwargs["attention_mask"].clone())
            return step(*args, **kwargs)

        return call

    model.get_compiled_call = spying
    ids = INPUT_IDS.clone()
    padding = torch.ones_like(ids)
    ids[1, :4], padding[1, :4] = 0, 0  # the second row is 4 tokens shorter, left-padded
    with_4d_masks = zen_woq_pass.optimize(load(path, keep=False), compile=True)
    del with_4d_masks.create_masks_for_generate  # transformers' own
    settings = {"attention_mask": padding, "max_new_tokens": NEW_TOKENS, "do_sample": False, "eos_token_id": None}
    with torch.no_grad():
        tokens = model.generate(ids, **settings)
        expected = with_4d_masks.generate(ids, **settings)
    assert len(masks) == NEW_TOKENS - 1 and {tuple(m.shape) for m in masks} == {(2, 12 + NEW_TOKENS - 1)}
    assert all(torch.equal(m[1, :4], torch.zeros(4, dtype=m.dtype)) for m in masks)  # the padding stays masked
    assert [int(m[0].sum()) for m in masks] == list(range(13, 12 + NEW_TOKENS))  # and so do the slots not yet written
    assert torch.equal(tokens, expected)


def test_a_users_own_compile_config_is_honoured(checkpoints):
    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False), compile=True)
    ours = model.get_compiled_call(model.generation_config.compile_config)
    assert model.get_compiled_call(None) is ours
    assert model.get_compiled_call(CompileConfig(backend="inductor")) is not ours


def test_the_heads_mv_is_one_op_in_compiled_code():
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 320, bias=False).to(torch.bfloat16)
    head.__class__ = gemv._gemv_class(torch.nn.Linear)
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = head(x)
        compiled, (code,) = run_and_get_code(torch.compile(head, backend="zen_woq"), x)
    assert torch.equal(compiled, eager) and torch.equal(eager[0, 0], torch.mv(head.weight, x[0, 0]))
    assert "zen_woq.mv" in code


def test_in_place_writes_nobody_reads_survive_the_pass():
    """A static KV cache's update has no users in the graph; the pass erases only the unpacking it
    replaced (FX's dead-code pass alone dropped the update: wrong tokens from the third on)."""

    def step(cache, position, value):
        cache.index_copy_(0, position, value)
        return value * 2

    cache, value = torch.zeros(4, 3), torch.ones(1, 3)
    out = torch.compile(step, backend="zen_woq", fullgraph=True)(cache, torch.tensor([2]), value)
    assert torch.equal(out, value * 2) and torch.equal(cache[2], value[0]) and cache.sum() == 3


def test_in_place_writes_nobody_reads_survive_inside_nested_compile_regions():
    """FX's dead-code pass recurses into the subgraphs of nested compile regions, and there dropped
    each region's cache update (found with the decoder layers as one region: wrong tokens from the
    third)."""

    @torch.compiler.nested_compile_region
    def layer(cache, position, value):
        cache.index_copy_(0, position, value)
        return value * 2

    def step(caches, position, value):
        for cache in caches:
            value = layer(cache, position, value)
        return value

    caches, value = [torch.zeros(4, 3) for _ in range(3)], torch.ones(1, 3)
    out = torch.compile(step, backend="zen_woq", fullgraph=True)(caches, torch.tensor([2]), value)
    assert torch.equal(out, value * 8)
    assert [cache[2].tolist() for cache in caches] == [[1.0] * 3, [2.0] * 3, [4.0] * 3]
    assert all(cache.sum() == 3 * cache[2, 0] for cache in caches)


@pytest.mark.parametrize(
    "kernel,cpp_wrapper", [("zentorch", None), ("avx512-int4", None), ("aten-int4", None), ("avx512-int4", True), ("aten-int4", True)]
)
def test_each_4_bit_kernel_decodes_in_the_compiled_step(checkpoints, kernel, cpp_wrapper):
    if kernel == "avx512-int4" and native.unavailable_reason():
        pytest.skip(native.unavailable_reason())
    path = checkpoints("qwen2_asym_bias")  # zero points and biases reach the kernel
    reference = greedy(load_reference(path), INPUT_IDS[:1], NEW_TOKENS)
    wrapper = {} if cpp_wrapper is None else {"cpp_wrapper": cpp_wrapper}
    model = zen_woq_pass.optimize(load(path, keep=False), compile=True, kernel=kernel, **wrapper)
    torch._dynamo.reset()  # a fresh compile, not a code cache hit, so that its code is seen
    tokens, codes = run_and_get_code(greedy, model, INPUT_IDS[:1], NEW_TOKENS)
    assert_same_greedy(path, model, INPUT_IDS[:1], tokens, reference)
    [step] = zen_woq_pass.recent_reports()[-1:]
    assert step.count_calls(KERNEL_CALLS[kernel]) == 8, "\n".join(step.graph_calls)
    one_graph = cpp_wrapper is True
    assert codes and all(("CppWrapperCodeCache" in code) == one_graph for code in codes), codes[0][:2000]
    assert all(("subgraph_0(args)" in code) != one_graph for code in codes)  # the layer's code, called per layer
    assert not any("assert_size_stride(" in code for code in codes)  # dynamo's guards check the inputs


def test_a_batch_of_left_padded_prompts_decodes_on_the_4_bit_kernels_as_each_prompt_alone(checkpoints):
    """``generate`` on 8 prompts of different lengths at once (left padding, greedy), through the
    default ``optimize``: one compiled step for the whole batch, every projection in it a 4-bit
    call (q/k/v, o, gate/up, down per layer), and each row's tokens those of its prompt alone on
    the eager reference, but for near-ties."""
    path = checkpoints("qwen2_asym_bias")  # zero points and biases
    lengths = [12, 11, 9, 12, 5, 8, 3, 10]
    prompts = [torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(n + i)) for i, n in enumerate(lengths)]
    ids, padding = torch.zeros(len(prompts), max(lengths), dtype=torch.long), torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, -prompt.shape[1] :], padding[row, -prompt.shape[1] :] = prompt[0], 1
    model = zen_woq_pass.optimize(load(path, keep=False))  # the default compiles the decode step
    tokens = []

    def generate():
        with torch.no_grad():
            out = model.generate(ids, attention_mask=padding, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        tokens.append(out[:, ids.shape[1] :])

    [step] = _graphs_compiled_by(generate)
    assert sum(step.count_calls(call) for call in KERNEL_CALLS.values()) == 8, "\n".join(step.graph_calls)
    for row, prompt in enumerate(prompts):
        assert_same_greedy(path, model, prompt, tokens[0][row : row + 1], greedy(load_reference(path), prompt, NEW_TOKENS))


def test_optimize_compiles_the_decode_step_by_default_and_says_so(checkpoints):
    path = checkpoints("llama_sym_g128")
    compiled = zen_woq_pass.optimize(load(path, keep=False))
    assert compiled.zen_woq_report.decode.startswith("decode: generate's step compiled on its first call")
    assert compiled.zen_woq_report.decode in str(compiled.zen_woq_report)
    assert compiled.generation_config.cache_implementation == "static"
    eager = zen_woq_pass.optimize(load(path, keep=False), compile=False)
    assert eager.zen_woq_report.decode == "decode: every step eager (compile=False)"
    assert "get_compiled_call" not in vars(eager) and eager.generation_config.compile_config is None
    assert _graphs_compiled_by(lambda: greedy(eager, INPUT_IDS[:1], 4)) == []


def test_without_a_cpp_compiler_the_decode_step_stays_eager_and_the_report_says_why(checkpoints):
    """Inductor's CPU code needs a C++ compiler; where it finds none (here: told to use one that
    does not exist), the default must not fail on the first ``generate``."""
    with torch._inductor.config.patch({"cpp.cxx": ("no-such-c++-compiler",)}):
        model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False))
    assert model.zen_woq_report.decode.startswith("decode: every step eager: Inductor finds no C++ compiler"), model.zen_woq_report.decode
    assert "get_compiled_call" not in vars(model)
    assert _graphs_compiled_by(lambda: greedy(model, INPUT_IDS[:1], 4)) == []
