"""Measuring what users care about: medians of repeated calls, greedy generation timings, and the
bytes a model's quantized linears hold. Shared by ``zen-woq run`` and the benchmarks."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from pathlib import Path

import torch

from zen_woq_pass.runtime import huge_pages


def median_ms(fn, min_seconds: float = 0.3, min_runs: int = 5, max_runs: int = 200, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in ms, after ``warmup`` calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < min_seconds and len(times) < max_runs):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def best_ms(fn, runs: int = 20, warmup: int = 2) -> float:
    """Fastest wall time of ``fn()`` in ms over ``runs`` calls: for comparing kernels, where a
    shared machine's slow spells should not decide."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        best = float("inf")
        for _ in range(runs):
            begin = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - begin)
    return best * 1e3


def largest_cache_bytes() -> int:
    """The CPU's largest cache (sysfs); 64 MiB where it does not say."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * scale)
    return max(sizes, default=64 * 2**20)


def best_ms_from_memory(calls, runs: int = 5) -> tuple[float, ...]:
    """Fastest wall time in ms of each of ``calls`` with the caches flushed before every call (twice
    the largest cache written, at most 1 GiB): how a decode step meets a layer's weights. The calls
    take turns, so a slow spell of a shared host falls on all of them."""
    flush = torch.empty(min(2 * largest_cache_bytes(), 2**30) // 4)
    best = [float("inf")] * len(calls)
    with torch.no_grad():
        for run in range(runs + 1):  # the first round warms up
            for index, fn in enumerate(calls):
                flush.fill_(run)
                begin = time.perf_counter()
                fn()
                if run:
                    best[index] = min(best[index], time.perf_counter() - begin)
    return tuple(ms * 1e3 for ms in best)


def read_bandwidth_gbs(megabytes: int = 256) -> float:
    """Memory read bandwidth (GB/s): summing a tensor much larger than the caches, the best of 10
    (on a shared host a median still read 8.5 GB/s among 20-22: a bound must not be that low), on
    2 MB pages as ``optimize`` puts the weights (on a Zen 4 that read 36 GB/s where 4 KB pages
    read 30)."""
    data = torch.ones(megabytes * 2**20 // 4)
    huge_pages.move([data])
    return data.nbytes / best_ms(lambda: data.sum(), runs=10) / 1e6


def rss_mb() -> float:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def linear_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the ``weight*`` tensors (packed or dense) of every Linear but the LM head."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            total += sum(t.nbytes for n, t in module.named_parameters() if n.startswith("weight"))
    return total


def greedy(model, input_ids: torch.Tensor, new_tokens: int, streamer=None) -> torch.Tensor:
    """Exactly ``new_tokens`` greedy tokens, the argmax at every step, EOS included, as llama.cpp's
    loop in the benchmarks: [batch, new_tokens]. Not ``min_new_tokens``: its logits processor scans
    the whole vocabulary each step (0.3 ms of a 10 ms SmolLM2 step), which no user pays."""
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, streamer=streamer)
    return out[:, input_ids.shape[1] :]


@dataclasses.dataclass(frozen=True)
class GenerationTiming:
    ttft_ms: float  # prefill + first token
    decode_ms_per_token: float

    @property
    def decode_tokens_per_s(self) -> float:
        return 1e3 / self.decode_ms_per_token


def time_generation(model, input_ids: torch.Tensor, new_tokens: int, runs: int = 3) -> GenerationTiming:
    """Time to first token, and the per-token time of the rest (medians; call after a warm-up)."""
    ttft = median_ms(lambda: greedy(model, input_ids, 1), min_runs=runs, min_seconds=0, warmup=0)
    full = median_ms(lambda: greedy(model, input_ids, new_tokens + 1), min_runs=runs, min_seconds=0, warmup=0)
    return GenerationTiming(ttft, max(full - ttft, 1e-6) / new_tokens)


NEAR_TIE_FACTOR = 4.0  # a divergence is a near-tie when the reference's top-2 margin <= this x the logit noise
MIN_LOGITS_SQNR_DB = 30.0  # and the candidate's logits there are this close to the reference's


@dataclasses.dataclass(frozen=True)
class GreedyComparison:
    """Greedy tokens of a candidate against a reference, and why they part if they do.

    Two numerically different implementations of the same model (a bf16 kernel vs bf16 eager
    dequantization, or just Inductor's fusions) may pick different tokens where the reference's
    best two logits are closer than their rounding noise. That is a near-tie, not an error.
    """

    new_tokens: int
    matching: int  # leading tokens that are identical
    margin: float | None = None  # reference top-1 minus top-2 logit at the first divergence
    noise: float | None = None  # max |candidate - reference| logit there
    sqnr_db: float | None = None  # candidate logits vs reference logits there

    @property
    def identical(self) -> bool:
        return self.matching == self.new_tokens

    @property
    def acceptable(self) -> bool:
        """Identical, or parting at a near-tie with logits close to the reference's."""
        if self.identical:
            return True
        assert self.margin is not None and self.noise is not None and self.sqnr_db is not None  # compare_greedy gives them when not identical
        return self.margin <= NEAR_TIE_FACTOR * self.noise and self.sqnr_db >= MIN_LOGITS_SQNR_DB

    def explain(self) -> str:
        if self.identical:
            return f"identical ({self.new_tokens} greedy tokens)"
        kind = "a near-tie" if self.acceptable else "NOT a near-tie"
        return (
            f"first {self.matching} of {self.new_tokens} tokens identical; at token {self.matching + 1} the reference's "
            f"top-2 logits differ by {self.margin:.3g} and the logits differ by up to {self.noise:.3g} "
            f"(SQNR {self.sqnr_db:.1f} dB): {kind}"
        )


def compare_greedy(reference, candidate, input_ids, tokens, reference_tokens) -> GreedyComparison:
    """Compare ``tokens`` (candidate's, [1, n]) with ``reference_tokens`` after ``input_ids`` [1, L]."""
    from zen_woq_pass.planning.numerics import sqnr_db

    same = (tokens == reference_tokens)[0].int()
    matching = int(same.cumprod(0).sum())
    if matching == same.numel():
        return GreedyComparison(same.numel(), matching)
    prefix = torch.cat([input_ids, reference_tokens[:, :matching]], dim=1)
    with torch.no_grad():
        want = reference(prefix).logits[0, -1].float()
        got = candidate(prefix).logits[0, -1].float()
    top2 = want.topk(2).values
    return GreedyComparison(same.numel(), matching, (top2[0] - top2[1]).item(), (got - want).abs().max().item(), sqnr_db(got, want))
