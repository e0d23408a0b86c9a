"""The GPTQ predicate and zentorch's additions: every rejection reason, on layer descriptions."""

import dataclasses

import pytest
import torch

from zen_woq_pass.graph.layer import FAKE_QUANT, PACKED, QuantizedLinear
from zen_woq_pass.kernels import KERNELS
from zen_woq_pass.planning import eligibility

pytestmark = pytest.mark.library_independent

GOOD = QuantizedLinear(
    module_path="model.layers.0.mlp.up_proj",
    out_features=512,
    in_features=256,
    weight_form=PACKED,
    num_bits=4,
    values_per_word=8,
    packed_dim=1,
    num_groups=2,
    has_zero_point=True,
    has_g_idx=False,
    has_bias=True,
    activation_dtype=torch.bfloat16,
    weights_require_grad=False,
)


def test_a_gptq_int4_layer_is_eligible():
    assert eligibility.gptq_int4_reason(GOOD) is None
    assert KERNELS["zentorch"].layer_reason(GOOD) is None
    assert KERNELS["zentorch"].layer_reason(dataclasses.replace(GOOD, num_groups=1)) is None  # channel-wise


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(num_bits=8, values_per_word=4), "8-bit weights (4 values per int32)"),
        (dict(num_bits=2, values_per_word=16), "2-bit weights (16 values per int32)"),
        (dict(weight_form=FAKE_QUANT, values_per_word=None, packed_dim=None, num_bits=8), "8-bit weights"),
        (dict(packed_dim=0), "AWQ layout"),
        (dict(has_g_idx=True), "activation re-ordering"),
        (dict(num_groups=3), "not divisible by 3 groups"),
        (dict(weights_require_grad=True), "require grad"),
        (dict(activation_requires_grad=True), "no backward"),
        (dict(activation_dtype=torch.float32), "bfloat16 only"),
        (dict(activation_dtype=torch.float16), "bfloat16 only"),
        (dict(in_features=258, num_groups=86), "group size 3 is odd"),
    ],
)
def test_each_rejection_has_its_reason(change, reason):
    assert reason in KERNELS["zentorch"].layer_reason(dataclasses.replace(GOOD, **change))


def test_a_fake_quant_layer_within_4_bits_is_eligible():
    layer = dataclasses.replace(GOOD, weight_form=FAKE_QUANT, values_per_word=None, packed_dim=None, num_bits=4)
    assert KERNELS["zentorch"].layer_reason(layer) is None


@pytest.mark.parametrize(
    "change, reason",
    [
        (dict(out_features=520), "not a multiple of 16"),
        (dict(in_features=240, num_groups=15), "group size 16 is not a multiple of 32"),
        (dict(num_bits=8, values_per_word=4), "8-bit weights"),
        (dict(has_g_idx=True), "activation re-ordering"),
    ],
)
def test_aten_int4_rejections(change, reason):
    assert reason in KERNELS["aten-int4"].layer_reason(dataclasses.replace(GOOD, **change))


def test_aten_int4_takes_float32_activations():
    assert KERNELS["aten-int4"].layer_reason(dataclasses.replace(GOOD, activation_dtype=torch.float32)) is None
