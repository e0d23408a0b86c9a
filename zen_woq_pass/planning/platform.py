"""What this machine can run: CPU identity and ISA flags, and whether zentorch's WOQ ops are usable.

zentorch's 4-bit WOQ kernel needs AVX512-BF16 (ZenDNN lists BF16 x S4/U4 WOQ as "AVX512+"); on
Zen 2/3 it runs without error and returns garbage. We decide from CPU flags, not family/model
numbers (hypervisors hide AVX-512 on some Zen 4 hosts), like zentorch's own
``is_avx512_supported`` and vLLM's Zen detection.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os

import torch

# zentorch's is_avx512_supported() asks for these; bf16 is what the WOQ kernel uses.
ZENTORCH_WOQ_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")
ZENTORCH_WOQ_OPS = ("zentorch_woq_repack_weight", "zentorch_woq_linear")
# The id of ZenDNN's reference matmul algorithm, read from ZENDNNL_MATMUL_ALGO at the first
# zentorch call; correct on CPUs without AVX512-BF16, and slow. Tied to zentorch 2.13.0.x.
ZENDNN_REFERENCE_ALGO = "9"


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    vendor: str
    model_name: str
    family: int | None
    model: int | None
    flags: frozenset[str]

    @property
    def is_amd(self) -> bool:
        return self.vendor == "AuthenticAMD"

    @property
    def zen_generation(self) -> str:
        """Best-effort name from family/model; for display only, never for decisions."""
        if not self.is_amd or self.family is None:
            return "not AMD Zen"
        if self.family == 0x17:
            return "Zen 1/2"
        if self.family == 0x19:
            return "Zen 4" if self.model is not None and self.model >= 0x10 and self.model not in range(0x20, 0x60) else "Zen 3"
        if self.family == 0x1A:
            return "Zen 5"
        return f"AMD family {self.family:#x}"

    def missing_flags(self, required=ZENTORCH_WOQ_FLAGS) -> list[str]:
        return [flag for flag in required if flag not in self.flags]


@functools.cache
def cpu_info(path: str = "/proc/cpuinfo") -> CpuInfo:
    """The first processor's entry of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        with open(path) as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass

    def number(key):
        return int(fields[key]) if fields.get(key, "").isdigit() else None

    return CpuInfo(
        vendor=fields.get("vendor_id", "unknown"),
        model_name=fields.get("model name", "unknown"),
        family=number("cpu family"),
        model=number("model"),
        flags=frozenset(fields.get("flags", "").split()),
    )


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2])


@functools.cache
def zentorch_unusable_reason() -> str | None:
    """Why zentorch's WOQ ops cannot be called in this process, or None when they can.

    Imports zentorch (it registers its ops on import); cached for the process.
    """
    try:
        zentorch = importlib.import_module("zentorch")
    except Exception as error:  # ImportError, or an ABI mismatch raised as OSError/RuntimeError
        return f"zentorch is not importable ({type(error).__name__}: {error})"
    version = getattr(zentorch, "__version__", "unknown")
    if version == "unknown" or _minor(version) != _minor(torch.__version__):
        return f"zentorch {version} is built for another torch minor version than torch {torch.__version__}"
    missing = [op for op in ZENTORCH_WOQ_OPS if not hasattr(torch.ops.zentorch, op)]
    if missing:
        return f"torch.ops.zentorch.{{{', '.join(missing)}}} are not registered"
    return None


def zentorch_cpu_reason(cpu: CpuInfo | None = None) -> str | None:
    """Why this CPU cannot run zentorch's 4-bit WOQ kernel, or None when it can."""
    cpu = cpu or cpu_info()
    if not cpu.is_amd:
        return f"not an AMD Zen CPU ({cpu.vendor})"
    missing = cpu.missing_flags()
    if missing:
        return f"{cpu.zen_generation} CPU lacks {', '.join(missing)} (zentorch WOQ needs AVX512-BF16)"
    return None


def zendnn_reference_algorithm() -> bool:
    """Whether ZenDNN runs its reference matmul algorithm (read at zentorch's first call)."""
    return os.environ.get("ZENDNNL_MATMUL_ALGO") == ZENDNN_REFERENCE_ALGO


def zentorch_ops():
    """``torch.ops.zentorch``, importing zentorch first; RuntimeError when it is unusable."""
    reason = zentorch_unusable_reason()
    if reason:
        raise RuntimeError(reason)
    return torch.ops.zentorch


def clear_caches() -> None:
    """Forget the CPU and zentorch probes (``torch._dynamo.reset()`` does, through the backend)."""
    for probe in (cpu_info, zentorch_unusable_reason):
        getattr(probe, "cache_clear", lambda: None)()  # tests may stand in a plain function
