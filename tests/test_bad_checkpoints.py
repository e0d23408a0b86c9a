"""Bad checkpoints, made by corrupting a real llmcompressor checkpoint: transformers loads them
without a word; keep_compressed must refuse each with the layer's name and what is wrong, and
what is valid but odd (zero scales) must compute the right thing."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from zen_woq_pass.graph import ct_format
from zen_woq_pass.graph.keep_compressed import keep_compressed
from zen_woq_pass.models.probe import packed_linear

from conftest import MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB
from helpers import INPUT_IDS, assert_close_to_reference, fp32_reference, load, run_compiled

LAYER = "model.layers.0.self_attn.q_proj"


def _set(name, change):
    def corrupt(tensors):
        tensors[f"{LAYER}.{name}"] = change(tensors[f"{LAYER}.{name}"]).contiguous()

    return corrupt


CORRUPTIONS = {
    "packed width": (_set("weight_packed", lambda t: t[:, :-4]), "weight_packed has shape (256, 28), expected (256, 32)"),
    "packed dtype": (_set("weight_packed", lambda t: t.to(torch.int64)), "weight_packed is stored as torch.int64"),
    "weight_shape": (_set("weight_shape", lambda t: torch.tensor([256, 512])), "weight_shape says (256, 512)"),
    "scale groups": (_set("weight_scale", lambda t: t[:, :1]), "weight_scale has 1 groups, group size 128"),
    "scale NaN": (_set("weight_scale", lambda t: t.index_fill(0, torch.tensor([3]), float("nan"))), "NaN or Inf"),
    "scale Inf": (_set("weight_scale", lambda t: t.index_fill(0, torch.tensor([3]), float("inf"))), "NaN or Inf"),
    "zero point rows": (_set("weight_zero_point", lambda t: t[:-1]), "weight_zero_point is torch.int32 (31, 2)"),
    "zero point dtype": (_set("weight_zero_point", lambda t: t.to(torch.int64)), "weight_zero_point is torch.int64"),
}


def _corrupted(checkpoints, tmp_path, corrupt):
    path = tmp_path / "bad"
    shutil.copytree(checkpoints("qwen2_asym_bias"), path)
    tensors = load_file(path / "model.safetensors")
    corrupt(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_checkpoint_is_refused_naming_the_layer(checkpoints, tmp_path, case):
    corrupt, problem = CORRUPTIONS[case]
    model = load(_corrupted(checkpoints, tmp_path, corrupt), keep=False)  # transformers accepts it
    with pytest.raises(ValueError, match="bad compressed-tensors checkpoint") as error:
        keep_compressed(model)
    assert str(error.value).startswith(LAYER) and problem in str(error.value)


def test_zero_scales_are_valid_and_computed_right(checkpoints, tmp_path):
    path = _corrupted(checkpoints, tmp_path, _set("weight_scale", torch.zeros_like))
    model = load(path)
    with torch.no_grad():
        eager = model(INPUT_IDS).logits
    compiled = run_compiled(model, {"kernel": "zentorch"})
    assert torch.isfinite(compiled).all()
    assert_close_to_reference(compiled, eager, fp32_reference(path), MODEL_SQNR_DB, MODEL_SQNR_SLACK_DB)


def test_g_idx_that_is_no_group_map_is_refused():
    with pytest.raises(ValueError, match="weight_g_idx is not a map of 256 input columns to 4 groups"):
        packed_linear(96, 256, group_size=64, g_idx=torch.full((256,), 7, dtype=torch.int32))


def test_unpack_refuses_non_int32_storage_of_its_own():
    with pytest.raises(ValueError, match="bit widths dividing 32"):
        ct_format.unpack_int32(torch.zeros(2, 2, dtype=torch.int32), 3, 4)
