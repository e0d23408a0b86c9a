"""``zen-woq`` (also ``python -m zen_woq_pass``): ``doctor`` says what this machine can run;
``run`` is the main job -- a W4A16 model kept compressed, compiled with ``backend="zen_woq"``,
generating, checked against the eager reference and measured beside the dense model."""

from __future__ import annotations

import argparse
import time
from importlib import resources

import torch
from tqdm.auto import tqdm

import zen_woq_pass
from zen_woq_pass import doctor, measure, packed_constants
from zen_woq_pass.kernels import KERNELS

DEFAULT_PROMPT = "AMD EPYC runs 4-bit models"


def default_model_dir() -> str:
    """The small W4A16 GPTQ checkpoint shipped in the package (made by scripts/make_default_model.py)."""
    return str(resources.files("zen_woq_pass") / "default_model")


class _TokenBar:
    """A transformers streamer that advances a progress bar per generated token."""

    def __init__(self, total: int, desc: str):
        self.bar, self.prompt_seen = tqdm(total=total, desc=desc, unit="tok", leave=False), False

    def put(self, value):
        if self.prompt_seen:
            self.bar.update(1)
        self.prompt_seen = True

    def end(self):
        self.bar.close()


def run(model_dir: str | None, prompt: str, new_tokens: int, kernel: str) -> bool:
    """The main job; returns whether the compiled model agrees with the eager reference (identical
    greedy tokens, or parting only at a near-tie within the logits' rounding noise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_dir or default_model_dir()
    print(f"model: {path}{' (embedded default)' if model_dir is None else ''}; kernel={kernel}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(prompt, return_tensors="pt").input_ids

    def load(keep: bool):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        return zen_woq_pass.keep_compressed(model) if keep else model

    with tqdm(total=3, desc="loading", leave=False) as bar:
        dense = load(keep=False)
        bar.update()
        eager = load(keep=True)
        bar.update()
        model = load(keep=True)
        bar.update()
    reference = measure.greedy(eager, ids, new_tokens, _TokenBar(new_tokens, "eager reference"))
    measure.greedy(dense, ids, 1)  # transformers decompresses on the first forward
    dense_timing = measure.time_generation(dense, ids, new_tokens)
    dense_bytes = measure.linear_weight_bytes(dense)
    del dense

    model.forward = torch.compile(model.forward, backend="zen_woq", options={"kernel": kernel})
    start = time.perf_counter()
    tokens = measure.greedy(model, ids, new_tokens, _TokenBar(new_tokens, "compiling + generating"))
    first_s = time.perf_counter() - start
    timing = measure.time_generation(model, ids, new_tokens)
    print(zen_woq_pass.last_report())
    comparison = measure.compare_greedy(eager, model, ids, tokens, reference)
    print(f"\nprompt    : {prompt!r} ({ids.shape[1]} tokens)")
    print(f"generated : {tokenizer.decode(tokens[0])!r}")
    print(f"token ids : {tokens[0].tolist()}")
    print(f"vs the eager compressed-tensors reference: {comparison.explain()}")
    print(f"first generate (compile included): {first_s:.1f} s")
    print(f"time to first token: {timing.ttft_ms:.1f} ms (dense bf16 model: {dense_timing.ttft_ms:.1f} ms)")
    print(
        f"decode: {timing.decode_tokens_per_s:.1f} tokens/s (dense bf16 model: {dense_timing.decode_tokens_per_s:.1f}, "
        f"x{timing.decode_tokens_per_s / dense_timing.decode_tokens_per_s:.2f})"
    )

    def print_memory(when):
        kept, constants = measure.linear_weight_bytes(model), packed_constants.held_bytes()
        print(
            f"quantized linears' weights {when}: {kept / 1e6:.2f} MB in the model + {constants / 1e6:.2f} MB kernel "
            f"constants = {(kept + constants) / dense_bytes:.2f}x of the dense bf16 {dense_bytes / 1e6:.2f} MB; "
            f"process RSS {measure.rss_mb():.0f} MB"
        )

    print_memory("as compiled")
    zen_woq_pass.release_module_weights(model)
    print_memory("after zen_woq_pass.release_module_weights(model)")
    after = measure.compare_greedy(eager, model, ids, measure.greedy(model, ids, new_tokens), reference)
    print(f"generating again after the release: {after.explain()}")
    return comparison.acceptable and after.acceptable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zen-woq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="what this machine can run, and what to do next")
    run_parser = commands.add_parser("run", help="generate with a W4A16 model compiled by zen_woq")
    run_parser.add_argument("model_dir", nargs="?", help="compressed-tensors W4A16 checkpoint (default: embedded)")
    run_parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    run_parser.add_argument("--max-new-tokens", type=int, default=32)
    run_parser.add_argument("--kernel", default="auto", choices=["auto", "default", *KERNELS])
    args = parser.parse_args(argv)
    if args.command == "doctor":
        lines, verdict = doctor.report()
        print("\n".join(lines))
        print(f"\nverdict: {verdict}")
        return 0
    return 0 if run(args.model_dir, args.prompt, args.max_new_tokens, args.kernel) else 1
