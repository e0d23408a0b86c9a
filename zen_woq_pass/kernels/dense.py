"""The chain's last link: dequantize once, at compile time, into a dense constant.

A quantized layer that no 4-bit kernel takes (8-bit weights, ``g_idx``, AWQ layout, a shape a
kernel refuses, a kernel failing its self-check) would otherwise unpack and dequantize on every
call: up to 9x slower than transformers' own dense model. Folded into a constant it runs exactly
what transformers runs after decompressing (the weight is computed as compressed-tensors computes
it, in the scale's dtype), at dense memory for that layer; the report says so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from zen_woq_pass.graph import ct_format
from zen_woq_pass.graph.layer import QuantizedLinear, QuantizedWeights
from zen_woq_pass.kernels.base import Kernel


class DenseKernel(Kernel):
    name = "dense"

    def platform_reason(self, forced: bool) -> str | None:
        return None

    def layer_reason(self, layer: QuantizedLinear) -> str | None:
        if layer.weights_require_grad:
            return "weights require grad in this compile (training?): a folded constant would get no gradient"
        return None

    def pack(self, layer: QuantizedLinear, weights: QuantizedWeights) -> dict[str, torch.Tensor]:
        """weight [N, K] in the activation dtype, as compressed-tensors' decompression makes it."""
        dense = ct_format.dequantize(weights.q, weights.scale, weights.zero_point, weights.g_idx)
        return {"weight": dense.to(layer.activation_dtype).contiguous()}

    target = staticmethod(F.linear)

    def arguments(self, x, constants, bias) -> tuple:
        return (x, constants["weight"], bias)
