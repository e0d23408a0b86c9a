"""Free a compiled model's own copy of its 4-bit weights, keeping the kernels' copy only.

After compiling, a replaced layer's weights live twice: packed in the module (compressed-tensors'
layout, what the eager forward and any recompile read) and packed for its kernel (the compiled
code's constants). :func:`release_module_weights` empties the module's tensors and makes each such
module call its kernel directly, on the kernel's constants -- in eager mode and in any later
compile alike -- so one copy remains. Inference only: the model can no longer be saved as a
compressed-tensors checkpoint, and layers left on the default path keep their weights.
"""

from __future__ import annotations

import functools

import torch

from zen_woq_pass import packed_constants
from zen_woq_pass.keep_compressed import PACKED_TENSOR_NAMES, PackedForward
from zen_woq_pass.kernels import KERNELS


class KernelForward:
    """Mixed in before a Linear class: the kernel chosen at compile time, on its packed constants."""

    zen_woq_kernel: str
    zen_woq_constants: dict[str, torch.Tensor]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return KERNELS[self.zen_woq_kernel].run(input, self.zen_woq_constants, self.bias)


@functools.cache
def _kernel_class(cls: type) -> type:
    base = next(c for c in cls.__mro__ if c is not PackedForward and not issubclass(c, PackedForward))
    return type(f"Kernel{base.__name__}", (KernelForward, base), {})


def release_module_weights(model: torch.nn.Module, activation_dtype: torch.dtype = torch.bfloat16) -> int:
    """Empty the module copy of every layer a kernel took; returns the bytes released."""
    released = 0
    for module in model.modules():
        if not isinstance(module, PackedForward):
            continue
        found = packed_constants.lookup(module.weight_packed, activation_dtype)
        if found is None:
            continue  # on the default path: the module's weights are the only copy
        kernel, constants = found
        for name in PACKED_TENSOR_NAMES:
            tensor = getattr(module, name, None)
            if tensor is not None:
                released += tensor.nbytes
                tensor.data = torch.empty(0, dtype=tensor.dtype)
        module.zen_woq_kernel, module.zen_woq_constants = kernel, constants
        module.__class__ = _kernel_class(type(module))
    return released
