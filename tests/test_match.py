"""Matching by meaning on hand-built modules: the fake-quant form, g_idx, look-alikes that are
not compressed-tensors dequantization, and models that share one compiled graph."""

import pytest
import torch
import torch.nn.functional as F
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import fake_quantize

import zen_woq_pass
from zen_woq_pass.graph import ct_format
from zen_woq_pass.models.probe import packed_linear
from zen_woq_pass.planning import numerics

from helpers import count

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


def _assert_refused(module, reason, kernel="default"):
    x = torch.randn(3, 256).to(torch.bfloat16)
    with torch.no_grad():
        eager = module(x)
    y = _compile(module, x)
    [decision] = zen_woq_pass.last_report().layers
    assert decision.kernel == kernel and reason in decision.reason
    assert torch.allclose(y.float(), eager.float(), rtol=2**-7, atol=1e-2)


def test_g_idx_layer_is_refused_by_4_bit_kernels_with_its_reason_and_folded_dense():
    g_idx = torch.randperm(256, generator=torch.Generator().manual_seed(1)) // 64
    _assert_refused(_packed_linear(g_idx=g_idx.to(torch.int32)), "activation re-ordering", kernel="dense")
    assert zen_woq_pass.last_report().count_calls("rshift") == 0


def test_a_look_alike_that_is_not_dequantization_is_left_alone():
    class Doubled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _packed_linear()[0]

        def forward(self, x):
            m = self.inner
            q = ct_format.unpack_weight(m.weight_packed, 4, 256)
            return F.linear(x, ct_format.dequantize(q, m.weight_scale * 2))  # not what CT computes

    _assert_refused(Doubled(), "not compressed-tensors dequantization")


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


def test_each_layer_is_analysed_once_however_many_graphs(monkeypatch):
    from zen_woq_pass.graph import match

    recovered = []
    real = match.recover
    monkeypatch.setattr("zen_woq_pass.graph.rewrite.recover", lambda gm, m: recovered.append(m.module_path) or real(gm, m))
    module = _packed_linear()
    compiled = torch.compile(module, backend="zen_woq", options={"kernel": "default"}, dynamic=False)
    with torch.no_grad():
        for rows in (1, 4, 7):  # three shapes: three graphs, each matching the layer again
            compiled(torch.randn(rows, 256).to(torch.bfloat16))
    assert len(zen_woq_pass.recent_reports()) == 3
    assert recovered == ["0"]


def test_compiled_layers_hold_their_constants_once_across_graphs():
    module = _packed_linear()
    compiled = torch.compile(module, backend="zen_woq", options={"kernel": "aten-int4"}, dynamic=False)
    with torch.no_grad():
        for rows in (1, 4):  # two shapes: two graphs, the second on the converted module
            compiled(torch.randn(rows, 256).to(torch.bfloat16))
    first, second = zen_woq_pass.recent_reports()
    assert first.count_calls("int4pack") == second.count_calls("int4pack") == 1
    assert module[0].weight_packed.numel() == 0  # the checkpoint's copy is gone
    buffers = dict(module[0].named_buffers())
    assert zen_woq_pass.planning.plan.held_bytes() == sum(b.nbytes for b in buffers.values()) > 0
