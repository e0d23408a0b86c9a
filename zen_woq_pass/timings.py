"""Race timings kept per machine, so a race is run once per machine and decides the same way in
every process.

``auto`` and the dense head choose their kernel by timing (:mod:`zen_woq_pass.choose`,
:mod:`zen_woq_pass.gemv`). On a shared, noisy host two close kernels can swap places from one
process to the next. A different pick makes a different graph, which Inductor's compile cache
does not hold: SmolLM2's decode step compiles in about 60 s cold where a warm cache gives 13-15 s
(an Intel Xeon, 2 threads). So the first measurement is written to a JSON file under the cache folder
(``$ZEN_WOQ_CACHE``, else ``~/.cache/zen_woq_pass``), in ``timings/``. The file's name hashes what
can change the result: the CPU model and flags, the thread count, the zentorch algorithm setting,
and the versions of torch, zentorch, this package and its C++ kernel source. Delete the file to
measure again.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from zen_woq_pass import cache, native, platform


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def _installed() -> dict:
    cpu = platform.cpu_info()
    sources = hashlib.sha256(b"".join(source.read_bytes() for source in native.SOURCES))
    return {
        "cpu": f"{cpu.vendor} family {cpu.family} model {cpu.model} {cpu.model_name}",
        "flags": sorted(cpu.flags),
        "torch": torch.__version__,
        "zentorch": _version("zentorch"),
        "zen_woq_pass": _version("zen_woq_pass"),
        "csrc": sources.hexdigest()[:16],
    }


def _machine() -> dict:
    """What a timing depends on besides the code being timed (threads and the environment may
    change within a process)."""
    return {
        **_installed(),
        "threads": torch.get_num_threads(),
        "ZENDNNL_MATMUL_ALGO": os.environ.get("ZENDNNL_MATMUL_ALGO", ""),
    }


def path(machine: dict | None = None) -> Path:
    """This machine's timings file."""
    machine = machine or _machine()
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:16]
    return cache.root() / "timings" / f"{digest}.json"


def _read(file: Path) -> dict:
    try:
        timings = json.loads(file.read_text())["timings"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # absent or damaged: measure again
    return timings if isinstance(timings, dict) else {}


def remembered(race: str, key: tuple, measure: Callable[[], tuple[float, ...]]) -> tuple[float, ...]:
    """The times this machine measured for ``race`` and ``key``; ``measure()`` once if none."""
    machine = _machine()
    file = path(machine)
    name = f"{race} {key!r}"
    times = _read(file).get(name)
    if times is not None:
        return tuple(times)
    times = tuple(measure())
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with cache.locked(file.parent / f".{file.name}.lock"):
            timings = _read(file)
            times = tuple(timings.setdefault(name, list(times)))  # another process may have been first
            handle, partial = tempfile.mkstemp(dir=file.parent, prefix=f".{file.stem}.", suffix=".tmp")
            with os.fdopen(handle, "w") as out:
                json.dump({"machine": machine, "timings": timings}, out, indent=1)
            os.replace(partial, file)  # readers see the old file or the new one, never half of one
    except OSError:
        pass  # a read-only cache folder: this process keeps its own measurement
    return times
