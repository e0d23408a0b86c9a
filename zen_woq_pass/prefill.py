"""A prompt's many rows through a bf16 GEMM, on weights dequantized from aten's int4 layout per call.

Why: aten's int4 CPU kernel is built for a few rows. On a 512-token prompt it made zen_woq's
prefill 3.8x slower than transformers' decompressed model, whose bf16 GEMM (oneDNN, AVX512-BF16 or
AMX) computes far faster. Dequantizing a layer reads N*K/2 bytes and writes N*K*2: small beside
the GEMM once the rows are many, and no second copy is held. Which path is faster is measured on
the call's own rows, once per layer shape and power-of-two bucket of rows, and the dense path must
agree with the kernel (SQNR) before it is ever used. Eager calls only: a compiled decode step
has one row.

The layout (PyTorch's ``int4mm_kernel.cpp``, checked here): per block of ``BLOCK_N`` output rows
(64 where torch's CPU capability is AVX512, 32 for AVX2), for each k, ``BLOCK_N / 2`` bytes; byte j
holds row j in its low nibble and row j + BLOCK_N/2 in its high one. A last, partial block holds
rows n and n + 1 in one byte. Other capabilities are not decoded: their layers keep the kernel.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
import torch.nn.functional as F

from zen_woq_pass.numerics import sqnr_db

logger = logging.getLogger(__name__)

MIN_ROWS = 16  # below this the 4-bit kernel is not raced: a GEMV kernel's ground
MIN_SQNR_DB = 40.0  # the dense path against the kernel on the same rows
HALF_BLOCK = {"AVX512": 32, "AVX2": 16}  # torch's CPU capability -> BLOCK_N / 2


def decoded_here() -> bool:
    """Whether this CPU's int4 layout (torch's CPU capability) is one :func:`codes` reads."""
    return torch.backends.cpu.get_cpu_capability() in HALF_BLOCK


def codes(packed: torch.Tensor, out_features: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor | None:
    """[N, K] codes (0..15) in ``dtype`` from aten's packed uint8 [N, K/2]; None for a layout not
    decoded here. A transposed view of a [K, N] tensor: that order copies contiguous runs of
    output rows (2.5x faster than writing [N, K]), and F.linear takes it without a copy."""
    half = HALF_BLOCK.get(torch.backends.cpu.get_cpu_capability())
    if half is None:
        return None
    n, k = out_features, packed.shape[1] * 2
    whole = n // (2 * half) * 2 * half
    flat, out = packed.reshape(-1), torch.empty(k, n, dtype=dtype)
    if whole:
        blocks, rows = flat[: whole * k // 2].view(-1, k, half).transpose(0, 1), out[:, :whole].view(k, -1, 2, half)
        rows[:, :, 0].copy_(blocks & 15)
        rows[:, :, 1].copy_(blocks >> 4)
    if whole < n:
        tail, rows = flat[whole * k // 2 :].view(k, (n - whole) // 2), out[:, whole:].view(k, -1, 2)
        rows[:, :, 0].copy_(tail & 15)
        rows[:, :, 1].copy_(tail >> 4)
    return out.T


def dequantize(packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor | None:
    """[N, K] weights in the scales' dtype (a transposed view): ``(code - 8) * scale + zero`` per
    group, rounded once: the kernel's weights as its identity product gives them (inside, it keeps
    them in fp32), and transformers' bf16 numerics."""
    groups, n, _ = scales_and_zeros.shape
    q = codes(packed, n, scales_and_zeros.dtype)
    if q is None:
        return None
    scale, zero = scales_and_zeros.permute(2, 0, 1).unsqueeze(2).contiguous()  # [G, 1, N] each, dense
    return torch.addcmul(zero, q.T.view(groups, -1, n).sub_(8), scale).view(-1, n).T


def dense_linear(rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    return F.linear(rows, dequantize(packed, scales_and_zeros))


@dataclasses.dataclass(frozen=True)
class Choice:
    """What one layer shape and bucket of rows runs, and why."""

    shape: str
    rows: int  # the bucket: calls with rows / 2 < M <= rows
    dense: bool
    kernel_ms: float
    dense_ms: float | None
    sqnr: float | None

    def __str__(self) -> str:
        if self.dense_ms is None:
            return f"{self.shape}, up to {self.rows} rows: the int4 kernel (aten's layout is not decoded on this CPU)"
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


def linear(rows: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int, kernel) -> torch.Tensor:
    """``kernel()`` (aten's int4 matmul of ``rows``), or the dense path where it was measured faster."""
    if rows.shape[0] < MIN_ROWS:
        return kernel()
    n, k = scales_and_zeros.shape[1], rows.shape[1]
    key = (n, k, group_size, rows.dtype, _bucket(rows.shape[0]))
    choice = _choices.get(key)
    if choice is None:
        _choices[key], answer = _race(rows, packed, scales_and_zeros, kernel, key)
        logger.info("zen_woq prefill: %s", _choices[key])
        return answer
    return dense_linear(rows, packed, scales_and_zeros) if choice.dense else kernel()


def _race(rows, packed, scales_and_zeros, kernel, key) -> tuple[Choice, torch.Tensor]:
    """Each path twice on this call's rows, the faster run counting (the kernel's answer serves
    the call): the first dense call includes oneDNN making its GEMM for a new M, and one busy
    moment on a shared host must not decide for the process. Twice, not more: on a big model a
    long prompt costs seconds per kernel call."""
    n, k, group_size, dtype, bucket = key
    shape = f"{n}x{k} g{group_size} {str(dtype).removeprefix('torch.')}"
    kernel_ms, answer = _best_of_two(kernel)
    if not decoded_here():
        return Choice(shape, bucket, False, kernel_ms, None, None), answer
    dense_ms, dense = _best_of_two(lambda: dense_linear(rows, packed, scales_and_zeros))
    sqnr = sqnr_db(dense.float(), answer.float())
    return Choice(shape, bucket, dense_ms < kernel_ms and sqnr >= MIN_SQNR_DB, kernel_ms, dense_ms, sqnr), answer


def _best_of_two(fn) -> tuple[float, torch.Tensor]:
    times = []
    for _ in range(2):
        start = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), result
