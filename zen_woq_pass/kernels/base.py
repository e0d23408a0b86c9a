"""What every kernel of the chain provides: can it run here and on this layer, compile-time
packing, and the call -- one description of the call, used both in the graph and in the self-check.
"""

from __future__ import annotations

import abc
from typing import Any, Callable

import torch
import torch.fx as fx

from zen_woq_pass.graph.layer import QuantizedLinear, QuantizedWeights


class Kernel(abc.ABC):
    name: str

    @abc.abstractmethod
    def platform_reason(self, forced: bool) -> str | None:
        """Why this process/CPU cannot run the kernel (None: it can). ``forced`` skips CPU checks
        that the self-check can answer instead, never missing ops."""

    @abc.abstractmethod
    def layer_reason(self, layer: QuantizedLinear) -> str | None:
        """Why this kernel cannot compute ``layer`` (None: it can)."""

    @abc.abstractmethod
    def pack(self, layer: QuantizedLinear, weights: QuantizedWeights) -> dict[str, torch.Tensor]:
        """Compile-time weight preparation: the constants the call reads, by argument name."""

    target: Callable[..., Any]
    # the same call for a converted module's eager forward, where it may differ (None: ``target``)
    eager_target: Callable[..., Any] | None = None
    # whether the constants may be copied elsewhere after packing (zen_woq_pass.runtime.huge_pages)
    constants_movable: bool = True
    # whether it rounds the activations (to integers per group): the self-check then also probes
    # outlier activations, which such a rounding must survive (zen_woq_pass.planning.selfcheck)
    rounds_activations: bool = False

    @abc.abstractmethod
    def arguments(self, x, constants: dict, bias) -> tuple:
        """``target``'s positional arguments; works for tensors and for fx nodes alike."""

    def run(self, x: torch.Tensor, constants: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        return self.target(*self.arguments(x, constants, bias))

    def run_eager(self, x: torch.Tensor, constants: dict[str, torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
        """The call a converted module makes outside a compile (many rows may take a dense GEMM)."""
        return (self.eager_target or self.target)(*self.arguments(x, constants, bias))

    def emit(self, graph: fx.Graph, x: fx.Node, constants: dict[str, fx.Node], bias: fx.Node | None) -> fx.Node:
        return graph.call_function(self.target, self.arguments(x, constants, bias))
