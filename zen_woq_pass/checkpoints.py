"""Make small, real compressed-tensors checkpoints with llmcompressor (GPTQ), offline, in seconds.

Tests, the notebook and the examples need real pack-quantized checkpoints but may not download
anything: we build a tiny randomly initialised transformers model, a word-level tokenizer and a
random calibration set, and run llmcompressor's ``oneshot`` with a ``GPTQModifier``. Needs the
``test`` extra (llmcompressor).
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

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


def _model(recipe: Recipe):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[recipe.arch]
    config = config_cls(
        vocab_size=VOCAB,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(recipe.seed)
    return model_cls(config).to(torch.bfloat16)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="t0", pad_token="t0", bos_token="t2", eos_token="t1")


def _modifier(recipe: Recipe):
    from llmcompressor.modifiers.quantization import GPTQModifier

    if isinstance(recipe.scheme, str):
        return GPTQModifier(targets="Linear", scheme=recipe.scheme, ignore=list(recipe.ignore))
    groups = {"group_0": {"targets": ["Linear"], "weights": dict(recipe.scheme)}}
    return GPTQModifier(config_groups=groups, ignore=list(recipe.ignore))


def make_checkpoint(recipe: Recipe, directory: str | Path) -> Path:
    """Write a dense bf16 model, then its llmcompressor GPTQ checkpoint, under ``directory``."""
    from datasets import Dataset
    from llmcompressor import oneshot

    directory = Path(directory)
    dense, quantized = directory / "dense", directory / "quantized"
    _model(recipe).save_pretrained(dense)
    _tokenizer().save_pretrained(dense)
    rng = random.Random(recipe.seed)
    texts = [" ".join(f"t{rng.randrange(3, VOCAB)}" for _ in range(48)) for _ in range(16)]
    oneshot(
        model=str(dense),
        dataset=Dataset.from_dict({"text": texts}),
        recipe=_modifier(recipe),
        max_seq_length=64,
        num_calibration_samples=len(texts),
        output_dir=str(quantized),
    )
    _tokenizer().save_pretrained(quantized)
    return quantized
