"""What each decode lever gives on the real model, measured side by side in one run (issue 9).

    python benchmarks/levers.py [--threads 2] [--rounds 2]

Two tables. (1) The lm_head (SmolLM2's tied 49152x576 bf16 matrix) at one row: F.linear, torch.mv
(what ``optimize`` picks where it is faster), and the int8 / int4 weight-only kernels a quantized head
would use. (2) One decode step (one token, ``logits_to_keep=1``) of ``zen_woq_pass.optimize`` on
SmolLM2-135M W4A16 with each lever on or off: fusion of q/k/v and gate/up, and the head's torch.mv.
Each variant runs in its own process, the variants take turns for ``--rounds`` rounds, and the table
gives the median and the 10th percentile of 350 steps per process (the machine is shared: p10 is
the less noisy). Say which CPU made the numbers: the header does.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

VARIANTS = {  # name -> (fuse, torch.mv head)
    "neither": (False, False),
    "fusion": (True, False),
    "torch.mv head": (False, True),
    "both (optimize's default)": (True, True),
}
STEPS, WARMUP = 400, 50


def head_table(threads: int) -> str:
    import torch
    import torch.nn.functional as F

    from zen_woq_pass.models.measure import best_ms, median_ms

    torch.set_num_threads(threads)
    n, k = 49152, 576
    weight = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    int8 = torch.randint(-127, 127, (n, k), dtype=torch.int8)
    int8_scales = torch.rand(n).to(torch.bfloat16)
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
    int4_scales = torch.rand(k // 64, n, 2).to(torch.bfloat16)
    kernels = {
        "F.linear bf16": lambda: F.linear(x, weight),
        "torch.mv bf16 (optimize)": lambda: torch.mv(weight, x[0]),
        "int8 weight-only (_weight_int8pack_mm)": lambda: torch.ops.aten._weight_int8pack_mm(x, int8, int8_scales),
        "int4 g64 (_weight_int4pack_mm_for_cpu)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, 64, int4_scales),
    }
    lines = [f"lm_head {n}x{k} at one row, {threads} threads", "| kernel | best ms | median ms |", "|---|---|---|"]
    with torch.no_grad():
        for name, fn in kernels.items():
            best, median = best_ms(fn, runs=200), median_ms(fn, min_runs=200, min_seconds=0)
            lines.append(f"| {name} | {best:.2f} | {median:.2f} |")
    return "\n".join(lines)


def step_child(variant: str, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import zen_woq_pass
    from zen_woq_pass.models import smollm2

    torch.set_num_threads(threads)
    fuse, mv_head = VARIANTS[variant]
    model = AutoModelForCausalLM.from_pretrained(smollm2.checkpoint("w4a16-rtn"), dtype=torch.bfloat16)
    model = zen_woq_pass.optimize(model, fuse=fuse)
    if not mv_head:
        model.lm_head.__class__ = torch.nn.Linear  # undo optimize's one-row torch.mv
    ids = torch.tensor([[1234]])
    times = []
    with torch.no_grad():
        for _ in range(STEPS):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    times = sorted(times[WARMUP:])
    return {"median": statistics.median(times) * 1e3, "p10": times[len(times) // 10] * 1e3}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(step_child(args.variant, args.threads)))
        return 0
    from zen_woq_pass.planning import platform

    print(f"CPU: {platform.cpu_info().model_name}; torch threads {args.threads}\n")
    print(head_table(args.threads) + "\n")
    results = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            command = [sys.executable, __file__, "--variant", variant, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = min(r["p10"] for r in results["neither"])
    lines = ["SmolLM2-135M W4A16 RTN g64, one decode step (eager)", "| levers | median ms | p10 ms | p10 speed-up |", "|---|---|---|---|"]
    for variant, runs in results.items():
        median, p10 = min(r["median"] for r in runs), min(r["p10"] for r in runs)
        lines.append(f"| {variant} | {median:.2f} | {p10:.2f} | x{base / p10:.2f} |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
