"""Never slower than transformers: checkpoints no 4-bit kernel takes, side by side in one run.

    python benchmarks/never_slower.py [--layers 2] [--hidden 2048] [--intermediate 5632]

W8A16 (8-bit weights: refused by both 4-bit kernels) and, for contrast, W4A16, both made here by
llmcompressor (RTN). Per decode step (greedy, prompt 32): transformers (decompressed, eager),
``torch.compile(backend="zen_woq")`` on the kept model, and ``zen_woq_pass.optimize``. Refused
layers used to unpack and dequantize on every call (9x slower than transformers on W8A16); the
``dense`` link of the chain now folds them once.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import zen_woq_pass
from zen_woq_pass import platform
from zen_woq_pass.measure import greedy, time_generation
from zen_woq_pass.testing import Recipe, make_checkpoint


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
    for scheme in ("W8A16", "W4A16"):
        recipe = Recipe(scheme=scheme, hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers, algorithm="rtn")
        with tempfile.TemporaryDirectory() as scratch:
            path = make_checkpoint(recipe, scratch)
            rows = []
            for label in ("transformers (decompressed)", 'torch.compile(backend="zen_woq")', "zen_woq_pass.optimize"):
                torch._dynamo.reset()
                model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
                if label.startswith("torch.compile"):
                    zen_woq_pass.keep_compressed(model)
                    model.forward = torch.compile(model.forward, backend="zen_woq")
                elif label.startswith("zen_woq_pass"):
                    zen_woq_pass.optimize(model)
                greedy(model, ids, 4)  # decompress, compile, convert
                report = getattr(model, "zen_woq_report", None)  # optimize's; the backend's first graph else
                if report is None and zen_woq_pass.recent_reports():
                    report = zen_woq_pass.recent_reports()[0]
                kernels = {k: len(v) for k, v in report.by_kernel().items()} if report else "-"
                rows.append((label, kernels, time_generation(model, ids, 16).decode_ms_per_token))
            for label, kernels, ms in rows:
                print(f"| {scheme} | {label} | {kernels} | {ms:.2f} | x{rows[0][2] / ms:.2f} |")


if __name__ == "__main__":
    main()
