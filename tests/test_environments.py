"""Wrong environments: no zentorch, other model dtypes, training. Each compiles and runs correctly
on whatever path is left, and the report (or ``zen-woq doctor``) says why."""

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB
from helpers import INPUT_IDS, assert_close_to_reference, four_bit_kernels_here, fp32_reference, load, run_compiled

import zen_woq_pass
from zen_woq_pass import platform

WITHOUT_ZENTORCH = four_bit_kernels_here(zentorch=False)  # what auto may pick here when zentorch is out


def test_without_zentorch_auto_uses_another_4_bit_kernel_and_doctor_says_why(checkpoints):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["zentorch"] = None  # as if not installed: importing it raises ImportError
        import torch, zen_woq_pass
        from zen_woq_pass import doctor
        from transformers import AutoModelForCausalLM
        model = zen_woq_pass.keep_compressed(AutoModelForCausalLM.from_pretrained({str(checkpoints("llama_sym_g128"))!r}, dtype=torch.bfloat16))
        with torch.no_grad():
            torch.compile(model, backend="zen_woq")(torch.randint(3, 256, (1, 6)))
        report = zen_woq_pass.last_report()
        print("KERNELS", sorted(report.by_kernel()))
        print("REASON", report.layers[0].reason)
        lines, verdict = doctor.report()
        print("VERDICT", verdict)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.split(" ")[0] in ("KERNELS", "REASON", "VERDICT"))
    kernels = set(eval(out["KERNELS"]))  # the M=1 race runs per layer shape: near-ties may split
    assert kernels and kernels <= WITHOUT_ZENTORCH
    assert out["REASON"].startswith("zentorch: zentorch is not importable")
    assert any(f"uses {kernel} here" in out["VERDICT"] for kernel in WITHOUT_ZENTORCH), out["VERDICT"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_model_dtypes_skip_zentorch_and_stay_correct(checkpoints, dtype):
    path = checkpoints("qwen2_asym_bias")
    model = load(path, dtype=dtype)
    with torch.no_grad():
        eager = model(INPUT_IDS).logits
    compiled = run_compiled(model, None)
    report = zen_woq_pass.last_report()
    assert set(report.by_kernel()) == {"aten-int4"}
    gate = platform.zentorch_cpu_reason()  # the CPU gate speaks first where it says no
    expected = f"zentorch: {gate}" if gate else f"activations are {dtype}; zentorch WOQ takes bfloat16 only"
    assert all(expected in d.reason for d in report.layers)
    assert_close_to_reference(compiled, eager, fp32_reference(path), MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB)


def test_training_mode_with_grads_folds_dense_and_backpropagates(checkpoints):
    model = load(checkpoints("llama_sym_g128")).train()
    compiled = torch.compile(model, backend="zen_woq")
    logits = compiled(INPUT_IDS).logits  # grad mode on: hidden states require grad
    logits.float().logsumexp(-1).mean().backward()
    assert model.model.embed_tokens.weight.grad is not None
    report = zen_woq_pass.last_report()
    assert set(report.by_kernel()) == {"dense"}  # F.linear on a folded constant: activations get their grads
    assert all("no backward" in d.reason for d in report.layers)


def test_zentorch_for_another_torch_minor_is_refused(checkpoints, tmp_path):
    """A zentorch wheel built for torch 2.14 beside torch 2.13: loads a subset, no WOQ ops."""
    other = tmp_path / "site" / "zentorch"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text('__version__ = "2.14.0.1"\n')
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "site")!r})
        import torch, zen_woq_pass
        from zen_woq_pass.probe import packed_linear
        with torch.no_grad():
            torch.compile(torch.nn.Sequential(packed_linear(64, 256)), backend="zen_woq")(torch.randn(2, 256).to(torch.bfloat16))
        print("DECISION", zen_woq_pass.last_report().layers[0].kernel, "|", zen_woq_pass.last_report().layers[0].reason)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    decision = next(line for line in done.stdout.splitlines() if line.startswith("DECISION"))
    kernel, reason = decision.removeprefix("DECISION ").split(" | ")
    assert kernel in WITHOUT_ZENTORCH and reason.startswith("zentorch: zentorch 2.14.0.1 is built for another torch minor version")
