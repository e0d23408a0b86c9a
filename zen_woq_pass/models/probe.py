"""Hand-built compressed-tensors layers, for shapes and variants no small checkpoint has.

``zen-woq doctor`` compiles one to prove each kernel on this machine; tests and benchmarks use them
for Llama-3-8B shapes and for ``g_idx``, which llmcompressor no longer writes. Built as
transformers loads a pack-quantized layer, from compressed-tensors' own quantization args.
"""

from __future__ import annotations

import torch

from zen_woq_pass.graph import ct_format
from zen_woq_pass.graph.keep_compressed import keep_compressed


def packed_linear(
    out_features: int,
    in_features: int,
    group_size: int | None = 128,
    zero_point: bool = False,
    bias: bool = False,
    g_idx: torch.Tensor | None = None,
    seed: int = 0,
) -> torch.nn.Linear:
    """One compressed-tensors pack-quantized Linear, built as transformers loads it (random 4-bit
    values and bf16 scales; ``group_size=None`` is channel-wise), already kept compressed.

    For shapes no small checkpoint has (Llama-3-8B's, in benchmarks) and for hand-made variants
    (g_idx) that llmcompressor no longer writes.
    """
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    generator = torch.Generator().manual_seed(seed)
    groups = 1 if group_size is None else in_features // group_size
    q = torch.randint(-8, 8, (out_features, in_features), generator=generator).to(torch.int8)
    scale = (torch.rand(out_features, groups, generator=generator) * 0.02 + 0.001).to(torch.bfloat16)
    linear = torch.nn.Linear(in_features, out_features, bias=bias, dtype=torch.bfloat16)
    del linear.weight

    def constant(tensor):
        return torch.nn.Parameter(tensor, requires_grad=False)

    linear.weight_packed = constant(ct_format.pack_int32(q, 4))
    linear.weight_scale = constant(scale)
    if zero_point:
        zp = torch.randint(-8, 8, (out_features, groups), generator=generator).to(torch.int8)
        linear.weight_zero_point = constant(ct_format.pack_int32(zp.t(), 4).t().contiguous())
    if g_idx is not None:
        linear.weight_g_idx = constant(g_idx)
    strategy = {"strategy": "channel"} if group_size is None else {"strategy": "group", "group_size": group_size}
    args = QuantizationArgs(num_bits=4, symmetric=not zero_point, **strategy)
    linear.quantization_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    keep_compressed(linear)
    return linear
