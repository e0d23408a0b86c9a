"""zen_woq's own 4-bit kernel (``csrc/int4_linear.cpp``) for CPUs with AVX512-VNNI and AVX512-BF16:
Zen 4 and later, Intel Sapphire Rapids and later; its 8-bit twin serves the opt-in int8 lm_head.

Why a kernel of our own: a decode step multiplies one row, and there aten's one-row int4 matmul
reads its weights well below the memory bandwidth (``benchmarks/kernel_rounds.py``: this one is
1.8-2.4x faster); zentorch's is wrong on some CPUs. This one multiplies the 4-bit codes as they lie in memory with VPDPBUSD (64 per
instruction), x written per group as 15-bit integers times a power of two: exact for every bf16
element within 2^7 of its group's largest, the rest rounded to 2^-14 of that group's scale; the
sums are exact integers per group, fp32 across groups, rounded once to bf16. A group's few
outliers (LLMs' massive activations, 10^3-10^4 x the median) would leave the rest about 4 bits:
where at most 1 in 8 of its elements (2 of 16) lie within 2^7 of its largest and smaller nonzero
ones remain, those are taken out, tier by tier, and added exactly from their weight columns, and
the rest is written at its own scale: outliers stay within the bf16 bound (:mod:`numerics`).

Packing (this module, at compile time): codes ``q + 8`` (0..15) in the C++ source's layout (blocks
of 16 output rows, 64 bytes per 8 inputs), ``scales`` as the checkpoint holds them (bf16 or fp32)
and ``zeros`` uint8 ``zp + 8`` (8 without zero points), both [N, G] with their bytes in the same
blocks of 16 rows. Groups must be multiples of 16 (channel-wise included), out_features a multiple
of 16; activations bf16.

For many rows the layer's weights are dequantized to bf16 per call (no copy held) for a dense
GEMM, by the rule of :mod:`zen_woq_pass.planning.prefill`.
"""

from __future__ import annotations

import torch

from zen_woq_pass.graph.layer import QuantizedLinear, QuantizedWeights
from zen_woq_pass.kernels import native
from zen_woq_pass.kernels.base import Kernel
from zen_woq_pass.planning import eligibility, prefill

BLOCK_ROWS = 16  # output rows per block: one int32 lane each
GROUP_MULTIPLE = 16  # inputs per vector of the activations' quantization


def pack_codes(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """uint8 [N, K * bits / 8] in the kernel's layout from codes uint8 [N, K]: per block of 16 rows,
    per step of 8 inputs from k, byte 4r + j holds row r's input k + j and k + 4 + j; 4-bit, in its
    low and high nibble of 64 bytes; 8-bit, in the first and second 64 bytes."""
    n, k = codes.shape
    steps = codes.reshape(n // BLOCK_ROWS, BLOCK_ROWS, k // 8, 2, 4)  # [block, row, step, half, j]
    if bits == 4:
        steps = steps.permute(0, 2, 1, 3, 4)  # [block, step, row, half, j]
        return (steps[..., 0, :] | (steps[..., 1, :] << 4)).reshape(n, k // 2).contiguous()
    return steps.permute(0, 2, 3, 1, 4).reshape(n, k).contiguous()  # [block, step, half, row, j]


def by_block(values: torch.Tensor) -> torch.Tensor:
    """A copy of [N, G] values whose bytes are [N / 16][G][16]: per block, per group, its 16 rows."""
    n, g = values.shape
    blocked = values.new_empty(n // BLOCK_ROWS, g, BLOCK_ROWS)
    blocked.copy_(values.reshape(n // BLOCK_ROWS, BLOCK_ROWS, g).transpose(1, 2))
    return blocked.view(n, g)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def _bf16(bias):
    return bias if bias is None or bias.dtype == torch.bfloat16 else bias.to(torch.bfloat16)


def _linear(op, x, weight, scales, zeros, bias):
    y = op(_rows(x), weight, scales, zeros, _bf16(bias))
    return y.reshape(*x.shape[:-1], weight.shape[0])


def _linear_by_rows(op, dequantize, x, weight, scales, zeros, bias):
    rows, bias = _rows(x), _bf16(bias)
    y = prefill.linear(
        rows,
        lambda: op(rows, weight, scales, zeros, bias),
        lambda: torch.nn.functional.linear(rows, dequantize(weight, scales, zeros), bias),
    )
    return y.reshape(*x.shape[:-1], weight.shape[0])


def avx512_int4_linear(x, weight, scales, zeros, bias):
    """x [..., K] bf16 -> [..., N] bf16."""
    return _linear(torch.ops.zen_woq_native.int4_linear, x, weight, scales, zeros, bias)


def avx512_int4_linear_by_rows(x, weight, scales, zeros, bias):
    """The same, with many rows through a dense GEMM by the prompt-row rule."""
    ops = torch.ops.zen_woq_native
    return _linear_by_rows(ops.int4_linear, ops.int4_dequantize, x, weight, scales, zeros, bias)


def avx512_int8_linear(x, weight, scales, zeros, bias):
    return _linear(torch.ops.zen_woq_native.int8_linear, x, weight, scales, zeros, bias)


def avx512_int8_linear_by_rows(x, weight, scales, zeros, bias):
    ops = torch.ops.zen_woq_native
    return _linear_by_rows(ops.int8_linear, ops.int8_dequantize, x, weight, scales, zeros, bias)


class Avx512Int4Kernel(Kernel):
    name = "avx512-int4"
    bits = 4
    rounds_activations = True  # x as 15-bit integers per group

    def platform_reason(self, forced: bool) -> str | None:
        return native.unavailable_reason()

    def bits_reason(self, layer: QuantizedLinear) -> str | None:
        return eligibility.gptq_int4_reason(layer)

    def layer_reason(self, layer: QuantizedLinear) -> str | None:
        reason = self.bits_reason(layer)
        if reason:
            return reason
        if layer.activation_dtype != torch.bfloat16:
            return f"activations are {layer.activation_dtype}; it takes bfloat16"
        if layer.out_features % BLOCK_ROWS:
            return f"out_features {layer.out_features} is not a multiple of {BLOCK_ROWS}"
        assert layer.group_size is not None  # bits_reason refuses None
        if layer.group_size % GROUP_MULTIPLE:
            return f"group size {layer.group_size} is not a multiple of {GROUP_MULTIPLE}"
        return None

    def pack(self, layer: QuantizedLinear, weights: QuantizedWeights) -> dict[str, torch.Tensor]:
        offset = 1 << (self.bits - 1)  # signed values -> unsigned codes
        codes = weights.q.to(torch.int16) + offset
        zero = (
            weights.zero_point.to(torch.int16) + offset
            if weights.zero_point is not None
            else torch.full_like(weights.scale, offset, dtype=torch.int16)
        )
        if codes.min() < 0 or codes.max() >= 2 * offset or zero.min() < 0 or zero.max() > 255:
            raise ValueError(f"values or zero points outside the signed {self.bits}-bit range")
        scale_dtype = weights.scale.dtype if weights.scale.dtype in (torch.bfloat16, torch.float32) else torch.float32
        return {
            "weight": pack_codes(codes.to(torch.uint8), self.bits),
            "scales": by_block(weights.scale.to(scale_dtype)),  # a copy: the checkpoint's is emptied
            "zeros": by_block(zero.to(torch.uint8)),
        }

    target = staticmethod(avx512_int4_linear)
    eager_target = staticmethod(avx512_int4_linear_by_rows)

    def arguments(self, x, constants, bias) -> tuple:
        return (x, constants["weight"], constants["scales"], constants["zeros"], bias)


class Avx512Int8Kernel(Avx512Int4Kernel):
    """The same kernel on 8-bit weights: the opt-in int8 lm_head (:mod:`zen_woq_pass.runtime.head`)."""

    name = "avx512-int8"
    bits = 8

    def bits_reason(self, layer: QuantizedLinear) -> str | None:
        if layer.num_bits != 8:
            return f"{layer.num_bits}-bit weights; it takes 8-bit"
        return eligibility.grouped_frozen_reason(layer)

    target = staticmethod(avx512_int8_linear)
    eager_target = staticmethod(avx512_int8_linear_by_rows)
