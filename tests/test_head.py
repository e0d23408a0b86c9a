"""The opt-in quantized lm_head (int8, int4): rounded to nearest, planned like any layer, and the
input embedding it may share left whole; where its kernel cannot run, the head stays dense and the
report says why."""

import pytest
import torch

import zen_woq_pass
from zen_woq_pass.graph import ct_format
from zen_woq_pass.kernels import native
from zen_woq_pass.planning.numerics import sqnr_db
from zen_woq_pass.planning.report import DEFAULT_PATH
from zen_woq_pass.runtime.head import round_to_int4, round_to_int8

from conftest import MODEL_SQNR_DB
from helpers import FOUR_BIT_KERNELS, INPUT_IDS, load


def test_rounding_is_within_half_a_step_but_at_the_clamped_ends():
    weight = torch.randn(64, 128).to(torch.bfloat16)
    rounded = round_to_int4(weight)
    assert rounded.q.min() >= -8 and rounded.q.max() <= 7 and rounded.scale.shape == (64, 4)
    dense = ct_format.dequantize(rounded.q, rounded.scale.float(), rounded.zero_point)
    step = rounded.scale.float().repeat_interleave(32, dim=1)
    error = (dense - weight.float()).abs()
    assert (error <= step / 2 + 1e-6).float().mean() >= 0.99  # round to nearest...
    assert (error <= step).all()  # ...but where the bf16 scale and the integer zero point clamp a group's end


def test_int8_rounding_is_within_half_a_step_on_a_symmetric_grid():
    weight = torch.randn(64, 128).to(torch.bfloat16)
    rounded = round_to_int8(weight)
    assert rounded.q.abs().max() == 127 and rounded.zero_point is None and rounded.scale.shape == (64, 4)
    step = rounded.scale.float().repeat_interleave(32, dim=1)
    error = (rounded.q.float() * step - weight.float()).abs()
    assert (error <= step / 2 * (1 + 2**-7)).all()  # the bf16 scale may round the grid by 2**-8


def _head_of(model):
    [head] = [d for d in model.zen_woq_report.layers if d.module_path == "lm_head"]
    return head


@pytest.mark.parametrize("form", ["int4", "int8"])
@pytest.mark.parametrize("tied", [False, True])
def test_a_quantized_head_runs_its_kernel_on_the_rounded_weight(checkpoints, tied, form):
    if form == "int8" and native.unavailable_reason():
        pytest.skip(f"avx512-int8: {native.unavailable_reason()}")
    model = load(checkpoints("llama_sym_g128"), keep=False)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    embedding = model.model.embed_tokens.weight.detach().clone()
    rounded = (round_to_int4 if form == "int4" else round_to_int8)(model.lm_head.weight)
    model = zen_woq_pass.optimize(model, lm_head=form)
    head = _head_of(model)
    assert head.kernel in (FOUR_BIT_KERNELS if form == "int4" else {"avx512-int8"}) and head.weight_form == f"rtn-{form}"
    assert torch.equal(model.model.embed_tokens.weight, embedding)
    with torch.no_grad():
        hidden = model.model(INPUT_IDS).last_hidden_state
        got = model.lm_head(hidden)
    expected = hidden.float() @ ct_format.dequantize(rounded.q, rounded.scale.float(), rounded.zero_point).t()
    assert sqnr_db(got, expected) >= MODEL_SQNR_DB


def test_an_int8_head_stays_dense_with_the_reason_where_its_kernel_cannot_run(checkpoints, zen3_cpu):
    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False), lm_head="int8")
    head = _head_of(model)
    assert head.kernel == DEFAULT_PATH and "avx512-int8: the CPU lacks" in head.reason
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.bfloat16


def test_an_unknown_head_form_is_a_clear_error(checkpoints):
    with pytest.raises(ValueError, match="lm_head='int3' is not one of"):
        zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False), lm_head="int3")
