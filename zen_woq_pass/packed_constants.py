"""Kernel-packed constants, shared by every graph compiled from the same weights.

``generate`` alone compiles several graphs (prefill, decode, then a dynamic-shape decode); each
would otherwise repack every layer and hold its own copy of the 4-bit weights. Packed constants
are kept per source tensor (weakly: they go when the model goes) and per kernel and activation
dtype, so all graphs of a model share one copy. Like the compiled code, they assume the source
weights are not changed in place.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

# source tensor (by identity, weakly) -> {(kernel, activation dtype, other sources): constants}
_packed = WeakIdKeyDictionary()


def packed(sources: tuple[torch.Tensor, ...], key: tuple, pack: Callable[[], dict[str, torch.Tensor]]):
    """``pack()``'s result for these source tensors and ``key``, computed once while they live."""
    first, others = sources[0], tuple(id(t) for t in sources[1:])
    per_source = _packed.setdefault(first, {})
    full_key = (*key, others)
    if full_key not in per_source:
        per_source[full_key] = pack()
    return per_source[full_key]


def held_bytes() -> int:
    """Bytes of all packed constants alive in this process (shared storages counted once)."""
    storages = {}
    for per_source in _packed.values():
        for constants in per_source.values():
            for tensor in constants.values():
                storage = tensor.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def lookup(source: torch.Tensor, activation_dtype: torch.dtype) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(kernel name, constants) packed from ``source`` for ``activation_dtype``, if any."""
    for (kernel, dtype, _), constants in _packed.get(source, {}).items():
        if dtype == activation_dtype:
            return kernel, constants
    return None
