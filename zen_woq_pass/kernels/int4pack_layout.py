"""aten's packed int4 layout, decoded: the weights ``aten._weight_int4pack_mm_for_cpu`` multiplies,
for the dense GEMM that many rows take (:mod:`zen_woq_pass.planning.prefill`).

The layout (PyTorch's ``int4mm_kernel.cpp``, checked here): per block of ``BLOCK_N`` output rows
(64 where torch's CPU capability is AVX512, 32 for AVX2), for each k, ``BLOCK_N / 2`` bytes; byte j
holds row j in its low nibble and row j + BLOCK_N/2 in its high one. A last, partial block holds
rows n and n + 1 in one byte. Other capabilities are not decoded: their layers keep the kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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
    weight = dequantize(packed, scales_and_zeros)
    assert weight is not None  # int4pack_linear calls it only where decoded_here()
    return F.linear(rows, weight)
