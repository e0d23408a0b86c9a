"""End to end on real llmcompressor checkpoints: compiled logits vs the fp32 reference, exactly
the eligible layers rewritten to the 4-bit kernel, the rest folded to dense constants, and no
per-call unpack left for any of them."""

import pytest
import torch

import zen_woq_pass
from zen_woq_pass.kernels import CHAIN
from zen_woq_pass.planning import platform

from conftest import MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB
from helpers import (
    FOUR_BIT_KERNELS,
    INPUT_IDS,
    KERNEL_CALLS,
    assert_close_to_reference,
    count,
    four_bit_kernels_here,
    fp32_reference,
    load,
    rewritten_graphs,
    run_compiled,
)

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


@pytest.mark.parametrize("kernel", ["aten-int4", "zentorch"])  # avx512-int4: test_avx512_int4.py
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_forced_kernel_rewrites_exactly_the_eligible_layers(checkpoints, name, kernel):
    quantized, eligible = EXPECTED[name]
    report = _compile_and_check(checkpoints(name), {"kernel": kernel})
    assert len(report.layers) == quantized
    assert len(report.by_kernel().get(kernel, [])) == eligible
    for other_kernel, call in KERNEL_CALLS.items():
        assert count(report, call) == (eligible if other_kernel == kernel else 0)
    assert count(report, "rshift") == 0  # no per-call unpack left, for any quantized layer
    for decision in report.layers:
        if decision.kernel != kernel:  # what the 4-bit kernel refuses is folded once, never unpacked per call
            assert decision.kernel == "dense" and f"{kernel}: 8-bit weights" in decision.reason


def test_kernel_default_replaces_nothing(checkpoints):
    report = _compile_and_check(checkpoints("llama_sym_g128"), {"kernel": "default"})
    assert set(report.by_kernel()) == {"default"} and count(report, "rshift") == 14


def test_zero_points_and_bias_reach_the_kernel(checkpoints):
    _compile_and_check(checkpoints("qwen2_asym_bias"), {"kernel": "zentorch"})
    [graph] = rewritten_graphs(load(checkpoints("qwen2_asym_bias")), {"kernel": "zentorch"})
    calls = [n for n in graph.graph.nodes if "zentorch_woq_linear" in str(n.target)]
    assert len(calls) == 14
    assert all(n.args[3] is not None for n in calls), "asymmetric layers must pass zero points"
    with_bias = [n for n in calls if n.args[4] is not None]
    assert len(with_bias) == 6  # q/k/v of two Qwen2 layers


def _assert_first_of_the_chain(report):
    """Each layer on the first 4-bit kernel of the chain that qualifies, by rule, never by a clock:
    every kernel before it named in the reasons with why not, none after it."""
    order = [kernel.name for kernel in CHAIN]
    for decision in report.layers:
        assert decision.kernel in FOUR_BIT_KERNELS, decision
        assert [reason.split(":")[0] for reason in decision.reasons] == order[: order.index(decision.kernel)], decision


def test_auto_follows_the_platform_gate_here(checkpoints):
    report = _compile_and_check(checkpoints("llama_sym_g128"), None)
    _assert_first_of_the_chain(report)
    first_here = next(kernel.name for kernel in CHAIN if kernel.name in four_bit_kernels_here())
    assert set(report.by_kernel()) == {first_here}
    assert "zentorch" not in report.by_kernel()  # aten's takes every layer zentorch's would


def test_auto_takes_the_first_qualifying_kernel_as_a_zen4_would(checkpoints, zen4_cpu):
    _assert_first_of_the_chain(_compile_and_check(checkpoints("qwen2_asym_bias"), None))


def test_auto_on_zen3_falls_through_to_the_aten_int4_kernel(checkpoints, zen3_cpu):
    report = _compile_and_check(checkpoints("qwen2_asym_bias"), {"kernel": "auto"})
    assert set(report.by_kernel()) == {"aten-int4"}
    assert count(report, "zentorch_woq_linear") == 0 and count(report, "int4pack_linear") == 14
    for decision in report.layers:
        assert decision.reason.startswith("avx512-int4: ") and "zentorch" not in decision.reason


def test_auto_folds_8_bit_layers_to_dense_constants_with_each_kernels_reason(checkpoints):
    report = _compile_and_check(checkpoints("llama_w8a16"), None)
    assert set(report.by_kernel()) == {"dense"}
    assert count(report, "rshift") == 0
    for decision in report.layers:
        assert "aten-int4: 8-bit weights" in decision.reason
    assert "held dense" in report.memory_note


def test_forced_zentorch_on_zen3_needs_the_reference_algorithm_and_is_correct(checkpoints, zen3_cpu):
    # Forced, the CPU gate gives way only to ZenDNN's reference algorithm; the self-check then decides.
    report = _compile_and_check(checkpoints("llama_sym_g128"), {"kernel": "zentorch"})
    if platform.zendnn_reference_algorithm():
        assert len(report.by_kernel()["zentorch"]) == 14
    else:
        assert set(report.by_kernel()) == {"dense"}
        assert all("needs ZENDNNL_MATMUL_ALGO=9" in d.reason for d in report.layers)


def test_env_var_selects_the_kernel(checkpoints, monkeypatch):
    monkeypatch.setenv("ZEN_WOQ_KERNEL", "aten-int4")
    report = _compile_and_check(checkpoints("llama_sym_g128"), None)
    assert set(report.by_kernel()) == {"aten-int4"}
    assert count(report, "zentorch_woq_linear") == 0


def test_unknown_kernel_is_a_clear_error(checkpoints):
    model = load(checkpoints("llama_sym_g128"))
    with pytest.raises(Exception, match="kernel='nope' is not one of"):
        run_compiled(model, {"kernel": "nope"})


def test_fullgraph_has_no_graph_breaks(checkpoints):
    model = load(checkpoints("qwen2_asym_bias"))
    run_compiled(model, {"kernel": "zentorch"}, fullgraph=True)
    assert len(zen_woq_pass.last_report().layers) == 14


def test_inductor_options_and_modes_pass_through(checkpoints, monkeypatch):
    import zen_woq_pass.graph.backend as backend

    patches = []
    real = backend.compile_fx
    monkeypatch.setattr(
        backend, "compile_fx", lambda gm, inputs, config_patches: patches.append(config_patches) or real(gm, inputs, config_patches=config_patches)
    )
    step = INPUT_IDS[:, :1]  # one token: a decode step's graph, which Inductor compiles (a prompt's runs as it is)
    model = load(checkpoints("llama_sym_g128"))
    run_compiled(model, {"kernel": "zentorch", "freezing": True}, input_ids=step)
    assert len(zen_woq_pass.last_report().by_kernel()["zentorch"]) == 14
    assert patches[-1] == {"freezing": True}
    torch._dynamo.reset()
    run_compiled(load(checkpoints("llama_sym_g128")), None, input_ids=step, mode="max-autotune-no-cudagraphs")
    assert patches[-1] == {"max_autotune": True, "coordinate_descent_tuning": True}
    torch._dynamo.reset()
    run_compiled(load(checkpoints("llama_sym_g128")), None, input_ids=step, mode="reduce-overhead")  # CUDA graphs: none on CPU
    assert patches[-1] == {}


def test_report_prints_a_row_per_layer(checkpoints):
    report = _compile_and_check(checkpoints("llama_w8a16"), {"kernel": "zentorch"})
    text = str(report)
    assert text.count("\n") == 1 + 14 + 1  # title, header, a row per layer, the memory line
    assert text.splitlines()[-1].startswith("memory: ")
    assert "model.layers.1.mlp.down_proj" in text and "8-bit weights" in text
    assert "<table>" in report._repr_html_()
