"""Prefill by rows: aten's int4 layout decoded exactly, the dense path computing the kernel's own
weights, and a converted layer on the path the rule names on both sides of the threshold, the same
bits on every call, right against the fp32 reference."""

import pytest
import torch

from zen_woq_pass.kernels import int4pack_layout
from zen_woq_pass.planning import platform, prefill

from conftest import LAYER_SQNR_DB, ZEN4_CPU
from helpers import assert_rows_follow_the_rule, optimized_down_proj

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


@pytest.fixture(params=["this CPU", "a CPU with bf16 GEMM hardware"])
def cpu(request, monkeypatch):
    """The rule as this CPU has it, and as a Zen 4 has it (its dense path is plain torch here)."""
    if request.param != "this CPU":
        monkeypatch.setattr(platform, "cpu_info", lambda: ZEN4_CPU)
    prefill.clear()
    yield request.param
    monkeypatch.undo()
    prefill.clear()


def test_the_rule_follows_the_cpu_not_a_clock(cpu):
    flags = platform.cpu_info().flags
    has_bf16_gemm = "avx512_bf16" in flags or "amx_bf16" in flags
    assert prefill.dense_min_rows() == (prefill.DENSE_MIN_ROWS if has_bf16_gemm else None)
    assert not prefill.takes_dense(1)
    assert prefill.takes_dense(prefill.DENSE_MIN_ROWS) == has_bf16_gemm


def test_a_layer_takes_the_ruled_path_on_both_sides_of_the_threshold(checkpoints, cpu):
    layer, reference = optimized_down_proj(checkpoints("llama_sym_g128"), "aten-int4")
    packed, scales_and_zeros = layer.zen_woq_weight, layer.zen_woq_scales_and_zeros
    group_size = layer.in_features // scales_and_zeros.shape[0]

    def kernel(x):
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)

    def dense(x):
        return int4pack_layout.dense_linear(x, packed, scales_and_zeros)

    assert_rows_follow_the_rule(layer, reference, kernel, dense, LAYER_SQNR_DB)
