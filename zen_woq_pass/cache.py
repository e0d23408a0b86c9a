"""Where things made once per machine live (checkpoints, built kernels), and the lock that makes
them once when several processes ask at the same time."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$ZEN_WOQ_CACHE``, else ``~/.cache/zen_woq_pass``."""
    return Path(cache_dir or os.environ.get("ZEN_WOQ_CACHE") or Path.home() / ".cache" / "zen_woq_pass")


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive ``flock`` on ``path``: excludes other processes and other threads alike (each
    ``open`` is its own lock owner)."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish %s", path.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
