"""The newest transformers and compressed-tensors, on checkpoints the pinned set made (issue 11).

llmcompressor pins transformers and compressed-tensors to older releases, so it makes the test
checkpoints here, with the library set it pins. A second environment then holds the newest
releases (``NEWEST``) in front of this one and runs every test that does not run llmcompressor
itself and reads either library, on those checkpoints. The environment borrows this one's torch, zentorch and the rest
through a ``.pth`` line, so only the two libraries and what they need are installed.
"""

import json
import os
import shutil
import site
import subprocess
import venv
from pathlib import Path

import pytest

from conftest import MADE_CHECKPOINTS, RECIPES

pytestmark = pytest.mark.needs_llmcompressor  # makes the checkpoints

NEWEST = {"transformers": "5.23.0", "compressed-tensors": "0.20.0"}
ROOT = Path(__file__).resolve().parent.parent
VERSIONS = "import json, transformers, compressed_tensors as ct; print(json.dumps([transformers.__version__, ct.__version__]))"


def _newest_environment(folder: Path) -> Path:
    """A venv whose own site-packages hold NEWEST, and that falls back on this one's packages."""
    venv.create(folder, with_pip=True)
    python = folder / "bin" / "python"
    own = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True)
    fallback = "".join(f"import site; site.addsitedir({path!r})\n" for path in site.getsitepackages())
    (Path(own.stdout.strip()) / "zz_pinned_environment.pth").write_text(fallback)
    pins = [f"{name}=={version}" for name, version in NEWEST.items()]
    done = subprocess.run([python, "-m", "pip", "install", "-q", *pins], capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return python


def test_suite_passes_on_the_newest_libraries_with_checkpoints_the_pinned_set_made(checkpoints, tmp_path):
    made = tmp_path / "checkpoints"
    for name in RECIPES:
        shutil.copytree(checkpoints.path(name), made / name)
    python = _newest_environment(tmp_path / "venv")
    versions = subprocess.run([python, "-c", VERSIONS], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert json.loads(versions.stdout) == list(NEWEST.values())
    env = {**os.environ, MADE_CHECKPOINTS: str(made)}
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not needs_llmcompressor and not library_independent", "tests"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    print("newest libraries:", summary)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in summary  # and, with returncode 0, nothing failed
