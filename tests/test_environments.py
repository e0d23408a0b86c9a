"""Wrong environments: no zentorch, other model dtypes, training. Each compiles and runs correctly
on whatever path is left, and the report (or ``zen-woq doctor``) says why."""

import subprocess
import sys
import textwrap

import pytest
import torch

import zen_woq_pass
from zen_woq_pass.kernels import CHAIN, native
from zen_woq_pass.planning import platform

from conftest import MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB
from helpers import INPUT_IDS, assert_close_to_reference, four_bit_kernels_here, fp32_reference, load, run_compiled

WITHOUT_ZENTORCH = four_bit_kernels_here(zentorch=False)  # what auto may pick here when zentorch is out


def test_without_zentorch_auto_uses_another_4_bit_kernel_and_doctor_says_why(checkpoints):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["zentorch"] = None  # as if not installed: importing it raises ImportError
        import torch, zen_woq_pass
        from zen_woq_pass.cli import doctor
        from transformers import AutoModelForCausalLM
        def load():
            path = {str(checkpoints("llama_sym_g128"))!r}
            return zen_woq_pass.keep_compressed(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
        with torch.no_grad():
            torch.compile(load(), backend="zen_woq")(torch.randint(3, 256, (1, 6)))
        report = zen_woq_pass.last_report()
        print("KERNELS", sorted(report.by_kernel()))
        torch._dynamo.reset()
        with torch.no_grad():  # forced, it falls back to dense and says why
            torch.compile(load(), backend="zen_woq", options={{"kernel": "zentorch"}})(torch.randint(3, 256, (1, 6)))
        print("FORCED", zen_woq_pass.last_report().layers[0].kernel, "|", zen_woq_pass.last_report().layers[0].reason)
        lines, verdict = doctor.report()
        print("DOCTOR", next(line for line in lines if line.startswith("zentorch     :")))
        print("VERDICT", verdict)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.split(" ")[0] in ("KERNELS", "FORCED", "DOCTOR", "VERDICT"))
    first_here = next(kernel.name for kernel in CHAIN if kernel.name in WITHOUT_ZENTORCH)
    assert set(eval(out["KERNELS"])) == {first_here}  # the chain's first that runs here, every layer
    kernel, reason = out["FORCED"].split(" | ")
    assert kernel == "dense" and reason.startswith("zentorch: zentorch is not importable")
    assert out["DOCTOR"].startswith("zentorch     : zentorch is not importable"), out["DOCTOR"]
    assert f"uses {first_here} here" in out["VERDICT"], out["VERDICT"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_model_dtypes_skip_zentorch_and_stay_correct(checkpoints, dtype):
    path = checkpoints("qwen2_asym_bias")
    model = load(path, dtype=dtype)
    with torch.no_grad():
        eager = model(INPUT_IDS).logits
    compiled = run_compiled(model, None)
    report = zen_woq_pass.last_report()
    assert set(report.by_kernel()) == {"aten-int4"}  # the only one of the chain that takes them
    native_reason = native.unavailable_reason()  # avx512-int4 speaks first: its library, else the dtype
    expected = f"avx512-int4: {native_reason}" if native_reason else f"avx512-int4: activations are {dtype}; it takes bfloat16"
    assert all(d.reason.startswith(expected) for d in report.layers), report.layers[0].reason
    assert_close_to_reference(compiled, eager, fp32_reference(path), MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB)
    torch._dynamo.reset()
    forced = run_compiled(load(path, dtype=dtype), {"kernel": "zentorch"})  # a fresh model: the first is converted
    gate = platform.zentorch_cpu_reason()  # forced, the CPU gate still speaks first where it says no
    expected = (
        f"zentorch: {gate}" if gate and not platform.zendnn_reference_algorithm() else f"activations are {dtype}; zentorch WOQ takes bfloat16 only"
    )
    assert all(expected in d.reason for d in zen_woq_pass.last_report().layers), zen_woq_pass.last_report().layers[0].reason
    assert_close_to_reference(forced, eager, fp32_reference(path), MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB)


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
        from zen_woq_pass.models.probe import packed_linear
        with torch.no_grad():
            torch.compile(torch.nn.Sequential(packed_linear(64, 256)), backend="zen_woq", options={{"kernel": "zentorch"}})(torch.randn(2, 256).to(torch.bfloat16))
        print("DECISION", zen_woq_pass.last_report().layers[0].kernel, "|", zen_woq_pass.last_report().layers[0].reason)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    decision = next(line for line in done.stdout.splitlines() if line.startswith("DECISION"))
    kernel, reason = decision.removeprefix("DECISION ").split(" | ")
    assert kernel == "dense" and reason.startswith("zentorch: zentorch 2.14.0.1 is built for another torch minor version")
