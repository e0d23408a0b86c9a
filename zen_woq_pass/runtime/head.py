"""Opt-in quantized lm_head: ``optimize(model, lm_head="int8")`` or ``lm_head="int4"``.

llmcompressor's recipes leave the lm_head dense, and a small model's head is a large share of what a
decode step reads: SmolLM2-135M's tied 49152x576 bf16 head is 57 MB of the about 117 MB per token.
From memory (cache flushed, 2 threads, the Xeon this was written on) one row took 5.8 ms with
F.linear, 4.2 ms with torch.mv, 3.3 ms with int8 weight-only and 1.4-1.7 ms with int4 g64. llama.cpp
quantizes its output matrix too (SmolLM2's GGUF holds it as Q8_0: 8 bits per group of 32).
``"int8"`` rounds the head to nearest, 8 bits symmetric per group of 32 inputs (Q8_0's grid), for
the package's own 8-bit kernel (``avx512-int8``, AVX512-VNNI CPUs); ``"int4"`` to 4 bits with a zero
point per group of 32, for the chain's 4-bit kernels. Either is planned like any quantized layer
(self-check, report row). They change the numbers, so they are off by default;
``benchmarks/vs_llamacpp.py`` prints their perplexity cost.
"""

from __future__ import annotations

import torch

from zen_woq_pass.graph.layer import QuantizedLinear, QuantizedWeights
from zen_woq_pass.kernels import DENSE, INT8
from zen_woq_pass.planning import plan as plans
from zen_woq_pass.planning.options import Options
from zen_woq_pass.planning.report import LayerDecision
from zen_woq_pass.runtime.convert import adopt

GROUP_SIZE = 32
HEAD_FORMS = ("int8", "int4")


def round_to_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> QuantizedWeights:
    """Asymmetric round-to-nearest, compressed-tensors' convention: w ~ (q - zp) * scale, q and zp
    signed 4-bit, one scale and zero point per group of ``group_size`` inputs."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().unflatten(1, (in_features // group_size, group_size))
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(weight.dtype)
    zero_point = (-8 - torch.round(low / scale.float())).clamp(-8, 7)
    q = (torch.round(groups / scale.float().unsqueeze(-1)) + zero_point.unsqueeze(-1)).clamp(-8, 7)
    return QuantizedWeights(q.flatten(1).to(torch.int8), scale, zero_point.to(torch.int8), None)


def round_to_int8(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> QuantizedWeights:
    """Symmetric round-to-nearest, llama.cpp's Q8_0 grid: w ~ q * scale, q in -127..127, one scale
    per group of ``group_size`` inputs."""
    out_features, in_features = weight.shape
    groups = weight.detach().float().unflatten(1, (in_features // group_size, group_size))
    scale = (groups.abs().amax(-1) / 127).clamp(min=torch.finfo(torch.float32).tiny).to(weight.dtype)
    q = torch.round(groups / scale.float().unsqueeze(-1)).clamp(-127, 127)
    return QuantizedWeights(q.flatten(1).to(torch.int8), scale, None, None)


def quantize_head(model: torch.nn.Module, form: str, options: Options) -> LayerDecision | None:
    """Plan the output Linear at 8 or 4 bits and adopt it; the decision (or None: no dense head)."""
    if form not in HEAD_FORMS:
        raise ValueError(f"lm_head={form!r} is not one of {HEAD_FORMS} (or None: keep it dense)")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or not head.weight.is_floating_point() or head.weight.numel() == 0:
        return None
    name = next(n for n, m in model.named_modules() if m is head)
    out_features, in_features = head.weight.shape
    if in_features % GROUP_SIZE:
        return plans.refused(name, f"in_features {in_features} is not a multiple of {GROUP_SIZE}").decision
    layer = QuantizedLinear(
        module_path=name,
        out_features=out_features,
        in_features=in_features,
        weight_form=f"rtn-{form}",  # the report's "form" for a head we quantized ourselves
        num_bits=int(form[3:]),
        values_per_word=None,
        packed_dim=None,
        num_groups=in_features // GROUP_SIZE,
        has_zero_point=form == "int4",
        has_g_idx=False,
        has_bias=head.bias is not None,
        activation_dtype=head.weight.dtype,
        weights_require_grad=False,
    )
    if form == "int8":  # the 8-bit kernel, whatever options choose for the 4-bit layers
        weights, options = round_to_int8(head.weight), Options(kernel=INT8.name)
    else:
        weights = round_to_int4(head.weight)
    plan = plans.decide(layer, weights, head.bias, options, skip=(DENSE.name,))  # dense: no gain
    if plan.kernel is not None:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        tied = embeddings is not None and getattr(embeddings, "weight", None) is head.weight
        adopt(head, plan, keep_weight=tied)
    return plan.decision
