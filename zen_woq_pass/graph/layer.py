"""One quantized linear, described once: every later step reads this, never the raw graph.

The matcher fills a :class:`QuantizedLinear` (what the layer is) and a :class:`QuantizedWeights`
(its recovered integer values and scales) from the constants feeding a linear in the captured
graph. Eligibility, kernels, the self-check and the report all work from these two.
"""

from __future__ import annotations

import dataclasses

import torch

PACKED = "packed"  # weight_packed int32 -> unpack -> dequantize -> linear
FAKE_QUANT = "fake-quant"  # float weight -> quantize -> dequantize -> linear (after calibration)


@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """Shapes and format of one quantized linear.

    ``values_per_word`` is in_features / packed columns for the packed form (8 for 4-bit);
    None for the fake-quant form, where ``num_bits`` is the width the values actually span.
    ``packed_dim`` is 1 when values are packed along the input dim (GPTQ, compressed-tensors),
    0 along the output dim (AWQ); None for the fake-quant form.
    """

    module_path: str
    out_features: int
    in_features: int
    weight_form: str
    num_bits: int
    values_per_word: int | None
    packed_dim: int | None
    num_groups: int
    has_zero_point: bool
    has_g_idx: bool
    has_bias: bool
    activation_dtype: torch.dtype
    weights_require_grad: bool
    activation_requires_grad: bool = False

    @property
    def group_size(self) -> int | None:
        """Input columns per scale group; None when groups do not divide in_features."""
        if self.num_groups <= 0 or self.in_features % self.num_groups:
            return None
        return self.in_features // self.num_groups

    @property
    def signature(self) -> tuple:
        """What a kernel's numerics can depend on: layers sharing it share one self-check."""
        return (self.out_features, self.in_features, self.num_groups, self.has_zero_point, self.has_bias)


@dataclasses.dataclass(frozen=True)
class QuantizedWeights:
    """The recovered constants of one layer.

    q: int8 [N, K] signed values; scale: [N, G] float; zero_point: int8 [N, G] signed or None;
    g_idx: int [K] or None.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    g_idx: torch.Tensor | None
