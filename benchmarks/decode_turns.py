"""Decode speed of llama.cpp and zen_woq taking turns in one process (issue 9, target 1).

    python benchmarks/decode_turns.py [--threads 2] [--turns 7] [--new-tokens 64]

Why: on a shared host the speed of a row moves by 30 % and more within minutes, so rows measured
one after another (``vs_llamacpp.py``) can put a slow spell on one side of a ratio. Here each
engine loads in its own process and waits; then every engine decodes once per turn, in the same
minute, while the others wait idle on a pipe. The table gives each engine's median and its median
ratio to llama.cpp Q4_1 over the turns. (All in one process, llama.cpp's and torch's threads and
four models' weights got in each other's way: every engine ran 20-40 % slower.) Engines:
llama.cpp Q4_1 (the GGUF as shipped), and SmolLM2 W4A16 through ``zen_woq_pass.optimize`` with
``compile=True`` (each layer compiled once; and the step as one graph from Inductor's C++ wrapper,
``cpp_wrapper=True``, for the lever's worth), the opt-in int8 head, and the eager default. Speed
only: quality is ``vs_llamacpp.py``'s.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import subprocess
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from vs_llamacpp import PROMPT, llama, llama_greedy, llama_timing, machine

import zen_woq_pass
from zen_woq_pass.models import quality, smollm2
from zen_woq_pass.models.measure import greedy, time_generation

# label -> optimize's keywords
ZEN_WOQ = {
    "zen_woq optimize() (the default: compiled decode step)": {},
    "zen_woq compile=True, cpp_wrapper=True (one graph)": {"compile": True, "cpp_wrapper": True},
    "zen_woq compile=True + lm_head=int8 (opt-in)": {"compile": True, "lm_head": "int8"},
    "zen_woq compile=False (every step eager)": {"compile": False},
}
LLAMA = "llama.cpp Q4_1 (GGUF as shipped)"


def _extra_bufts_work(gguf: str, threads: int) -> bool:
    """Whether llama.cpp's extra buffer types run here (their AMX path dies of SIGILL on some CPUs)."""
    probe = f"from vs_llamacpp import llama; llama({gguf!r}, {threads}, 64).eval([1, 2, 3])"
    done = subprocess.run([sys.executable, "-c", probe], cwd=sys.path[0], capture_output=True)
    return done.returncode != -signal.SIGILL


def _engine(label: str, threads: int, new: int) -> None:
    """One engine in this (child) process: load and warm up, then one decode per line on stdin."""
    torch.set_num_threads(threads)
    path = smollm2.checkpoint()
    ids = AutoTokenizer.from_pretrained(path)(quality.evaluation_text()).input_ids[:PROMPT]
    start, note = time.perf_counter(), ""
    if label == LLAMA:
        gguf = str(smollm2.gguf_path())
        extra_bufts = _extra_bufts_work(gguf, threads)
        note = "" if extra_bufts else "[extra buffer types off]"
        llm = llama(gguf, threads, 2048, extra_bufts=extra_bufts)
        llama_greedy(llm, ids, 8)

        def decode():
            return llama_timing(llm, ids, new, runs=1)[1]
    else:
        model = zen_woq_pass.optimize(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16), **ZEN_WOQ[label])
        prompt = torch.tensor([ids])
        greedy(model, prompt, 8)  # compiles where asked

        def decode():
            return time_generation(model, prompt, new, runs=1).decode_tokens_per_s

    print(f"ready {time.perf_counter() - start:.1f} {note}", flush=True)
    for _ in sys.stdin:
        rate = decode()  # None where the decode beat time_generation's timer floor
        print("nan" if rate is None else rate, flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--turns", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine:
        _engine(args.engine, args.threads, args.new_tokens)
        return 0
    info = machine(args.threads)
    children = {}
    for label in (LLAMA, *ZEN_WOQ):  # started one at a time: each compiles alone
        command = [sys.executable, __file__, "--engine", label, "--threads", str(args.threads), "--new-tokens", str(args.new_tokens)]
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        _, seconds, *note = child.stdout.readline().strip().split(maxsplit=2)
        print(f"# {label}: loaded, first generate done in {seconds} s", file=sys.stderr, flush=True)
        children[" ".join([label, *note])] = child

    speeds = {label: [] for label in children}
    for turn in range(args.turns):
        for label, child in children.items():  # the others wait on a pipe, idle
            time.sleep(0.5)  # let the last engine's threads go idle
            child.stdin.write("go\n")
            child.stdin.flush()
            speeds[label].append(float(child.stdout.readline()))
        print(f"# turn {turn + 1}: " + ", ".join(f"{s[-1]:.1f}" for s in speeds.values()), file=sys.stderr, flush=True)
    for child in children.values():
        child.stdin.close()
        child.wait()

    base = next(iter(speeds.values()))  # llama.cpp's
    print(
        f"# {info['cpu']}; {info['threads']} threads; read bandwidth {info['read GB/s']:.1f} GB/s; "
        f"load average {info['load average']:.1f} at the start; torch {info['versions']['torch']}"
    )
    print(f"decode tok/s, {args.new_tokens} tokens after a {PROMPT}-token prompt, {args.threads} threads, {args.turns} turns")
    print("| engine | median tok/s | median ratio to llama.cpp | all turns |")
    print("|---|---|---|---|")
    for label, rates in speeds.items():
        ratios = [r / b for r, b in zip(rates, base) if not (math.isnan(r) or math.isnan(b))]
        timed = [r for r in rates if not math.isnan(r)]
        median, ratio = (statistics.median(v) if v else math.nan for v in (timed, ratios))
        print(f"| {label} | {median:.1f} | x{ratio:.2f} | {' '.join(f'{r:.0f}' for r in rates)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
