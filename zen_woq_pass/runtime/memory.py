"""Give memory back once a model is converted: the checkpoint file's mapping, and freed heap.

transformers loads safetensors as views of the memory-mapped file. After :func:`convert` the
quantized layers hold only their kernels' constants, but the pages of the file stay resident
while any tensor still views the mapping (the embedding does): dropping the packed weights frees
no memory at all. Copying the remaining mapped tensors into ordinary memory lets the mapping go.
Converting also allocates and frees a dense weight per layer; glibc keeps such freed heap in the
process (measured on SmolLM2: +590 MB of RSS) until ``malloc_trim`` returns it.
"""

from __future__ import annotations

import bisect
import ctypes
import ctypes.util

import torch


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed data mappings (not shared libraries)."""
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                path = fields[5].strip() if len(fields) == 6 else ""
                if path.startswith("/") and ".so" not in path and not path.startswith("/dev/"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return sorted(ranges)


def release_checkpoint_file(model: torch.nn.Module) -> int:
    """Copy every parameter and buffer that views a mapped file into process memory; returns
    the bytes copied (0 when nothing was mapped)."""
    ranges = _file_mappings()
    starts = [start for start, _ in ranges]
    copied = 0
    for tensor in {id(t): t for t in (*model.parameters(), *model.buffers())}.values():
        pointer = tensor.untyped_storage().data_ptr()
        index = bisect.bisect_right(starts, pointer) - 1
        if tensor.numel() and index >= 0 and pointer < ranges[index][1]:
            copied += tensor.nbytes
            tensor.data = tensor.data.clone()
    return copied


def return_freed_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere)."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
