"""Make the small W4A16 GPTQ checkpoint shipped in the package as ``zen-woq run``'s default.

    python scripts/make_default_model.py

Llama-shaped, 2 layers, hidden 256, random weights, byte-level tokenizer; GPTQ by llmcompressor.
Under a megabyte, so it ships inside the wheel and ``zen-woq run`` needs no download.
"""

import shutil
import tempfile
from pathlib import Path

from zen_woq_pass.models.testing import Recipe, make_checkpoint

TARGET = Path(__file__).resolve().parent.parent / "zen_woq_pass" / "models" / "default_model"
KEEP = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as scratch:
        made = make_checkpoint(Recipe(seed=2026), scratch)
        shutil.rmtree(TARGET, ignore_errors=True)
        TARGET.mkdir(parents=True)
        for name in KEEP:
            if (made / name).exists():
                shutil.copy(made / name, TARGET / name)
    print(f"wrote {TARGET}: {sum(f.stat().st_size for f in TARGET.iterdir()) / 1e6:.2f} MB")
