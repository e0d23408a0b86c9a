"""Matching by meaning on hand-built modules: the fake-quant form, g_idx, look-alikes that are
not compressed-tensors dequantization, and models that share one compiled graph."""

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from helpers import count

import zen_woq_pass
from zen_woq_pass import ct_format, numerics
from zen_woq_pass.checkpoints import packed_linear

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
    return torch.nn.Sequential(packed_linear(96, 256, group_size=64, zero_point=True, g_idx=g_idx, seed=seed))


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


def _assert_left_on_the_default_path(module, reason):
    x = torch.randn(3, 256).to(torch.bfloat16)
    with torch.no_grad():
        eager = module(x)
    y = _compile(module, x)
    [decision] = zen_woq_pass.last_report().layers
    assert decision.kernel == "default" and reason in decision.reason
    assert torch.allclose(y.float(), eager.float(), rtol=2**-7, atol=1e-2)


def test_g_idx_layer_is_rejected_with_its_reason_and_stays_correct():
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(1)) // 64
    _assert_left_on_the_default_path(_packed_linear(g_idx=g_idx.to(torch.int32)), "activation re-ordering")


def test_a_look_alike_that_is_not_dequantization_is_left_alone():
    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _packed_linear()[0]

        def forward(self, x):
            m = self.inner
            q = ct_format.unpack_weight(m.weight_packed, 4, 256)
            return F.linear(x, ct_format.dequantize(q, m.weight_scale * 2))  # not what CT computes

    _assert_left_on_the_default_path(Doubled(), "not compressed-tensors dequantization")


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


def test_graphs_compiled_from_the_same_weights_share_packed_constants():
    module = _packed_linear()
    compiled = torch.compile(module, backend="zen_woq", options={"kernel": "aten-int4"}, dynamic=False)
    constants = []
    with torch.no_grad():
        for rows in (1, 4):  # two shapes: two graphs
            compiled(torch.randn(rows, 256).to(torch.bfloat16))
            gm = zen_woq_pass.last_report().graph_module
            constants.append({name: buffer.data_ptr() for name, buffer in gm.named_buffers()})
    assert constants[0] and constants[0] == constants[1]
