"""Per-layer benchmark: one W4A16 linear of each Llama-3-8B shape, every path side by side.

    python benchmarks/layers.py [--rows 1 8 32 128] [--shapes q_proj k_proj gate_proj down_proj]

Prints, per (shape, M), milliseconds and the speed-up over dense bf16 ``F.linear`` (what a model
decompressed by transformers runs), for: the eager compressed-tensors path (unpack + dequantize +
linear every call), Inductor on that path, Inductor with freezing, dense bf16 and fp32, each kernel
of our chain that runs here (through ``backend="zen_woq"``), and the bound set by reading the 4-bit
weights once at the bandwidth measured in this run. Ratios are comparable within one run only.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import zen_woq_pass
from zen_woq_pass.kernels import CHAIN
from zen_woq_pass.models.measure import median_ms, read_bandwidth_gbs
from zen_woq_pass.models.probe import packed_linear
from zen_woq_pass.planning import platform

SHAPES = {  # name: (out_features, in_features), Llama-3-8B
    "q_proj": (4096, 4096),
    "k_proj": (1024, 4096),
    "gate_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
GROUP_SIZE = 128


def _compiled(module, x, **kwargs):
    torch._dynamo.reset()
    compiled = torch.compile(module, dynamic=False, **kwargs)
    with torch.no_grad():
        compiled(x)
    return compiled


def _paths(make_layer, x):
    """name -> (callable, weight bytes) or (None, why it cannot run here). ``make_layer()`` gives
    the same packed layer afresh: compiling with zen_woq converts the layer it compiled."""
    layer = make_layer()
    dense = layer.dequantized_weight().to(torch.bfloat16)
    dense32 = dense.float()
    x32 = x.float()
    four_bit = layer.weight_packed.nbytes + layer.weight_scale.nbytes
    inductor = _compiled(layer, x)
    paths = {
        "eager CT": (lambda: layer(x), four_bit),
        "inductor": (lambda: inductor(x), four_bit),
    }
    with torch._inductor.config.patch(freezing=True):
        frozen = _compiled(layer, x)

    def frozen_call():  # the config is part of dynamo's guards: call under it too
        with torch._inductor.config.patch(freezing=True):
            return frozen(x)

    paths["inductor+freezing"] = (frozen_call, dense.nbytes)
    paths["dense bf16"] = (lambda: F.linear(x, dense), dense.nbytes)
    paths["dense fp32"] = (lambda: F.linear(x32, dense32), dense32.nbytes)
    for kernel in CHAIN:
        compiled = _compiled(make_layer(), x, backend="zen_woq", options={"kernel": kernel.name})
        decision = zen_woq_pass.last_report().layers[0]
        if decision.kernel == kernel.name:
            paths[kernel.name] = (lambda compiled=compiled: compiled(x), four_bit)
        else:
            paths[kernel.name] = (None, decision.reason)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--json", help="also write the results here, for benchmarks/plot.py")
    args = parser.parse_args(argv)
    table = []
    cpu = platform.cpu_info()
    bandwidth = read_bandwidth_gbs()
    print(f"# {cpu.model_name} ({cpu.zen_generation}), {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"# read bandwidth {bandwidth:.1f} GB/s; group size {GROUP_SIZE}; bf16 activations; times in ms")
    print(f"# zentorch WOQ on this CPU: {platform.zentorch_cpu_reason() or 'supported'}")
    print("# (x N.NN) = speed-up over dense bf16 F.linear; weight MB in the header row of each shape\n")
    header = None
    for name in args.shapes:
        out_features, in_features = SHAPES[name]
        for rows in args.rows:
            x = torch.randn(rows, in_features).to(torch.bfloat16)
            paths = _paths(lambda: packed_linear(out_features, in_features, GROUP_SIZE), x)
            results = {p: (median_ms(fn) if fn else None, extra) for p, (fn, extra) in paths.items()}
            four_bit = paths["eager CT"][1]
            results["4-bit bound"] = (four_bit / bandwidth / 1e6, four_bit)
            if header is None:
                header = ["layer", "M", *results]
                print(" | ".join(header))
                print(" | ".join("---" for _ in header))
            base = results["dense bf16"][0]
            cells = [f"{name} {out_features}x{in_features}", str(rows)]
            for path, (ms, extra) in results.items():
                cells.append("n/a" if ms is None else f"{ms:.2f} (x{base / ms:.2f})")
            print(" | ".join(cells), flush=True)
            table.append({"layer": name, "M": rows, "ms": {p: ms for p, (ms, _) in results.items()}})
        print(
            f"{name}: weight MB: 4-bit {paths['eager CT'][1] / 1e6:.1f}, dense bf16 {paths['dense bf16'][1] / 1e6:.1f} "
            f"({paths['eager CT'][1] / paths['dense bf16'][1]:.2f}x)"
        )
        for path, (fn, reason) in paths.items():
            if fn is None:
                print(f"{name}: {path} not run: {reason}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": f"{cpu.model_name} ({cpu.zen_generation})", "rows": table}, f, indent=1)


if __name__ == "__main__":
    main()
