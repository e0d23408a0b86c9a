"""End to end on real llmcompressor checkpoints: compiled logits vs the fp32 reference, and
exactly the eligible layers rewritten to zentorch_woq_linear with no per-call unpack left."""

import pytest
import torch
from conftest import MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB, zentorch_cpu_ok
from helpers import INPUT_IDS, assert_close_to_reference, count, fp32_reference, load, run_compiled

import zen_woq_pass

# name -> (quantized linears, of which eligible for the 4-bit kernel)
EXPECTED = {
    "llama_sym_g128": (14, 14),
    "qwen2_asym_bias": (14, 14),
    "llama_channel": (14, 14),
    "llama_w8a16": (14, 0),
    "llama_partial": (8, 8),
}


def _compile_and_check(path, options):
    model = load(path)
    with torch.no_grad():
        eager = model(INPUT_IDS).logits
    compiled = run_compiled(model, options)
    assert_close_to_reference(compiled, eager, fp32_reference(path), MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB)
    return zen_woq_pass.last_report()


# kernel -> the call its rewritten layers become in the graph
KERNEL_CALLS = {"zentorch": "zentorch_woq_linear", "aten-int4": "int4pack_linear"}


@pytest.mark.parametrize("kernel", sorted(KERNEL_CALLS))
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forced_kernel_rewrites_exactly_the_eligible_layers(checkpoints, name, kernel):
    quantized, eligible = EXPECTED[name]
    report = _compile_and_check(checkpoints(name), {"kernel": kernel})
    assert len(report.layers) == quantized
    assert len(report.by_kernel().get(kernel, [])) == eligible
    for other_kernel, call in KERNEL_CALLS.items():
        assert count(report, call) == (eligible if other_kernel == kernel else 0)
    # the per-call unpack (shift) survives only for layers left on the default path
    assert count(report, "rshift") == quantized - eligible
    for decision in report.layers:
        if decision.kernel != kernel:
            assert decision.kernel == "default" and f"{kernel}: 8-bit weights" in decision.reason


def test_zero_points_and_bias_reach_the_kernel(checkpoints):
    report = _compile_and_check(checkpoints("qwen2_asym_bias"), {"kernel": "zentorch"})
    calls = [n for n in report.graph_module.graph.nodes if "zentorch_woq_linear" in str(n.target)]
    assert all(n.args[3] is not None for n in calls), "asymmetric layers must pass zero points"
    with_bias = [n for n in calls if n.args[4] is not None]
    assert len(with_bias) == 6  # q/k/v of two Qwen2 layers


def test_auto_follows_the_platform_gate_here(checkpoints):
    report = _compile_and_check(checkpoints("llama_sym_g128"), None)
    if zentorch_cpu_ok():
        assert report.by_kernel() == {"zentorch": [d.module_path for d in report.layers]}
    else:
        assert set(report.by_kernel()) == {"aten-int4"}
        assert all("AVX512-BF16" in d.reason for d in report.layers)


def test_auto_on_zen3_falls_through_to_the_aten_int4_kernel(checkpoints, zen3_cpu):
    report = _compile_and_check(checkpoints("qwen2_asym_bias"), {"kernel": "auto"})
    assert set(report.by_kernel()) == {"aten-int4"}
    assert count(report, "zentorch_woq_linear") == 0 and count(report, "int4pack_linear") == 14
    for decision in report.layers:
        assert decision.reason.startswith("zentorch: Zen 3 CPU lacks") and "avx512_bf16" in decision.reason


def test_auto_leaves_8_bit_layers_on_the_default_path_with_each_kernels_reason(checkpoints):
    report = _compile_and_check(checkpoints("llama_w8a16"), None)
    assert set(report.by_kernel()) == {"default"}
    assert count(report, "rshift") == 14
    for decision in report.layers:
        assert "aten-int4: 8-bit weights" in decision.reason


def test_forced_zentorch_on_zen3_is_still_checked_and_correct(checkpoints, zen3_cpu):
    # The gate's CPU check is skipped when forced; the self-check decides (ALGO=9 makes it pass).
    report = _compile_and_check(checkpoints("llama_sym_g128"), {"kernel": "zentorch"})
    assert len(report.by_kernel()["zentorch"]) == 14


def test_env_var_selects_the_kernel(checkpoints, monkeypatch):
    monkeypatch.setenv("ZEN_WOQ_KERNEL", "default")
    report = _compile_and_check(checkpoints("llama_sym_g128"), None)
    assert set(report.by_kernel()) == {"default"}
    assert count(report, "zentorch_woq_linear") == 0


def test_unknown_kernel_is_a_clear_error(checkpoints):
    model = load(checkpoints("llama_sym_g128"))
    with pytest.raises(Exception, match="kernel='nope' is not one of"):
        run_compiled(model, {"kernel": "nope"})


def test_fullgraph_has_no_graph_breaks(checkpoints):
    model = load(checkpoints("qwen2_asym_bias"))
    run_compiled(model, {"kernel": "zentorch"}, fullgraph=True)
    assert len(zen_woq_pass.last_report().layers) == 14


def test_inductor_options_pass_through(checkpoints):
    model = load(checkpoints("llama_sym_g128"))
    run_compiled(model, {"kernel": "zentorch", "freezing": True})
    assert len(zen_woq_pass.last_report().by_kernel()["zentorch"]) == 14


def test_report_prints_a_row_per_layer(checkpoints):
    report = _compile_and_check(checkpoints("llama_w8a16"), {"kernel": "zentorch"})
    text = str(report)
    assert text.count("\n") == 1 + 14
    assert "model.layers.1.mlp.down_proj" in text and "8-bit weights" in text
    assert "<table>" in report._repr_html_()
