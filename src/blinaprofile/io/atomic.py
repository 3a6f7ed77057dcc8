"""Atomic output: every file blinaprofile writes appears whole or not at all.

One mechanism for the whole package: :func:`atomic_path` yields a temporary name in the
destination folder; when the block finishes the file is moved over the destination with
``os.replace`` (atomic on POSIX), and when it fails the temporary file is removed and an
``OSError`` becomes an :class:`~blinaprofile.errors.OutputError` naming the path and the
reason (disk full, permission denied...), so the CLI exits 2 with one line.

:func:`write_csv` is the one CSV writer: it also neutralises spreadsheet formulas (cells
starting with ``=``, ``+``, ``-``, ``@``, tab or carriage return get a leading ``'``, the
OWASP rule for CSV injection) in text columns; numbers are written as numbers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blinaprofile.errors import OutputError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "atomic_path",
    "neutralise_formulas",
    "write_bytes",
    "write_csv",
    "write_text",
]

PathLike = str | os.PathLike[str]
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@contextlib.contextmanager
def atomic_path(path: PathLike, *, mkdir: bool = True, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it into place when the block succeeds.

    Parameters
    ----------
    path
        The destination file.
    mkdir
        Create the destination folder if missing.
    fsync
        Flush the file to disk before it is moved into place (resumable batch parts).

    Raises
    ------
    OutputError
        The folder cannot be created or written, or the block raised ``OSError``; the
        temporary file is gone and ``path`` is unchanged.
    """
    dest = Path(path)
    tmp: Path | None = None
    try:
        if mkdir:
            dest.parent.mkdir(parents=True, exist_ok=True)
        # a fresh hidden name the writer creates itself (so the umask applies, unlike mkstemp)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
        tmp = None
    except OSError as err:
        raise OutputError(f"cannot write: {err.strerror or err}", path=dest) from err
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def write_bytes(path: PathLike, data: bytes | bytearray | memoryview) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)


def neutralise_formulas(value: Any) -> Any:
    """``value`` with a leading ``'`` if it is text a spreadsheet would run as a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(df: pd.DataFrame, path: PathLike, *, index: bool = False) -> Path:
    """Write a table as CSV atomically, with spreadsheet formulas neutralised in text cells."""
    safe = df.copy()
    for col in safe.columns:
        if safe[col].dtype == object or str(safe[col].dtype) in ("string", "category"):
            safe[col] = safe[col].map(neutralise_formulas)
    if index and safe.index.dtype == object:
        safe.index = safe.index.map(neutralise_formulas)
    safe.columns = [neutralise_formulas(str(c)) for c in safe.columns]
    with atomic_path(path) as tmp:
        # CRLF rows (RFC 4180): a carriage return inside a cell is then quoted, so no
        # reader can start a new row (and a formula) in the middle of a cell
        safe.to_csv(tmp, index=index, lineterminator="\r\n")
    return Path(path)
