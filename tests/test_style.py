"""The code's habits, checked where a user's tests run (``.ci/run`` checks ruff first, in seconds):
ruff's pyflakes, syntax and import-order rules and its formatter (``[tool.ruff]`` in
pyproject.toml) find nothing to change in the package, its tests, benchmarks, scripts or notebook, mypy
finds no type error in the package, and the package's modules import each other without cycles."""

import ast
import graphlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.library_independent

ROOT = Path(__file__).parent.parent


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(), reason="ruff is in the test extra")
@pytest.mark.parametrize("command", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_finds_nothing(command):
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    done = subprocess.run([ruff, *command, "."], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("mypy") is None and not (Path(sys.executable).parent / "mypy").exists(), reason="mypy is in the test extra")
def test_mypy_finds_nothing():
    """``[tool.mypy]`` in pyproject.toml: the package type-checks against this environment's
    libraries (the pinned set: the newest-libraries run skips this module, as a newer transformers
    may type things otherwise)."""
    mypy = str(Path(sys.executable).parent / "mypy") if (Path(sys.executable).parent / "mypy").exists() else shutil.which("mypy")
    command = [mypy, "--python-executable", sys.executable, "--cache-dir", str(ROOT / ".mypy_cache")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def _imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules a module imports, anywhere in it (a function-level import is still a
    dependency); ``from package import module`` depends on the module, not the package."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in modules:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {node.module}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names} & modules
    return found


def test_the_package_has_no_import_cycles():
    """The sub-packages are layers (kernels, planning, graph, runtime, then models and cli): no
    module reaches back to one that imports it, so any of them can be read, and imported, alone."""
    package = ROOT / "zen_woq_pass"
    paths = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {name: _imports_of(path, set(paths)) - {name, "zen_woq_pass"} for name, path in paths.items()}
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as cycle:
        pytest.fail(f"import cycle: {' -> '.join(cycle.args[1])}")


def test_names_users_were_shown_before_the_layout_still_work():
    import zen_woq_pass
    from zen_woq_pass import measure, platform, smollm2
    from zen_woq_pass.models import measure as models_measure
    from zen_woq_pass.runtime import attention

    assert zen_woq_pass.attention.restore is attention.restore
    assert measure is models_measure and callable(platform.cpu_info) and callable(smollm2.checkpoint)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        zen_woq_pass.nope
