"""Generation end to end with a kept-compressed, compiled model: the same greedy tokens as the
eager reference, one decoder layer traced for all, prefill and decode on the kernels after the
first prompt, bounded recompiles, and one copy of the weights at 4 bits with no extra call."""

import pytest
import torch
from torch._dynamo.utils import compilation_time_metrics
from torch._inductor.utils import run_and_get_code

import zen_woq_pass
from zen_woq_pass.models.measure import greedy, linear_weight_bytes

from helpers import INPUT_IDS, NEW_TOKENS, assert_same_greedy, load, load_reference


def _compiled(path, kernel):
    model = load(path)
    reference = greedy(load_reference(path), INPUT_IDS[:1], NEW_TOKENS)
    model.forward = torch.compile(model.forward, backend="zen_woq", options={"kernel": kernel})
    return model, reference


@pytest.mark.parametrize(
    "name, kernel",
    [("llama_sym_g128", "zentorch"), ("llama_sym_g128", "aten-int4"), ("llama_sym_g128", "default"), ("qwen2_asym_bias", "zentorch")],
)
def test_greedy_tokens_equal_the_eager_reference_but_for_near_ties(checkpoints, name, kernel):
    """keep_compressed's static cache: the decoder layers share one trace, so the first prompt runs
    as traced (compressed-tensors' math, once), then the layers take their kernels (q/k/v and
    gate/up fused: 4 calls a layer) and every later graph calls them, with no unpack left."""
    path = checkpoints(name)
    model, reference = _compiled(path, kernel)
    before, stamped = len(zen_woq_pass.recent_reports()), len(compilation_time_metrics.get("invoke_subgraph_reuse_stamp_out", []))
    tokens = greedy(model, INPUT_IDS[:1], NEW_TOKENS)
    again = greedy(model, INPUT_IDS[:1], NEW_TOKENS)  # its prompt on the kernels too
    assert len(compilation_time_metrics.get("invoke_subgraph_reuse_stamp_out", [])) > stamped  # layer 1 reused layer 0's trace
    reports = zen_woq_pass.recent_reports()[before:]
    for got in (tokens, again):
        assert_same_greedy(path, model, INPUT_IDS[:1], got, reference)
    first, later = reports[0], reports[1:]
    assert first.count_calls("rshift") >= 14 and not first.replaced  # the first prompt, as traced
    if kernel == "default":  # nothing replaced: Inductor compiles the unpack, and the prompt's graph serves again
        assert later and all(report.count_calls("rshift") >= 14 and not report.replaced for report in later)
        return
    assert len(later) >= 2, "no decode step or second prompt compiled"
    call = {"zentorch": "zentorch_woq_linear", "aten-int4": "int4pack"}[kernel]
    for report in later:  # the decode step and the second prompt
        assert report.by_kernel() == {kernel: [d.module_path for d in report.layers]}
        assert len(report.layers) == 14 and report.count_calls(call) == 8 and report.count_calls("rshift") == 0


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
    # the first prompt ran as traced, then every graph calls the kernels (fused: 4 calls a layer)
    assert all(r.count_calls("zentorch_woq_linear") == 8 for r in zen_woq_pass.recent_reports()[-warm_up + 1 :])


def test_prompts_run_on_their_kernels_without_inductor_and_the_decode_step_compiles_once(checkpoints):
    """A prompt's graph (many tokens per sequence) runs as the pass left it, with no Inductor
    compile; the decode step compiles once, for every cache length (marked as varying up front)."""
    model, reference = _compiled(checkpoints("llama_sym_g128"), "aten-int4")
    with torch.no_grad():
        _, prompt_code = run_and_get_code(model, INPUT_IDS[:1])
    assert prompt_code == []
    assert zen_woq_pass.last_report().count_calls("int4pack") == 14  # on the 4-bit kernel all the same
    tokens, codes = run_and_get_code(greedy, model, INPUT_IDS[:1], NEW_TOKENS)
    assert len(codes) == 1  # the decode step, once; the prompt again without Inductor
    assert_same_greedy(checkpoints("llama_sym_g128"), model, INPUT_IDS[:1], tokens, reference)


def test_one_copy_at_4_bits_with_no_extra_call(checkpoints):
    path = checkpoints("llama_sym_g128")
    model, reference = _compiled(path, "zentorch")
    tokens = greedy(model, INPUT_IDS[:1], NEW_TOKENS)
    report = zen_woq_pass.last_report()  # this generate's last graph: every layer, as each graph has
    dense = sum(d.dense_bytes for d in report.layers)
    constants = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for n, t in model.named_buffers() if "zen_woq_" in n}
    held = linear_weight_bytes(model) + sum(constants.values())  # what the model holds, shared storages once
    print(f"4-bit weights held after compile and generate: {held / dense:.3f}x of dense bf16")
    assert linear_weight_bytes(model) == 0  # the checkpoint's copy is gone
    assert held / dense <= 0.3 and held == sum(d.held_bytes for d in report.layers)
    assert_same_greedy(path, model, INPUT_IDS[:1], tokens, reference)
    with torch.no_grad():  # the module still works eagerly, on its kernel
        eager = type(model).forward(model, INPUT_IDS[:1, :7]).logits
        want = load_reference(path)(INPUT_IDS[:1, :7]).logits
    from zen_woq_pass.planning.numerics import sqnr_db

    assert sqnr_db(eager, want) >= 30
