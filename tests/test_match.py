"""Matching by meaning on hand-built modules: the fake-quant form, g_idx, look-alikes that are
not compressed-tensors dequantization, and models that share one compiled graph."""

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from helpers import count

import zen_woq_pass
from zen_woq_pass import ct_format, numerics

ARGS = QuantizationArgs(num_bits=4, symmetric=False, strategy="group", group_size=64)


def _quantized(n=96, k=256, groups=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-8, 8, (n, k), generator=g).to(torch.int8)
    scale = (torch.rand(n, groups, generator=g) * 0.05 + 0.001).to(torch.bfloat16)
    zp = torch.randint(-8, 8, (n, groups), generator=g).to(torch.int8)
    return q, scale, zp


class FakeQuantLinear(torch.nn.Module):
    """What a Linear computes right after llmcompressor calibration: QDQ of its float weight."""

    def __init__(self, seed=0):
        super().__init__()
        q, scale, zp = _quantized(seed=seed)
        weight = ct_format.dequantize(q, scale, zp)
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
        self.weight_zero_point = torch.nn.Parameter(zp, requires_grad=False)
        self.exact = ct_format.dequantize(q, scale.float(), zp)

    def forward(self, x):
        return F.linear(x, fake_quantize(self.weight, self.weight_scale, self.weight_zero_point, ARGS))


def _packed_linear(g_idx=None, seed=0):
    """A compressed-tensors pack-quantized Linear built by hand (as transformers would load it)."""
    q, scale, zp = _quantized(seed=seed)
    linear = torch.nn.Linear(256, 96, bias=False, dtype=torch.bfloat16)
    del linear.weight
    linear.weight_packed = torch.nn.Parameter(ct_format.pack_int32(q, 4), requires_grad=False)
    linear.weight_scale = torch.nn.Parameter(scale, requires_grad=False)
    linear.weight_zero_point = torch.nn.Parameter(ct_format.pack_int32(zp.t(), 4).t().contiguous(), requires_grad=False)
    if g_idx is not None:
        linear.weight_g_idx = torch.nn.Parameter(g_idx, requires_grad=False)
    linear.quantization_scheme = QuantizationScheme(targets=["Linear"], weights=ARGS)
    return zen_woq_pass.keep_compressed(torch.nn.Sequential(linear))


def _compile(module, x, kernel="zentorch"):
    with torch.no_grad():
        return torch.compile(module, backend="zen_woq", options={"kernel": kernel})(x)


def test_fake_quant_form_is_matched_and_rewritten():
    module = FakeQuantLinear()
    x = torch.randn(3, 256).to(torch.bfloat16)
    y = _compile(module, x)
    report = zen_woq_pass.last_report()
    [decision] = report.layers
    assert (decision.kernel, decision.weight_form, decision.has_zero_point) == ("zentorch", "fake-quant", True)
    assert count(report, "zentorch_woq_linear") == 1 and count(report, "round") == 0
    assert numerics.worst_excess(y, x, module.exact) <= 1.0


def test_g_idx_layer_is_rejected_with_its_reason_and_stays_correct():
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(1)) // 64
    module = _packed_linear(g_idx=g_idx.to(torch.int32))
    x = torch.randn(3, 256).to(torch.bfloat16)
    with torch.no_grad():
        eager = module(x)
    y = _compile(module, x)
    [decision] = zen_woq_pass.last_report().layers
    assert decision.kernel == "default" and "activation re-ordering" in decision.reason
    assert torch.allclose(y.float(), eager.float(), rtol=2**-7, atol=1e-2)


def test_a_look_alike_that_is_not_dequantization_is_left_alone():
    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _packed_linear()[0]

        def forward(self, x):
            m = self.inner
            q = ct_format.unpack_weight(m.weight_packed, 4, 256)
            return F.linear(x, ct_format.dequantize(q, m.weight_scale * 2))  # not what CT computes

    x = torch.randn(2, 256).to(torch.bfloat16)
    module = Doubled()
    with torch.no_grad():
        eager = module(x)
    y = _compile(module, x)
    [decision] = zen_woq_pass.last_report().layers
    assert decision.kernel == "default" and "not compressed-tensors dequantization" in decision.reason
    assert torch.allclose(y.float(), eager.float(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("kernel", ["zentorch", "default"])
def test_two_models_sharing_a_graph_keep_their_own_constants(kernel):
    first, second = _packed_linear(seed=0), _packed_linear(seed=1)
    x = torch.randn(2, 256).to(torch.bfloat16)
    with torch.no_grad():
        expected = [first(x), second(x)]
        got = [_compile(first, x, kernel), _compile(second, x, kernel), _compile(first, x, kernel)]
    for y, want in zip(got, [*expected, expected[0]]):
        assert torch.allclose(y.float(), want.float(), rtol=2**-7, atol=2e-2)
    assert not torch.allclose(expected[0], expected[1])


def test_a_replaced_parameter_gets_a_new_variant_not_stale_constants():
    first, second = _packed_linear(seed=0), _packed_linear(seed=1)
    x = torch.randn(2, 256).to(torch.bfloat16)
    compiled = torch.compile(first, backend="zen_woq", options={"kernel": "zentorch"})
    with torch.no_grad():
        compiled(x)
        for name in ("weight_packed", "weight_scale", "weight_zero_point"):
            setattr(first[0], name, getattr(second[0], name))
        y, want = compiled(x), second(x)
    assert torch.allclose(y.float(), want.float(), rtol=2**-7, atol=2e-2)
