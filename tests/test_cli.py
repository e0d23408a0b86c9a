"""The command line a new user runs first: ``zen-woq doctor`` and ``zen-woq run``."""

import subprocess
import sys

from zen_woq_pass import platform


def _zen_woq(*args):
    done = subprocess.run([sys.executable, "-m", "zen_woq_pass", *args], capture_output=True, text=True, timeout=600)
    return done.returncode, done.stdout


def test_doctor_gives_facts_self_checks_and_a_verdict():
    rc, out = _zen_woq("doctor")
    assert rc == 0, out
    assert "avx512_bf16:" in out and "zentorch     : 2.13" in out
    assert "self-check   : aten-int4: passed" in out
    expected = "uses zentorch here" if platform.zentorch_cpu_reason() is None else "uses aten-int4 here"
    assert expected in out.splitlines()[-1]


def test_run_on_the_embedded_default():
    rc, out = _zen_woq("run", "--max-new-tokens", "12")
    assert rc == 0, out
    assert "(embedded default)" in out and "14 quantized linear(s)" in out
    assert "vs the eager compressed-tensors reference: " in out
    assert "decode:" in out and "tokens/s" in out
    released = next(line for line in out.splitlines() if "after zen_woq_pass.release_module_weights" in line)
    assert "0.00 MB in the model" in released and "0.26x of the dense bf16" in released
