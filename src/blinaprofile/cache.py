"""A per-user cache of things derived from a model, so a new process need not redo them.

Scoring one sample in a fresh process should not pay for work that depends only on the
model: its pipelines in plain arrays (:mod:`blinaprofile.models.compiled`, no scikit-learn
import) and the training-cohort background of the report's cohort figure
(:mod:`blinaprofile.scoring.report`). Both are stored here, keyed by the SHA-256 of the
model files they come from (and the versions of what made them), so a changed model never
meets a stale entry.

Where: ``$BLINAPROFILE_CACHE_DIR``, else ``$XDG_CACHE_HOME/blinaprofile``, else
``~/.cache/blinaprofile``; never inside a model folder. ``BLINAPROFILE_CACHE_DIR=off`` (or
an empty value) turns the cache off: everything is then recomputed in every process.

The cache is best effort: an entry that cannot be read or written is simply recomputed, and
entries are written atomically, so a crash leaves no half-written file. Entries are plain
data (``.npz`` read without pickle, JSON); nothing in the cache is code. Delete the folder at
any time to reclaim the space (a model's entries take about a megabyte). The compiled model
arrays decide probabilities: the folder is trusted like the Python environment itself, so it
lives in the user's own cache folder by default.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = ["cache_dir", "file_digest", "memo_file", "read_entry", "write_entry"]

_OFF = {"", "0", "off", "false", "no", "none"}


def cache_dir() -> Path | None:
    """The cache folder, or ``None`` when caching is turned off."""
    env = os.environ.get("BLINAPROFILE_CACHE_DIR")
    if env is not None:
        return None if env.strip().lower() in _OFF else Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "blinaprofile"


def file_digest(paths: Iterable[str | os.PathLike[str]], *extra: str) -> str:
    """SHA-256 of the files' bytes (in order, each with its size) and of ``extra`` strings."""
    h = hashlib.sha256()
    for p in paths:
        data = Path(p).read_bytes()
        h.update(f"{len(data)}:".encode())
        h.update(data)
    for e in extra:
        h.update(b"\0" + e.encode("utf-8"))
    return h.hexdigest()


def _entry(kind: str, key: str) -> Path | None:
    root = cache_dir()
    return None if root is None else root / kind / key


def read_entry(kind: str, key: str) -> bytes | None:
    """The bytes stored under ``kind/key``, or ``None`` (absent, unreadable, cache off)."""
    path = _entry(kind, key)
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None


def write_entry(kind: str, key: str, data: bytes) -> Path | None:
    """Store ``data`` under ``kind/key`` atomically; ``None`` if it could not be written."""
    from blinaprofile.errors import OutputError
    from blinaprofile.io.atomic import atomic_path

    path = _entry(kind, key)
    if path is None:
        return None
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OutputError:
        return None
    return path


_MEMO: dict[tuple[str, str, int, int], Any] = {}
_MEMO_LOCK = threading.Lock()


def memo_file[T](kind: str, path: str | os.PathLike[str], load: Callable[[Path], T]) -> T:
    """``load(path)``, done once per process and version of the file (size, mtime).

    For small files read for every sample of a batch (the gating strategy, the panel):
    parsing their YAML again for each sample cost more than gating it. ``kind`` names what
    ``load`` makes; the result is shared, so callers must not change it. A file that cannot
    be examined is passed to ``load`` as it is (which reports the problem).
    """
    p = Path(path)
    try:
        st = p.stat()
        key = (kind, str(p.resolve()), st.st_size, st.st_mtime_ns)
    except OSError:
        return load(p)
    with _MEMO_LOCK:
        if key in _MEMO:
            return _MEMO[key]
    value = load(p)
    with _MEMO_LOCK:
        if len(_MEMO) > 64:
            _MEMO.clear()
        _MEMO[key] = value
    return value
