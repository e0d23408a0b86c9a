"""Where things made once per machine live (checkpoints, built kernels), and the lock that makes
them once when several processes ask at the same time."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
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


def made_once(final: Path, make: Callable[[Path], None]) -> Path:
    """``final``, made by ``make(folder)`` the first time any process asks on this machine: under
    a lock, in a temporary folder renamed into place when complete, so a folder that is found is
    whole (one left half-made by a process that died holding the lock is removed)."""
    if final.is_dir():  # renamed into place only when complete
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with locked(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process made it while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            log.info("removing the unfinished %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        start = time.perf_counter()
        try:
            make(partial)
            os.chmod(partial, 0o755)  # mkdtemp made it private; a shared $ZEN_WOQ_CACHE is read by others
            os.rename(partial, final)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        log.info("made %s in %.1f s", final, time.perf_counter() - start)
    return final
