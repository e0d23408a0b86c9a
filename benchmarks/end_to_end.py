"""End-to-end benchmark: a medium Llama-shaped W4A16 model, three ways, side by side in one run.

    python benchmarks/end_to_end.py [--layers 8] [--hidden 2048] [--intermediate 5632] [--new-tokens 32]

The model is made here: random weights, quantized W4A16 (group 128) by llmcompressor (round to
nearest: GPTQ's result has the same shapes and speed, and takes minutes at this size). Compared:
transformers' default (decompressed to bf16 on the first forward, eager), ``torch.compile`` with
Inductor on that decompressed model, and ``zen_woq_pass.optimize`` with each kernel (eager) and with
``compile=True``. Prints time to first token, decode tokens/s and its share of the 4-bit bandwidth
bound (weight bytes over the read bandwidth, on 2 MB pages, probed around each of 7 generates a row:
the median of those rounds' shares), first-call (compile) time,
bytes held by the quantized linears' own tensors and by the kernels' constants. Greedy tokens are
compared with the eager model's: on random weights near-tied logits may flip under bf16 rounding.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time

import torch

import zen_woq_pass
from zen_woq_pass.models.measure import greedy, linear_weight_bytes, read_bandwidth_gbs, time_generation
from zen_woq_pass.models.testing import Recipe, make_checkpoint
from zen_woq_pass.planning import plan, platform

BOUND_ROUNDS = 7


def held_bytes(model) -> int:
    """What the model's kernels hold: its report's sum where ``optimize`` made one (the process-wide
    plans are keyed by checkpoint tensors that ``optimize`` lets go, so they undercount it)."""
    report = getattr(model, "zen_woq_report", None)
    return sum(d.held_bytes for d in report.layers) if report is not None else plan.held_bytes()


def beside_bandwidth(model, ids, new_tokens, rounds=BOUND_ROUNDS) -> list[tuple[float, float]]:
    """(decode ms/token, GB/s) per round: one generate between two bandwidth probes, the better
    probe counting. On a shared host the bandwidth moved between 34 and 67 GB/s within one run:
    a decode measured in a busy minute against a probe taken in a quiet one (or the reverse) says
    little, so each round's decode meets the bandwidth of its own minute."""
    pairs = []
    for _ in range(rounds):
        before = read_bandwidth_gbs()
        timing = time_generation(model, ids, new_tokens, runs=1)
        pairs.append((timing.decode_ms_per_token, max(before, read_bandwidth_gbs())))
    return pairs


def measure(label, model, ids, new_tokens):
    start = time.perf_counter()
    tokens = greedy(model, ids, new_tokens)  # first call: decompression or compilation happens here
    first = time.perf_counter() - start
    timing = time_generation(model, ids, new_tokens)
    warm = (timing.ttft_ms + new_tokens * timing.decode_ms_per_token) / 1e3
    return {
        "decode ms/token and GB/s, by round": beside_bandwidth(model, ids, new_tokens),
        "path": label,
        "first generate s": first,
        "first-call overhead s": first - warm,  # compilation (or decompression), beyond a warm generate
        "TTFT ms": timing.ttft_ms,
        "decode ms/token": timing.decode_ms_per_token,
        "decode tok/s": timing.decode_tokens_per_s,
        "linear weights MB": linear_weight_bytes(model) / 1e6,
        "kernel constants MB": held_bytes(model) / 1e6,
        "tokens": tokens[0].tolist(),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--json", help="also write the results here, for benchmarks/plot.py")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    cpu = platform.cpu_info()
    print(
        f"# {cpu.model_name} ({cpu.zen_generation}), {torch.get_num_threads()} threads; zentorch WOQ here: "
        f"{platform.zentorch_cpu_reason() or 'supported'}"
    )
    recipe = Recipe(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers, algorithm="rtn")
    ids = torch.randint(3, 256, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        path = make_checkpoint(recipe, scratch)

        def load():
            gc.collect()
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

        rows.append(measure("transformers (decompressed, eager)", load(), ids, args.new_tokens))
        torch._dynamo.reset()
        model = load()
        greedy(model, ids, 1)  # decompress first, so Inductor compiles the dense model
        model.forward = torch.compile(model.forward)
        rows.append(measure("torch.compile inductor (decompressed)", model, ids, args.new_tokens))
        del model
        reports = {}
        kernels = ["auto", "aten-int4", "dense"] + (["zentorch"] if platform.zentorch_cpu_reason() is None else [])
        for kernel, compile in [(k, False) for k in kernels] + [("auto", True)]:
            torch._dynamo.reset()
            model = zen_woq_pass.optimize(load(), kernel=kernel, compile=compile)
            label = f"zen_woq_pass.optimize(kernel={kernel}{', compile=True' if compile else ''})"
            rows.append(measure(label, model, ids, args.new_tokens))
            reports[label] = {k: len(v) for k, v in model.zen_woq_report.by_kernel().items()}
            if kernel == "auto" and not compile:
                four_bit_mb = rows[-1]["kernel constants MB"]
            del model
    bandwidths = [gbs for row in rows for _, gbs in row["decode ms/token and GB/s, by round"]]
    print(
        f"# read bandwidth {min(bandwidths):.1f}-{max(bandwidths):.1f} GB/s (2 threads, 2 MB pages, probed before and "
        f"after each of {BOUND_ROUNDS} generates a row); 4-bit weights {four_bit_mb:.0f} MB, the bound "
        f"{four_bit_mb / max(bandwidths):.2f}-{four_bit_mb / min(bandwidths):.2f} ms/token (the lm_head and embedding not counted)"
    )
    for row in rows:  # the median over rounds of the bound of each round's minute over its decode
        row["% of 4-bit bound"] = statistics.median(100 * four_bit_mb / gbs / ms for ms, gbs in row["decode ms/token and GB/s, by round"])
    base = rows[0]
    print(
        f"# {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}; prompt {args.prompt}, "
        f"{args.new_tokens} new tokens; layers per kernel: {reports}\n"
    )
    columns = [
        "first generate s",
        "first-call overhead s",
        "TTFT ms",
        "decode ms/token",
        "decode tok/s",
        "% of 4-bit bound",
        "linear weights MB",
        "kernel constants MB",
    ]
    print("| path | " + " | ".join(columns) + " | decode speed-up | same tokens |")
    print("|---" * (len(columns) + 3) + "|")
    for row in rows:
        cells = [f"{row[c]:.2f}" for c in columns]
        speedup = base["decode ms/token"] / row["decode ms/token"]
        print(f"| {row['path']} | " + " | ".join(cells) + f" | x{speedup:.2f} | {row['tokens'] == base['tokens']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": f"{cpu.model_name} ({cpu.zen_generation})", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
