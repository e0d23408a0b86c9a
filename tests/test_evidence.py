"""``zen-woq measure``: each rule's candidates timed taking turns, and the rule's pick named."""

import pytest
import torch

from zen_woq_pass.cli import evidence
from zen_woq_pass.kernels import CHAIN
from zen_woq_pass.planning import prefill

from helpers import four_bit_kernels_here

pytestmark = pytest.mark.library_independent


def test_taking_turns_drops_a_slow_spell():
    calls = iter([5.0] + [1.0] * 40)  # one 5x round (a busy moment): dropped, not the median's

    def slow_once():
        torch.ones(1)
        return next(calls)

    measured = evidence.taking_turns({"a": slow_once}, rounds=5)
    assert set(measured) == {"a"} and measured["a"] >= 0


def test_the_4_bit_rule_names_every_kernel_that_takes_the_layer_and_its_pick():
    line = evidence.four_bit_kernel(64, 256, 64, bandwidth_gbs=20.0)
    here = four_bit_kernels_here()
    pick = next(kernel.name for kernel in CHAIN if kernel.name in here)
    assert all(f"{name} " in line for name in here) and "dense" not in line
    assert f"the rule's pick, {pick}, is the fastest here" in line or f"the rule picks {pick};" in line


def test_the_prompt_rule_times_both_paths():
    line = evidence.prompt_rows(64, 256, 64, rows=prefill.DENSE_MIN_ROWS)
    assert line.startswith(f"{prefill.DENSE_MIN_ROWS} rows: ") and " kernel " in line and "dequantize + GEMM " in line
    assert prefill.takes_dense(1) is False  # the rule itself untouched afterwards


def test_the_head_rule_times_every_way():
    line = evidence.head(256, 64)
    assert "F.linear " in line and "torch.mv " in line
