"""zen_woq's own 4-bit kernel (``csrc/int4_linear.cpp``) for CPUs with AVX512-BF16: Zen 4 and later.

Why a kernel of our own: a decode step multiplies one row, and there the chain's other kernels
are far from the memory bandwidth (aten's one-row int4 matmul read its weights at about 4-13 GB/s
in issue 9, zentorch's is wrong on some CPUs). This one widens each 4-bit code to the bf16 number
128 + code with one byte interleave and sums with VDPBF16PS in fp32; its weights stream as one
prefetched sequence per block of 8 output rows. Numerics: the exact products of x with
``(q - zp) * scale``, summed in fp32, rounded once to bf16.

Packing (this module, at compile time): codes ``q + 8`` (0..15) in the C++ source's layout,
``scales`` [N, G] as the checkpoint holds them (bf16 or fp32), ``zeros`` [N, G] uint8 ``zp + 8``
(8 without zero points). Groups must be multiples of 64 (channel-wise included), in_features a
multiple of 64, out_features of 8; activations bf16.

For many rows the layer's weights are dequantized to bf16 per call (no copy held) for a dense
GEMM, where measured faster (:mod:`zen_woq_pass.prefill`).
"""

from __future__ import annotations

import torch

from zen_woq_pass import eligibility, native, prefill
from zen_woq_pass.kernels.base import Kernel
from zen_woq_pass.layer import QuantizedLinear, QuantizedWeights

BLOCK_ROWS = 8
CHUNK = 128  # inputs per 64 bytes of a row
HALF = 64  # inputs per 32 bytes; groups are multiples of it


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] in the kernel's layout from codes uint8 [N, K] (0..15): per block of 8 rows,
    per chunk of 128 inputs, each row's 64 bytes, byte 16i + 8h + j holding input 32h + 8i + j (low
    nibble) and 64 + 32h + 8i + j (high); then, if K % 128 == 64, each row's 32 bytes, byte j
    holding inputs j and 32 + j."""
    n, k = codes.shape
    chunks = k // CHUNK
    blocks = []
    if chunks:
        # [N, chunk, nibble, h, i, j] -> bytes [N, chunk, i, h, j] -> [block, chunk, row, 64]
        split = codes[:, : chunks * CHUNK].reshape(n, chunks, 2, 2, 4, 8)
        rows = (split[:, :, 0] | (split[:, :, 1] << 4)).permute(0, 1, 3, 2, 4).reshape(n, chunks, 64)
        blocks.append(rows.view(n // BLOCK_ROWS, BLOCK_ROWS, chunks, 64).transpose(1, 2).reshape(n // BLOCK_ROWS, -1))
    if k % CHUNK:
        tail = codes[:, chunks * CHUNK :].reshape(n, 2, 32)
        blocks.append((tail[:, 0] | (tail[:, 1] << 4)).reshape(n // BLOCK_ROWS, -1))
    return torch.cat(blocks, dim=1).reshape(n, k // 2).contiguous()


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _bf16(bias):
    return bias if bias is None or bias.dtype == torch.bfloat16 else bias.to(torch.bfloat16)


def avx512_int4_linear(x, weight, scales, zeros, bias):
    """x [..., K] bf16 -> [..., N] bf16."""
    bias = _bf16(bias)
    y = torch.ops.zen_woq_native.int4_linear(_rows(x), weight, scales, zeros, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def avx512_int4_linear_by_rows(x, weight, scales, zeros, bias):
    """The same, with many rows through a dense GEMM where that was measured faster."""
    rows, bias = _rows(x), _bf16(bias)
    n, k = weight.shape[0], rows.shape[1]
    y = prefill.linear(
        rows,
        ("avx512-int4", n, k, k // scales.shape[1]),
        lambda: torch.ops.zen_woq_native.int4_linear(rows, weight, scales, zeros, bias),
        lambda: torch.nn.functional.linear(rows, torch.ops.zen_woq_native.int4_dequantize(weight, scales, zeros), bias),
    )
    return y.reshape(*x.shape[:-1], n)


class Avx512Int4Kernel(Kernel):
    name = "avx512-int4"

    def platform_reason(self, forced: bool) -> str | None:
        return native.unavailable_reason()

    def layer_reason(self, layer: QuantizedLinear) -> str | None:
        reason = eligibility.gptq_int4_reason(layer)
        if reason:
            return reason
        if layer.activation_dtype != torch.bfloat16:
            return f"activations are {layer.activation_dtype}; it takes bfloat16"
        if layer.out_features % BLOCK_ROWS:
            return f"out_features {layer.out_features} is not a multiple of {BLOCK_ROWS}"
        if layer.in_features % HALF:
            return f"in_features {layer.in_features} is not a multiple of {HALF}"
        if layer.group_size % HALF:
            return f"group size {layer.group_size} is not a multiple of {HALF}"
        return None

    def pack(self, layer: QuantizedLinear, weights: QuantizedWeights) -> dict[str, torch.Tensor]:
        codes = weights.q.to(torch.int16) + 8
        zero = weights.zero_point.to(torch.int16) + 8 if weights.zero_point is not None else torch.full_like(weights.scale, 8, dtype=torch.int16)
        if codes.min() < 0 or codes.max() > 15 or zero.min() < 0 or zero.max() > 255:
            raise ValueError("values or zero points outside the signed 4-bit range")
        scale_dtype = weights.scale.dtype if weights.scale.dtype in (torch.bfloat16, torch.float32) else torch.float32
        return {
            "weight": pack_codes(codes.to(torch.uint8)),
            "scales": weights.scale.to(scale_dtype, copy=True).contiguous(),  # a copy: the checkpoint's is emptied
            "zeros": zero.to(torch.uint8).contiguous(),
        }

    target = staticmethod(avx512_int4_linear)
    eager_target = staticmethod(avx512_int4_linear_by_rows)

    def arguments(self, x, constants, bias) -> tuple:
        return (x, constants["weight"], constants["scales"], constants["zeros"], bias)
