"""A fast, strict reader for FCS (Flow Cytometry Standard) files.

Only numpy is used. :func:`read_fcs` supports FCS 2.0, 3.0 and 3.1 (and 3.2, which
is read like 3.1), list-mode data (``$MODE L``) of type ``F`` (float32), ``D``
(float64) and ``I`` (unsigned integers of 8, 16, 32 or 64 bits, masked by ``$PnR``
as the standard prescribes), in either byte order. :func:`blinaprofile.io.fcs_write.write_fcs`
writes FCS 3.1 float32 little-endian files.

Every problem with the bytes of a file is reported as :class:`~blinaprofile.errors.FCSFormatError`
(a missing or unreadable file as :class:`~blinaprofile.errors.InputError`) whose message
names the problem precisely; no other exception escapes :func:`read_fcs`, whatever
the file contains. Allocations are bounded by the size of the file, so a TEXT
segment that lies (``$TOT`` of 10**15, say) is rejected before any memory is taken.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from blinaprofile.errors import FCSFormatError, InputError, PanelMismatchError

#: Versions :func:`read_fcs` accepts (the HEADER's first six bytes, without ``FCS``).
SUPPORTED_VERSIONS: tuple[str, ...] = ("2.0", "3.0", "3.1", "3.2")

#: Default limit on the length (in characters) of one keyword value.
DEFAULT_MAX_KEYWORD_LENGTH = 10_000

HEADER_LENGTH = 58
# The HEADER holds offsets in 8 ASCII digits; larger offsets are written as 0 there
# and given only in $BEGINDATA/$ENDDATA (FCS 3.0 and later).
HEADER_OFFSET_LIMIT = 99_999_999
# Integers in TEXT longer than this many digits are rejected (also keeps int() safe).
_MAX_INT_DIGITS = 18
# Events are converted in chunks of about this many bytes (fits in L2 cache).
_CHUNK_BYTES = 1 << 20
_SPILLOVER_KEYWORDS = ("$SPILLOVER", "SPILL", "$SPILL")
_MATRIX_KEYWORDS = frozenset({*_SPILLOVER_KEYWORDS, "$COMP"})
# Spillover/compensation values may be this many times max_keyword_length.
_MATRIX_LENGTH_FACTOR = 100
_PNN_RE = re.compile(r"\$P([1-9][0-9]*)N")
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a ZIP archive (xlsx/docx/zip)"),
    (b"\x89PNG", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"\x89HDF", "an HDF5 file (h5ad?)"),
    (b"GIF8", "a GIF image"),
    (b"<?xml", "an XML document"),
)


@dataclass(eq=False)
class FCSData:
    """The first dataset of an FCS file.

    Attributes
    ----------
    path
        The file it was read from.
    version
        The FCS version from the HEADER, e.g. ``"3.1"``.
    channels
        The ``$PnN`` short channel names, in file order (unique).
    markers
        The ``$PnS`` names (usually the marker/antibody), ``""`` where absent.
    events
        ``n_events x n_channels`` C-contiguous array of the requested dtype. Empty
        (zero rows) when the file has no events or was read with ``only_text=True``.
    keywords
        Every TEXT keyword, names upper-cased, values stripped of surrounding blanks.
    spillover
        ``(channel names, n x n matrix)`` from ``$SPILLOVER``, ``SPILL``, ``$SPILL`` or
        ``$COMP`` (first present), or ``None``.
    ranges
        ``$PnR`` per channel (``nan`` where absent, float data only).
    gains
        ``$PnG`` per channel, ``None`` where absent.
    decades
        ``$PnE`` per channel as ``(decades, offset)``, ``None`` where absent.
    n_nonfinite
        How many event values are NaN or infinite (they are kept; callers decide).
    warnings
        Notes about tolerated irregularities (extra DATA bytes, Latin-1 TEXT, ...).
    has_more_datasets
        True when ``$NEXTDATA`` points to another dataset, which was not read.
    only_text
        True when read with ``only_text=True`` (events were not loaded).
    declared_events
        The number of events the file declares (``$TOT``).
    """

    path: str
    version: str
    channels: list[str]
    markers: list[str]
    events: npt.NDArray[Any]
    keywords: dict[str, str]
    spillover: tuple[list[str], npt.NDArray[np.float64]] | None = None
    ranges: list[float] = field(default_factory=list)
    gains: list[float | None] = field(default_factory=list)
    decades: list[tuple[float, float] | None] = field(default_factory=list)
    n_nonfinite: int = 0
    warnings: list[str] = field(default_factory=list)
    has_more_datasets: bool = False
    only_text: bool = False
    declared_events: int = 0

    @property
    def n_events(self) -> int:
        """Number of events (the declared ``$TOT`` when read with ``only_text=True``)."""
        if self.only_text:
            return self.declared_events
        return int(self.events.shape[0])

    @property
    def n_channels(self) -> int:
        """Number of channels (``$PAR``)."""
        return len(self.channels)

    def channel_index(self, name: str) -> int:
        """Return the column index of the channel whose ``$PnN`` is ``name``.

        Parameters
        ----------
        name
            The exact ``$PnN`` channel name.

        Returns
        -------
        int
            Zero-based column index into :attr:`events`.

        Raises
        ------
        PanelMismatchError
            If no channel has that name.
        """
        try:
            return self.channels.index(name)
        except ValueError:
            raise PanelMismatchError(
                f"channel {name!r} is not in this file (channels: {', '.join(self.channels)})",
                path=self.path,
            ) from None

    def __repr__(self) -> str:
        return (
            f"FCSData(path={self.path!r}, version={self.version!r}, "
            f"n_events={self.n_events}, n_channels={self.n_channels}, "
            f"dtype={self.events.dtype}, spillover={'yes' if self.spillover else 'no'}, "
            f"warnings={len(self.warnings)})"
        )


# --------------------------------------------------------------------------- reading


class _Ctx:
    """Per-file parsing context: the path (for messages) and collected warnings."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.warnings: list[str] = []

    def error(self, message: str) -> FCSFormatError:
        return FCSFormatError(message, path=self.path)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def _short(name: str, limit: int = 40) -> str:
    """Return ``name`` cut to ``limit`` characters (with an ellipsis) for messages."""
    return name if len(name) <= limit else name[:limit] + "..."


def _parse_int(ctx: _Ctx, value: str, what: str) -> int:
    """Parse a non-negative decimal integer from a TEXT value or HEADER field."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise ctx.error(f"{what} is not a non-negative integer: {_short(value)!r}")
    if len(text.lstrip("0")) > _MAX_INT_DIGITS:
        raise ctx.error(f"{what} is implausibly large: {_short(text)!r}")
    return int(text)


def _parse_float(ctx: _Ctx, value: str, what: str) -> float:
    """Parse a finite float from a TEXT value."""
    try:
        number = float(value.strip())
    except ValueError:
        raise ctx.error(f"{what} is not a number: {_short(value)!r}") from None
    if not math.isfinite(number):
        raise ctx.error(f"{what} is not a finite number: {_short(value)!r}")
    return number


def _describe_non_fcs(head: bytes) -> str:
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return f" (looks like {kind})"
    sample = head[:64]
    if sample and all(32 <= b < 127 or b in (9, 10, 13) for b in sample):
        return " (looks like a text file, e.g. CSV)"
    return ""


def _parse_header(ctx: _Ctx, header: bytes, file_size: int) -> tuple[str, list[int]]:
    """Validate the HEADER; return the version and the six segment offsets."""
    if file_size == 0:
        raise ctx.error("not an FCS file: the file is empty (0 bytes)")
    if not header.startswith(b"FCS"):
        raise ctx.error(
            f"not an FCS file: header starts with {header[:4]!r}{_describe_non_fcs(header)}"
        )
    magic = header[:6]
    version = magic[3:].decode("ascii", errors="replace")
    if version not in SUPPORTED_VERSIONS:
        raise ctx.error(
            f"unsupported FCS version {magic!r} (supported: {', '.join(SUPPORTED_VERSIONS)})"
        )
    if len(header) < HEADER_LENGTH:
        raise ctx.error(
            f"HEADER is {len(header)} bytes but an FCS HEADER needs {HEADER_LENGTH} (truncated?)"
        )
    names = ("TEXT start", "TEXT end", "DATA start", "DATA end", "ANALYSIS start", "ANALYSIS end")
    offsets: list[int] = []
    for i, name in enumerate(names):
        raw = header[10 + 8 * i : 18 + 8 * i]
        text = raw.strip()
        if not text:
            offsets.append(0)
        elif text.isdigit():
            offsets.append(int(text))
        elif name.startswith("ANALYSIS"):
            ctx.warn(f"HEADER {name} offset {raw!r} is not a number; ANALYSIS ignored")
            offsets.append(0)
        else:
            raise ctx.error(f"HEADER {name} offset is not a number: {raw!r}")
    return version, offsets


def _split_text(ctx: _Ctx, raw: bytes) -> list[bytes]:
    """Split a TEXT segment (first byte = delimiter) into fields, undoubling delimiters."""
    delim = raw[:1]
    n = len(raw)
    fields: list[bytes] = []
    current = bytearray()
    i = 1
    while i < n:
        j = raw.find(delim, i)
        if j < 0:
            current += raw[i:]
            i = n
            if bytes(current).strip(b" \t\r\n\x00"):
                fields.append(bytes(current))
                ctx.warn("TEXT segment does not end with its delimiter")
            current = bytearray()
            break
        current += raw[i:j]
        if j + 2 == n and raw[j + 1 : j + 2] == delim:
            # A doubled delimiter that ends the segment: an (illegal but common) empty
            # last value followed by the closing delimiter, e.g. ``/KEY//``.
            fields.append(bytes(current))
            fields.append(b"")
            current = bytearray()
            ctx.warn("TEXT segment ends with an empty keyword value")
            i = n
            break
        if j + 1 < n and raw[j + 1 : j + 2] == delim:
            current += delim  # doubled delimiter = one literal delimiter character
            i = j + 2
            continue
        fields.append(bytes(current))
        current = bytearray()
        i = j + 1
    if current:
        fields.append(bytes(current))
        ctx.warn("TEXT segment does not end with its delimiter")
    return fields


def _decode(ctx: _Ctx, token: bytes) -> str:
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        ctx.warn("TEXT segment is not valid UTF-8; non-UTF-8 fields were decoded as Latin-1")
        return token.decode("latin-1")


def _parse_text(
    ctx: _Ctx, raw: bytes, max_keyword_length: int, segment: str = "TEXT"
) -> dict[str, str]:
    """Parse a TEXT (or supplemental TEXT) segment into an upper-cased keyword dict."""
    if len(raw) < 2:
        raise ctx.error(f"{segment} segment is {len(raw)} byte(s) long; it holds no keywords")
    fields = _split_text(ctx, raw)
    if len(fields) % 2:
        # never quote the fields: with a value lost, names and values shift and a quoted
        # "keyword" may be a patient identifier
        raise ctx.error(
            f"{segment} segment has an odd number of fields ({len(fields)}): a keyword has "
            f"no value (an unescaped delimiter inside a value?)"
        )
    keywords: dict[str, str] = {}
    for k in range(0, len(fields), 2):
        name = _decode(ctx, fields[k]).strip().upper()
        value = _decode(ctx, fields[k + 1]).strip()
        if not name:
            raise ctx.error(
                f"{segment} segment contains an empty keyword name (field {k + 1} of {len(fields)})"
            )
        if len(name) > max_keyword_length:
            raise ctx.error(
                f"keyword name {_short(name)!r} is {len(name)} characters long, more than "
                f"max_keyword_length={max_keyword_length}"
            )
        limit = max_keyword_length
        if name in _MATRIX_KEYWORDS:
            # n names + n*n numbers: a 40-colour spectral matrix alone is ~40,000 characters.
            limit = max_keyword_length * _MATRIX_LENGTH_FACTOR
        if len(value) > limit:
            raise ctx.error(
                f"keyword {_short(name)!r} has a value of {len(value)} characters, more than "
                f"the limit of {limit} (max_keyword_length={max_keyword_length})"
            )
        if name in keywords:
            if keywords[name] != value:
                if name.startswith("$"):
                    raise ctx.error(
                        f"keyword {_short(name)!r} appears more than once with different values"
                    )
                ctx.warn(
                    f"keyword {_short(name)!r} appears more than once with different values; "
                    f"kept the first"
                )
            continue
        keywords[name] = value
    return keywords


def _byte_order(ctx: _Ctx, value: str) -> str:
    """Return '<' or '>' for a $BYTEORD value."""
    parts = [p.strip() for p in value.split(",")]
    if all(p.isascii() and p.isdigit() and len(p) <= 2 for p in parts) and len(parts) in (
        1,
        2,
        4,
        8,
    ):
        numbers = [int(p) for p in parts]
        ascending = list(range(1, len(numbers) + 1))
        if numbers == ascending:
            return "<"
        if numbers == ascending[::-1]:
            return ">"
    raise ctx.error(
        f"unsupported $BYTEORD {_short(value)!r} (only 1,2,3,4 little-endian and "
        f"4,3,2,1 big-endian are supported)"
    )


def _parse_spillover(
    ctx: _Ctx, keyword: str, value: str, channels: Sequence[str]
) -> tuple[list[str], npt.NDArray[np.float64]] | None:
    """Parse ``n,name_1..name_n,v_11,v_12..v_nn`` (row-major) into names and matrix."""
    parts = [p.strip() for p in value.split(",")]
    n = _parse_int(ctx, parts[0], f"{keyword} channel count n")
    if n == 0:
        ctx.warn(f"{keyword} declares 0 channels; no spillover matrix")
        return None
    rest = len(parts) - 1
    named = rest == n + n * n
    if not named:
        # FCS 3.0 $COMP may omit the names: n followed by n*n values for the first n channels.
        if keyword == "$COMP" and rest == n * n and n <= len(channels):
            ctx.warn("$COMP has no channel names; assumed it covers the first n channels")
            names = list(channels[:n])
            values = parts[1:]
        else:
            raise ctx.error(
                f"{keyword} declares n={n} channels, so it needs {n + n * n} comma-separated "
                f"fields after n ({n} names and {n * n} values) but has {rest}"
            )
    else:
        names = parts[1 : 1 + n]
        values = parts[1 + n :]
    for idx, name in enumerate(names):
        if not name:
            raise ctx.error(f"{keyword} channel name {idx + 1} of {n} is empty")
    duplicates = sorted(x for x, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ctx.error(
            f"{keyword} names a channel more than once: {_short(', '.join(duplicates), 200)}"
        )
    matrix = np.empty(n * n, dtype=np.float64)
    for idx, text in enumerate(values):
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            row, col = divmod(idx, n)
            raise ctx.error(
                f"{keyword} value {_short(text)!r} at row {row + 1}, column {col + 1} "
                f"is not a finite number"
            )
        matrix[idx] = number
    missing = [x for x in names if x not in channels]
    if missing:
        ctx.warn(f"{keyword} names channels that are not in $PnN: {', '.join(missing)}")
    return names, matrix.reshape(n, n)


def _read_at(ctx: _Ctx, fh: io.BufferedReader, offset: int, length: int, what: str) -> bytes:
    fh.seek(offset)
    data = fh.read(length)
    if len(data) != length:
        raise ctx.error(
            f"{what} should be {length} bytes at byte {offset} but only {len(data)} could be "
            f"read (truncated?)"
        )
    return data


def _resolve_data_offsets(
    ctx: _Ctx, header_start: int, header_end: int, keywords: Mapping[str, str]
) -> tuple[int, int]:
    """Return the DATA segment (start, end) from the HEADER or $BEGINDATA/$ENDDATA."""
    kw_start = kw_end = None
    if "$BEGINDATA" in keywords:
        kw_start = _parse_int(ctx, keywords["$BEGINDATA"], "$BEGINDATA")
    if "$ENDDATA" in keywords:
        kw_end = _parse_int(ctx, keywords["$ENDDATA"], "$ENDDATA")
    if header_start == 0 and header_end == 0:
        if kw_start is None or kw_end is None:
            return 0, 0  # no DATA offsets anywhere; fine only if there are no events
        return kw_start, kw_end
    if (kw_start is not None and kw_start != header_start) or (
        kw_end is not None and kw_end != header_end
    ):
        ctx.warn(
            f"HEADER DATA offsets ({header_start}-{header_end}) differ from "
            f"$BEGINDATA/$ENDDATA ({kw_start}-{kw_end}); used the HEADER"
        )
    return header_start, header_end


def _check_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    out = np.dtype(dtype)
    if out.kind != "f":
        raise ValueError(f"read_fcs dtype must be a floating-point dtype, not {out}")
    return out


def read_fcs(
    path: str | os.PathLike[str],
    *,
    dtype: npt.DTypeLike = np.float64,
    max_keyword_length: int = DEFAULT_MAX_KEYWORD_LENGTH,
    only_text: bool = False,
) -> FCSData:
    """Read the first dataset of an FCS 2.0/3.0/3.1 file.

    Parameters
    ----------
    path
        The FCS file.
    dtype
        Floating-point dtype of the returned events (``float64`` or ``float32``).
    max_keyword_length
        Longest keyword value (and name) accepted, in characters. Spillover and
        compensation matrices ($SPILLOVER, SPILL, $SPILL, $COMP) may be 100 times
        longer, since a spectral panel's matrix alone takes tens of thousands.
    only_text
        Parse and validate HEADER and TEXT (including the DATA segment's offsets and
        size) but do not load the events; :attr:`FCSData.events` is then empty and
        :attr:`FCSData.n_events` reports ``$TOT``.

    Returns
    -------
    FCSData
        Channels, markers, events, keywords, spillover and per-channel metadata.

    Raises
    ------
    InputError
        If the file does not exist, is not a regular file or cannot be read.
    FCSFormatError
        If the file is not a valid FCS file this reader supports; the message names
        the problem.
    ValueError
        If ``dtype`` is not a floating-point dtype.
    """
    out_dtype = _check_dtype(dtype)
    path_str = os.fspath(path)
    try:
        st = os.stat(path_str)
    except FileNotFoundError:
        raise InputError("file not found", path=path_str) from None
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InputError(f"cannot access file: {reason}", path=path_str) from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise InputError(f"not a regular file (it is {kind})", path=path_str)
    ctx = _Ctx(path_str)
    try:
        with open(path_str, "rb") as fh:
            return _read_open_file(ctx, fh, out_dtype, max_keyword_length, only_text)
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", path=path_str) from None
    except MemoryError:
        raise ctx.error("not enough memory to load the events") from None


def _read_open_file(
    ctx: _Ctx,
    fh: io.BufferedReader,
    out_dtype: np.dtype[Any],
    max_keyword_length: int,
    only_text: bool,
) -> FCSData:
    file_size = os.fstat(fh.fileno()).st_size
    header = fh.read(HEADER_LENGTH)
    version, offsets = _parse_header(ctx, header, file_size)
    text_start, text_end, h_data_start, h_data_end = offsets[:4]

    # ---- TEXT
    if text_start < HEADER_LENGTH:
        raise ctx.error(
            f"HEADER says TEXT starts at byte {text_start}, inside the {HEADER_LENGTH}-byte HEADER"
        )
    if text_end < text_start:
        raise ctx.error(
            f"HEADER says TEXT ends at byte {text_end}, before it starts ({text_start})"
        )
    if text_end >= file_size:
        raise ctx.error(
            f"TEXT segment ends at byte {text_end} but the file has {file_size} bytes (truncated?)"
        )
    raw_text = _read_at(ctx, fh, text_start, text_end - text_start + 1, "TEXT segment")
    keywords = _parse_text(ctx, raw_text, max_keyword_length)
    _merge_supplemental_text(ctx, fh, file_size, raw_text[:1], keywords, max_keyword_length)

    # ---- required keywords
    def required(name: str) -> str:
        if name not in keywords:
            raise ctx.error(f"required keyword {name} is missing from the TEXT segment")
        return keywords[name]

    mode = keywords.get("$MODE")
    if mode is None:
        ctx.warn("$MODE is missing; assumed list mode (L)")
    elif mode.upper() != "L":
        raise ctx.error(f"unsupported $MODE {_short(mode)!r}: only list mode (L) is supported")
    datatype = required("$DATATYPE").upper()
    if datatype not in ("I", "F", "D"):
        kind = {"A": " (ASCII)"}.get(datatype, "")
        raise ctx.error(
            f"unsupported $DATATYPE {_short(datatype)!r}{kind}: only I, F and D are supported"
        )
    par = _parse_int(ctx, required("$PAR"), "$PAR")
    if par < 1:
        raise ctx.error(f"$PAR must be at least 1, got {par}")

    present = {int(m.group(1)) for key in keywords if (m := _PNN_RE.fullmatch(key))}
    n_present = sum(1 for i in present if i <= par)
    if n_present < par:
        missing = list(
            itertools.islice((f"$P{i}N" for i in range(1, par + 1) if i not in present), 5)
        )
        more = ", ..." if par - n_present > len(missing) else ""
        raise ctx.error(
            f"TEXT segment says $PAR={par} but only {n_present} $PnN keywords are present "
            f"(missing {', '.join(missing)}{more})"
        )
    if any(i > par for i in present):
        extra = sorted(i for i in present if i > par)[:5]
        ctx.warn(
            f"TEXT segment has $PnN keywords beyond $PAR={par} "
            f"({', '.join(f'$P{i}N' for i in extra)}); ignored"
        )

    channels, markers, widths, ranges, gains, decades = _parameters(ctx, keywords, par, datatype)
    duplicates = sorted(c for c, count in Counter(channels).items() if count > 1)
    if duplicates:
        positions: dict[str, list[str]] = {c: [] for c in duplicates[:5]}
        for i, x in enumerate(channels, start=1):
            if x in positions and len(positions[x]) < 6:
                positions[x].append(f"$P{i}N" if len(positions[x]) < 5 else "...")
        where = "; ".join(f"{c!r} ({', '.join(p)})" for c, p in positions.items())
        more = f" and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        raise ctx.error(f"duplicate channel names in $PnN: {where}{more}")

    order = "<"
    bytes_per_event = sum(widths) // 8
    if any(w > 8 for w in widths):
        order = _byte_order(ctx, required("$BYTEORD"))
    elif "$BYTEORD" in keywords:
        order = _byte_order(ctx, keywords["$BYTEORD"])

    nextdata = _parse_int(ctx, keywords.get("$NEXTDATA", "0"), "$NEXTDATA")
    if nextdata > 0:
        ctx.warn(
            f"file holds more than one dataset ($NEXTDATA={nextdata}); only the first was read"
        )

    spillover = None
    for key in (*_SPILLOVER_KEYWORDS, "$COMP"):
        if key in keywords:
            spillover = _parse_spillover(ctx, key, keywords[key], channels)
            break

    # ---- DATA
    data_start, data_end = _resolve_data_offsets(ctx, h_data_start, h_data_end, keywords)
    if "$TOT" in keywords:
        tot = _parse_int(ctx, keywords["$TOT"], "$TOT")
    else:
        tot = _infer_tot(ctx, version, data_start, data_end, bytes_per_event)
    needed = tot * bytes_per_event
    if needed > 0:
        _check_data_segment(ctx, data_start, data_end, file_size, needed, tot, par)

    n_nonfinite = 0
    if only_text or tot == 0:
        events = np.empty((0, par), dtype=out_dtype)
    else:
        fh.seek(data_start)
        # NaN/inf (even signalling NaNs) are kept and counted, not warned about.
        with np.errstate(all="ignore"):
            events, n_nonfinite = _read_events(
                ctx, fh, datatype, order, widths, ranges, tot, out_dtype
            )
    return FCSData(
        path=ctx.path,
        version=version,
        channels=channels,
        markers=markers,
        events=events,
        keywords=keywords,
        spillover=spillover,
        ranges=ranges,
        gains=gains,
        decades=decades,
        n_nonfinite=n_nonfinite,
        warnings=ctx.warnings,
        has_more_datasets=nextdata > 0,
        only_text=only_text,
        declared_events=tot,
    )


def _merge_supplemental_text(
    ctx: _Ctx,
    fh: io.BufferedReader,
    file_size: int,
    delimiter: bytes,
    keywords: dict[str, str],
    max_keyword_length: int,
) -> None:
    """Add keywords from a supplemental TEXT segment ($BEGINSTEXT/$ENDSTEXT), if any."""
    start_text = keywords.get("$BEGINSTEXT", "0")
    end_text = keywords.get("$ENDSTEXT", "0")
    start = _parse_int(ctx, start_text, "$BEGINSTEXT")
    end = _parse_int(ctx, end_text, "$ENDSTEXT")
    if start == 0 and end == 0:
        return
    if start < HEADER_LENGTH or end < start or end >= file_size:
        raise ctx.error(
            f"supplemental TEXT segment ($BEGINSTEXT={start}, $ENDSTEXT={end}) lies outside "
            f"the file's {file_size} bytes"
        )
    raw = _read_at(ctx, fh, start, end - start + 1, "supplemental TEXT segment")
    if raw[:1] != delimiter:
        raw = delimiter + raw  # some writers omit the leading delimiter
    extra = _parse_text(ctx, raw, max_keyword_length, segment="supplemental TEXT")
    for name, value in extra.items():
        if name not in keywords:
            keywords[name] = value
        elif keywords[name] != value:
            ctx.warn(f"supplemental TEXT repeats keyword {_short(name)!r}; kept the primary value")


def _parameters(
    ctx: _Ctx, keywords: Mapping[str, str], par: int, datatype: str
) -> tuple[
    list[str],
    list[str],
    list[int],
    list[float],
    list[float | None],
    list[tuple[float, float] | None],
]:
    """Collect and validate the per-parameter keywords $PnN/S/B/R/G/E."""
    channels: list[str] = []
    markers: list[str] = []
    widths: list[int] = []
    ranges: list[float] = []
    gains: list[float | None] = []
    decades: list[tuple[float, float] | None] = []
    expected = {"F": 32, "D": 64}.get(datatype)
    for i in range(1, par + 1):
        name = keywords[f"$P{i}N"]
        if not name:
            raise ctx.error(f"$P{i}N is empty (every channel needs a name)")
        channels.append(name)
        markers.append(keywords.get(f"$P{i}S", ""))

        if f"$P{i}B" not in keywords:
            raise ctx.error(f"$P{i}B is missing (every parameter needs a bit width)")
        width_text = keywords[f"$P{i}B"]
        width = _parse_int(ctx, width_text, f"$P{i}B") if width_text != "*" else -1
        if expected is not None and width != expected:
            raise ctx.error(
                f"$DATATYPE {datatype} needs $PnB={expected} but $P{i}B={_short(width_text)}"
            )
        if width not in (8, 16, 32, 64):
            raise ctx.error(
                f"$P{i}B={_short(width_text)} is not supported: integer bit widths must be "
                f"8, 16, 32 or 64"
            )
        widths.append(width)

        range_text = keywords.get(f"$P{i}R")
        if range_text is None:
            if datatype == "I":
                raise ctx.error(f"$P{i}R is missing (integer data needs a range)")
            ctx.warn(f"$P{i}R is missing")
            ranges.append(math.nan)
        else:
            ranges.append(_parse_float(ctx, range_text, f"$P{i}R"))

        gain_text = keywords.get(f"$P{i}G")
        gains.append(None if gain_text is None else _parse_float(ctx, gain_text, f"$P{i}G"))

        e_text = keywords.get(f"$P{i}E")
        if e_text is None:
            decades.append(None)
        else:
            pieces = e_text.split(",")
            if len(pieces) != 2:
                raise ctx.error(
                    f"$P{i}E must be two comma-separated numbers (decades,offset), "
                    f"got {_short(e_text)!r}"
                )
            decades.append(
                (
                    _parse_float(ctx, pieces[0], f"$P{i}E decades"),
                    _parse_float(ctx, pieces[1], f"$P{i}E offset"),
                )
            )
    return channels, markers, widths, ranges, gains, decades


def _infer_tot(ctx: _Ctx, version: str, start: int, end: int, bytes_per_event: int) -> int:
    """FCS 2.0 does not require $TOT: derive it from the DATA segment size."""
    if version != "2.0":
        raise ctx.error("required keyword $TOT is missing from the TEXT segment")
    length = end - start + 1 if end >= start and (start or end) else 0
    if length % bytes_per_event:
        raise ctx.error(
            f"$TOT is missing and the DATA segment ({length} bytes) is not a whole number "
            f"of {bytes_per_event}-byte events"
        )
    ctx.warn("$TOT is missing; the event count was derived from the DATA segment size")
    return length // bytes_per_event


def _check_data_segment(
    ctx: _Ctx, start: int, end: int, file_size: int, needed: int, tot: int, par: int
) -> None:
    """Check that the DATA segment exists, fits in the file and holds ``needed`` bytes."""
    if start == 0 and end == 0:
        raise ctx.error(
            f"$TOT={tot} events but neither the HEADER nor $BEGINDATA/$ENDDATA give the "
            f"DATA segment's offsets"
        )
    if start < HEADER_LENGTH:
        raise ctx.error(
            f"DATA segment starts at byte {start}, inside the {HEADER_LENGTH}-byte HEADER"
        )
    if start >= file_size:
        raise ctx.error(
            f"DATA segment starts at byte {start} but the file has {file_size} bytes (truncated?)"
        )
    if end < start:
        raise ctx.error(f"DATA segment ends at byte {end}, before it starts ({start})")
    length = end - start + 1
    if length < needed:
        raise ctx.error(
            f"DATA segment holds {length} bytes but $TOT={tot} events x $PAR={par} channels "
            f"need {needed} bytes (truncated, or $TOT too large)"
        )
    if end >= file_size:
        if start + needed > file_size:
            raise ctx.error(
                f"DATA segment ends at byte {end} but the file has {file_size} bytes (truncated?)"
            )
        ctx.warn(
            f"DATA segment end offset {end} is past the end of the file ({file_size} bytes) "
            f"but the events fit; read the {needed} bytes needed"
        )
    elif length > needed:
        ctx.warn(
            f"DATA segment holds {length} bytes, {length - needed} more than $TOT={tot} x "
            f"$PAR={par} needs; the extra bytes were ignored"
        )


def _readinto_exact(ctx: _Ctx, fh: io.BufferedReader, target: npt.NDArray[np.uint8]) -> None:
    """Fill ``target`` (a flat uint8 array) from the file's current position."""
    view = memoryview(target)
    filled = 0
    while filled < len(view):
        got = fh.readinto(view[filled:])
        if not got:
            raise ctx.error(
                f"DATA segment ended after {fh.tell()} bytes of the file while "
                f"{len(view) - filled} more bytes were expected (truncated?)"
            )
        filled += got


def _read_events(
    ctx: _Ctx,
    fh: io.BufferedReader,
    datatype: str,
    order: str,
    widths: Sequence[int],
    ranges: Sequence[float],
    tot: int,
    out_dtype: np.dtype[Any],
) -> tuple[npt.NDArray[Any], int]:
    """Read ``tot`` events from the file's current position into a C-contiguous array.

    Data already in the requested layout are read straight into the result; anything
    else (byte swapping, widening, bit masking) is converted in cache-sized chunks,
    so memory use stays at the result plus one small buffer.

    Returns
    -------
    tuple
        The ``tot x n_channels`` events and the number of NaN/infinite values.
    """
    par = len(widths)
    out = np.empty((tot, par), dtype=out_dtype)
    bytes_per_event = sum(widths) // 8
    masks = (
        [None] * par
        if datatype != "I"
        else [_int_mask(w, r) for w, r in zip(widths, ranges, strict=True)]
    )
    uniform = len(set(widths)) == 1
    if datatype == "I":
        if uniform:
            source = np.dtype(f"{order}u{widths[0] // 8}")
        else:
            fields = [f"c{i}" for i in range(par)]
            source = np.dtype({"names": fields, "formats": [f"{order}u{w // 8}" for w in widths]})
    else:
        source = np.dtype(f"{order}f{widths[0] // 8}")
    if uniform and source == out_dtype and all(m is None for m in masks):
        _readinto_exact(ctx, fh, out.reshape(-1).view(np.uint8))
        return out, _count_nonfinite(out)

    mask_row = None
    if uniform and any(m is not None for m in masks):
        full = (1 << widths[0]) - 1
        mask_row = np.array([full if m is None else m for m in masks], dtype=source)
    rows_per_chunk = max(1, _CHUNK_BYTES // bytes_per_event)
    buffer = np.empty(min(tot, rows_per_chunk) * bytes_per_event, dtype=np.uint8)
    n_nonfinite = 0
    for first in range(0, tot, rows_per_chunk):
        last = min(tot, first + rows_per_chunk)
        raw = buffer[: (last - first) * bytes_per_event]
        _readinto_exact(ctx, fh, raw)
        target = out[first:last]
        if uniform:
            values = raw.view(source).reshape(last - first, par)
            target[...] = values if mask_row is None else values & mask_row
        else:
            table = raw.view(source)
            for i, name in enumerate(table.dtype.names or ()):
                column = table[name]
                mask = masks[i]
                target[:, i] = column if mask is None else column & column.dtype.type(mask)
        if datatype != "I":  # integers are always finite; count while the chunk is cached
            n_nonfinite += _count_nonfinite(target)
    return out, n_nonfinite


def _int_mask(width: int, prange: float) -> int | None:
    """Bit mask for integer data: values use the bits needed for ``$PnR - 1``.

    The FCS standard says that for ``$DATATYPE I`` any bits above those needed to
    hold ``$PnR`` values (``0 .. PnR-1``, rounded up to a power of two) are to be
    ignored. Returns ``None`` when no masking is needed.
    """
    if not math.isfinite(prange) or prange < 1 or prange >= 2.0**width:
        return None
    top = max(math.ceil(prange) - 1, 1)
    bits = top.bit_length()
    if bits >= width:
        return None
    return (1 << bits) - 1


def _count_nonfinite(events: npt.NDArray[Any]) -> int:
    if events.size == 0:
        return 0
    # Fast path: a float64 sum of finite values is finite unless a value is NaN/inf
    # (or the sum overflows, in which case the exact count below is taken anyway).
    with np.errstate(over="ignore", invalid="ignore"):
        total = events.sum(dtype=np.float64)
    if math.isfinite(float(total)):
        return 0
    return int(events.size - np.count_nonzero(np.isfinite(events)))


# --------------------------------------------------------------------------- writing
