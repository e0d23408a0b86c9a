"""A dense bf16 weight in 12 bits per value, losslessly, for the package's one-row kernel
(``csrc/packed_bf16_linear.cpp``, AVX512-BF16 CPUs).

Why: at decode a dense lm_head is read whole for every token (SmolLM2's tied head: 57 MB of the
about 113 MB a step reads), so its time is its bytes. A bf16 value's high byte is its sign and the
top 7 bits of its exponent, and within one row of a trained matrix those 7 bits take few values
(SmolLM2's head: at most 6 per row). Each value keeps its low byte and gets a 4-bit code, its sign
and how far its high byte lies below the row's largest; the kernel rebuilds the exact bf16 bits and
multiplies them as a bf16 GEMM does (exact products, fp32 sums). Not a quantization: the numbers
are the model's. A row whose values span more than 7 such steps (or hold subnormals far below the
rest) cannot be coded, and the layer keeps its plain kernel.
"""

from __future__ import annotations

import torch

BLOCK_ROWS = 16  # output rows per block: one fp32 lane each
ZERO = 7  # the code's distance for a zero value
INPUT_MULTIPLE = 4  # inputs per step of the kernel's loop


def why_not(weight: torch.Tensor) -> str | None:
    """None if ``weight`` can be packed; else why not, in words."""
    if weight.dtype != torch.bfloat16 or weight.dim() != 2:
        return f"it is {str(weight.dtype).removeprefix('torch.')} {weight.dim()}-D, not a bf16 matrix"
    out_features, in_features = weight.shape
    if out_features % BLOCK_ROWS or in_features % INPUT_MULTIPLE or in_features == 0:
        return f"its shape {out_features}x{in_features} is not a multiple of {BLOCK_ROWS}x{INPUT_MULTIPLE}"
    _, _, _, distance, _ = _split(weight)
    widest = int(distance.max())
    if widest >= ZERO:
        row = int(distance.amax(1).argmax())
        return f"row {row}'s exponents span {widest + 1} steps of 2 (at most {ZERO} fit the 12-bit code)"
    return None


def _split(weight: torch.Tensor):
    """Each value's low byte and sign [N, K]; each row's largest high byte less the sign [N]; each
    value's distance below it (0 for zeros) and whether it is nonzero [N, K]. In bytes, not int32:
    a quarter of the memory traffic (SmolLM2's head: 0.3 s of ``optimize`` against 1.0 s)."""
    pairs = weight.detach().contiguous().view(torch.uint8).view(*weight.shape, 2)  # x86: low byte first
    low, high = pairs[..., 0], pairs[..., 1]
    top = high & 0x7F
    nonzero = (low != 0) | (top != 0)
    row_top = torch.where(nonzero, top, 0).amax(1, keepdim=True)
    distance = torch.where(nonzero, row_top - top, 0)  # no wrap-around: a nonzero top is at most its row's
    return low, high >> 7, row_top.squeeze(1), distance, nonzero


def pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed uint8 [N / 16, K / 2, 48], tops uint8 [N]) in the C++ source's layout: per block of
    16 rows, per 2 inputs, 32 low bytes (byte 2r + j: row r, input k + j) then 16 code bytes (byte
    r: row r's code for input k in its low nibble, k + 1 in its high one); a code is
    distance << 1 | sign. Call only where :func:`why_not` is None."""
    out_features, in_features = weight.shape
    low, sign, row_top, distance, nonzero = _split(weight)
    code = torch.where(nonzero, distance, ZERO) << 1 | sign
    blocks, steps = out_features // BLOCK_ROWS, in_features // 2

    def by_step(values: torch.Tensor) -> torch.Tensor:  # [block, step, row, j]
        return values.reshape(blocks, BLOCK_ROWS, steps, 2).permute(0, 2, 1, 3)

    low = by_step(low).reshape(blocks, steps, 2 * BLOCK_ROWS)
    code = by_step(code)
    code = code[..., 0] | code[..., 1] << 4
    return torch.cat([low, code], -1).contiguous(), row_top


def unpack(packed: torch.Tensor, tops: torch.Tensor) -> torch.Tensor:
    """The bf16 [N, K] weight back from :func:`pack`'s output (what the kernel decodes)."""
    blocks, steps, _ = packed.shape
    low = packed[..., : 2 * BLOCK_ROWS].to(torch.int32).reshape(blocks, steps, BLOCK_ROWS, 2)
    codes = packed[..., 2 * BLOCK_ROWS :].to(torch.int32)
    code = torch.stack([codes & 0xF, codes >> 4], -1)  # [block, step, row, j]
    top = tops.to(torch.int32).reshape(blocks, 1, BLOCK_ROWS, 1)
    distance, sign = code >> 1, code & 1
    bits = torch.where(distance == ZERO, 0, sign << 15 | (top - distance) << 8 | low)
    bits = bits.permute(0, 2, 1, 3).reshape(blocks * BLOCK_ROWS, steps * 2)
    return torch.where(bits >= 0x8000, bits - 0x10000, bits).to(torch.int16).view(torch.bfloat16)
