"""The opt-in 4-bit lm_head: rounded as compressed-tensors rounds, planned like any layer, and the
input embedding it may share left whole."""

import pytest
import torch
from conftest import MODEL_SQNR_DB
from helpers import FOUR_BIT_KERNELS, INPUT_IDS, load

import zen_woq_pass
from zen_woq_pass import ct_format
from zen_woq_pass.head import round_to_int4
from zen_woq_pass.numerics import sqnr_db


def test_rounding_is_within_half_a_step_but_at_the_clamped_ends():
    weight = torch.randn(64, 128).to(torch.bfloat16)
    rounded = round_to_int4(weight)
    assert rounded.q.min() >= -8 and rounded.q.max() <= 7 and rounded.scale.shape == (64, 4)
    dense = ct_format.dequantize(rounded.q, rounded.scale.float(), rounded.zero_point)
    step = rounded.scale.float().repeat_interleave(32, dim=1)
    error = (dense - weight.float()).abs()
    assert (error <= step / 2 + 1e-6).float().mean() >= 0.99  # round to nearest...
    assert (error <= step).all()  # ...but where the bf16 scale and the integer zero point clamp a group's end


@pytest.mark.parametrize("tied", [False, True])
def test_int4_head_runs_a_4_bit_kernel_on_the_rounded_weight(checkpoints, tied):
    model = load(checkpoints("llama_sym_g128"), keep=False)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    rounded = round_to_int4(model.lm_head.weight)
    model = zen_woq_pass.optimize(model, lm_head="int4")
    [head] = [d for d in model.zen_woq_report.layers if d.module_path == "lm_head"]
    assert head.kernel in FOUR_BIT_KERNELS and head.weight_form == "rtn-int4"
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        hidden = model.model(INPUT_IDS).last_hidden_state
        got = model.lm_head(hidden)
    expected = hidden.float() @ ct_format.dequantize(rounded.q, rounded.scale.float(), rounded.zero_point).t()
    assert sqnr_db(got, expected) >= MODEL_SQNR_DB


def test_an_unknown_head_form_is_a_clear_error(checkpoints):
    with pytest.raises(ValueError, match="lm_head='int3' is not one of"):
        zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False), lm_head="int3")
