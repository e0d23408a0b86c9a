"""zentorch's kernel, real op, against the fp32 reference: repack and argument conventions
(signed/unsigned, zero points, transposes, bias) over shapes and group sizes; and the self-check
catching a kernel that computes the wrong thing."""

import dataclasses

import pytest
import torch

from zen_woq_pass.graph import ct_format
from zen_woq_pass.graph.layer import QuantizedWeights
from zen_woq_pass.kernels import CHAIN, zentorch
from zen_woq_pass.kernels.dense import DenseKernel
from zen_woq_pass.kernels.zentorch import ZentorchKernel
from zen_woq_pass.planning import numerics, selfcheck

from test_eligibility import GOOD

pytestmark = pytest.mark.library_independent


def _runnable_here(kernel):
    """Skip a kernel this CPU cannot run; load the one it can (avx512-int4's library)."""
    reason = kernel.platform_reason(forced=True)
    if reason is not None:
        pytest.skip(f"{kernel.name}: {reason}")


def _layer_and_weights(n, k, group_size, zero_point, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    groups = k // group_size
    q = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
    scale = (torch.rand(n, groups, generator=g) * 0.05 + 0.001).to(torch.bfloat16)
    zp = torch.randint(-8, 8, (n, groups), generator=g).to(torch.int8) if zero_point else None
    b = torch.randn(n, generator=g).to(torch.bfloat16) if bias else None
    layer = dataclasses.replace(GOOD, out_features=n, in_features=k, num_groups=groups, has_zero_point=zero_point, has_bias=bias)
    return layer, QuantizedWeights(q, scale, zp, None), b


@pytest.mark.parametrize("n, k", [(64, 256), (208, 384), (96, 1024)])
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("zero_point, bias", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("kernel", CHAIN, ids=lambda k: k.name)
def test_kernel_matches_fp32_reference(kernel, n, k, group_size, zero_point, bias, rows):
    _runnable_here(kernel)
    layer, weights, b = _layer_and_weights(n, k, group_size, zero_point, bias)
    assert kernel.layer_reason(layer) is None
    constants = kernel.pack(layer, weights)
    x = torch.randn(rows, k).to(torch.bfloat16)
    exact = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point)
    assert numerics.worst_excess(kernel.run(x, constants, b), x, exact, b) <= 1.0


@pytest.mark.parametrize("kernel", CHAIN, ids=lambda k: k.name)
@pytest.mark.parametrize("group_size", [256, 512])  # channel-wise; a group size aten-int4 re-expresses
def test_large_groups_and_3d_activations(kernel, group_size):
    _runnable_here(kernel)
    layer, weights, b = _layer_and_weights(64, 512, group_size, True, True)
    x = torch.randn(2, 3, 512).to(torch.bfloat16)
    exact = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point)
    y = kernel.run(x, kernel.pack(layer, weights), b)
    assert y.shape == (2, 3, 64)
    assert numerics.worst_excess(y, x, exact, b) <= 1.0


class SignedZeroPointKernel(ZentorchKernel):
    """zentorch without the +8 offset: signed weights with a signed zero point (FACTS.md: wrong)."""

    name = "zentorch-signed-zp"

    def pack(self, layer, weights):
        return {
            "weight": zentorch.repack(weights.q).t(),
            "scales": weights.scale.t().contiguous(),
            "zero_points": weights.zero_point.t().contiguous(),
        }


class TransposedScaleKernel(ZentorchKernel):
    name = "zentorch-bad-scales"

    def pack(self, layer, weights):
        constants = super().pack(layer, weights)
        constants["scales"] = constants["scales"].flip(0).contiguous()  # groups swapped
        return constants


@pytest.mark.parametrize("wrong", [SignedZeroPointKernel, TransposedScaleKernel])
def test_self_check_rejects_a_kernel_that_computes_the_wrong_thing(wrong):
    layer, weights, b = _layer_and_weights(64, 256, 64, True, False, seed=3)
    kernel = wrong()
    reason = selfcheck.self_check(kernel, layer, weights, kernel.pack(layer, weights), b)
    assert reason is not None and "self-check failed" in reason


class RoundsActivationsKernel(DenseKernel):
    """The dense kernel on x rounded per group of 64 as avx512-int4 rounded it before issue 26:
    15-bit integers times a power of two just above the group's largest |x|."""

    name = "dense-rounding-x"
    rounds_activations = True

    def run(self, x, constants, bias):
        groups = x.float().unflatten(-1, (-1, 64))
        exponent = torch.floor(torch.log2(groups.abs().amax(-1, keepdim=True).clamp(min=1e-30))) + 1
        step = torch.exp2(exponent - 14)
        rounded = (torch.round(groups / step) * step).flatten(-2).to(x.dtype)
        return super().run(rounded, constants, bias)


def test_self_check_probes_outlier_activations_where_a_kernel_rounds_them():
    layer, weights, b = _layer_and_weights(64, 256, 64, False, False, seed=5)
    kernel = RoundsActivationsKernel()
    reason = selfcheck.self_check(kernel, layer, weights, kernel.pack(layer, weights), b)
    assert reason is not None and "at M=2 " in reason  # randn rows pass; the outlier probe does not
    selfcheck.clear()
    kernel.rounds_activations = False  # without the probe the same kernel passes
    assert selfcheck.self_check(kernel, layer, weights, kernel.pack(layer, weights), b) is None
    selfcheck.clear()


def test_self_check_passes_the_real_kernel():
    layer, weights, b = _layer_and_weights(64, 256, 64, True, True, seed=4)
    kernel = ZentorchKernel()
    assert selfcheck.self_check(kernel, layer, weights, kernel.pack(layer, weights), b) is None


def test_zentorch_is_right_on_weights_packed_after_others_were_dropped():
    """ZenDNN caches a weight's reordered copy under its address: a weight packed where a dropped
    one was must not run on the dropped one's copy (a model deleted, a kernel that lost a layer)."""
    kernel = ZentorchKernel()
    _runnable_here(kernel)
    x = torch.randn(1, 576, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    for seed in range(24):
        layer, weights, _ = _layer_and_weights(576, 576, 64, seed % 2 == 1, False, seed=seed)
        exact = ct_format.dequantize(weights.q, weights.scale.float(), weights.zero_point)
        constants = kernel.pack(layer, weights)
        assert numerics.worst_excess(kernel.run(x, constants, None), x, exact, None) <= 1.0, f"weights {seed}"
        del constants
