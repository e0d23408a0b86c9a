"""``zen-woq doctor``: what this machine can run, proved by running it, and what to do next."""

from __future__ import annotations

import os

import torch

from zen_woq_pass.kernels import CHAIN
from zen_woq_pass.models.probe import packed_linear
from zen_woq_pass.planning import platform, prefill
from zen_woq_pass.planning.report import DEFAULT_PATH, last_report
from zen_woq_pass.runtime import gemv

SHOWN_FLAGS = ("avx2", "fma", *platform.ZENTORCH_WOQ_FLAGS, "amx_bf16")


def probe(kernel: str):
    """Compile a probe layer (256x512, group 128, zero points, bias) through ``backend="zen_woq"``
    with ``kernel`` and return the decision the pass made for it (gate, predicate, self-check)."""
    module = torch.nn.Sequential(packed_linear(256, 512, 128, zero_point=True, bias=True, seed=7))
    x = torch.randn(4, 512).to(torch.bfloat16)
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(module, backend="zen_woq", options={"kernel": kernel})(x)
    made = last_report()
    assert made is not None  # the compile above made one
    [decision] = made.layers
    return decision


def report() -> tuple[list[str], str]:
    """(lines of facts, one-line verdict)."""
    cpu = platform.cpu_info()
    lines = [
        f"CPU          : {cpu.model_name} [{cpu.vendor}, family {cpu.family}, model {cpu.model}] -> {cpu.zen_generation}",
        "ISA          : " + "  ".join(f"{flag}:{'yes' if flag in cpu.flags else 'no'}" for flag in SHOWN_FLAGS),
        f"threads      : {torch.get_num_threads()}",
    ]
    zentorch_reason = platform.zentorch_unusable_reason()
    if zentorch_reason:
        lines.append(f"zentorch     : {zentorch_reason}")
    else:
        import zentorch

        lines.append(f"zentorch     : {zentorch.__version__} with torch {torch.__version__} (minor versions match); WOQ ops registered")
    lines.append(f"ZENDNNL_MATMUL_ALGO: {os.environ.get('ZENDNNL_MATMUL_ALGO', 'unset (ZenDNN default)')}")
    lines.append(f"zentorch gate: {platform.zentorch_cpu_reason() or 'this CPU can run zentorch WOQ'}")
    for kernel in CHAIN:  # forced: the CPU gate is skipped, so this is the self-check's own verdict
        decision = probe(kernel.name)
        result = "passed (within the bf16 bound of the fp32 reference)" if decision.kernel == kernel.name else decision.reason
        lines.append(f"self-check   : {kernel.name}: {result}")
    auto = probe("auto")
    lines.append("rules        : by the CPU and the call's shape, never by a clock (same input, same bits; `zen-woq measure` times them here)")
    lines.append(f"  4-bit kernel: the first of {', '.join(k.name for k in CHAIN)} that passes")
    lines.append(f"  dense head  : {gemv.rule()}")
    lines.append(f"  prompt rows : {prefill.rule()}")
    if auto.kernel == DEFAULT_PATH:
        return lines, f"NO 4-bit kernel works here ({auto.reason}): layers stay on Inductor's default path."
    passed_over = f" (not {auto.reason})" if auto.reasons else ""
    return lines, f"OK: kernel='auto' uses {auto.kernel} here{passed_over}. Next: `zen-woq run`."
