"""The code's habits, checked where a user's tests run: ruff's pyflakes, syntax and import-order
rules (``[tool.ruff]`` in pyproject.toml) find nothing in the package, its tests, benchmarks or
scripts."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.library_independent

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(), reason="ruff is in the test extra")
def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, "check", "zen_woq_pass", "tests", "benchmarks", "scripts"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
