"""The packed-bf16 head: its 12-bit layout gives back the weight's exact bf16 bits, the kernel is
within bf16 rounding of the fp32 product of those bits, a Linear takes it up to PACKED_MAX_ROWS
rows and F.linear above, optimize takes it by rule where it runs and reports it, and a compiled graph calls it
as one op."""

import pickle

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import zen_woq_pass
from zen_woq_pass.kernels import native, packed_bf16
from zen_woq_pass.planning import numerics
from zen_woq_pass.runtime import gemv

from helpers import load

needs_the_kernel = pytest.mark.skipif(native.unavailable_reason() is not None, reason=f"packed-bf16: {native.unavailable_reason()}")


def _weight(n=64, k=96, seed=0):
    """A trained-looking bf16 weight (magnitudes 0.005 to about 0.1) with exact zeros, a negative
    zero, a row of zeros and a row as wide as the code takes (2^0 to 2^-13, both signs)."""
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, k, generator=generator)
    weight = (normal.sign() * (0.005 + normal.abs() * 0.02)).to(torch.bfloat16)
    weight[0, :7] = 0
    weight[1, 3] = -0.0
    weight[2, :14] = torch.tensor([2.0**-e for e in range(14)]) * torch.tensor([1, -1] * 7)
    weight[5] = 0
    return weight


def _without_negative_zero(weight):
    return torch.where(weight == 0, torch.zeros_like(weight), weight)


def test_the_layout_gives_back_every_bit():
    weight = _weight()
    assert packed_bf16.why_not(weight) is None
    packed, tops = packed_bf16.pack(weight)
    assert packed.shape == (64 // 16, 96 // 2, 48) and packed.dtype == torch.uint8 and tops.shape == (64,)
    assert packed.nbytes == weight.nbytes * 3 // 4
    unpacked = packed_bf16.unpack(packed, tops)
    assert torch.equal(unpacked.view(torch.int16), _without_negative_zero(weight).view(torch.int16))


@pytest.mark.parametrize(
    "weight, reason",
    [
        (torch.randn(64, 96), "not a bf16 matrix"),
        (torch.randn(40, 96).to(torch.bfloat16), "not a multiple of 16x4"),
        (torch.randn(64, 90).to(torch.bfloat16), "not a multiple of 16x4"),
    ],
)
def test_what_cannot_be_packed_says_why(weight, reason):
    assert reason in packed_bf16.why_not(weight)


def test_a_row_whose_exponents_span_too_far_is_refused():
    weight = _weight()
    weight[3, 0], weight[3, 1] = 1.0, 2.0**-14  # 14 binades: 7 steps of 2 in the high byte
    assert packed_bf16.why_not(weight) == "row 3's exponents span 8 steps of 2 (at most 7 fit the 12-bit code)"
    weight[3, 1] = 2.0**-12  # 6 steps: fits
    assert packed_bf16.why_not(weight) is None


@needs_the_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5])
@pytest.mark.parametrize("has_bias", [False, True])
def test_the_kernel_is_within_bf16_rounding_of_the_exact_product(rows, has_bias):
    weight = _weight(n=320, k=576)
    g = torch.Generator().manual_seed(rows)
    bias = torch.randn(320, generator=g).to(torch.bfloat16) if has_bias else None
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    got = torch.ops.zen_woq_native.packed_bf16_linear(x, *packed_bf16.pack(weight), bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 320)
    assert numerics.worst_excess(got, x, weight.float(), None if bias is None else bias.float()) <= 1.0
    # tighter: the exact product of those bits, summed in fp32 (in any order: up to k fp32 roundings
    # of the magnitudes' sum) and rounded once to bf16 (one step at the result's binade)
    exact = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    step = torch.exp2(torch.floor(torch.log2(exact.abs().clamp(min=1e-30))) - 7)
    magnitudes = F.linear(x.float().abs(), weight.float().abs(), None if bias is None else bias.float().abs())
    assert ((got.float() - exact).abs() <= step + 576 * 2**-24 * magnitudes).all()


@needs_the_kernel
@pytest.mark.parametrize("has_bias", [False, True])
def test_no_inputs_give_zeros_plus_the_bias_as_f_linear(has_bias):
    """in_features 0 (which :func:`packed_bf16.why_not` refuses to pack) divided by zero before."""
    x = torch.randn(3, 0).to(torch.bfloat16)
    bias = torch.randn(32).to(torch.bfloat16) if has_bias else None
    packed, tops = torch.empty(2, 0, 48, dtype=torch.uint8), torch.zeros(32, dtype=torch.uint8)
    got = torch.ops.zen_woq_native.packed_bf16_linear(x, packed, tops, bias)
    assert torch.equal(got, F.linear(x, torch.empty(32, 0, dtype=torch.bfloat16), bias))


@needs_the_kernel
@pytest.mark.parametrize("rows", [1, gemv.PACKED_MAX_ROWS, gemv.PACKED_MAX_ROWS + 1, 7])
def test_a_packed_linear_takes_the_kernel_up_to_its_rows_and_f_linear_above(rows):
    linear = torch.nn.Linear(576, 320, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(_weight(n=320, k=576))
    packed, tops = packed_bf16.pack(linear.weight)
    x = torch.randn(1, rows, 576, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = F.linear(x, linear.weight, linear.bias)
        gemv.use_packed_bf16(linear, packed, tops)
        got = linear(x)
    if rows > gemv.PACKED_MAX_ROWS:
        assert torch.equal(got, expected)  # F.linear itself
    else:
        assert torch.equal(got[0], torch.ops.zen_woq_native.packed_bf16_linear(x[0], packed, tops, linear.bias))
        assert numerics.worst_excess(got[0], x[0], linear.weight.float(), linear.bias.float()) <= 1.0


@needs_the_kernel
def test_a_compiled_graph_calls_the_kernel_as_one_op():
    head = torch.nn.Linear(64, 320, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(_weight(n=320, k=64))
    gemv.use_packed_bf16(head, *packed_bf16.pack(head.weight))
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = head(x)
        compiled, (code,) = run_and_get_code(torch.compile(head, backend="zen_woq"), x)
    assert torch.equal(compiled, eager)
    assert "zen_woq_native.packed_bf16_linear" in code


def test_optimize_picks_the_heads_path_by_rule_and_reports_it(checkpoints):
    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False))
    [line] = model.zen_woq_report.dense_layers
    assert line.startswith("lm_head 256x256 bfloat16, not quantized:") and line in str(model.zen_woq_report)
    why_not = native.unavailable_reason() or packed_bf16.why_not(model.lm_head.weight)
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        y = model.lm_head(x)
    if why_not is None:  # the kernel runs here and takes the weight
        assert "packed-bf16 up to 2 rows" in line and isinstance(model.lm_head, gemv.PackedBf16Forward)
    else:  # this tiny model's random head spans too many exponents, or the kernel cannot run here
        assert line.endswith(f"torch.mv at one row, F.linear above (packed-bf16 not used: {why_not})")
        assert isinstance(model.lm_head, gemv.GemvForward)
        assert torch.equal(y[0, 0], torch.mv(model.lm_head.weight, x[0, 0]))
    assert numerics.worst_excess(y[0], x[0], model.lm_head.weight.float()) <= 1.0


@needs_the_kernel
def test_optimize_packs_a_packable_head(checkpoints):
    model = load(checkpoints("llama_sym_g128"), keep=False)
    with torch.no_grad():
        model.lm_head.weight.copy_(_weight(n=256, k=256))
    model = zen_woq_pass.optimize(model)
    [line] = model.zen_woq_report.dense_layers
    assert "packed-bf16 up to 2 rows" in line and isinstance(model.lm_head, gemv.PackedBf16Forward)
    x = torch.randn(1, 1, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert numerics.worst_excess(model.lm_head(x)[0], x[0], model.lm_head.weight.float()) <= 1.0


def test_an_optimized_model_pickles_and_the_copy_computes_the_same(checkpoints):
    """The head's class is made at run time (a mixin before the Linear's own class): pickle must
    rebuild it from what it was made of, as it does for the quantized layers."""
    model = zen_woq_pass.optimize(load(checkpoints("llama_sym_g128"), keep=False))
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy.lm_head) is type(model.lm_head)
    assert copy.get_compiled_call.model is copy  # its decode step is its own (compiled on its first generate)
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(copy(ids).logits, model(ids).logits)
