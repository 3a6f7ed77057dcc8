"""Writing FCS 3.1 files (float32, little-endian) atomically: simulated cohorts, conversions and tests."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from blinaprofile.io.atomic import atomic_path
from blinaprofile.io.fcs import (
    DEFAULT_MAX_KEYWORD_LENGTH,
    HEADER_LENGTH,
    HEADER_OFFSET_LIMIT,
)

_WRITER_DELIMITER = "|"
_WRITER_MIN_RANGE = 262_144
_WRITER_STRUCTURAL = frozenset(
    {
        "$BEGINANALYSIS",
        "$ENDANALYSIS",
        "$BEGINSTEXT",
        "$ENDSTEXT",
        "$BEGINDATA",
        "$ENDDATA",
        "$BYTEORD",
        "$DATATYPE",
        "$MODE",
        "$NEXTDATA",
        "$PAR",
        "$TOT",
        "$SPILLOVER",
    }
)
_WRITER_PARAM_RE = re.compile(r"\$P[0-9]+[NBERS]")


def _escape(ctx_what: str, text: str) -> str:
    if text.startswith(_WRITER_DELIMITER):
        raise ValueError(
            f"{ctx_what} {text[:40]!r} starts with the delimiter {_WRITER_DELIMITER!r}, "
            f"which FCS cannot encode unambiguously"
        )
    return text.replace(_WRITER_DELIMITER, _WRITER_DELIMITER * 2)


def _encode_text(pairs: Sequence[tuple[str, str]]) -> bytes:
    d = _WRITER_DELIMITER
    parts = [d]
    for key, value in pairs:
        parts.append(_escape("keyword name", key))
        parts.append(d)
        parts.append(_escape(f"value of keyword {key}", value) if value.strip() else " ")
        parts.append(d)
    return "".join(parts).encode("utf-8")


def _format_float(value: float) -> str:
    """Shortest decimal that round-trips the float exactly."""
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def _validate_names(what: str, names: Sequence[str], n: int) -> list[str]:
    out = [str(x) for x in names]
    if len(out) != n:
        raise ValueError(f"{what} has {len(out)} entries but the events have {n} columns")
    return out


def write_fcs(
    path: str | os.PathLike[str],
    events: npt.ArrayLike,
    *,
    channels: Sequence[str],
    markers: Sequence[str] | None = None,
    spillover: tuple[Sequence[str], npt.ArrayLike] | None = None,
    keywords: Mapping[str, str | int | float] | None = None,
    atomic: bool = True,
) -> None:
    """Write events as an FCS 3.1 file (float32, little-endian, list mode).

    Parameters
    ----------
    path
        Destination file; replaced if it exists.
    events
        ``n_events x n_channels`` numeric array (stored as float32; NaN/inf are
        stored as is, finite values beyond the float32 range are refused).
    channels
        ``$PnN`` names, one per column, unique and non-empty.
    markers
        ``$PnS`` names, one per column; empty strings are omitted.
    spillover
        ``(channel names, n x n matrix)`` written as ``$SPILLOVER``; every name must be
        one of ``channels`` and contain no comma.
    keywords
        Extra TEXT keywords. Names must be printable ASCII and may not be one of the
        structural keywords the writer sets itself ($PAR, $TOT, $PnN/B/E/R/S,
        $SPILLOVER, offsets...). Values are written as ``str(value)``; surrounding
        blanks are not preserved (readers strip them).
    atomic
        Write to a temporary file in the same directory and ``os.replace`` it into
        place, so an interrupted write never leaves a partial file at ``path``.

    Raises
    ------
    ValueError
        If the arguments cannot be written as a valid FCS file.
    OSError
        If the file cannot be written.
    """
    array = np.asarray(events)
    if array.ndim != 2:
        raise ValueError(f"events must be a 2-D array (events x channels), got {array.ndim}-D")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"events must be numeric, got dtype {array.dtype}")
    n_events, n_channels = array.shape
    if n_channels < 1:
        raise ValueError("events must have at least one channel")
    names = _validate_names("channels", channels, n_channels)
    if any(not c.strip() or c != c.strip() for c in names):
        raise ValueError("channel names must be non-empty with no surrounding blanks")
    duplicates = sorted(c for c, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"duplicate channel names: {', '.join(duplicates)}")
    marker_names = (
        [""] * n_channels if markers is None else _validate_names("markers", markers, n_channels)
    )

    with np.errstate(over="ignore", invalid="ignore"):
        data = np.ascontiguousarray(array, dtype="<f4")
    if array.dtype.kind == "f" and n_events:
        with np.errstate(over="ignore", invalid="ignore"):
            overflow = np.isfinite(array) & ~np.isfinite(data)
        if overflow.any():
            raise ValueError("events contain finite values beyond the float32 range")

    pairs_fixed: list[tuple[str, str]] = [
        ("$BYTEORD", "1,2,3,4"),
        ("$DATATYPE", "F"),
        ("$MODE", "L"),
        ("$NEXTDATA", "0"),
        ("$PAR", str(n_channels)),
        ("$TOT", str(n_events)),
        ("$BEGINANALYSIS", "0"),
        ("$ENDANALYSIS", "0"),
        ("$BEGINSTEXT", "0"),
        ("$ENDSTEXT", "0"),
    ]
    maxima = _column_maxima(data)
    for i, name in enumerate(names, start=1):
        pairs_fixed.append((f"$P{i}N", name))
        pairs_fixed.append((f"$P{i}B", "32"))
        pairs_fixed.append((f"$P{i}E", "0,0"))
        pairs_fixed.append((f"$P{i}R", str(max(_WRITER_MIN_RANGE, math.ceil(maxima[i - 1])))))
        if marker_names[i - 1].strip():
            pairs_fixed.append((f"$P{i}S", marker_names[i - 1]))
    if spillover is not None:
        pairs_fixed.append(("$SPILLOVER", _format_spillover(spillover, names)))
    pairs_fixed.extend(_custom_keywords(keywords))

    text, header = _layout(pairs_fixed, data.nbytes)
    payload = (header, text, memoryview(data.reshape(-1).view(np.uint8)), b"00000000")
    if atomic:
        _write_payload(Path(os.fspath(path)), payload)
    else:
        with open(os.fspath(path), "wb") as fh:
            for part in payload:
                fh.write(part)


def _column_maxima(data: npt.NDArray[np.float32]) -> list[float]:
    if data.shape[0] == 0:
        return [0.0] * data.shape[1]
    finite = np.where(np.isfinite(data), data, np.float32(0))
    return [float(x) for x in finite.max(axis=0)]


def _format_spillover(spillover: tuple[Sequence[str], npt.ArrayLike], channels: list[str]) -> str:
    names = [str(x) for x in spillover[0]]
    matrix = np.asarray(spillover[1], dtype=np.float64)
    n = len(names)
    if n == 0 or matrix.shape != (n, n):
        raise ValueError(f"spillover matrix must be {n} x {n} for {n} names, got {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("spillover matrix contains NaN or infinite values")
    for name in names:
        if "," in name or not name.strip() or name != name.strip():
            raise ValueError(f"spillover channel name {name!r} is empty or contains a comma")
        if name not in channels:
            raise ValueError(f"spillover channel {name!r} is not one of the channels")
    if len(set(names)) != n:
        raise ValueError("spillover names a channel more than once")
    return ",".join([str(n), *names, *(_format_float(v) for v in matrix.ravel())])


def _custom_keywords(keywords: Mapping[str, str | int | float] | None) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for key, value in (keywords or {}).items():
        name = str(key)
        upper = name.upper()
        if not name or name != name.strip() or not all(32 <= ord(ch) < 127 for ch in name):
            raise ValueError(f"keyword name {name[:40]!r} must be non-empty printable ASCII")
        if upper in _WRITER_STRUCTURAL or _WRITER_PARAM_RE.fullmatch(upper):
            raise ValueError(f"keyword {name!r} is set by write_fcs itself and cannot be given")
        if upper in seen:
            raise ValueError(
                f"keyword {name!r} is given twice (keyword names are case-insensitive)"
            )
        seen.add(upper)
        text = str(value)
        if len(text) > DEFAULT_MAX_KEYWORD_LENGTH:
            raise ValueError(
                f"value of keyword {name[:40]!r} is {len(text)} characters; read_fcs refuses "
                f"values longer than {DEFAULT_MAX_KEYWORD_LENGTH} by default"
            )
        out.append((name, text))
    return out


def _layout(pairs: list[tuple[str, str]], n_data_bytes: int) -> tuple[bytes, bytes]:
    """Encode TEXT with correct $BEGINDATA/$ENDDATA and build the HEADER."""
    begin = end = 0
    for _ in range(10):
        text = _encode_text([*pairs, ("$BEGINDATA", str(begin)), ("$ENDDATA", str(end))])
        text_end = HEADER_LENGTH + len(text) - 1
        new_begin = text_end + 1 if n_data_bytes else 0
        new_end = new_begin + n_data_bytes - 1 if n_data_bytes else 0
        if (new_begin, new_end) == (begin, end):
            break
        begin, end = new_begin, new_end
    else:  # pragma: no cover - the digit count converges in a few rounds
        raise RuntimeError("could not lay out the FCS TEXT segment")
    if text_end > HEADER_OFFSET_LIMIT:
        raise ValueError("TEXT segment too large: it must end within the first 99,999,999 bytes")
    header_begin, header_end = (begin, end) if end <= HEADER_OFFSET_LIMIT else (0, 0)
    fields = (HEADER_LENGTH, text_end, header_begin, header_end, 0, 0)
    header = b"FCS3.1    " + b"".join(str(x).rjust(8).encode("ascii") for x in fields)
    return text, header


def _write_payload(path: Path, payload: Sequence[bytes | memoryview]) -> None:
    with atomic_path(path, fsync=True) as tmp, open(tmp, "wb") as fh:
        for part in payload:
            fh.write(part)
