"""``zen-woq measure``: the timings behind the package's rules, measured again on this machine.

What runs is decided by fixed rules of the CPU and the call's shape (the chain's order, the dense
head's path, the prompt-row threshold), never by a clock: the candidates compute different bits,
and races made numbers depend on the machine's load (issue 26). The rules rest on measurements
written in their modules' docstrings; this verb repeats them here, so a user on another CPU can see
whether a rule's pick is this machine's fastest, and force another kernel (``kernel=``) if not.
It changes nothing that runs.

How, so that one busy moment cannot mislead: the candidates take turns, round after round (a slow
spell falls on all of them), each candidate's median is taken over its rounds after dropping
rounds more than 3x its median, and a call faster than this machine's memory could stream its
bytes is flagged as served from cache.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from unittest import mock

import torch

from zen_woq_pass.kernels import CHAIN, DENSE, packed_bf16
from zen_woq_pass.models.measure import best_ms_from_memory, read_bandwidth_gbs
from zen_woq_pass.models.probe import packed_linear
from zen_woq_pass.planning import prefill
from zen_woq_pass.planning.options import Options
from zen_woq_pass.runtime import convert, gemv

ROUNDS = 15
OUTLIER_FACTOR = 3.0


def taking_turns(calls: dict[str, Callable[[], object]], rounds: int = ROUNDS) -> dict[str, float]:
    """Median ms of each call over ``rounds`` rounds of one call each in turn (after one warm-up
    round), rounds over ``OUTLIER_FACTOR`` x the median dropped."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for round in range(rounds + 1):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                if round:
                    times[name].append((time.perf_counter() - start) * 1e3)
    medians = {}
    for name, ms in times.items():
        median = statistics.median(ms)
        medians[name] = statistics.median([t for t in ms if t <= OUTLIER_FACTOR * median])
    return medians


def _verdict(measured: dict[str, float], pick: str) -> str:
    fastest = min(measured, key=measured.__getitem__)
    times = ", ".join(f"{name} {ms:.3f} ms" for name, ms in measured.items())
    if fastest == pick:
        return f"{times}: the rule's pick, {pick}, is the fastest here"
    return f"{times}: the rule picks {pick}; {fastest} was {measured[pick] / measured[fastest]:.2f}x faster here"


def _kernels(layer: torch.nn.Module) -> dict[str, tuple]:
    """The chain's kernels that take ``layer`` here (each forced: gate, predicate, self-check), with
    their constants: {name: (kernel, constants)}."""
    taken = {}
    for kernel in CHAIN:
        plan = convert.plan_module("probe", layer, Options(kernel=kernel.name), torch.bfloat16)
        if plan.kernel is kernel:
            taken[kernel.name] = (kernel, plan.constants)
    return taken


def four_bit_kernel(out_features: int, in_features: int, group_size: int, bandwidth_gbs: float) -> str:
    """The chain's rule at one row, on a probe layer of this shape."""
    layer = packed_linear(out_features, in_features, group_size, seed=1)
    candidates = {name: kc for name, kc in _kernels(layer).items() if name != DENSE.name}
    if not candidates:
        return "no 4-bit kernel takes the probe layer here"
    x = torch.randn(1, in_features).to(torch.bfloat16)
    # mypy cannot infer a lambda with default arguments where a Callable is expected
    measured = taking_turns({name: (lambda k=k, c=c: k.run(x, c, None)) for name, (k, c) in candidates.items()})  # type: ignore[misc]
    pick = next(kernel.name for kernel in CHAIN if kernel.name in candidates)
    streamed_ms = out_features * in_features / 2 / bandwidth_gbs / 1e6
    cached = [name for name, ms in measured.items() if ms < streamed_ms]
    note = f" (faster than {bandwidth_gbs:.0f} GB/s could stream the weights: from cache)" if cached else ""
    return _verdict(measured, pick) + note


def prompt_rows(out_features: int, in_features: int, group_size: int, rows: int) -> str:
    """The prompt-row rule: the 4-bit kernel against dequantize + bf16 GEMM at ``rows`` rows."""
    layer = packed_linear(out_features, in_features, group_size, seed=2)
    candidates = _kernels(layer)
    name = next((kernel.name for kernel in CHAIN if kernel.name in candidates and kernel.eager_target), None)
    if name is None:
        return "no kernel with a dense prompt path takes the probe layer here"
    kernel, constants = candidates[name]
    x = torch.randn(rows, in_features).to(torch.bfloat16)

    def dense():
        with mock.patch.object(prefill, "takes_dense", lambda rows: True):  # that path, whatever the rule
            return kernel.run_eager(x, constants, None)

    measured = taking_turns({f"{name} kernel": lambda: kernel.run(x, constants, None), "dequantize + GEMM": dense}, rounds=5)
    threshold = prefill.dense_min_rows()
    pick = "dequantize + GEMM" if threshold is not None and rows >= threshold else f"{name} kernel"
    return f"{rows} rows: " + _verdict(measured, pick)


def head(out_features: int = 49152, in_features: int = 576) -> str:
    """The dense head's rule at one row, from memory, on a packable random weight of this shape."""
    weight = (torch.randn(out_features, in_features) * 0.02).to(torch.bfloat16)
    x = torch.randn(1, in_features).to(torch.bfloat16)
    ways = {"F.linear": lambda: torch.nn.functional.linear(x, weight), "torch.mv": lambda: torch.mv(weight, x[0])}
    why_not = gemv.why_not_packed(weight)
    if why_not is None:
        packed, tops = packed_bf16.pack(weight)
        ways["packed-bf16"] = lambda: torch.ops.zen_woq_native.packed_bf16_linear(x, packed, tops, None)
    measured = dict(zip(ways, best_ms_from_memory(list(ways.values()))))
    return _verdict(measured, "torch.mv" if why_not else "packed-bf16")


def report() -> list[str]:
    """One line per rule: what it picks, what was measured, and whether they agree."""
    bandwidth = read_bandwidth_gbs()
    lines = [f"read bandwidth: {bandwidth:.1f} GB/s (the best of 10 sums of 256 MB)"]
    for n, k, g in ((1536, 576, 64), (2048, 2048, 128), (5632, 2048, 128)):
        lines.append(f"4-bit kernel, {n}x{k} g{g}, one row: {four_bit_kernel(n, k, g, bandwidth)}")
    for rows in (16, prefill.DENSE_MIN_ROWS, 512):
        lines.append(f"prompt rows, 2048x2048 g128, {prompt_rows(2048, 2048, 128, rows)}")
    lines.append(f"dense head 49152x576, one row from memory: {head()}")
    return lines
