"""Helpers the end-to-end tests share: load, compile, compare, count graph nodes."""

import torch
from transformers import AutoModelForCausalLM

import zen_woq_pass
from zen_woq_pass.kernels import native
from zen_woq_pass.models.measure import compare_greedy
from zen_woq_pass.planning import platform
from zen_woq_pass.planning.numerics import sqnr_db

# kernel -> a fragment of the call its layers become in a graph (rewritten, or traced from optimize)
KERNEL_CALLS = {"zentorch": "zentorch_woq_linear", "aten-int4": "int4pack", "avx512-int4": "int4_linear"}
FOUR_BIT_KERNELS = frozenset(KERNEL_CALLS)


def four_bit_kernels_here(zentorch: bool = True) -> set[str]:
    """The 4-bit kernels whose CPU gate says yes here (``zentorch=False``: as if it were missing)."""
    here = {"aten-int4"} | ({"avx512-int4"} if native.unavailable_reason() is None else set())
    return here | ({"zentorch"} if zentorch and platform.zentorch_cpu_reason() is None else set())


INPUT_IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
NEW_TOKENS = 32
_references = {}


def load(path, dtype=torch.bfloat16, keep=True):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return zen_woq_pass.keep_compressed(model) if keep else model


def load_reference(path):
    """The eager kept-compressed model: compressed-tensors' own math, bit for bit (one per path)."""
    if path not in _references:
        _references[path] = load(path)
    return _references[path]


def assert_same_greedy(path, model, ids, tokens, reference_tokens):
    """Greedy tokens equal the reference's, but where its best two logits are a near-tie."""
    comparison = compare_greedy(load_reference(path), model, ids, tokens, reference_tokens)
    print(comparison.explain())
    assert comparison.acceptable, comparison.explain()


def optimized_down_proj(path, kernel):
    """Layer 0's down_proj after ``optimize(kernel=kernel)``, and its fp32 reference weight:
    compressed-tensors' decompression in fp32 (transformers decompresses on the first forward)."""
    model = zen_woq_pass.optimize(load(path, keep=False), kernel=kernel)
    decompressed = load(path, torch.float32, keep=False)
    with torch.no_grad():
        decompressed(INPUT_IDS[:, :2])
    return model.model.layers[0].mlp.down_proj, decompressed.model.layers[0].mlp.down_proj.weight.detach()


def assert_rows_follow_the_rule(layer, reference, kernel_call, dense_call, layer_sqnr_db):
    """``layer`` (a converted Linear) on both sides of the prompt-row threshold: each call the path
    the rule names for its rows (``kernel_call(x)`` or ``dense_call(x)``, x [M, K]) bit for bit, the
    same bits on a first and a second call, within ``layer_sqnr_db`` of the fp32 ``reference``."""
    from zen_woq_pass.planning import prefill

    threshold = prefill.dense_min_rows() or prefill.DENSE_MIN_ROWS
    for rows in (1, threshold - 1, threshold, 200):
        x = torch.randn(1, rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        with torch.no_grad():
            first, second = layer(x), layer(x)
            path = dense_call if prefill.takes_dense(rows) else kernel_call
            expected = path(x[0])
        assert torch.equal(first, second), f"{rows} rows: a second call computed other bits"
        assert torch.equal(first[0], expected), f"{rows} rows: not the path the rule names ({path.__name__})"
        assert sqnr_db(first.float(), x.float() @ reference.T) >= layer_sqnr_db


def fp32_reference(path, input_ids=INPUT_IDS):
    """compressed-tensors' own decompression, run in fp32: the dequantized fp32 reference."""
    with torch.no_grad():
        return load(path, torch.float32, keep=False)(input_ids).logits


def run_compiled(model, options=None, input_ids=INPUT_IDS, **compile_kwargs):
    compiled = torch.compile(model, backend="zen_woq", options=options, **compile_kwargs)
    with torch.no_grad():
        return compiled(input_ids).logits


def count(report, fragment: str) -> int:
    return report.count_calls(fragment)


def rewritten_graphs(model, options=None, input_ids=INPUT_IDS) -> list:
    """The graphs the pass hands to Inductor, for tests that read node arguments."""
    from zen_woq_pass.graph.rewrite import rewrite
    from zen_woq_pass.planning.options import Options

    graphs = []

    def backend(gm, example_inputs):
        gm, _, _, _ = rewrite(gm, example_inputs, Options.from_user(options))
        graphs.append(gm)
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(input_ids)
    return graphs


EAGER_SQNR_CAP_DB = 60.0  # an fp32 model's eager output *is* the reference (inf dB): do not demand exactness


def assert_close_to_reference(compiled, eager, reference, min_db, slack_db):
    """SQNR(compiled, fp32 reference) >= min_db, and at most slack_db below the eager model's own."""
    eager_db, compiled_db = min(sqnr_db(eager, reference), EAGER_SQNR_CAP_DB), sqnr_db(compiled, reference)
    assert compiled_db >= min_db, f"compiled SQNR {compiled_db:.1f} dB < {min_db} dB"
    assert compiled_db >= eager_db - slack_db, f"compiled {compiled_db:.1f} dB vs eager {eager_db:.1f} dB"
