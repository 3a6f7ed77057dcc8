"""Sample files: type checks before any byte is read, content checksums, pseudonyms.

Every sample file is opened through :func:`open_regular` after :func:`ensure_file` has
checked its type, so a FIFO, a device (a link to ``/dev/zero``) or a socket is refused at
once instead of blocking or never ending. :func:`file_checksum` keys results on content
(a corrected file saved under the same name is scored again) and :func:`pseudonymous_id`
names a sample without revealing its file name. :func:`stamped_checksum` gives the
checksum with the file's :func:`file_stamp`, which later shows, without reading the file
again, that it still holds the bytes hashed (``score-batch`` hashes each file once).
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from pathlib import Path
from typing import BinaryIO

from blinaprofile.errors import InputError

__all__ = [
    "FileStamp",
    "ensure_file",
    "file_checksum",
    "file_stamp",
    "file_type_name",
    "open_regular",
    "pseudonymous_id",
    "stamped_checksum",
]

#: One version of a regular file, told without reading it: device, inode, size, and the
#: modification and status-change times (ns). Writing to the file or replacing it changes
#: it; the status-change time cannot be set back.
type FileStamp = tuple[int, int, int, int, int]

#: A file modified less than this long before it is hashed could be written again within
#: the same timestamp tick, unseen by its stamp: its stamp is not trusted ("racily clean").
RACY_SECONDS = 2.0


def file_type_name(mode: int) -> str:
    """What a ``st_mode`` is, in words (``"FIFO"``, ``"character device"``, ``"socket"``...).

    Parameters
    ----------
    mode
        ``os.stat_result.st_mode``.

    Returns
    -------
    str
        ``"regular file"``, ``"directory"``, ``"FIFO"``, ``"socket"``, ``"character device"``,
        ``"block device"``, ``"symbolic link"`` or ``"unknown file type"``.
    """

    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "unknown file type"


def ensure_file(path: str | os.PathLike[str], *, allow_dir: bool = True) -> Path:
    """Check, without opening it, that ``path`` is a sample file that can be read.

    Symbolic links are followed. Devices (``/dev/zero``), FIFOs and sockets are refused:
    reading one could block or never end.

    Parameters
    ----------
    path
        The sample's file.
    allow_dir
        Accept a folder (a 10x matrix folder for the single-cell path).

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    InputError
        ``"FILE: file not found"``, ``"FILE: not a regular file (FIFO)"``,
        ``"FILE: cannot access file: REASON"``.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise InputError("file not found", path=p) from None
    except (OSError, ValueError) as err:  # permission, symlink loop, NUL in the name...
        reason = getattr(err, "strerror", None) or str(err)
        raise InputError(f"cannot access file: {reason}", path=p) from None
    kind = file_type_name(st.st_mode)
    if kind == "regular file" or (allow_dir and kind == "directory"):
        return p
    raise InputError(f"not a regular file ({kind})", path=p)


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open a regular file for binary reading, refusing anything else without blocking.

    The file is opened non-blocking and checked on the open descriptor, so a FIFO or
    device put in place after :func:`ensure_file` is refused too (opening a FIFO for
    reading would otherwise wait for a writer forever).

    Parameters
    ----------
    path
        The file (symbolic links are followed).

    Returns
    -------
    BinaryIO
        The open file (blocking reads again); the caller closes it.

    Raises
    ------
    InputError
        The file is missing, not a regular file, or cannot be opened.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InputError("file not found", path=path) from None
    except OSError as err:
        ensure_file(path)  # a socket cannot be opened (ENXIO): say what it is
        raise InputError(f"cannot open file: {err.strerror or err}", path=path) from None
    try:
        kind = file_type_name(os.fstat(fd).st_mode)
        if kind != "regular file":
            raise InputError(f"not a regular file ({kind})", path=path)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_checksum(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (of every regular file below it, sorted, for a folder).

    The file type is checked before a byte is read, so a FIFO, a device (a link to
    ``/dev/zero``) or a socket is refused at once instead of blocking or never ending.

    Parameters
    ----------
    path
        A sample file, or a folder (10x matrix folder).

    Returns
    -------
    str
        64 hex digits.

    Raises
    ------
    InputError
        The file is missing, not a regular file (``"FILE: not a regular file (FIFO)"``)
        or cannot be read.
    """
    h = hashlib.sha256()
    p = ensure_file(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        with open_regular(f) as fh:
            try:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
            except OSError as err:
                raise InputError(f"cannot read file: {err.strerror or err}", path=f) from None
    return h.hexdigest()


def pseudonymous_id(checksum: str) -> str:
    """A sample ID that reveals nothing about the file: ``S-`` + 12 hex of its SHA-256."""
    return f"S-{checksum[:12]}"


def file_stamp(path: str | os.PathLike[str]) -> FileStamp | None:
    """The :data:`FileStamp` of a regular file (links followed); ``None`` for anything else
    (a folder, a FIFO...) or a file that cannot be examined."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stamped_checksum(path: str | os.PathLike[str]) -> tuple[str, FileStamp | None]:
    """:func:`file_checksum` and the file's :func:`file_stamp`, when the stamp can stand for
    the bytes hashed.

    The stamp is ``None`` (hash the file again to be sure of its content) for a folder, for
    a file whose stamp changed while it was hashed, and for one modified less than
    :data:`RACY_SECONDS` before: a later write within the same timestamp tick could leave
    the stamp unchanged. Otherwise, a file that shows the same stamp later holds the same
    bytes.

    Raises
    ------
    InputError
        As :func:`file_checksum`.
    """
    before = file_stamp(path)
    started = time.time_ns()
    digest = file_checksum(path)
    if before is None or file_stamp(path) != before:
        return digest, None
    if started - max(before[3], before[4]) < RACY_SECONDS * 1e9:
        return digest, None
    return digest, before
