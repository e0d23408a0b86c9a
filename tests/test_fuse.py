"""Horizontal fusion (q/k/v and gate/up in one kernel call) and the one-row ``torch.mv`` path for
dense Linears: fewer calls; each sibling within the package's bound of its exact product, and bit
for bit the unfused layer where the kernel makes that true by construction; the hand-over between
siblings (call order, threads, in-place edits, lifetimes, copies)."""

import copy
import pickle
import re
import weakref

import pytest
import torch

import zen_woq_pass
from zen_woq_pass.kernels import KERNELS
from zen_woq_pass.models.probe import packed_linear
from zen_woq_pass.planning import numerics, prefill
from zen_woq_pass.planning.numerics import sqnr_db
from zen_woq_pass.planning.options import Options
from zen_woq_pass.runtime.convert import convert
from zen_woq_pass.runtime.fuse import FusedForward, fuse_siblings
from zen_woq_pass.runtime.gemv import GemvForward

from conftest import MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB
from helpers import INPUT_IDS, assert_close_to_reference, fp32_reference, load

# name -> layers fused: q/k/v and gate/up of both layers; llama_partial leaves layer 1's attention dense
FUSED = {"llama_sym_g128": 10, "qwen2_asym_bias": 10, "llama_partial": 7}


def _logits(path, **optimize_options):
    model = zen_woq_pass.optimize(load(path, keep=False), **optimize_options)
    with torch.no_grad():
        return model(INPUT_IDS).logits, model.zen_woq_report


# Kernels whose fused call hands each sibling the very bits of its own call, by construction: our
# avx512-int4 computes each block of 16 output rows on its own (csrc/int4_linear.cpp): a row's sum
# is exact integers per group, then one fp32 sum over the groups in k order, whatever N is, and
# which rows of x share a decoded step depends on M alone. Where prefill sends many rows to a dense
# GEMM instead (prefill.takes_dense), that is a GEMM like any other. Not claimed, so checked against
# the fp32 reference with the package's bounds instead: aten-int4 (PyTorch's kernel blocks its sums
# by N on AVX-512: a wider N changed the order of additions on an Intel Xeon), zentorch (ZenDNN
# picks its blocking by shape) and dense (F.linear: oneDNN/BLAS pick blocking and may split K
# across threads by shape; nothing promises a column's bits do not depend on N).
BIT_IDENTICAL = frozenset({"avx512-int4"})
KERNELS_TRIED = ("avx512-int4", "aten-int4", "zentorch", "dense")


def _runs_here(kernel: str) -> None:
    """Skip where the platform refuses ``kernel`` even when forced: the test would run another."""
    reason = KERNELS[kernel].platform_reason(forced=True)
    if reason is not None:
        pytest.skip(f"{kernel} cannot run here: {reason}")


def _bit_identical(kernel: str, rows: int) -> bool:
    return kernel in BIT_IDENTICAL and not prefill.takes_dense(rows)


@pytest.mark.parametrize("kernel", KERNELS_TRIED)
@pytest.mark.parametrize("name", sorted(FUSED))
def test_fused_and_unfused_models_compute_the_same(checkpoints, name, kernel):
    _runs_here(kernel)
    path = checkpoints(name)
    fused, report = _logits(path, kernel=kernel)
    unfused, plain_report = _logits(path, kernel=kernel, fuse=False)
    assert sum(bool(d.fused_with) for d in report.layers) == FUSED[name]
    assert not any(d.fused_with for d in plain_report.layers)
    assert {d.kernel for d in report.layers} == {kernel}, report  # the kernel asked for took every layer
    assert {d.kernel for d in plain_report.layers} == {kernel}, plain_report
    if _bit_identical(kernel, INPUT_IDS.numel()):
        assert torch.equal(fused, unfused)
    with torch.no_grad():
        eager = load(path)(INPUT_IDS).logits
    reference = fp32_reference(path)
    for logits in (fused, unfused):
        assert_close_to_reference(logits, eager, reference, MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB)


def _attention_like(seed=0, **variant):
    """q/k/v of 256, 64 and 64 outputs on 256 inputs, groups of 64; ``variant``: zero_point, bias."""
    parent = torch.nn.Module()
    for i, (name, out_features) in enumerate((("q_proj", 256), ("k_proj", 64), ("v_proj", 64))):
        linear = packed_linear(out_features, 256, group_size=64, seed=seed + i, **variant)
        if linear.bias is not None:
            with torch.no_grad():
                linear.bias.copy_(torch.randn(out_features, generator=torch.Generator().manual_seed(seed + i)))
        setattr(parent, name, linear)
    return parent


@pytest.mark.parametrize("rows", [1, 6])
@pytest.mark.parametrize("variant", [{}, {"zero_point": True, "bias": True}], ids=["sym", "asym_bias"])
@pytest.mark.parametrize("kernel", KERNELS_TRIED)
def test_each_fused_sibling_is_within_the_bound_of_its_own_weights(kernel, variant, rows):
    _runs_here(kernel)
    fused, unfused = _attention_like(**variant), _attention_like(**variant)
    names = ("q_proj", "k_proj", "v_proj")
    exact = {n: getattr(fused, n).dequantized_weight(torch.float32) for n in names}
    _fuse_and_convert(fused, Options.from_user({"kernel": kernel}))
    convert(unfused, Options.from_user({"kernel": kernel}))
    for n in names:  # the kernel asked for took the group, fused, and each sibling alone
        assert getattr(fused, n).zen_woq_decision.kernel == kernel and isinstance(getattr(fused, n), FusedForward)
        assert getattr(unfused, n).zen_woq_decision.kernel == kernel
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        for n in names:
            got, alone = getattr(fused, n)(x), getattr(unfused, n)(x)
            bias = getattr(fused, n).bias
            assert numerics.worst_excess(got, x, exact[n], bias) <= 1.0, n
            if _bit_identical(kernel, rows):
                assert torch.equal(got, alone), n


def test_any_call_order_and_another_input_give_each_sibling_its_own_answer():
    fused, unfused = _attention_like(), _attention_like()
    _fuse_and_convert(fused, Options.from_user({"kernel": "aten-int4"}))
    convert(unfused, Options.from_user({"kernel": "aten-int4"}))
    assert all(isinstance(m, FusedForward) for m in (fused.q_proj, fused.k_proj, fused.v_proj))
    x, other = torch.randn(2, 3, 256, dtype=torch.bfloat16), torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        for name in ("k_proj", "v_proj", "q_proj"):  # not the model's order
            assert torch.equal(getattr(fused, name)(x), getattr(unfused, name)(x))
        assert fused.q_proj.zen_woq_pending.entry is None  # all taken: no activation held
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
    _fuse_and_convert(fused, Options.from_user({"kernel": "aten-int4"}))
    x = torch.randn(1, 4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        other = threading.Thread(target=fused.q_proj, args=(x,))  # leaves k and v pending there
        other.start()
        other.join()
    assert fused.k_proj.zen_woq_pending.entry is None  # nothing pending in this thread


def test_compiled_fused_model_makes_one_call_per_group(checkpoints):
    from torch._inductor.utils import run_and_get_code

    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False), kernel="aten-int4")
    step = INPUT_IDS[:, :1]  # one token: a decode step's graph, which Inductor compiles (a prompt's runs as it is)
    with torch.no_grad():
        eager = model(step).logits
        compiled, code = run_and_get_code(torch.compile(model, backend="zen_woq", fullgraph=True), step)
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


def _fuse_and_convert(model, options):
    fuse_siblings(model, options)
    convert(model, options)


def _converted_pair(kernel="aten-int4"):
    fused, unfused = _attention_like(), _attention_like()
    _fuse_and_convert(fused, Options.from_user({"kernel": kernel}))
    convert(unfused, Options.from_user({"kernel": kernel}))
    return fused, unfused


def test_an_input_edited_in_place_after_the_first_sibling_is_computed_again():
    fused, unfused = _converted_pair()
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        fused.q_proj(x)
        x.mul_(2)
        assert torch.equal(fused.k_proj(x), unfused.k_proj(x))
        assert torch.equal(fused.v_proj(x), unfused.v_proj(x))


def test_a_pre_hook_that_edits_the_input_in_place_sees_its_edit():
    fused, unfused = _converted_pair()
    for parent in (fused, unfused):
        parent.k_proj.register_forward_pre_hook(lambda module, args: args[0].add_(1))
    x = torch.randn(1, 4, 256, dtype=torch.bfloat16)
    names = ("q_proj", "k_proj", "v_proj")  # the model's order: q sees x, k and v x + 1
    with torch.no_grad():
        fused_input, unfused_input = x.clone(), x.clone()
        got = [getattr(fused, name)(fused_input) for name in names]
        expected = [getattr(unfused, name)(unfused_input) for name in names]
    assert torch.equal(fused_input, x + 1)
    for name, a, b in zip(names, got, expected):
        assert torch.equal(a, b), name


def test_a_sibling_never_called_keeps_neither_the_input_nor_the_fused_output_alive():
    """Cross-attention, or layers that share another layer's K/V, call q_proj alone."""
    fused, _ = _converted_pair()
    x = torch.randn(1, 4, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        q = fused.q_proj(x)
    input_ref, output_ref = weakref.ref(x), weakref.ref(q._base)  # q is a slice of the fused output
    del x, q
    assert input_ref() is None
    assert output_ref() is None  # k's and v's slices were dropped with the input


def test_a_fused_model_deep_copies_and_pickles_and_the_copies_compute_the_same():
    fused, unfused = _converted_pair()
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        fused.q_proj(x)  # k and v pending: the copies must not carry them
        copies = [copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))]
        for twin in copies:
            pending = twin.q_proj.zen_woq_pending
            assert pending is not fused.q_proj.zen_woq_pending and pending.entry is None
            assert twin.k_proj.zen_woq_pending is pending and twin.v_proj.zen_woq_pending is pending
            for name in ("k_proj", "q_proj", "v_proj"):
                assert torch.equal(getattr(twin, name)(x), getattr(unfused, name)(x)), name


def test_under_inference_mode_the_siblings_still_share_one_call():
    """Inference tensors keep no version counter: there the hand-over is by identity alone."""
    fused, unfused = _converted_pair()
    with torch.inference_mode():
        x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
        for name in ("q_proj", "k_proj", "v_proj"):
            assert torch.equal(getattr(fused, name)(x), getattr(unfused, name)(x)), name
            if name == "q_proj":
                assert fused.q_proj.zen_woq_pending.entry is not None  # k and v were handed over
        assert fused.q_proj.zen_woq_pending.entry is None


def test_an_optimized_model_deep_copies_and_the_copy_computes_the_same(checkpoints):
    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False), kernel="aten-int4")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(twin(INPUT_IDS).logits, model(INPUT_IDS).logits)
    assert twin.model.layers[0].self_attn.q_proj.zen_woq_pending is twin.model.layers[0].self_attn.v_proj.zen_woq_pending
    assert twin.get_compiled_call.model is twin  # the copy's generate compiles its own step, on its own weights
