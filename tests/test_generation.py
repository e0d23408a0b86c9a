"""Generation end to end with a kept-compressed, compiled model: the same greedy tokens as the
eager reference, prefill and decode both on the rewritten path, bounded recompiles, and memory."""

import pytest
import torch
from helpers import INPUT_IDS, load

import zen_woq_pass
from zen_woq_pass.measure import compare_greedy, greedy, linear_weight_bytes

NEW_TOKENS = 32
_references = {}


def load_reference(path):
    """The eager kept-compressed model: compressed-tensors' own math, bit for bit."""
    if path not in _references:
        _references[path] = load(path)
    return _references[path]


def _compiled(path, kernel):
    model = load(path)
    reference = greedy(load_reference(path), INPUT_IDS[:1], NEW_TOKENS)
    model.forward = torch.compile(model.forward, backend="zen_woq", options={"kernel": kernel})
    return model, reference


def assert_same_greedy(path, model, ids, tokens, reference_tokens):
    comparison = compare_greedy(load_reference(path), model, ids, tokens, reference_tokens)
    print(comparison.explain())
    assert comparison.acceptable, comparison.explain()


@pytest.mark.parametrize(
    "name, kernel",
    [("llama_sym_g128", "zentorch"), ("llama_sym_g128", "aten-int4"), ("llama_sym_g128", "default"), ("qwen2_asym_bias", "zentorch")],
)
def test_greedy_tokens_equal_the_eager_reference_but_for_near_ties(checkpoints, name, kernel):
    path = checkpoints(name)
    model, reference = _compiled(path, kernel)
    before = len(zen_woq_pass.recent_reports())
    tokens = greedy(model, INPUT_IDS[:1], NEW_TOKENS)
    reports = zen_woq_pass.recent_reports()[before:]
    assert_same_greedy(path, model, INPUT_IDS[:1], tokens, reference)
    assert reports, "generate compiled no graph"
    expected = kernel if kernel != "default" else "default"
    for report in reports:  # prefill (M = prompt length) and decode (M = 1) graphs alike
        assert report.by_kernel() == {expected: [d.module_path for d in report.layers]}


def test_new_prompt_lengths_and_batches_do_not_recompile(checkpoints):
    model, _ = _compiled(checkpoints("qwen2_asym_bias"), "zentorch")

    def compiles_for(shapes):
        before = len(zen_woq_pass.recent_reports())
        for batch, length in shapes:
            greedy(model, torch.randint(3, 256, (batch, length), generator=torch.Generator().manual_seed(length)), 3)
        return len(zen_woq_pass.recent_reports()) - before

    warm_up = compiles_for([(1, 5), (1, 9), (2, 7), (2, 11)])  # static graphs, then dynamic seq and batch
    later = compiles_for([(1, 13), (1, 17), (2, 15), (3, 6), (4, 21)])
    print(f"graphs compiled: {warm_up} while warming up on 4 shapes, {later} for 5 new ones")
    assert warm_up <= 8 and later == 0
    assert all(set(r.by_kernel()) == {"zentorch"} for r in zen_woq_pass.recent_reports()[-warm_up:])


def test_memory_one_copy_at_4_bits_after_release(checkpoints):
    path = checkpoints("llama_sym_g128")
    model, reference = _compiled(path, "zentorch")
    greedy(model, INPUT_IDS[:1], 2)
    report = zen_woq_pass.last_report()
    dense = sum(d.out_features * d.in_features * 2 for d in report.layers)  # bf16 bytes of those layers
    held = linear_weight_bytes(model) + report.kernel_constant_bytes
    assert "release_module_weights" in str(report)
    assert 0.45 < held / dense < 0.6  # both copies: module's packed weights and the kernels'
    released = zen_woq_pass.release_module_weights(model)
    assert released == report.module_weight_bytes
    held = linear_weight_bytes(model) + report.kernel_constant_bytes
    print(f"4-bit weights held: {held / dense:.3f}x of dense bf16")
    assert held / dense <= 0.35
    tokens = greedy(model, INPUT_IDS[:1], NEW_TOKENS)  # the compiled graphs read the kernels' copy
    assert_same_greedy(path, model, INPUT_IDS[:1], tokens, reference)
    torch._dynamo.reset()  # fresh compiles (and eager) now run the kernels on their constants
    ids = INPUT_IDS[1:2, :7]
    assert_same_greedy(path, model, ids, greedy(model, ids, 8), greedy(load_reference(path), ids, 8))
