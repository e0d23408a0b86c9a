"""Race timings are measured once per machine and kept: a new process decides the same way, so
its graphs are the same and Inductor's compile cache hits."""

import json
import os

import pytest
import torch

from zen_woq_pass import timings


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEN_WOQ_CACHE", str(tmp_path))
    return tmp_path


class _Stopwatch:
    """A race's measurement that counts its runs and returns made-up times."""

    def __init__(self, times):
        self.times, self.runs = times, 0

    def __call__(self):
        self.runs += 1
        return self.times


def test_a_race_is_measured_once_and_kept_in_the_cache_folder(cache_dir):
    first, again = _Stopwatch([0.2, 0.1]), _Stopwatch([0.1, 0.2])
    assert timings.remembered("M=1", ("a", 1), first) == (0.2, 0.1)
    assert timings.remembered("M=1", ("a", 1), again) == (0.2, 0.1)  # kept, not measured again
    assert (first.runs, again.runs) == (1, 0)
    assert timings.remembered("M=1", ("a", 2), again) == (0.1, 0.2)  # another key is its own race
    [file] = (cache_dir / "timings").glob("*.json")
    saved = json.loads(file.read_text())
    assert saved["machine"]["threads"] == torch.get_num_threads() and saved["machine"]["torch"] == torch.__version__
    assert set(saved["timings"]) == {"M=1 ('a', 1)", "M=1 ('a', 2)"}


def test_another_thread_count_or_zendnn_setting_measures_again(cache_dir, monkeypatch):
    timings.remembered("M=1", ("a",), _Stopwatch([1.0]))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert timings.remembered("M=1", ("a",), _Stopwatch([2.0])) == (2.0,)
    finally:
        torch.set_num_threads(threads)
    other = "1" if os.environ.get("ZENDNNL_MATMUL_ALGO") == "9" else "9"  # conftest may have set 9
    monkeypatch.setenv("ZENDNNL_MATMUL_ALGO", other)
    assert timings.remembered("M=1", ("a",), _Stopwatch([3.0])) == (3.0,)
    assert len(list((cache_dir / "timings").glob("*.json"))) == 3


def test_a_damaged_file_is_measured_again_and_rewritten(cache_dir):
    timings.path().parent.mkdir(parents=True)
    timings.path().write_text("{not json")
    stopwatch = _Stopwatch([0.5])
    assert timings.remembered("M=1", ("a",), stopwatch) == (0.5,) and stopwatch.runs == 1
    assert json.loads(timings.path().read_text())["timings"] == {"M=1 ('a',)": [0.5]}


def test_a_read_only_cache_folder_still_measures(cache_dir):
    (cache_dir / "timings").write_text("a file where the folder should be")
    assert timings.remembered("M=1", ("a",), _Stopwatch([0.5])) == (0.5,)
