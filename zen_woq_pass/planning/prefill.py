"""A prompt's many rows through a bf16 GEMM on the layer's weights dequantized per call, by a fixed
rule of the CPU and the row count: never by a clock.

Why the dense path: the 4-bit kernels are built for a few rows. On a 512-token prompt aten's made
zen_woq's prefill 3.8x slower than transformers' decompressed model, whose bf16 GEMM (oneDNN,
AVX512-BF16 or AMX) computes far faster. Dequantizing a layer reads N*K/2 bytes and writes N*K*2:
small beside the GEMM once the rows are many, and no second copy is held. Each kernel brings its
own dequantization (its packed layout). Eager calls only: a compiled decode step has one row.

Why a rule: the two paths compute different bits (the GEMM sums in another order than the kernel).
Until issue 26 a race per layer shape and bucket of rows decided, on the first call's own rows, and
returned the kernel's answer for that call: the same prompt gave other logits on its second call,
in another process, or on a busy machine. The rule, from measurements (docs in README.md):
- CPUs with bf16 GEMM hardware (AVX512-BF16 or AMX: Zen 4, Sapphire Rapids and later) take the
  GEMM from ``DENSE_MIN_ROWS`` rows (a Xeon, SmolLM2, 2 threads: at 512 rows gate/up 3.4-4.4 ms
  against the kernel's 13.3, down 1.4 against 6.7; at 16 rows all layers 9.8 ms dense before
  dequantizing against the kernel's 12.1; a Zen 4 took the GEMM for every shape at 512 rows);
- CPUs without (Zen 3, AVX2) keep the kernel: there a bf16 GEMM is emulated and 10-30x slower.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from zen_woq_pass.planning import platform

DENSE_MIN_ROWS = 64  # from this many rows the GEMM runs, where the CPU has bf16 GEMM hardware
BF16_GEMM_FLAGS = ("avx512_bf16", "amx_bf16")  # either: oneDNN's bf16 GEMM runs natively


@functools.cache
def dense_min_rows() -> int | None:
    """Rows from which this CPU's prompts take the dense GEMM; None: never (no bf16 hardware)."""
    flags = platform.cpu_info().flags
    return DENSE_MIN_ROWS if any(flag in flags for flag in BF16_GEMM_FLAGS) else None


def rule() -> str:
    """The rule in force here, in words (``zen-woq doctor``, ``zen-woq run``)."""
    rows = dense_min_rows()
    if rows is None:
        return f"prompts stay on the 4-bit kernel (this CPU has none of {', '.join(BF16_GEMM_FLAGS)}: no fast bf16 GEMM)"
    return f"from {rows} rows a prompt's layers run dequantize + bf16 GEMM; fewer rows, the 4-bit kernel"


def takes_dense(rows: int) -> bool:
    """Whether a call of ``rows`` rows takes the dense GEMM here."""
    threshold = dense_min_rows()
    return threshold is not None and rows >= threshold


def linear(rows: torch.Tensor, kernel: Callable[[], torch.Tensor], dense: Callable[[], torch.Tensor] | None) -> torch.Tensor:
    """``kernel()`` (a 4-bit kernel on ``rows`` [M, K]) or ``dense()`` (the same through a bf16
    GEMM; None where the kernel's layout is not decoded), by :func:`takes_dense`."""
    if dense is not None and takes_dense(rows.shape[0]):
        return dense()
    return kernel()


def clear() -> None:
    dense_min_rows.cache_clear()
