"""Never slower than transformers: checkpoints no 4-bit kernel takes, side by side in one run.

    python benchmarks/never_slower.py [--layers 2] [--hidden 2048] [--intermediate 5632]

W8A16 (8-bit weights: refused by both 4-bit kernels), W4A16 in groups of 8 (refused by aten-int4)
and, for contrast, W4A16 g128, all made here by llmcompressor (RTN). Per decode step (greedy, prompt 32): transformers (decompressed, eager),
``torch.compile(backend="zen_woq")`` on the kept model, and ``zen_woq_pass.optimize``. Refused
layers used to unpack and dequantize on every call (9x slower than transformers on W8A16); the
``dense`` link of the chain now folds them once. The three paths of a scheme are timed in turns,
three rounds, best median of each.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import zen_woq_pass
from zen_woq_pass.models.measure import greedy, time_generation
from zen_woq_pass.models.testing import Recipe, make_checkpoint
from zen_woq_pass.planning import platform

# W4A16 in groups of 8: a real llmcompressor checkpoint that aten-int4 refuses (groups must be multiples
# of 32) and that zentorch takes only where its gate says yes; elsewhere it is folded dense.
ROUNDS = 3
SCHEMES = {
    "W8A16": "W8A16",
    "W4A16 g8": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 8},
    "W4A16": "W4A16",
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    print(f"# {platform.cpu_info().model_name}, {torch.get_num_threads()} threads")
    print("| scheme | path | kernels | decode ms/token | vs transformers |\n|---|---|---|---|---|")
    ids = torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(0))
    for scheme_label, scheme in SCHEMES.items():
        recipe = Recipe(scheme=scheme, hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers, algorithm="rtn")
        with tempfile.TemporaryDirectory() as scratch:
            path = make_checkpoint(recipe, scratch)
            models = {}
            for label in ("transformers (decompressed)", 'torch.compile(backend="zen_woq")', "zen_woq_pass.optimize"):
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
                if label.startswith("torch.compile"):
                    zen_woq_pass.keep_compressed(model)
                    model.forward = torch.compile(model.forward, backend="zen_woq")
                elif label.startswith("zen_woq_pass"):
                    zen_woq_pass.optimize(model)
                compiled_before = len(zen_woq_pass.recent_reports())
                greedy(model, ids, 4)  # decompress, compile, convert
                report = getattr(model, "zen_woq_report", None)  # optimize's; else the backend's first graph's
                if report is None and len(zen_woq_pass.recent_reports()) > compiled_before:
                    report = zen_woq_pass.recent_reports()[compiled_before]
                models[label] = (model, {k: len(v) for k, v in report.by_kernel().items()} if report else "-")
            best = {label: float("inf") for label in models}
            for _ in range(ROUNDS):  # the paths take turns: a shared machine's slow spell hits them alike
                for label, (model, _) in models.items():
                    best[label] = min(best[label], time_generation(model, ids, 16, runs=5).decode_ms_per_token)
            base = best["transformers (decompressed)"]
            for label, (_, kernels) in models.items():
                print(f"| {scheme_label} | {label} | {kernels} | {best[label]:.2f} | x{base / best[label]:.2f} |")
            del models
            torch._dynamo.reset()


if __name__ == "__main__":
    main()
