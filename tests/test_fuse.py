"""Horizontal fusion (q/k/v and gate/up in one kernel call) and the one-row ``torch.mv`` path for
dense Linears: the same numbers as the unfused layers and F.linear, fewer calls."""

import re

import pytest
import torch
from conftest import MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB
from helpers import INPUT_IDS, assert_close_to_reference, fp32_reference, load

import zen_woq_pass
from zen_woq_pass import numerics
from zen_woq_pass.convert import convert
from zen_woq_pass.fuse import FusedForward
from zen_woq_pass.gemv import GemvForward
from zen_woq_pass.numerics import sqnr_db
from zen_woq_pass.options import Options
from zen_woq_pass.probe import packed_linear

# name -> layers fused: q/k/v and gate/up of both layers; llama_partial leaves layer 1's attention dense
FUSED = {"llama_sym_g128": 10, "qwen2_asym_bias": 10, "llama_partial": 7}


def _logits(path, **optimize_options):
    model = zen_woq_pass.optimize(load(path, keep=False), **optimize_options)
    with torch.no_grad():
        return model(INPUT_IDS).logits, model.zen_woq_report


@pytest.mark.parametrize("kernel", ["aten-int4", "zentorch", "dense"])
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_and_unfused_models_compute_the_same(checkpoints, name, kernel):
    path = checkpoints(name)
    fused, report = _logits(path, kernel=kernel)
    unfused, plain_report = _logits(path, kernel=kernel, fuse=False)
    assert sum(bool(d.fused_with) for d in report.layers) == FUSED[name]
    assert not any(d.fused_with for d in plain_report.layers)
    assert [d.kernel for d in report.layers] == [d.kernel for d in plain_report.layers]
    if kernel == "zentorch":  # ZenDNN may block a wider N differently: the same math, maybe not the same bits
        assert sqnr_db(fused, unfused) >= 40.0
    else:  # each output column is the same reduction, fused or not
        assert torch.equal(fused, unfused)
    with torch.no_grad():
        eager = load(path)(INPUT_IDS).logits
    assert_close_to_reference(fused, eager, fp32_reference(path), MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB)


def _attention_like(seed=0):
    parent = torch.nn.Module()
    for i, (name, out_features) in enumerate((("q_proj", 256), ("k_proj", 64), ("v_proj", 64))):
        setattr(parent, name, packed_linear(out_features, 256, group_size=64, seed=seed + i))
    return parent


def test_any_call_order_and_another_input_give_each_sibling_its_own_answer():
    fused, unfused = _attention_like(), _attention_like()
    convert(fused, Options.from_user({"kernel": "aten-int4"}))
    convert(unfused, Options.from_user({"kernel": "aten-int4"}), fuse=False)
    assert all(isinstance(m, FusedForward) for m in (fused.q_proj, fused.k_proj, fused.v_proj))
    x, other = torch.randn(2, 3, 256, dtype=torch.bfloat16), torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        for name in ("k_proj", "v_proj", "q_proj"):  # not the model's order
            assert torch.equal(getattr(fused, name)(x), getattr(unfused, name)(x))
        assert fused.q_proj.zen_woq_pending.input is None  # all taken: no activation held
        assert torch.equal(fused.q_proj(x), unfused.q_proj(x))
        assert torch.equal(fused.k_proj(other), unfused.k_proj(other))  # another input: computed again
        assert torch.equal(fused.q_proj(x), unfused.q_proj(x))  # taken already: computed again
    weights = {t.data_ptr() for m in (fused.q_proj, fused.k_proj, fused.v_proj) for t in m.buffers()}
    assert len(weights) == 2  # one packed weight and one scales tensor, shared by the three


def test_each_thread_has_its_own_hand_over():
    """Shared pending outputs would let a thread take another thread's output if it switched
    between the identity check and the read; each thread has its own, so none can."""
    import threading

    fused = _attention_like()
    convert(fused, Options.from_user({"kernel": "aten-int4"}))
    x = torch.randn(1, 4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        other = threading.Thread(target=fused.q_proj, args=(x,))  # leaves k and v pending there
        other.start()
        other.join()
    assert fused.k_proj.zen_woq_pending.input is None  # nothing pending in this thread


def test_compiled_fused_model_makes_one_call_per_group(checkpoints):
    from torch._inductor.utils import run_and_get_code

    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False), kernel="aten-int4")
    with torch.no_grad():
        eager = model(INPUT_IDS).logits
        compiled, code = run_and_get_code(torch.compile(model, backend="zen_woq", fullgraph=True), INPUT_IDS)
    calls = len(re.findall(r"int4mm_packed_weight_cpu\.default\(|_weight_int4pack_mm_for_cpu\.default\(", "\n".join(code)))
    assert calls == 2 * 4  # per decoder layer: q/k/v, o, gate/up, down
    assert sqnr_db(compiled.logits, eager) >= MODEL_SQNR_DB


@pytest.mark.parametrize("rows", [1, 2, 7])
def test_gemv_at_one_row_and_f_linear_above_compute_the_same(rows):
    linear = torch.nn.Linear(576, 1000, dtype=torch.bfloat16)
    x = torch.randn(1, rows, 576, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = linear(x)
        linear.__class__ = type("GemvLinear", (GemvForward, torch.nn.Linear), {})
        got = linear(x)
    if rows > 1:
        assert torch.equal(got, expected)  # F.linear itself
    else:
        assert numerics.worst_excess(got[0], x[0], linear.weight.float(), linear.bias.float()) <= 1.0
