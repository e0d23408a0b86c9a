"""The weights a decode step streams, moved onto 2 MB pages: one anonymous mapping per model.

Why: a decode step reads every weight once, from memory. On 4 KB pages that stream walks a new
page, and misses the TLB, every 4 KB; Linux gives a process 2 MB pages only where it asks
(``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` on these machines). Measured on a
Zen 4, 2 threads, in one process, alternating (README): the avx512-int4 kernel over a model's
layers 10-17 % faster on 2 MB pages. The tensors keep their identity (``tensor.data`` is swapped),
so whatever holds them (modules, plans, a tied embedding) holds the moved copy; the mapping goes
when the last of them does. zentorch's weights stay where they are: ZenDNN keeps its own reordered
copy of each, keyed by address (:mod:`zen_woq_pass.kernels.zentorch`).
"""

from __future__ import annotations

import ctypes
import mmap

import torch

HUGE_PAGE = 2 << 20
MIN_BYTES = HUGE_PAGE  # less than a page gains nothing and costs up to a page
ALIGNMENT = 64  # each tensor starts on a cache line


def unavailable_reason() -> str | None:
    """Why this OS gives a process no 2 MB pages on a mapping of its own (None: it does)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as setting:
            mode = setting.read()
    except OSError:
        return "no transparent huge pages here"
    if not hasattr(mmap, "MADV_HUGEPAGE") or "[never]" in mode:
        return f"transparent huge pages are off ({mode.strip()})"
    return None


def _owns_its_storage(tensor: torch.Tensor) -> bool:
    """A contiguous tensor that is all of its storage: moving it leaves no other view behind."""
    return tensor.is_contiguous() and tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes


def move(tensors: list[torch.Tensor]) -> str:
    """Copy ``tensors`` into one mapping advised onto 2 MB pages and point each at its copy; says
    what it did, or why not (the OS has no such pages, or less than one page to move)."""
    unique = list({id(t): t for t in tensors if t.device.type == "cpu" and t.numel() and _owns_its_storage(t)}.values())
    sizes = [-(-t.nbytes // ALIGNMENT) * ALIGNMENT for t in unique]
    megabytes = sum(t.nbytes for t in unique) / 1e6
    reason = unavailable_reason() or ("less than one 2 MB page of them" if sum(sizes) < MIN_BYTES else None)
    if reason is None:
        length = -(-(sum(sizes) + HUGE_PAGE) // HUGE_PAGE) * HUGE_PAGE  # + a page to align the start
        try:
            mapping = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # private: shared memory has its own THP switch
            mapping.madvise(mmap.MADV_HUGEPAGE)
        except OSError as error:  # the weights stay where they are, and work as well
            reason = str(error)
    if reason is not None:
        return f"pages: the {megabytes:.1f} MB of weights a decode step streams stay on 4 KB pages: {reason}"
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    offset = -address % HUGE_PAGE
    with torch.no_grad():
        for tensor, size in zip(unique, sizes):
            # a storage of its own in the mapping (each holds the mapping): dynamo refuses inputs
            # of one compiled layer that share a storage
            own = torch.frombuffer(mapping, dtype=torch.uint8, count=tensor.nbytes, offset=offset)
            copy = own.view(tensor.dtype).view(tensor.shape)
            copy.copy_(tensor)
            tensor.data = copy
            offset += size
    return f"pages: the {megabytes:.1f} MB of weights a decode step streams are on 2 MB pages"
