"""``zen-woq`` (also ``python -m zen_woq_pass``): ``doctor`` says what this machine can run;
``measure`` times the candidates behind the package's rules here (it changes nothing that runs);
``run`` is the main job -- a real W4A16 model optimized by zen_woq, answering a chat prompt,
measured beside transformers' own dense model; ``make-model`` makes the real model's checkpoints."""

from __future__ import annotations

import argparse
import logging
import time
from importlib import resources
from typing import cast

import torch

import zen_woq_pass
from zen_woq_pass.cli import doctor, evidence
from zen_woq_pass.kernels import KERNELS
from zen_woq_pass.models import measure, smollm2
from zen_woq_pass.planning import prefill
from zen_woq_pass.planning.report import Report

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def default_model_dir() -> str:
    """The tiny random-weight W4A16 checkpoint shipped in the package (scripts/make_default_model.py)."""
    return str(resources.files("zen_woq_pass.models") / "default_model")


def _model_path(model_dir: str | None) -> tuple[str, str]:
    """(path, how it was chosen): the given folder, else SmolLM2 W4A16 when the ``models`` extra
    is installed (made once per machine), else the embedded tiny model."""
    if model_dir:
        return model_dir, "given"
    try:
        smollm2.gguf_path()
    except FileNotFoundError:
        return default_model_dir(), f"embedded tiny random-weight model; for a real one: {smollm2.INSTALL_HINT}"
    return str(smollm2.checkpoint("w4a16-rtn")), "SmolLM2-135M-Instruct W4A16 (RTN, group 64)"


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
        return ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def _answer(tokenizer, tokens: torch.Tensor) -> str:
    """The text up to the first end-of-sequence token: the greedy tokens go on past it (exactly
    ``new_tokens`` of them, for the timing and the comparison)."""
    ids = tokens[0].tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id)]
    return tokenizer.decode(ids, skip_special_tokens=True)


def run(model_dir: str | None, prompt: str, new_tokens: int, kernel: str, compile: bool = True) -> bool:
    """The main job; True when the optimized model's answer agrees with transformers' own (the
    same greedy tokens, or parting only at a near-tie within bf16 rounding noise)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, chosen = _model_path(model_dir)
    print(f"model: {path} ({chosen}); kernel={kernel}, {'compiled decode step' if compile else 'eager'}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = _prompt_ids(tokenizer, prompt)

    def load():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)

    dense = load()  # transformers decompresses it to dense bf16 on the first forward
    reference = measure.greedy(dense, ids, new_tokens)
    dense_timing = measure.time_generation(dense, ids, new_tokens)
    dense_bytes = measure.linear_weight_bytes(dense)

    model = zen_woq_pass.optimize(load(), kernel=kernel, compile=compile)
    start = time.perf_counter()
    tokens = measure.greedy(model, ids, new_tokens)
    first_s = time.perf_counter() - start
    timing = measure.time_generation(model, ids, new_tokens)
    print(model.zen_woq_report)
    print(f"prompt rows: {prefill.rule()}")
    comparison = measure.compare_greedy(dense, model, ids, tokens, reference)
    print(f"\nprompt              : {prompt!r}")
    print(f"answer (zen_woq)    : {_answer(tokenizer, tokens)!r}")
    print(f"answer (transformers): {_answer(tokenizer, reference)!r}")
    print(f"vs transformers' own dense model: {comparison.explain()}")
    print(f"first generate{' (compile included)' if compile else ''}: {first_s:.1f} s")
    print(f"time to first token: {timing.ttft_ms:.1f} ms (transformers: {dense_timing.ttft_ms:.1f} ms)")
    print(
        f"decode: {timing.decode_tokens_per_s:.1f} tokens/s (transformers: {dense_timing.decode_tokens_per_s:.1f}, "
        f"x{timing.decode_tokens_per_s / dense_timing.decode_tokens_per_s:.2f})"
    )
    report = cast(Report, model.zen_woq_report)  # an attribute of an nn.Module: Tensor | Module to mypy
    held = sum(d.held_bytes for d in report.layers) + measure.linear_weight_bytes(model)
    print(
        f"quantized linears: {held / 1e6:.1f} MB, {held / dense_bytes:.2f}x of transformers' dense bf16 "
        f"{dense_bytes / 1e6:.1f} MB; process RSS {measure.rss_mb():.0f} MB"
    )
    return comparison.acceptable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="zen-woq", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("doctor", help="what this machine can run, and what to do next")
    commands.add_parser("measure", help="time the candidates behind each rule here (changes nothing that runs)")
    run_parser = commands.add_parser("run", help="chat with a W4A16 model optimized by zen_woq")
    run_parser.add_argument("model_dir", nargs="?", help="compressed-tensors W4A16 checkpoint (default: SmolLM2, else embedded)")
    run_parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    run_parser.add_argument("--max-new-tokens", type=int, default=32)
    run_parser.add_argument("--kernel", default="auto", choices=["auto", "default", *KERNELS])
    run_parser.add_argument(
        "--eager", action="store_true", help="do not compile generate's decode step (a first answer in about a second; slower decode)"
    )
    run_parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)  # the default now; accepted as before
    commands.add_parser("make-model", help="make (once) a SmolLM2 checkpoint and print its path", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "make-model":
        return smollm2.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "doctor":
        lines, verdict = doctor.report()
        print("\n".join(lines))
        print(f"\nverdict: {verdict}")
        return 0
    if args.command == "measure":
        print("\n".join(evidence.report()))
        return 0
    logging.basicConfig(level=logging.WARNING)
    return 0 if run(args.model_dir, args.prompt, args.max_new_tokens, args.kernel, compile=not args.eager) else 1
