"""Write notebooks/quickstart.ipynb (without outputs): python scripts/make_quickstart_notebook.py"""

from pathlib import Path

import nbformat as nbf
nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
md("""# zen_woq quickstart: a W4A16 model, kept at 4 bits, compiled for AMD EPYC

1. make a small W4A16 GPTQ checkpoint with llmcompressor (offline, seconds; or point `MODEL_DIR` at your own),
2. load it with transformers and keep it compressed,
3. compile it with `backend="zen_woq"` and read the per-layer report,
4. generate, compare with the eager compressed-tensors reference,
5. plot the kernel decisions, and latency and memory beside the dense model transformers would run."""),
code("""import tempfile, time
import torch
import matplotlib.pyplot as plt
from transformers import AutoModelForCausalLM, AutoTokenizer

import zen_woq_pass
from zen_woq_pass import measure, packed_constants, platform
from zen_woq_pass.checkpoints import Recipe, make_checkpoint

cpu = platform.cpu_info()
print(cpu.model_name, "|", cpu.zen_generation, "| zentorch WOQ:", platform.zentorch_cpu_reason() or "supported")"""),
md("## 1. A W4A16 GPTQ checkpoint, made here with llmcompressor"),
code("""MODEL_DIR = None  # or the path of your own compressed-tensors W4A16 checkpoint
if MODEL_DIR is None:
    MODEL_DIR = make_checkpoint(Recipe(num_layers=2, hidden_size=256, intermediate_size=512), tempfile.mkdtemp())
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
ids = tokenizer("AMD EPYC runs 4-bit models", return_tensors="pt").input_ids
NEW_TOKENS = 32"""),
md("## 2. Load, keep compressed\n`keep_compressed` stops transformers from decompressing the model to bf16 on its first forward."),
code("""model = zen_woq_pass.keep_compressed(AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16))
dense = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16)   # what transformers runs by default
reference = measure.greedy(model, ids, NEW_TOKENS)   # eager compressed-tensors math: the reference
measure.greedy(dense, ids, 1)                         # decompresses here
print(type(model.model.layers[0].self_attn.q_proj).__name__, model.model.layers[0].self_attn.q_proj.weight_packed.dtype)"""),
md("## 3. Compile with `backend=\"zen_woq\"` and read the report"),
code("""model.forward = torch.compile(model.forward, backend="zen_woq")
tokens = measure.greedy(model, ids, NEW_TOKENS)
report = zen_woq_pass.last_report()
report"""),
md("## 4. Same tokens as the eager reference?\nIdentical, or parting only where the reference's two best logits are closer than bf16 rounding noise (a near-tie)."),
code("""eager = zen_woq_pass.keep_compressed(AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16))
comparison = measure.compare_greedy(eager, model, ids, tokens, reference)
print("generated:", repr(tokenizer.decode(tokens[0])))
print("vs the eager reference:", comparison.explain())
assert comparison.acceptable"""),
md("## 5. Kernel decisions, latency and memory beside the dense model"),
code("""compiled_timing = measure.time_generation(model, ids, NEW_TOKENS)
dense_timing = measure.time_generation(dense, ids, NEW_TOKENS)
dense_mb = measure.linear_weight_bytes(dense) / 1e6
kept_mb = (measure.linear_weight_bytes(model) + packed_constants.held_bytes()) / 1e6

fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
kernels = report.by_kernel()
axes[0].bar(list(kernels), [len(v) for v in kernels.values()])
axes[0].set_title("layers per kernel")
axes[1].bar(["dense bf16", "zen_woq"], [dense_timing.decode_tokens_per_s, compiled_timing.decode_tokens_per_s])
axes[1].set_title("decode tokens/s")
axes[2].bar(["dense bf16", "zen_woq (module + kernel copies)"], [dense_mb, kept_mb])
axes[2].set_title("quantized linears' weights, MB")
fig.tight_layout()
print(f"decode x{compiled_timing.decode_tokens_per_s / dense_timing.decode_tokens_per_s:.2f}; weights {kept_mb / dense_mb:.2f}x of dense")"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, str(Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"))
print("written")
