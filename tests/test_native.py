"""The build of the package's C++ library (:mod:`zen_woq_pass.kernels.native`), on any CPU: it lands whole
in its key's folder, is found there the next time, replaces a key folder that lacks it (a crashed
build, a cleaner), leaves nothing behind when the compiler fails, and the real source compiles with
the real command (it runs only on AVX-512 CPUs; it must compile everywhere)."""

import os
import stat

import pytest

from zen_woq_pass.kernels import native

pytestmark = pytest.mark.library_independent

FAKE = """#!/bin/sh
# a C++ compiler that writes "library" to its -o path, and counts its builds in {calls}
if [ "$1" = "--version" ]; then echo "fake-c++ 1.0"; exit 0; fi
echo build >> "{calls}"
{fail}
while [ $# -gt 0 ]; do
  if [ "$1" = "-o" ]; then echo library > "$2"; fi
  shift
done
"""


def _fake_compiler(tmp_path, fail=False):
    path = tmp_path / "fake-c++"
    path.write_text(FAKE.format(calls=tmp_path / "calls", fail='echo "no such header" >&2; exit 1' if fail else ""))
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def _builds(tmp_path):
    calls = tmp_path / "calls"
    return len(calls.read_text().splitlines()) if calls.exists() else 0


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ZEN_WOQ_CACHE", str(root))
    return root


def test_a_build_lands_whole_in_its_key_folder_and_is_found_there_next_time(tmp_path, cache_root):
    compiler = _fake_compiler(tmp_path)
    built = native._build(compiler)
    assert built == cache_root / "native" / native._key(compiler) / native.LIBRARY
    assert built.read_text() == "library\n" and _builds(tmp_path) == 1
    assert sorted(p.name for p in (cache_root / "native").iterdir()) == sorted([built.parent.name, f".{built.parent.name}.lock"])
    assert native._build(compiler) == built and _builds(tmp_path) == 1


@pytest.mark.parametrize("leftover", ["an empty folder", "a folder of other files", "a file"])
def test_a_key_folder_without_the_library_is_built_again(tmp_path, cache_root, leftover):
    """Before, the rename into a folder that was not empty failed on every later build."""
    compiler = _fake_compiler(tmp_path)
    folder = cache_root / "native" / native._key(compiler)
    folder.parent.mkdir(parents=True)
    if leftover == "a file":
        folder.write_text("")
    else:
        folder.mkdir()
        if leftover == "a folder of other files":
            (folder / "core").write_text("a crashed build's")
            (folder / "obj").mkdir()
    built = native._build(compiler)
    assert built == folder / native.LIBRARY and built.read_text() == "library\n"
    assert os.listdir(folder) == [native.LIBRARY]
    assert native._build(compiler) == built and _builds(tmp_path) == 1


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path, cache_root):
    compiler = _fake_compiler(tmp_path, fail=True)
    with pytest.raises(RuntimeError, match="no such header"):
        native._build(compiler)
    assert [p.name for p in (cache_root / "native").iterdir()] == [f".{native._key(compiler)}.lock"]


@pytest.mark.skipif(native._compiler() is None, reason="no C++ compiler")
def test_the_source_compiles_with_the_real_command_on_any_cpu(cache_root):
    """About 40 s on two cores: the library is compiled for AVX-512 but never loaded here."""
    built = native._build(native._compiler())
    assert built.is_file() and built.stat().st_size > 0
