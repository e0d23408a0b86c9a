"""The package's own AVX512-VNNI kernel: its packed layout decodes to compressed-tensors' own bf16
weights bit for bit, its product is within bf16 rounding of the fp32 reference for one row and
many (with and without zero points, bias, bf16 and fp32 scales, groups of 16 to channel-wise), and
within its stated bound for outlier activations; ``auto`` tries it, and it says no, with the
reason, where it cannot run or cannot take a layer."""

import dataclasses

import pytest
import torch
from conftest import LAYER_SQNR_DB, MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB
from helpers import INPUT_IDS, assert_close_to_reference, count, fp32_reference, load, optimized_down_proj, run_compiled
from test_eligibility import GOOD

import zen_woq_pass
from zen_woq_pass import ct_format, native, numerics, prefill
from zen_woq_pass.kernels import KERNELS
from zen_woq_pass.layer import QuantizedWeights
from zen_woq_pass.numerics import sqnr_db

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


@needs_the_kernel
def test_outlier_activations_stay_within_the_stated_bound():
    """x is written per group as 15-bit integers times a power of two (the C++ source's header): an
    element far below its group's largest loses bits, at most 2**-14 of that largest. So the error
    may exceed the bf16 bound by sum over groups of 2**-14 * max|x_g| * sum|W_g|, and no more."""
    n, k, group_size = 64, 576, 64
    weights = _weights(n, k, group_size, True, torch.bfloat16)
    constants = KERNEL.pack(_layer(n, k, group_size, True), weights)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(1))
    x[:, 5] *= 1000  # massive activations, as LLMs have in a few channels
    x[1, 300] *= -300
    x = x.to(torch.bfloat16)
    exact = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point, None)
    error = (KERNEL.run(x, constants, None).float() - numerics.reference_linear(x, exact)).abs()
    group_max = x.float().abs().view(3, -1, group_size).amax(-1)
    rounding = 2.0**-14 * group_max @ exact.abs().view(n, -1, group_size).sum(-1).T
    assert (error <= numerics.error_bound(x, exact) + rounding).all()


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
    assert KERNEL in zen_woq_pass.options.Options().kernels


@needs_the_kernel
def test_an_optimized_layer_is_right_on_both_sides_of_the_row_threshold(checkpoints):
    layer, reference = optimized_down_proj(checkpoints("llama_sym_g128"), "avx512-int4")
    prefill.clear()
    for rows in (prefill.MIN_ROWS - 1, prefill.MIN_ROWS, 200):
        x = torch.randn(1, rows, layer.in_features, generator=torch.Generator().manual_seed(rows)).to(torch.bfloat16)
        with torch.no_grad():
            got = layer(x)
        assert sqnr_db(got.float(), x.float() @ reference.T) >= LAYER_SQNR_DB
    raced = prefill.choices()
    print("\n".join(map(str, raced)))
    assert [choice.rows for choice in raced] == [16, 256] and all("avx512-int4" in choice.shape for choice in raced)
    assert all(choice.sqnr >= prefill.MIN_SQNR_DB for choice in raced)


def test_the_8_bit_twin_says_why_not_for_4_bit_weights():
    assert "4-bit weights; it takes 8-bit" in KERNELS["avx512-int8"].layer_reason(GOOD)
