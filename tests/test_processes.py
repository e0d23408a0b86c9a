"""Checks that need a fresh interpreter: backend discovery by entry point, and zentorch with
ZenDNN's default algorithm (ZENDNNL_MATMUL_ALGO is read once per process)."""

import os
import subprocess
import sys
import textwrap

from zen_woq_pass.planning import platform

SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    from compressed_tensors.compressors import ModelCompressor  # noqa: F401
    path, kernel = sys.argv[1], sys.argv[2]
    ids = torch.randint(3, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        want = reference(ids).logits
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert "zen_woq_pass" not in sys.modules
    assert "zen_woq" in torch._dynamo.list_backends()
    import zen_woq_pass
    zen_woq_pass.keep_compressed(model)
    with torch.no_grad():
        got = torch.compile(model, backend="zen_woq", options={"kernel": kernel})(ids).logits
    from zen_woq_pass.planning.numerics import sqnr_db
    report = zen_woq_pass.last_report()
    print("SQNR", sqnr_db(got, want))
    print("KERNELS", sorted(report.by_kernel()))
    print("REASONS", sorted({d.reason for d in report.layers}))
    """
)


def _run(path, kernel, env_overrides):
    env = {k: v for k, v in os.environ.items() if k != "ZENDNNL_MATMUL_ALGO"} | env_overrides
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path), kernel], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line[:4] in ("SQNR", "KERN", "REAS"))
    return float(lines["SQNR"]), eval(lines["KERNELS"]), eval(lines["REASONS"])


def test_entry_point_and_default_zendnn_algorithm_never_give_a_wrong_answer(checkpoints):
    """Forced zentorch with ZenDNN's default algorithm: where the platform gate says yes (Zen 4) the
    kernel is right and is used; where it says no (Zen 3, other CPUs), the default algorithm is
    not trusted even when forced, and the layers go to the dense fallback. Either way the answer
    is right."""
    sqnr, kernels, reasons = _run(checkpoints("qwen2_asym_bias"), "zentorch", {})
    assert sqnr >= 35.0
    if platform.zentorch_cpu_reason() is None:
        assert kernels == ["zentorch"]
    else:
        assert kernels == ["dense"]
        assert all("needs ZENDNNL_MATMUL_ALGO=9" in reason for reason in reasons)
