"""Notebook 00: files written safely: the cache folder where built models live, builds done once and renamed into
place, locks across processes, and atomic writes (a reader never sees half a file).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """Where built models live: $GPTJ_HELPERS_CACHE, else ~/.cache/gptj_helpers (notebook 00)."""
    return Path(os.environ.get("GPTJ_HELPERS_CACHE", Path.home() / ".cache" / "gptj_helpers"))


def build_atomically(final: Path, build) -> Path:
    """Run `build(tmp_dir)` once and rename the result to `final`; concurrent builders wait and share it (notebook
    00)."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(final.parent / f".{final.name}.lock"):
        if final.exists():  # another builder finished while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            build(tmp)
            try:
                os.rename(tmp, final)
            except OSError:  # a builder that did not take the lock (no fcntl) got there first
                if not final.exists():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return final


@contextlib.contextmanager


def build_lock(path: Path):
    """An exclusive lock on `path` across threads and processes (flock; without fcntl, on Windows, no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            Path(path).unlink(missing_ok=True)


def write_file(path: Path, data: bytes) -> None:
    """Write `data` under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
