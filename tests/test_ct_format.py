"""The pack-quantized format: golden bits, and agreement with compressed-tensors' own code."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize

from zen_woq_pass.graph import ct_format


def test_golden_bits():
    # element i sits in bits 4i..4i+3 with a +8 offset: word 0x76543210 holds 0..7 -> -8..-1
    word = torch.tensor([[0x76543210, 0x7FEDCBA9]], dtype=torch.int64)
    packed = torch.where(word >= 1 << 31, word - (1 << 32), word).to(torch.int32)
    assert ct_format.unpack_int32(packed, 4, 16).tolist() == [[-8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, -1]]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(16, 256), (13, 72), (3, 9)])
def test_unpack_matches_compressed_tensors(bits, shape):
    values = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, dtype=torch.int8)
    packed = pack_to_int32(values, bits)
    assert torch.equal(ct_format.unpack_weight(packed, bits, shape[1]), values)
    assert torch.equal(ct_format.pack_int32(values, bits), packed)


@pytest.mark.parametrize("shape", [(16, 2), (13, 3), (8, 1)])
def test_zero_point_unpack_matches_compressed_tensors(shape):
    zp = torch.randint(-8, 8, shape, dtype=torch.int8)
    packed = pack_to_int32(zp, 4, packed_dim=0)
    assert torch.equal(ct_format.unpack_zero_point(packed, 4, shape[0]), zp)
    assert torch.equal(unpack_from_int32(packed, 4, shape, packed_dim=0), zp)


@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_is_bit_exact_with_compressed_tensors(group_size, symmetric):
    n, k = 24, 256
    groups = 1 if group_size is None else k // group_size
    q = torch.randint(-8, 8, (n, k), dtype=torch.int8)
    scale = (torch.rand(n, groups) * 0.1).to(torch.bfloat16)
    zp = None if symmetric else torch.randint(-8, 8, (n, groups), dtype=torch.int8)
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="channel" if group_size is None else "group", group_size=group_size)
    assert torch.equal(ct_format.dequantize(q, scale, zp), ct_dequantize(q, scale, zp, args=args))


def test_g_idx_dequantize_uses_each_columns_group():
    q = torch.ones(2, 4, dtype=torch.int8)
    scale = torch.tensor([[1.0, 10.0], [2.0, 20.0]])
    g_idx = torch.tensor([1, 0, 1, 0])
    assert ct_format.dequantize(q, scale, None, g_idx).tolist() == [[10, 1, 10, 1], [20, 2, 20, 2]]
