"""Plot the benchmarks' JSON results into one PNG for the README.

python benchmarks/plot.py layers.json end_to_end.json benchmarks/results.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LAYER_PATHS = ["dense bf16", "zentorch", "aten-int4", "inductor", "4-bit bound"]


def main(layers_json: str, end_to_end_json: str, out: str) -> None:
    layers, end_to_end = json.load(open(layers_json)), json.load(open(end_to_end_json))
    figure, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    decode = [row for row in layers["rows"] if row["M"] == 1]
    width = 0.8 / len(LAYER_PATHS)
    for i, path in enumerate(LAYER_PATHS):
        speedups = [row["ms"]["dense bf16"] / row["ms"][path] if row["ms"].get(path) else 0 for row in decode]
        left.bar([j + i * width for j in range(len(decode))], speedups, width, label=path)
    left.set_xticks([j + 0.4 - width / 2 for j in range(len(decode))], [row["layer"] for row in decode])
    left.set_yscale("log")
    left.set_ylabel("speed-up over dense bf16 F.linear (M=1)")
    left.set_title("Llama-3-8B layer shapes, W4A16 g128, decode (M=1)")
    left.legend(fontsize=8)
    rows = end_to_end["rows"]
    labels = [row["path"].replace("torch.compile ", "").replace(" (kept 4-bit)", "") for row in rows]
    right.barh(labels, [row["decode tok/s"] for row in rows], color=[f"C{i}" for i in range(len(rows))])
    right.set_xlabel("decode tokens/s")
    right.set_title("end to end: 8-layer Llama, hidden 2048")
    figure.suptitle(f"zen_woq on {layers['machine']}, 2 threads", fontsize=10)
    figure.tight_layout()
    figure.savefig(out, dpi=100)


if __name__ == "__main__":
    main(*sys.argv[1:4])
