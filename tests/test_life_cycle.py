"""The model's life cycle: one decision per layer held once, a refused kernel never runs, memory
freed with the model, every cache cleared by ``torch._dynamo.reset()``, ``mode=`` and
transformers' ``CompileConfig`` accepted, and ``optimize`` taking a model in any state."""

import gc
import subprocess
import sys
import weakref

import pytest
import torch
from test_kernels import TransposedScaleKernel

import zen_woq_pass
from zen_woq_pass.kernels import DENSE, KERNELS
from zen_woq_pass.models.measure import greedy, linear_weight_bytes
from zen_woq_pass.models.probe import packed_linear
from zen_woq_pass.planning import numerics, options, plan, platform, report, selfcheck

from helpers import FOUR_BIT_KERNELS, INPUT_IDS, KERNEL_CALLS, load


def _layer():
    return torch.nn.Sequential(packed_linear(128, 256, 64, zero_point=True, bias=True, seed=5))


class WrongEverywhere(TransposedScaleKernel):
    """The real zentorch op with its scales' groups swapped, offered on any CPU zentorch loads on."""

    def platform_reason(self, forced):
        return platform.zentorch_unusable_reason()


def test_a_kernel_refused_by_its_self_check_never_runs(monkeypatch):
    """A kernel that computes the wrong thing is refused; the layer, compiled, converted and then
    run eagerly, runs the next one."""
    monkeypatch.setattr(options, "CHAIN", (WrongEverywhere(), KERNELS["aten-int4"], DENSE))
    module = _layer()
    exact = module[0].dequantized_weight(torch.float32)
    bias = module[0].bias
    x = torch.randn(3, 256).to(torch.bfloat16)
    with torch.no_grad():
        compiled = torch.compile(module, backend="zen_woq")(x)
        eager = module(x)  # the converted module, outside any compile
    [decision] = zen_woq_pass.last_report().layers
    assert decision.kernel == "aten-int4" and "zentorch-bad-scales: self-check failed" in decision.reason
    assert type(module[0]).zen_woq_kernel.name == "aten-int4"
    for y in (compiled, eager):
        assert numerics.worst_excess(y, x, exact, bias) <= 1.0


@pytest.mark.parametrize("backend", ["inductor", "zen_woq"])
def test_deleting_the_model_frees_every_byte_without_a_dynamo_reset(backend):
    """``del`` and a collection free the model's tensors and the constants the backend made, as
    plain Inductor frees the module's tensors; dynamo's caches (kept until ``torch._dynamo.reset()``)
    must not hold them. Two calls: the first compiles and converts the layer, the second recompiles
    onto the converted module."""
    module = _layer()
    compiled = torch.compile(module, backend=backend)
    with torch.no_grad():
        for rows in (2, 2):
            compiled(torch.randn(rows, 256).to(torch.bfloat16))
    tensors = [weakref.ref(t) for t in (*module.parameters(), *module.buffers())]
    constants = [weakref.ref(t) for name, t in module.named_buffers() if name.startswith("0.zen_woq_")]
    assert bool(constants) == (backend == "zen_woq") and (plan.held_bytes() > 0) == (backend == "zen_woq")
    kept_report = zen_woq_pass.last_report()
    model = weakref.ref(module)
    del module, compiled
    gc.collect()
    assert model() is None
    assert [ref() is None for ref in tensors] == [True] * len(tensors)
    assert plan.held_bytes() == 0
    assert not any(isinstance(v, torch.Tensor) for v in vars(kept_report or report.Report("", ())).values())  # plain data


def test_a_recompiled_graph_reports_the_layers_it_calls_though_an_earlier_graph_planned_them():
    """The second graph (another input shape, dynamic=False) calls the kernel the first graph's
    plan chose on the converted module: its report still lists that layer."""
    module = _layer()
    compiled = torch.compile(module, backend="zen_woq", dynamic=False)
    reports = []
    with torch.no_grad():
        for rows in (2, 5):
            compiled(torch.randn(rows, 256).to(torch.bfloat16))
            reports.append(zen_woq_pass.last_report())
    first, second = reports
    assert second is not first
    [decision] = first.layers
    assert decision.kernel != report.DEFAULT_PATH, decision
    assert second.layers == first.layers, second
    assert not second.count_calls("rshift")  # the converted module's kernel, nothing unpacked
    if decision.kernel in KERNEL_CALLS:
        assert second.count_calls(KERNEL_CALLS[decision.kernel]) == 1, second.graph_calls


def test_a_graph_compiled_after_optimize_reports_the_layers_it_calls(checkpoints):
    """optimize converted the layers; the user's own torch.compile of the model then plans nothing
    new, and its report must still say what runs."""
    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False))
    with torch.no_grad():
        torch.compile(model, backend="zen_woq")(INPUT_IDS)
    kernels = [decision.kernel for decision in zen_woq_pass.last_report().layers]
    assert kernels == [decision.kernel for decision in model.zen_woq_report.layers if decision.kernel != report.DEFAULT_PATH]
    assert len(kernels) >= 14 - 5  # fused: q/k/v and gate/up are one layer each


def test_dynamo_reset_clears_every_cache_of_the_package():
    module = _layer()
    with torch.no_grad():
        torch.compile(module, backend="zen_woq")(torch.randn(2, 256).to(torch.bfloat16))
    assert plan._plans and selfcheck._verdicts and report.recent_reports()
    torch._dynamo.reset()
    assert not plan._plans and not selfcheck._verdicts and not report.recent_reports()


@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "max-autotune-no-cudagraphs"])
def test_compile_modes_are_accepted(mode):
    module = _layer()
    x = torch.randn(2, 256).to(torch.bfloat16)
    with torch.no_grad():
        want = module(x)
        got = torch.compile(module, backend="zen_woq", mode=mode)(x)
    assert torch.allclose(got.float(), want.float(), rtol=2**-7, atol=2e-2)


def test_generate_through_transformers_compile_config(checkpoints):
    """transformers' own compiled decoding (static cache, CompileConfig with its default mode
    "reduce-overhead") on the optimized model: the same greedy tokens as without it."""
    from transformers import CompileConfig

    path = checkpoints("llama_sym_g128")
    model = zen_woq_pass.optimize(load(path, keep=False), compile=False)
    plain = greedy(model, INPUT_IDS[:1], 8)
    model.generation_config.compile_config = CompileConfig(backend="zen_woq")
    model.generation_config.compile_config._compile_all_devices = True
    before = len(zen_woq_pass.recent_reports())
    with torch.no_grad():
        out = model.generate(INPUT_IDS[:1], max_new_tokens=8, do_sample=False, eos_token_id=None, cache_implementation="static")
    reports = zen_woq_pass.recent_reports()[before:]
    assert reports, "transformers did not compile the decode step"
    kernel = model.zen_woq_report.layers[0].kernel
    call = KERNEL_CALLS[kernel]
    assert all(r.count_calls(call) and not r.count_calls("rshift") for r in reports)  # kernels, no unpack
    tokens = out[:, INPUT_IDS.shape[1] :]
    # a static cache attends over padding: other bf16 rounding, so near-tied random logits may part later
    assert tokens.shape == plain.shape and torch.equal(tokens[:, :2], plain[:, :2])


def test_compile_config_on_a_kept_model_reports_every_graphs_layers_and_frees_them(checkpoints):
    """transformers compiles the decode step with the plain backend (issue 26): the first graph
    runs as traced (its decoder layers share one trace, keep_compressed's layer regions), then the
    one dynamo traces again onto the converted modules; that report lists the 14 layers, and
    deleting the model frees its tensors without ``torch._dynamo.reset()``."""
    from transformers import CompileConfig

    model = load(checkpoints("llama_sym_g128"))  # kept compressed: the first graph runs as traced, then the layers convert
    model.generation_config.compile_config = CompileConfig(backend="zen_woq")
    model.generation_config.compile_config._compile_all_devices = True
    before = len(zen_woq_pass.recent_reports())
    with torch.no_grad():
        model.generate(INPUT_IDS[:1], max_new_tokens=4, do_sample=False, eos_token_id=None, cache_implementation="static")
    reports = zen_woq_pass.recent_reports()[before:]
    assert len(reports) >= 2, [r.graph_calls for r in reports]
    assert reports[0].count_calls("rshift") and [len(r.layers) for r in reports] == [0] + [14] * (len(reports) - 1)
    assert {d.kernel for r in reports for d in r.layers} <= FOUR_BIT_KERNELS
    tensors = [weakref.ref(t) for t in (*model.parameters(), *model.buffers())]
    del model
    gc.collect()  # the dead weights drop the compiled code that folded them ...
    gc.collect()  # ... and its reference cycles go in the next collection
    assert sum(ref() is not None for ref in tensors) == 0
    assert plan.held_bytes() == 0


@pytest.mark.parametrize("state", ["fresh", "decompressed", "kept"])
def test_optimize_takes_a_model_in_any_state_and_holds_it_at_4_bits(checkpoints, state):
    path = checkpoints("qwen2_asym_bias")
    model = load(path, keep=state == "kept")
    if state == "decompressed":
        with torch.no_grad():
            model(INPUT_IDS)  # transformers decompresses it to dense bf16
    reference = load(path)
    with torch.no_grad():
        want = reference(INPUT_IDS).logits
    optimized = zen_woq_pass.optimize(model)
    assert optimized is model
    with torch.no_grad():
        got = model(INPUT_IDS).logits
    decisions = model.zen_woq_report.layers
    assert len(decisions) == 14 and {d.kernel for d in decisions} <= FOUR_BIT_KERNELS
    dense = sum(d.dense_bytes for d in decisions)
    assert linear_weight_bytes(model) == 0
    assert sum(d.held_bytes for d in decisions) / dense <= 0.3
    assert numerics.sqnr_db(got, want) >= 30


def test_the_runtime_never_imports_test_or_benchmark_dependencies():
    script = (
        "import sys, zen_woq_pass, zen_woq_pass.cli.main, zen_woq_pass.cli.doctor\n"
        "from zen_woq_pass.cli import doctor\n"
        "doctor.probe('aten-int4')\n"
        "print(sorted(m for m in ('llmcompressor', 'matplotlib', 'datasets') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.needs_llmcompressor
def test_optimize_right_after_calibration_in_memory(tmp_path):
    """A model straight out of llmcompressor's oneshot (fake-quant form, never saved) gets the
    4-bit kernels in one call, and computes what compressed-tensors' own fake-quant forward does."""
    from zen_woq_pass.models.testing import Recipe, calibrated_model

    model = calibrated_model(Recipe(arch="qwen2", scheme="W4A16_ASYM", seed=6), tmp_path)
    with torch.no_grad():
        want = model(INPUT_IDS).logits
    zen_woq_pass.optimize(model)
    decisions = model.zen_woq_report.layers
    assert len(decisions) == 14 and all(d.weight_form == "fake-quant" for d in decisions), model.zen_woq_report
    assert {d.kernel for d in decisions} <= FOUR_BIT_KERNELS
    with torch.no_grad():
        got = model(INPUT_IDS).logits
    assert numerics.sqnr_db(got, want) >= 30
