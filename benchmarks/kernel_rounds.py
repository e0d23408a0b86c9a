"""The 4-bit kernels as a model streams them: one round over all of a model's layers, not one layer
repeated in cache.

    python benchmarks/kernel_rounds.py [--threads 2] [--rows 1 2 4 8 16]

Why rounds: a kernel called on one layer in a loop reads its weights from L1/L2; a decode step
reads every layer once, from L3 or memory. The last release's bf16 kernel beat aten's in the first
setting and lost in the second. Per model shape set (SmolLM2-135M, 30 layers; a hidden-2048 model,
4 layers) and number of rows, the best of 50 rounds of: our avx512-int4 kernel, aten's int4 kernel,
and a dense bf16 ``F.linear`` (one layer's weights per shape, in cache: a floor for it, not a
round). Random weights, packed by the kernels' own code. Ratios are comparable within one run only.
"""

from __future__ import annotations

import argparse

import torch

from zen_woq_pass.kernels import native
from zen_woq_pass.kernels.avx512_int4 import by_block, pack_codes
from zen_woq_pass.models.measure import best_ms

ROUNDS = 50  # best of
MODELS = {  # name: (layers, [(out_features, in_features, group)])
    "SmolLM2-135M": (30, [(960, 576, 64), (576, 576, 64), (3072, 576, 64), (576, 1536, 64)]),
    "hidden 2048": (4, [(3072, 2048, 128), (2048, 2048, 128), (11264, 2048, 128), (2048, 5632, 128)]),
}


def _layer(n: int, k: int, group: int) -> dict:
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, k // group) * 0.02 + 1e-3).to(torch.bfloat16)
    codes = (q.to(torch.int16) + 8).to(torch.uint8)
    zero = torch.full(scale.shape, 8, dtype=torch.uint8)
    aten_scale_zero = torch.stack([scale.float(), torch.zeros_like(scale.float())], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return {
        "ours": (pack_codes(codes), by_block(scale), by_block(zero)),
        "aten": (torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1), group, aten_scale_zero),
        "dense": (q.float() * scale.float().repeat_interleave(group, 1)).to(torch.bfloat16),
        "bytes": codes.numel() // 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reason = native.unavailable_reason()
    if reason:
        raise SystemExit(f"avx512-int4 cannot run here: {reason}")
    print(f"# {args.threads} threads; best of {ROUNDS} rounds")
    print("| model | rows | avx512-int4 ms | aten-int4 ms | aten / ours | dense bf16 ms (one layer per shape in cache, x layers) |")
    print("|---|---|---|---|---|---|")
    for name, (count, shapes) in MODELS.items():
        layers = [(k, _layer(n, k, group)) for _ in range(count) for n, k, group in shapes]
        megabytes = sum(layer["bytes"] for _, layer in layers) / 1e6
        for rows in args.rows:
            xs = {k: torch.randn(rows, k).to(torch.bfloat16) for _, k, _ in shapes}
            ours = best_ms(lambda: [torch.ops.zen_woq_native.int4_linear(xs[k], *layer["ours"], None) for k, layer in layers], ROUNDS, 3)
            aten = best_ms(lambda: [torch.ops.aten._weight_int4pack_mm_for_cpu(xs[k], *layer["aten"]) for k, layer in layers], ROUNDS, 3)
            dense = best_ms(lambda: [torch.nn.functional.linear(xs[k], layer["dense"]) for k, layer in layers[: len(shapes)]], ROUNDS, 3) * count
            print(
                f"| {name} ({len(layers)} calls, {megabytes:.0f} MB) | {rows} | {ours:.2f} ({megabytes / ours:.0f} GB/s) | {aten:.2f} | x{aten / ours:.2f} | {dense:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
