"""Build and load the package's own C++ kernels (``csrc/``) once per machine, and describe them to
torch.compile.

The source is compiled the first time a process needs it (about 10 s, with the C++ compiler that
Inductor uses too) into ``<cache>/native/<key>/``, under a file lock; ``key`` hashes the source,
the flags, torch's version and the compiler's, so a changed one builds anew and a found library is
whole (its folder is renamed into place when complete; a key folder without it, left by a crash or
a cleaner, is replaced). torch's ``cpp_extension.load`` would need ninja and a Python module; a
plain ``TORCH_LIBRARY`` shared object loaded by ``torch.ops.load_library`` needs neither. It is
built for AVX512-VNNI and AVX512-BF16 and loaded only where the CPU has both: anywhere else its
code must never run.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.utils import cpp_extension

from zen_woq_pass import cache
from zen_woq_pass.planning import platform

log = logging.getLogger(__name__)

# The CPU as /proc/cpuinfo says, even where a test makes the platform gate see another one: a
# simulated Zen 4 must never run AVX-512 code on a real Zen 3.
_real_cpu_info = platform.cpu_info

SOURCES = tuple(sorted((Path(__file__).parent / "csrc").glob("*.cpp")))  # one library of all
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16", "fma")
ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx512bf16", "-mfma")


def _command(compiler: str, sources: tuple[Path, ...], out: Path) -> list[str]:
    torch_lib = Path(torch.__file__).parent / "lib"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        compiler, "-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", *ISA_FLAGS,
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *(f"-I{path}" for path in cpp_extension.include_paths()),
        *map(str, sources), "-o", str(out),
        # torch's own libgomp (same soname) serves our OpenMP regions: one thread pool, not two
        f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu", "-lgomp",
    ]  # fmt: skip


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


LIBRARY = "zen_woq_native.so"


def _key(compiler: str) -> str:
    """The build's name: a hash of the source, the flags, torch's version and the compiler's."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    return hashlib.sha256(
        "\0".join([*(s.read_text() for s in SOURCES), " ".join(_command("", (), Path())), torch.__version__, version]).encode()
    ).hexdigest()[:16]


def _remove(path: Path) -> None:
    """Whatever is at ``path``: a folder with its files, a file, a link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _build(compiler: str) -> Path:
    """The built library's path, built here if no process built it before."""
    key = _key(compiler)
    folder = cache.root() / "native"
    final = folder / key / LIBRARY
    if final.is_file():
        return final
    folder.mkdir(parents=True, exist_ok=True)
    with cache.locked(folder / f".{key}.lock"):
        if final.is_file():
            return final
        partial = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=folder))
        try:
            done = subprocess.run(_command(compiler, SOURCES, partial / final.name), capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
            os.chmod(partial, 0o755)
            # the key's folder without the library (a build that crashed, files a cleaner took):
            # no process loads from it, and under the lock none is building into it
            _remove(final.parent)
            os.rename(partial, final.parent)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        log.info("zen_woq: built %s", final)
    return final


def unavailable_reason() -> str | None:
    """None once ``torch.ops.zen_woq_native`` is loaded in this process; else why it cannot be."""
    for cpu in (platform.cpu_info(), _real_cpu_info()):
        missing = cpu.missing_flags(CPU_FLAGS)
        if missing:
            return f"the CPU lacks {', '.join(missing)} (the kernel needs AVX512-VNNI and AVX512-BF16)"
    return _load_reason()


@functools.cache
def _load_reason() -> str | None:
    compiler = _compiler()
    if compiler is None:
        return "no C++ compiler (g++ or $CXX) to build it"
    try:
        torch.ops.load_library(str(_build(compiler)))
    except Exception as error:  # a failed build is a "no" for this kernel, never a crash
        return f"its build failed: {type(error).__name__}: {error}"
    _describe_to_compile()
    return None


def _describe_to_compile() -> None:
    """Output shapes for torch.compile's fake tensors: the ops run only with real ones."""

    for bits in (4, 8):
        torch.library.register_fake(f"zen_woq_native::int{bits}_linear")(_fake_linear)
        torch.library.register_fake(f"zen_woq_native::int{bits}_dequantize")(_fake_dequantize(bits))
    torch.library.register_fake("zen_woq_native::packed_bf16_linear")(_fake_packed_bf16_linear)
    torch.library.register_fake("zen_woq_native::prompt_attention")(_fake_prompt_attention)


def _fake_linear(x, weight, scales, zeros, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


def _fake_packed_bf16_linear(x, packed, tops, bias):
    return x.new_empty(x.shape[0], tops.shape[0])


def _fake_prompt_attention(q, k, v, mask, causal, scale):
    batch, heads, length, size = q.shape
    return q.new_empty(batch, length, heads, size)


def _fake_dequantize(bits: int):
    def dequantized(weight, scales, zeros):
        return weight.new_empty(weight.shape[0], weight.shape[1] * 8 // bits, dtype=torch.bfloat16)

    return dequantized
