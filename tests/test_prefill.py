"""Prefill by rows: aten's int4 layout decoded exactly, the dense path computing the kernel's own
weights, and a converted layer right on both sides of the threshold against the fp32 reference."""

import pytest
import torch
from conftest import LAYER_SQNR_DB
from helpers import optimized_down_proj

from zen_woq_pass import prefill
from zen_woq_pass.kernels import int4pack_layout
from zen_woq_pass.numerics import sqnr_db

pytestmark = pytest.mark.skipif(
    not int4pack_layout.decoded_here(),
    reason=f"aten's int4 layout for CPU capability {torch.backends.cpu.get_cpu_capability()} is not decoded",
)


@pytest.mark.parametrize("out_features", [192, 80, 16])  # whole blocks; a partial last block; only that
@pytest.mark.parametrize("in_features", [64, 576])
def test_the_packed_codes_decode_exactly(out_features, in_features):
    codes = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    assert torch.equal(int4pack_layout.codes(packed, out_features).to(torch.int32), codes)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("zero_points", [False, True])
def test_dequantized_weights_are_the_kernels_own(group_size, zero_points):
    """The kernel times the identity is its weight, transposed: the dense path must compute that,
    bit for bit (both round ``(code - 8) * scale + zero`` once)."""
    n, k = 96, 256
    generator = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales_and_zeros = torch.stack(
        [torch.rand(k // group_size, n, generator=generator) / 8 + 0.01, torch.randn(k // group_size, n, generator=generator) / 4 * zero_points],
        dim=-1,
    ).to(torch.bfloat16)
    identity = torch.eye(k, dtype=torch.bfloat16)
    kernels = torch.ops.aten._weight_int4pack_mm_for_cpu(identity, packed, group_size, scales_and_zeros).T
    ours = int4pack_layout.dequantize(packed, scales_and_zeros)
    assert ours.dtype == torch.bfloat16 and ours.shape == (n, k)
    assert torch.equal(ours, kernels)


def test_a_layer_is_right_on_both_sides_of_the_threshold(checkpoints):
    layer, reference = optimized_down_proj(checkpoints("llama_sym_g128"), "aten-int4")
    packed, scales_and_zeros = layer.zen_woq_weight, layer.zen_woq_scales_and_zeros
    prefill.clear()
    for rows in (prefill.MIN_ROWS - 1, prefill.MIN_ROWS, 200):
        x = torch.randn(1, rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        want = x.float() @ reference.T
        with torch.no_grad():
            got = layer(x)
            dense = int4pack_layout.dense_linear(x[0], packed, scales_and_zeros)
        assert sqnr_db(got.float(), want) >= LAYER_SQNR_DB
        assert sqnr_db(dense.float(), want[0]) >= LAYER_SQNR_DB  # the dense side, whichever won the race
    raced = prefill.choices()
    print("\n".join(map(str, raced)))
    assert [choice.rows for choice in raced] == [16, 256]  # 15 rows never race; one choice per bucket
    assert all(choice.dense_ms is not None and choice.sqnr >= prefill.MIN_SQNR_DB for choice in raced)
