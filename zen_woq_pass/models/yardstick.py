"""Real-size speed yardsticks, offline: Llama-3.2-1B and -3B shapes with random weights, as bf16,
compressed-tensors W4A16 and llama.cpp GGUF files of the same weights.

SmolLM2-135M is real but small: its step is per-op overhead, and its 4-bit weights fit in some
caches. Users run 1-8B models, whose decode streams weights from DRAM. No such model may be
downloaded, and speed does not need trained weights, so we make them: a Llama of the real shape
(vocabulary 128256, a tied head) with random bf16 weights and SmolLM2's tokenizer (its ids fit in
the vocabulary; llama.cpp cannot tokenize text with it, so callers feed token ids). From it:
llmcompressor's round-to-nearest W4A16 (group 128 symmetric, group 32 with zero points), and a
GGUF made by llama.cpp's own converter (shipped in llama-cpp-python's source distribution, fetched
from PyPI once) and quantized by llama.cpp's own quantizer to Q4_0 and Q4_1. Each is made once per
machine, cached under a lock (``cache.made_once``). The outputs are meaningless; the bytes are real.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from zen_woq_pass import cache
from zen_woq_pass.models import smollm2

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama's widths: what decides a step's bytes and its kernels' shapes."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int = 128256  # Llama 3's


SHAPES = {
    "llama-3.2-1b": Shape(2048, 8192, 16, 32, 8, 64),
    "llama-3.2-3b": Shape(3072, 8192, 28, 24, 8, 128),
    "tiny": Shape(256, 512, 1, 4, 2, 64),  # the suite's: the maker end to end in seconds, Llama 3's vocabulary kept
}
# variant -> (symmetric, group size) for W4A16; "bf16" is what the others are made from; "gguf-bf16"
# is llama.cpp's conversion of it, quantized by llama.cpp to the GGUF_TYPES
W4A16 = {"w4a16-g128": (True, 128), "w4a16-asym-g32": (False, 32)}
GGUF_TYPES = ("q4_0", "q4_1")
VARIANTS = ("bf16", *W4A16, "gguf-bf16", *GGUF_TYPES)
FORMAT_VERSION = 1  # part of the folder name: bump it when what a variant holds changes
GGUF_FILE = "model.gguf"  # inside a GGUF variant's folder
CONVERTER_VERSION = "0.3.36"  # llama-cpp-python's sdist the converter comes from, where none is installed
SEED = 0


def checkpoint(shape: str, variant: str, cache_dir: str | Path | None = None) -> Path:
    """The folder of ``shape``'s ``variant``, made on the first call on this machine (minutes at
    real size), at once afterwards. A GGUF variant's file is ``gguf(shape, variant)``."""
    if shape not in SHAPES:
        raise ValueError(f"unknown yardstick shape {shape!r}; one of {', '.join(SHAPES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown yardstick variant {variant!r}; one of {', '.join(VARIANTS)}")
    root = cache.root(cache_dir)
    return cache.made_once(root / f"yardstick-{shape}-{variant}-v{FORMAT_VERSION}", lambda out: _make(shape, variant, out, root))


def gguf(shape: str, variant: str = "q4_0", cache_dir: str | Path | None = None) -> Path:
    """The GGUF file of ``shape`` as ``variant`` ("gguf-bf16" or one of ``GGUF_TYPES``)."""
    if variant not in ("gguf-bf16", *GGUF_TYPES):
        raise ValueError(f"{variant!r} is not a GGUF variant; one of gguf-bf16, {', '.join(GGUF_TYPES)}")
    return checkpoint(shape, variant, cache_dir) / GGUF_FILE


def _make(shape: str, variant: str, out: Path, root: Path) -> None:
    if variant == "bf16":
        _random_model(SHAPES[shape], out)
    elif variant in W4A16:
        smollm2.quantize(checkpoint(shape, "bf16", root), out, "rtn", *W4A16[variant])
    elif variant == "gguf-bf16":
        _convert(checkpoint(shape, "bf16", root), out / GGUF_FILE, _converter(root))
    else:
        _llama_quantize(gguf(shape, "gguf-bf16", root), out / GGUF_FILE, variant)


def llama_config(shape: Shape, bos: int, eos: int):
    """Llama 3.2's configuration at ``shape``: a tied head, its rope base; ``eos`` pads too."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **dataclasses.asdict(shape),
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        max_position_embeddings=8192,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def _random_model(shape: Shape, out: Path) -> None:
    """A Llama of ``shape``, random bf16 weights made in bf16 (a 3B model in fp32 would take 13 GB),
    saved with SmolLM2's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = smollm2.gguf_tokenizer()
    config = llama_config(shape, tokenizer.bos_token_id, tokenizer.eos_token_id)
    log.info("making a random-weight Llama: %s", shape)
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _converter(root: Path) -> Path:
    """The folder holding llama.cpp's ``convert_hf_to_gguf.py`` (with its ``conversion`` and
    ``gguf-py``), from llama-cpp-python's source distribution: the installed version's, else
    ``CONVERTER_VERSION``. Fetched from PyPI once (76 MB), only those files kept."""
    try:
        version = importlib.metadata.version("llama_cpp_python")
    except importlib.metadata.PackageNotFoundError:
        version = CONVERTER_VERSION
    return cache.made_once(root / f"llama-cpp-converter-{version}", lambda out: _fetch_converter(version, out))


def _fetch_converter(version: str, out: Path) -> None:
    sdist = out / "sdist"
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", "-d", str(sdist)]
    log.info("fetching llama-cpp-python %s's source distribution for llama.cpp's converter", version)
    subprocess.run([*command, f"llama-cpp-python=={version}"], check=True, stdout=sys.stderr)
    (archive,) = sdist.glob("*.tar.gz")
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            inside = member.name.partition("/vendor/llama.cpp/")[2]
            if member.isfile() and inside.startswith(keep):
                member.name = inside
                tar.extract(member, out, filter="data")
    archive.unlink()
    sdist.rmdir()


def _convert(hf_dir: Path, out: Path, converter: Path) -> None:
    """llama.cpp's converter, in its own process (it imports its own ``gguf``), to bf16. It reads
    a copy of ``hf_dir`` (links) whose tokenizer is padded with reserved tokens to the vocabulary,
    as Llama 3's own is: llama.cpp sizes the embedding by the token list."""
    from transformers import AutoConfig, AutoTokenizer

    staged = out.parent / "hf"
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    vocab_size = AutoConfig.from_pretrained(hf_dir).vocab_size
    tokenizer.add_tokens([f"<|reserved_{i}|>" for i in range(len(tokenizer), vocab_size)], special_tokens=True)
    tokenizer.save_pretrained(staged)
    for file in hf_dir.iterdir():
        if not (staged / file.name).exists():
            (staged / file.name).symlink_to(file)
    log.info("converting %s to GGUF with llama.cpp's converter", hf_dir.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(converter / "gguf-py"), str(converter)])}
    command = [sys.executable, str(converter / "convert_hf_to_gguf.py"), str(staged), "--outtype", "bf16", "--outfile", str(out)]
    try:
        subprocess.run(command, check=True, env=env, stdout=sys.stderr)
    finally:
        shutil.rmtree(staged)


def _llama_quantize(source: Path, out: Path, variant: str) -> None:
    """llama.cpp's own quantizer (its default mix: the tied embedding and head take their own type)."""
    try:
        import llama_cpp
    except ImportError:
        raise RuntimeError(f"the {variant} GGUF needs llama.cpp's quantizer: pip install llama-cpp-python (a source build of minutes)") from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "q4_1": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1}[variant]
    params.nthread = os.cpu_count() or 1
    log.info("quantizing %s to %s with llama.cpp", source, variant)
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp's quantizer failed to make {variant} from {source}")


def main(argv=None) -> int:
    """``python -m zen_woq_pass.models.yardstick SHAPE [VARIANT ...]``: make (once) and print each
    variant's path."""
    parser = argparse.ArgumentParser(prog="python -m zen_woq_pass.models.yardstick", description="make real-size yardstick checkpoints")
    parser.add_argument("shape", choices=list(SHAPES))
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), help=f"default: all of {', '.join(VARIANTS)}")
    parser.add_argument("--cache-dir", help="default: $ZEN_WOQ_CACHE, else ~/.cache/zen_woq_pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for variant in args.variants:
        print(checkpoint(args.shape, variant, args.cache_dir), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
