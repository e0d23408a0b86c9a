"""Test and benchmark support, not used at run time: small real compressed-tensors checkpoints.

Tests, benchmarks and the examples need real pack-quantized checkpoints but may not download
anything: we build a tiny randomly initialised transformers model, a byte-level tokenizer and a
random calibration set, and run llmcompressor's ``oneshot`` (GPTQ or RTN). Needs llmcompressor
(the ``test`` or ``models`` extra).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import torch

VOCAB = 256


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One checkpoint to make: architecture, scheme, and the layers left unquantized."""

    arch: str = "llama"  # "llama" or "qwen2" (q/k/v carry a bias)
    scheme: str | dict = "W4A16"  # a preset name, or weight-args for a custom scheme
    ignore: tuple[str, ...] = ("lm_head",)
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 2
    seed: int = 0
    algorithm: str = "gptq"  # "gptq", "awq", or "rtn" (round-to-nearest: much faster on large models)
    initializer_range: float = 0.02  # larger: peakier logits, fewer near-ties for greedy decoding
    bypass_divisibility_checks: bool = False  # allow a last, partial group (SmolLM2's 576 with group 128)


def _model(recipe: Recipe):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[recipe.arch]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=max(4, recipe.hidden_size // 64),
        num_key_value_heads=max(2, recipe.hidden_size // 256),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=recipe.initializer_range,
    )
    torch.manual_seed(recipe.seed)
    return model_cls(config).to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' @wraps(Module.to) hides self from mypy


def _tokenizer():
    """Byte-level, one token per byte (256, no merges): any text encodes, nothing to download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    end = alphabet[0]
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=end, pad_token=end, bos_token=end)


def _modifier(recipe: Recipe):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    modifier = {"gptq": GPTQModifier, "rtn": QuantizationModifier, "awq": QuantizationModifier}[recipe.algorithm]
    common = {"ignore": list(recipe.ignore), "bypass_divisibility_checks": recipe.bypass_divisibility_checks}
    if isinstance(recipe.scheme, str):
        quantize = modifier(targets="Linear", scheme=recipe.scheme, **common)
    else:
        quantize = modifier(config_groups={"group_0": {"targets": ["Linear"], "weights": dict(recipe.scheme)}}, **common)
    if recipe.algorithm == "awq":  # llmcompressor 0.14's AWQ: activation-aware smoothing, then RTN
        from llmcompressor.modifiers.transform import AWQModifier

        _skip_pinning_without_accelerator()
        return [AWQModifier(), quantize]
    return quantize


def _skip_pinning_without_accelerator():
    """llmcompressor 0.14's AWQ pins its cached activations for host-to-device copies, and
    ``pin_memory`` raises on a CPU-only torch ("Cannot access accelerator device"). Pinning only
    speeds up copies to an accelerator, so without one it is skipped."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None


def _oneshot(recipe: Recipe, directory: Path, output_dir: Path | None):
    """llmcompressor's ``oneshot`` on a fresh dense model saved under ``directory``; returns the
    calibrated model, as it is in memory after calibration."""
    from datasets import Dataset
    from llmcompressor import oneshot

    dense = directory / "dense"
    _model(recipe).save_pretrained(dense)
    _tokenizer().save_pretrained(dense)
    rng = random.Random(recipe.seed)
    texts = ["".join(chr(rng.randrange(32, 127)) for _ in range(64)) for _ in range(16)]
    output: dict[str, Any] = {"output_dir": str(output_dir)} if output_dir else {}
    return oneshot(
        model=str(dense),
        dataset=Dataset.from_dict({"text": texts}),
        recipe=_modifier(recipe),
        max_seq_length=64,
        num_calibration_samples=len(texts),
        **output,
    )


def make_checkpoint(recipe: Recipe, directory: str | Path) -> Path:
    """Write a dense bf16 model, then its llmcompressor checkpoint, under ``directory``."""
    quantized = Path(directory) / "quantized"
    _oneshot(recipe, Path(directory), quantized)
    _tokenizer().save_pretrained(quantized)
    return quantized


def calibrated_model(recipe: Recipe, directory: str | Path):
    """The model right after ``oneshot``, never saved: the fake-quant form a notebook user has."""
    return _oneshot(recipe, Path(directory), None)
