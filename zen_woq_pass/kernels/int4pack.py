"""PyTorch's own int4 CPU kernel, ``aten._weight_int4pack_mm_for_cpu``: the chain's AVX2 fallback.

Runs where zentorch's WOQ kernel cannot (Zen 2/3, other x86). Conventions (read in PyTorch's
source, measured here): ``_convert_weight_to_int4pack_for_cpu`` takes int32 [N, K] of *unsigned*
codes 0..15 (N % 16 == 0, K even) and returns uint8 [N, K/2] in a layout that depends on the ISA of
the packing machine -- so we pack at compile time, on the machine that runs, and never ship it.
The matmul dequantizes ``(code - 8) * scale + zero`` from ``scales_and_zeros`` [G, N, 2] in the
activation dtype. compressed-tensors' ``(q - zp) * scale`` maps to code = q + 8, zero = -zp * scale.
Group sizes 32/64/128/256 only; a larger multiple of 32 (up to channel-wise) is re-expressed at a
finer allowed size by repeating its scales, which is exact.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch._inductor import config as inductor_config
from torch._inductor import lowering
from torch._inductor.custom_graph_pass import CustomGraphPass, get_custom_graph_passes

from zen_woq_pass.graph.layer import QuantizedLinear, QuantizedWeights
from zen_woq_pass.kernels import int4pack_layout
from zen_woq_pass.kernels.base import Kernel
from zen_woq_pass.planning import eligibility, prefill

GROUP_SIZES = (256, 128, 64, 32)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def kernel_group_size(group_size: int) -> int | None:
    """The largest group size the kernel takes that divides ``group_size``."""
    return next((g for g in GROUP_SIZES if group_size % g == 0), None)


class _CalledAsIs(CustomGraphPass):
    """A pass that changes nothing: its ``uuid`` keeps code compiled with aten's int4 op called as
    is apart from code compiled with Inductor's lowering in Inductor's caches, whose keys do not
    see the swapped lowering itself."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        pass

    def uuid(self) -> str:
        return "zen_woq: aten._weight_int4pack_mm_for_cpu called as is, v1"


# Inductor's lowering table is global: one swap at a time, Inductor's own lowering back after each
_swapping = threading.RLock()


@contextlib.contextmanager
def called_as_is_by_inductor():
    """While compiling a decoder layer apart: aten's int4 op an opaque call with its int group size.

    Inductor (torch 2.13) lowers the op with its group size as a tensor constant, which a region it
    compiles apart then passes wrongly ("group size must be a scalar"). Called as is, as Inductor
    calls an op it has no lowering for, the compiled layer decoded SmolLM2 as fast as the step
    compiled whole, for half its cold compile (Zen 4). Inductor's own lowering is back after; what
    was compiled meanwhile is cached under keys of its own (``_CalledAsIs``, after a user's own
    ``post_grad_custom_pre_pass``, which still runs). Inductor's lowering table is global, so the
    swap holds a lock: a second thread waits rather than save and then restore the swapped
    lowering."""
    op = torch.ops.aten._weight_int4pack_mm_for_cpu.default
    with _swapping:
        own = lowering.lowerings.get(op)
        lowering.lowerings[op] = lowering.fallback_handler(op, add_to_fallback_set=False)
        passes = (*get_custom_graph_passes(inductor_config.post_grad_custom_pre_pass), _CalledAsIs())
        try:
            with inductor_config.patch(post_grad_custom_pre_pass=passes):
                yield
        finally:
            if own is None:
                del lowering.lowerings[op]
            else:
                lowering.lowerings[op] = own


def int4pack_linear(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, bias: torch.Tensor | None, by_rows: bool = False):
    """x [..., K] -> [..., N]; weight uint8 [N, K/2] packed here; scales_and_zeros [G, N, 2].
    ``by_rows``: many rows may take a dense GEMM (the rule of :mod:`zen_woq_pass.planning.prefill`)."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    group_size = x.shape[-1] // scales_and_zeros.shape[0]

    def kernel():
        return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, group_size, scales_and_zeros)

    if by_rows:
        dense = (lambda: int4pack_layout.dense_linear(rows, weight, scales_and_zeros)) if int4pack_layout.decoded_here() else None
        y = prefill.linear(rows, kernel, dense)
    else:
        y = kernel()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


def int4pack_linear_by_rows(x, weight, scales_and_zeros, bias):
    return int4pack_linear(x, weight, scales_and_zeros, bias, by_rows=True)


class Int4PackKernel(Kernel):
    name = "aten-int4"

    def platform_reason(self, forced: bool) -> str | None:
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return f"torch {torch.__version__} has no aten._weight_int4pack_mm_for_cpu"
        return None

    def layer_reason(self, layer: QuantizedLinear) -> str | None:
        reason = eligibility.gptq_int4_reason(layer)
        if reason:
            return reason
        if layer.out_features % 16:
            return f"out_features {layer.out_features} is not a multiple of 16"
        if layer.in_features % 2:
            return f"in_features {layer.in_features} is odd"
        assert layer.group_size is not None  # gptq_int4_reason refuses None
        if kernel_group_size(layer.group_size) is None:
            return f"group size {layer.group_size} is not a multiple of 32"
        if layer.activation_dtype not in ACTIVATION_DTYPES:
            return f"activations are {layer.activation_dtype}"
        return None

    def pack(self, layer: QuantizedLinear, weights: QuantizedWeights) -> dict[str, torch.Tensor]:
        codes = weights.q.to(torch.int32) + 8
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
        assert layer.group_size is not None  # layer_reason refused the layer otherwise
        kernel_group = kernel_group_size(layer.group_size)
        assert kernel_group is not None  # likewise
        repeat = layer.group_size // kernel_group
        scale = weights.scale.float().repeat_interleave(repeat, dim=1)
        zero = torch.zeros_like(scale)
        if weights.zero_point is not None:
            zero = -weights.zero_point.float().repeat_interleave(repeat, dim=1) * scale
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
        return {"weight": packed, "scales_and_zeros": scales_and_zeros.to(layer.activation_dtype)}

    target = staticmethod(int4pack_linear)
    eager_target = staticmethod(int4pack_linear_by_rows)

    def arguments(self, x, constants, bias) -> tuple:
        return (x, constants["weight"], constants["scales_and_zeros"], bias)
