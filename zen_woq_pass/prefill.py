"""A prompt's many rows through a bf16 GEMM, on the layer's weights dequantized per call.

Why: the 4-bit kernels are built for a few rows. On a 512-token prompt aten's made zen_woq's
prefill 3.8x slower than transformers' decompressed model, whose bf16 GEMM (oneDNN, AVX512-BF16 or
AMX) computes far faster. Dequantizing a layer reads N*K/2 bytes and writes N*K*2: small beside
the GEMM once the rows are many, and no second copy is held. Which path is faster is measured on
the call's own rows, once per kernel, layer shape and power-of-two bucket of rows, and the dense
path must agree with the kernel (SQNR) before it is ever used. Eager calls only: a compiled decode
step has one row. Each kernel brings its own dequantization (its packed layout).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch

from zen_woq_pass.numerics import sqnr_db

logger = logging.getLogger(__name__)

MIN_ROWS = 16  # below this the 4-bit kernel is not raced: a GEMV kernel's ground
MIN_SQNR_DB = 40.0  # the dense path against the kernel on the same rows
MAX_ROUNDS = 5  # of the race: one run of each path a round
CLEAR_MARGIN = 0.1  # a race ends once one path is faster by this much (after two rounds)
BUDGET_MS = 200.0  # or once its rounds have cost this


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one layer shape and bucket of rows runs, and why."""

    shape: str  # kernel, layer shape, group, dtype
    rows: int  # the bucket: calls with rows / 2 < M <= rows
    dense: bool
    kernel_ms: float
    dense_ms: float
    sqnr: float

    def __str__(self) -> str:
        winner = "dense bf16 GEMM" if self.dense else "the int4 kernel"
        return (
            f"{self.shape}, up to {self.rows} rows: {winner} (int4 {self.kernel_ms:.2f} ms, "
            f"dequantize + GEMM {self.dense_ms:.2f} ms, SQNR {self.sqnr:.0f} dB against the kernel)"
        )


_choices: dict[tuple, Choice] = {}


def choices() -> list[Choice]:
    """Every choice made in this process (the report's run-time half)."""
    return list(_choices.values())


def clear() -> None:
    _choices.clear()


def _bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()


def linear(rows: torch.Tensor, shape: tuple, kernel: Callable[[], torch.Tensor], dense: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    """``kernel()`` (a 4-bit kernel on ``rows``), or ``dense()`` (the same through a bf16 GEMM;
    None where the kernel's layout is not decoded) where that was measured faster. ``shape``:
    (kernel name, out_features, in_features, group size)."""
    if rows.shape[0] < MIN_ROWS or dense is None:
        return kernel()
    key = (*shape, rows.dtype, _bucket(rows.shape[0]))
    choice = _choices.get(key)
    if choice is None:
        _choices[key], answer = _race(kernel, dense, key)
        logger.info("zen_woq prefill: %s", _choices[key])
        return answer
    return dense() if choice.dense else kernel()


def _race(kernel, dense, key) -> tuple[Choice, torch.Tensor]:
    """Both paths on this call's rows, taking turns, the fastest run of each counting (the
    kernel's answer serves the call). First one dense call untimed: in a fresh process it includes
    oneDNN making its GEMM for a new M and the allocator's first pages for the dequantized weights.
    Then rounds of one run each, at least two, more (up to ``MAX_ROUNDS``) while the two are
    within ``CLEAR_MARGIN`` of each other and the race has cost under ``BUDGET_MS``. Before, each
    path ran twice in a row with no warm-up: on SmolLM2 (a Zen 4) the slower kernel won near-ties
    that cost 80 ms of a 512-token prompt. On a big model a long prompt costs seconds a call."""
    name, n, k, group_size, dtype, bucket = key
    shape = f"{name} {n}x{k} g{group_size} {str(dtype).removeprefix('torch.')}"
    dense()
    kernel_times, dense_times, spent = [], [], 0.0
    for turn in range(MAX_ROUNDS):
        kernel_ms, answer = _timed(kernel)
        dense_ms, dense_answer = _timed(dense)
        kernel_times.append(kernel_ms)
        dense_times.append(dense_ms)
        spent += kernel_ms + dense_ms
        fastest, slowest = sorted((min(kernel_times), min(dense_times)))
        if turn and (slowest > fastest * (1 + CLEAR_MARGIN) or spent > BUDGET_MS):
            break
    sqnr = sqnr_db(dense_answer.float(), answer.float())
    kernel_ms, dense_ms = min(kernel_times), min(dense_times)
    return Choice(shape, bucket, dense_ms < kernel_ms and sqnr >= MIN_SQNR_DB, kernel_ms, dense_ms, sqnr), answer


def _timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    result = fn()
    return (time.perf_counter() - start) * 1e3, result
