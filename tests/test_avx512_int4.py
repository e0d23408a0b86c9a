"""The package's own AVX512-VNNI kernel: its packed layout decodes to compressed-tensors' own bf16
weights bit for bit, its product is within bf16 rounding of the fp32 reference for one row and
many (with and without zero points, bias, bf16 and fp32 scales, groups of 16 to channel-wise), and
within that bound for outlier activations too (its rounding of x, modelled here, checked on any
CPU); no inputs give the bias, as F.linear; ``auto`` tries it, and it says no, with the reason,
where it cannot run or cannot take a layer."""

import dataclasses
import math

import pytest
import torch

import zen_woq_pass
from zen_woq_pass.graph import ct_format
from zen_woq_pass.graph.layer import QuantizedWeights
from zen_woq_pass.kernels import KERNELS, native
from zen_woq_pass.planning import numerics, prefill
from zen_woq_pass.planning.numerics import sqnr_db

from conftest import LAYER_SQNR_DB, MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB
from helpers import (
    INPUT_IDS,
    assert_close_to_reference,
    assert_rows_follow_the_rule,
    count,
    fp32_reference,
    load,
    optimized_down_proj,
    run_compiled,
)
from test_eligibility import GOOD

KERNEL = KERNELS["avx512-int4"]
BOTH = pytest.mark.parametrize("bits", [4, 8])  # avx512-int4 and its 8-bit twin, avx512-int8
needs_the_kernel = pytest.mark.skipif(native.unavailable_reason() is not None, reason=f"avx512-int4: {native.unavailable_reason()}")
SHAPES = [(64, 576, 64), (32, 576, 576), (16, 640, 128), (48, 256, 128), (16, 64, 64), (32, 1024, 256), (16, 96, 32), (32, 48, 16)]


def _weights(n, k, group_size, zero_points, scale_dtype, seed=0, bits=4):
    generator = torch.Generator().manual_seed(seed)
    low, high = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(low, high, (n, k), dtype=torch.int8, generator=generator)
    zero_point = torch.randint(low, high, (n, k // group_size), dtype=torch.int8, generator=generator) if zero_points else None
    scale = (torch.rand(n, k // group_size, generator=generator) / 50 + 1e-3).to(scale_dtype)
    return QuantizedWeights(q, scale, zero_point, None)


def _layer(n, k, group_size, zero_points, has_bias=False, bits=4):
    return dataclasses.replace(
        GOOD, out_features=n, in_features=k, num_groups=k // group_size, has_zero_point=zero_points, has_bias=has_bias, num_bits=bits
    )


def _kernel(bits):
    return KERNEL if bits == 4 else KERNELS["avx512-int8"]


@needs_the_kernel
@BOTH
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("zero_points", [False, True])
@pytest.mark.parametrize("n, k, group_size", SHAPES)
def test_the_layout_decodes_to_compressed_tensors_weights(n, k, group_size, zero_points, scale_dtype, bits):
    weights = _weights(n, k, group_size, zero_points, scale_dtype, bits=bits)
    constants = _kernel(bits).pack(_layer(n, k, group_size, zero_points, bits=bits), weights)
    dequantize = getattr(torch.ops.zen_woq_native, f"int{bits}_dequantize")
    ours = dequantize(constants["weight"], constants["scales"], constants["zeros"])
    # compressed-tensors' dequantization in the scale's dtype, rounded to bf16 as transformers holds it
    assert torch.equal(ours, ct_format.dequantize(weights.q, weights.scale, weights.zero_point).to(torch.bfloat16))


@needs_the_kernel
@BOTH
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("zero_points, bias", [(False, False), (True, True)])
@pytest.mark.parametrize("n, k, group_size", SHAPES)
def test_the_product_is_within_bf16_rounding_of_the_fp32_reference(n, k, group_size, zero_points, bias, rows, bits):
    weights = _weights(n, k, group_size, zero_points, torch.bfloat16, seed=rows, bits=bits)
    kernel = _kernel(bits)
    constants = kernel.pack(_layer(n, k, group_size, zero_points, bias, bits), weights)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=generator).to(torch.bfloat16)
    b = torch.randn(n, generator=generator).to(torch.bfloat16) if bias else None
    y = kernel.run(x, constants, b)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, n)
    exact = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point, None)
    assert numerics.worst_excess(y, x, exact, b) <= 1.0


# Outlier activations. LLMs have a few "massive activations", 10^3-10^4 times the median, in fixed
# channels; quantized weights are exactly 0 where a code equals its zero point (1 in 16 at 4 bits),
# so some output rows do not see an outlier at all and their bound is the rest's.
OUTLIER_PROFILES = ["massive", "one at 12000, weight 0"]
OUTLIER_SHAPES = [(64, 576, 64), (32, 1024, 256), (16, 640, 640), (32, 48, 16)]
TIER, OUTLIERS_PER = 7, 8  # the C++ source's constants


def _outlier_case(profile, n, k, group_size, zero_points, bits, rows):
    """(weights, x [rows, k] bf16, bias [n] bf16) for one profile: "massive", per token three or
    four channels (two in the first group) at 10^3-10^4 x the median, either sign, and output rows
    0-3 with weight 0 at all of them; or one channel at 12000 whose weight is 0 in every row."""
    weights = _weights(n, k, group_size, zero_points, torch.bfloat16, seed=rows, bits=bits)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=generator)
    if profile == "massive":
        channels = sorted({3, 9, (group_size + 5) % k, k - 2})
        size = 10 ** (3 + torch.rand(rows, len(channels), generator=generator)) * x.abs().median()
        x[:, channels] = size * torch.where(torch.rand(rows, len(channels), generator=generator) < 0.5, -1.0, 1.0)
        outputs = slice(0, 4)
    else:
        channels, outputs = [5], slice(None)
        x[:, 5] = 12000
    for channel in channels:  # the code equal to its zero point: an exact 0
        weights.q[outputs, channel] = weights.zero_point[outputs, channel // group_size] if zero_points else 0
    bias = torch.randn(n, generator=generator).to(torch.bfloat16)
    return weights, x.to(torch.bfloat16), bias


def _exponent(a: float) -> int:
    return max(math.frexp(a)[1], -100)


def _modelled_x(x, group_size, take_out=True):
    """x [M, K] bf16 as the kernel multiplies it, in float64 (the C++ source's header): per row and
    group, the elements it takes out exact, the others rounded to multiples of 2^(e - 14)."""
    out = x.double()
    for row in out:
        for group in row.split(group_size):
            size = group.abs()
            e = _exponent(size.max().item())
            limit, taken, most = math.inf, 0, max(2, group_size // OUTLIERS_PER)
            top = int((size >= 2.0 ** (e - TIER)).sum())
            if take_out and 0 < top <= most:
                while True:
                    nonzero = int(((size < limit) & (size > 0)).sum())
                    if taken + top > most or nonzero == top:
                        break
                    limit, taken = 2.0 ** (e - TIER), taken + top
                    e = _exponent(size[size < limit].max().item())
                    top = int(((size < limit) & (size >= 2.0 ** (e - TIER))).sum())
            kept = size < limit
            group[kept] = torch.round(group[kept] * 2.0 ** (14 - e)) * 2.0 ** (e - 14)
    return out


@BOTH
@pytest.mark.parametrize("profile", OUTLIER_PROFILES)
@pytest.mark.parametrize("n, k, group_size", OUTLIER_SHAPES)
def test_the_kernels_rounding_of_x_keeps_outliers_within_the_bound(n, k, group_size, profile, bits):
    """On any CPU: the kernel's numerics, modelled (its sums are exact integers per group), with
    outliers taken out are within the bf16 bound; with them in the integer path, as before, an
    outlier of weight 0 put its group's other elements at 2x the bound and more."""
    weights, x, bias = _outlier_case(profile, n, k, group_size, True, bits, rows=3)
    exact = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point, None)

    def modelled(take_out):
        return (_modelled_x(x, group_size, take_out) @ exact.double().T + bias.double()).float().to(torch.bfloat16)

    assert numerics.worst_excess(modelled(True), x, exact, bias) <= 1.0
    if profile == "one at 12000, weight 0":
        assert numerics.worst_excess(modelled(False), x, exact, bias) > 1.5


@needs_the_kernel
@BOTH
@pytest.mark.parametrize("rows", [1, 3, 5])
@pytest.mark.parametrize("zero_points", [False, True])
@pytest.mark.parametrize("profile", OUTLIER_PROFILES)
@pytest.mark.parametrize("n, k, group_size", OUTLIER_SHAPES)
def test_outlier_activations_stay_within_the_bound(n, k, group_size, profile, zero_points, rows, bits):
    """Before, the outliers set their groups' scale: modelled, up to 10x the bound for "massive",
    1.7x and more for weight 0 (SQNR down to 8 dB, a bf16 GEMM's about 50)."""
    weights, x, bias = _outlier_case(profile, n, k, group_size, zero_points, bits, rows)
    kernel = _kernel(bits)
    y = kernel.run(x, kernel.pack(_layer(n, k, group_size, zero_points, True, bits), weights), bias)
    exact = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point, None)
    assert numerics.worst_excess(y, x, exact, bias) <= 1.0
    reference = numerics.reference_linear(x, exact, bias)
    dense = torch.nn.functional.linear(x, exact.to(torch.bfloat16), bias)  # bf16 weights: a GEMM's
    assert sqnr_db(y, reference) >= sqnr_db(dense, reference) - 1.0


def _edge_case(group_size, bits):
    """Groups at the edges of taking out: as many outliers as a group may take out and one more, a
    group of one nonzero element, one of a big and a tiny one, one of zeros, one of subnormals."""
    n, k = 32, 4 * group_size
    most = max(2, group_size // OUTLIERS_PER)
    weights = _weights(n, k, group_size, True, torch.bfloat16, bits=bits)
    x = torch.randn(4, k, generator=torch.Generator().manual_seed(2))
    x[0, :most] = 5000.0
    x[1, : most + 1] = -5000.0
    x[2, :group_size] = 0
    x[2, 3] = 7.0
    x[2, group_size : 2 * group_size] = 0
    x[2, group_size], x[2, group_size + 1] = 50.0, 0.01
    x[3, :group_size] = 0
    x[3, group_size : 2 * group_size] = torch.linspace(1, 16, group_size) * 2.0**-130
    exact = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point, None)
    return weights, x.to(torch.bfloat16), exact, _layer(n, k, group_size, True, bits=bits)


@BOTH
@pytest.mark.parametrize("group_size", [16, 64])
def test_the_kernels_rounding_of_x_at_the_edges_of_taking_out_stays_within_the_bound(group_size, bits):
    _, x, exact, _ = _edge_case(group_size, bits)
    modelled = (_modelled_x(x, group_size) @ exact.double().T).float().to(torch.bfloat16)
    assert numerics.worst_excess(modelled, x, exact) <= 1.0


@needs_the_kernel
@BOTH
@pytest.mark.parametrize("group_size", [16, 64])
def test_the_kernel_at_the_edges_of_taking_out_stays_within_the_bound(group_size, bits):
    weights, x, exact, layer = _edge_case(group_size, bits)
    kernel = _kernel(bits)
    assert numerics.worst_excess(kernel.run(x, kernel.pack(layer, weights), None), x, exact) <= 1.0


@needs_the_kernel
@BOTH
@pytest.mark.parametrize("groups", [0, 1])
@pytest.mark.parametrize("has_bias", [False, True])
def test_no_inputs_give_zeros_plus_the_bias_as_f_linear(has_bias, groups, bits):
    """in_features 0 divided by zero before."""
    ops = torch.ops.zen_woq_native
    linear = ops.int4_linear if bits == 4 else ops.int8_linear
    x = torch.randn(3, 0).to(torch.bfloat16)
    bias = torch.randn(32).to(torch.bfloat16) if has_bias else None
    scales = torch.ones(32, groups, dtype=torch.bfloat16)
    y = linear(x, torch.empty(32, 0, dtype=torch.uint8), scales, torch.zeros(32, groups, dtype=torch.uint8), bias)
    assert torch.equal(y, torch.nn.functional.linear(x, torch.empty(32, 0, dtype=torch.bfloat16), bias))


@needs_the_kernel
def test_a_nan_in_a_row_of_x_makes_that_row_nan():
    weights = _weights(32, 128, 64, False, torch.bfloat16)
    constants = KERNEL.pack(_layer(32, 128, 64, False), weights)
    x = torch.randn(2, 128).to(torch.bfloat16)
    x[0, 70] = float("nan")
    y = KERNEL.run(x, constants, None)
    assert y[0].isnan().all() and y[1].isfinite().all()


@needs_the_kernel
def test_a_batch_of_sequences_reshapes_like_a_linear():
    weights = _weights(16, 128, 64, False, torch.bfloat16)
    constants = KERNEL.pack(_layer(16, 128, 64, False), weights)
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    y = KERNEL.run(x, constants, None)
    assert y.shape == (2, 3, 16)
    assert torch.equal(y[1, 2], KERNEL.run(x[1, 2:3].contiguous(), constants, None)[0])


@pytest.mark.skipif(bool(native._real_cpu_info().missing_flags(native.CPU_FLAGS)), reason="the CPU lacks AVX512-VNNI/BF16")
def test_it_builds_and_loads_where_the_cpu_has_the_flags():
    """A build that fails is a "no" for the kernel, so every test above would skip: not here."""
    assert native.unavailable_reason() is None


def test_it_says_why_not_where_the_cpu_lacks_avx512_bf16(zen3_cpu):
    assert "lacks" in KERNEL.platform_reason(False) and "avx512" in KERNEL.platform_reason(False)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"out_features": 24}, "out_features 24 is not a multiple of 16"),
        ({"in_features": 256, "num_groups": 32}, "group size 8 is not a multiple of 16"),
        ({"activation_dtype": torch.float16}, "activations are torch.float16"),
    ],
)
def test_it_says_why_not_for_a_layer_it_cannot_take(change, reason):
    assert reason in KERNEL.layer_reason(dataclasses.replace(GOOD, **change))


@needs_the_kernel
@pytest.mark.parametrize("name", ["llama_sym_g128", "qwen2_asym_bias"])
def test_forced_it_takes_every_layer_of_a_real_checkpoint_in_a_compiled_graph(checkpoints, name):
    path = checkpoints(name)
    model = load(path)
    with torch.no_grad():
        eager = model(INPUT_IDS).logits
    compiled = run_compiled(model, {"kernel": "avx512-int4"})
    assert_close_to_reference(compiled, eager, fp32_reference(path), MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB)
    report = zen_woq_pass.last_report()
    assert set(report.by_kernel()) == {"avx512-int4"}
    assert count(report, "avx512_int4_linear") == 14 and count(report, "rshift") == 0


@needs_the_kernel
def test_auto_tries_it():
    assert KERNEL in zen_woq_pass.planning.options.Options().kernels


@needs_the_kernel
def test_an_optimized_layer_takes_the_ruled_path_on_both_sides_of_the_row_threshold(checkpoints):
    layer, reference = optimized_down_proj(checkpoints("llama_sym_g128"), "avx512-int4")
    weight, scales, zeros = layer.zen_woq_weight, layer.zen_woq_scales, layer.zen_woq_zeros
    ops = torch.ops.zen_woq_native

    def kernel(x):
        return ops.int4_linear(x, weight, scales, zeros, None)

    def dense(x):
        return torch.nn.functional.linear(x, ops.int4_dequantize(weight, scales, zeros))

    assert prefill.dense_min_rows() == prefill.DENSE_MIN_ROWS  # AVX512-BF16: the GEMM runs natively
    assert_rows_follow_the_rule(layer, reference, kernel, dense, LAYER_SQNR_DB)


def test_the_8_bit_twin_says_why_not_for_4_bit_weights():
    assert "4-bit weights; it takes 8-bit" in KERNELS["avx512-int8"].layer_reason(GOOD)
