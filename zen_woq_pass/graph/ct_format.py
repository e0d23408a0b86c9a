"""The compressed-tensors "pack-quantized" format, written as plain tensor code.

compressed-tensors' own ``unpack_from_int32`` graph-breaks under dynamo on 0.19 (boolean-mask
indexing), so we keep our own shift-and-mask version: traceable, and the reference our tests
hold every kernel to. The format, for a Linear of ``out_features`` N and ``in_features`` K:

- ``weight_packed``: int32 [N, ceil(K * bits / 32)]; element k lives in word k*bits // 32 at bit
  offset k*bits % 32, stored with a +2**(bits-1) offset (so 4-bit values are 0..15 on disk).
- ``weight_scale``: float [N, G], G = K / group_size (G = 1 channel-wise).
- ``weight_zero_point`` (asymmetric only): int32 [ceil(N * bits / 32), G], packed along dim 0.
- ``weight_g_idx`` (activation re-ordering only): int [K], the group of each input column.

Dequantization is ``(q - zp) * scale`` computed in the scale's dtype, exactly as
compressed-tensors' ``_dequantize`` does it, so the two agree bit for bit.
"""

from __future__ import annotations

import torch


def unpack_int32(packed: torch.Tensor, num_bits: int, length: int) -> torch.Tensor:
    """Unpack along the last dim: int32 [R, W] -> int8 [R, length], offset removed.

    Only for ``num_bits`` dividing 32 (1, 2, 4, 8): no value straddles two words.
    """
    if 32 % num_bits:
        raise ValueError(f"unpack_int32 handles bit widths dividing 32, got {num_bits}")
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << num_bits) - 1)
    values = values.flatten(-2)[..., :length]
    return (values - (1 << (num_bits - 1))).to(torch.int8)


def unpack_weight(weight_packed: torch.Tensor, num_bits: int, in_features: int) -> torch.Tensor:
    """``weight_packed`` int32 [N, ceil(K*bits/32)] -> signed int8 [N, K]."""
    return unpack_int32(weight_packed, num_bits, in_features)


def unpack_zero_point(zero_point: torch.Tensor, num_bits: int, out_features: int) -> torch.Tensor:
    """``weight_zero_point`` int32 [ceil(N*bits/32), G], packed along dim 0 -> int8 [N, G]."""
    return unpack_int32(zero_point.t(), num_bits, out_features).t()


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> torch.Tensor:
    """int [N, K] values, scale [N, G], zero point [N, G] or None, g_idx [K] or None
    -> dense weight [N, K] in ``scale.dtype``, computed as compressed-tensors computes it."""
    n, k = q.shape
    num_groups = scale.shape[-1]
    w = q.to(scale.dtype)
    if g_idx is not None:
        groups = g_idx.long()
        if zero_point is not None:
            w = w - zero_point.to(scale.dtype)[:, groups]
        return w * scale[:, groups]
    w = w.unflatten(-1, (num_groups, k // num_groups))
    if zero_point is not None:
        w = w - zero_point.to(scale.dtype).unsqueeze(-1)
    return (w * scale.unsqueeze(-1)).flatten(-2)


def pack_int32(values: torch.Tensor, num_bits: int) -> torch.Tensor:
    """The inverse of :func:`unpack_int32` (signed int [R, L] -> int32 [R, ceil(L*bits/32)]).

    Used to build modules by hand in tests and to corrupt checkpoints on purpose; real
    checkpoints come from llmcompressor.
    """
    per_word = 32 // num_bits
    rows, length = values.shape
    words = -(-length // per_word)
    padded = torch.zeros(rows, words * per_word, dtype=torch.int64)
    padded[:, :length] = values.to(torch.int64) + (1 << (num_bits - 1))
    shifts = torch.arange(0, 32, num_bits, dtype=torch.int64)
    packed = (padded.view(rows, words, per_word) << shifts).sum(-1)
    return torch.where(packed >= 1 << 31, packed - (1 << 32), packed).to(torch.int32)
