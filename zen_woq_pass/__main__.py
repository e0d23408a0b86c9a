"""``python -m zen_woq_pass``: the main job on an embedded default, end to end, offline.

Makes a tiny Llama-shaped W4A16 GPTQ checkpoint with llmcompressor (seconds, no download), loads it
with transformers, keeps it compressed, compiles it with ``backend="zen_woq"``, and prints the
per-layer report, the accuracy against compressed-tensors' fp32 reference, and greedy tokens from
the compiled model beside the eager reference's.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

import torch

from zen_woq_pass import keep_compressed, last_report, platform
from zen_woq_pass.numerics import sqnr_db


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zen_woq_pass", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", nargs="?", help="a compressed-tensors W4A16 checkpoint (default: make a tiny one)")
    parser.add_argument("--kernel", default=None, help="auto (default), zentorch or default")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoModelForCausalLM

    cpu = platform.cpu_info()
    print(f"CPU: {cpu.model_name} ({cpu.zen_generation}); zentorch WOQ here: {platform.zentorch_cpu_reason() or 'yes'}")
    with tempfile.TemporaryDirectory() as scratch:
        path = args.model_dir
        if path is None:
            from zen_woq_pass.checkpoints import Recipe, make_checkpoint

            print("making a tiny W4A16 GPTQ checkpoint with llmcompressor ...")
            path = make_checkpoint(Recipe(), scratch)
        ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits
            model = keep_compressed(AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16))
            eager_tokens = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
            options = {"kernel": args.kernel} if args.kernel else None
            model.forward = torch.compile(model.forward, backend="zen_woq", options=options)
            start = time.perf_counter()
            logits = model(ids).logits
            print(f"compiled and ran in {time.perf_counter() - start:.1f} s")
            print(last_report())
            tokens = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"logits vs fp32 dequantized reference: SQNR {sqnr_db(logits, reference):.1f} dB")
    new = slice(ids.shape[1], None)
    same = torch.equal(tokens[0, new], eager_tokens[0, new])
    print(f"greedy tokens (compiled): {tokens[0, new].tolist()}")
    print(f"greedy tokens (eager)   : {eager_tokens[0, new].tolist()}  -> {'match' if same else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
