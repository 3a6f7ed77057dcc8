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
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from blinaprofile.errors import InputError, PanelMismatchError
from blinaprofile.io.fcs_text import (
    SPILLOVER_KEYWORDS,
    ParseContext,
    byte_order,
    parse_float,
    parse_int,
    parse_spillover,
    parse_text,
    quote_value,
)

#: Versions :func:`read_fcs` accepts (the HEADER's first six bytes, without ``FCS``).
SUPPORTED_VERSIONS: tuple[str, ...] = ("2.0", "3.0", "3.1", "3.2")

#: Default limit on the length (in characters) of one keyword value.
DEFAULT_MAX_KEYWORD_LENGTH = 10_000

HEADER_LENGTH = 58
# The HEADER holds offsets in 8 ASCII digits; larger offsets are written as 0 there
# and given only in $BEGINDATA/$ENDDATA (FCS 3.0 and later).
HEADER_OFFSET_LIMIT = 99_999_999

#: How :func:`read_fcs` treats HEADER and ``$BEGINDATA``/``$ENDDATA`` DATA offsets that
#: disagree: refuse the file (``"strict"``) or trust one source.
DataOffsets = Literal["strict", "header", "text"]
#: The values ``data_offsets`` accepts.
DATA_OFFSET_CHOICES: tuple[DataOffsets, ...] = ("strict", "header", "text")
# Events are converted in chunks of about this many bytes (fits in L2 cache).
_CHUNK_BYTES = 1 << 20
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


def _describe_non_fcs(head: bytes) -> str:
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return f" (looks like {kind})"
    sample = head[:64]
    if sample and all(32 <= b < 127 or b in (9, 10, 13) for b in sample):
        return " (looks like a text file, e.g. CSV)"
    return ""


def _parse_header(ctx: ParseContext, header: bytes, file_size: int) -> tuple[str, list[int]]:
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


def _read_at(
    ctx: ParseContext, fh: io.BufferedReader, offset: int, length: int, what: str
) -> bytes:
    fh.seek(offset)
    data = fh.read(length)
    if len(data) != length:
        raise ctx.error(
            f"{what} should be {length} bytes at byte {offset} but only {len(data)} could be "
            f"read (truncated?)"
        )
    return data


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
    allow_tot_mismatch: bool = False,
    data_offsets: DataOffsets = "strict",
) -> FCSData:
    """Read the first dataset of an FCS 2.0/3.0/3.1 file.

    No event is silently lost and no byte outside the DATA segment is read as an event:
    ``$TOT`` must account for the whole DATA segment (a remainder smaller than one event
    is tolerated with a warning), the HEADER and ``$BEGINDATA``/``$ENDDATA`` must agree
    on where DATA is, and DATA must lie in the file, after the HEADER and apart from
    the TEXT segments. Tolerated irregularities are listed in :attr:`FCSData.warnings`.

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
    allow_tot_mismatch
        Accept a DATA segment that holds one or more events more than ``$TOT``: read
        the first ``$TOT`` events and record a warning saying how many were ignored.
        By default such a file is refused. DATA shorter than ``$TOT`` events is always
        refused.
    data_offsets
        Which DATA offsets to trust when the HEADER and ``$BEGINDATA``/``$ENDDATA``
        disagree: ``"strict"`` (default) refuses the file, ``"header"`` or ``"text"``
        uses that source and records a warning. The chosen segment is checked like any
        other (it may not overlap the HEADER or TEXT, nor end before the events do).

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
        If ``dtype`` is not a floating-point dtype or ``data_offsets`` is not one of
        :data:`DATA_OFFSET_CHOICES`.
    """
    out_dtype = _check_dtype(dtype)
    if data_offsets not in DATA_OFFSET_CHOICES:
        raise ValueError(
            f"read_fcs data_offsets must be one of {', '.join(DATA_OFFSET_CHOICES)}, "
            f"not {data_offsets!r}"
        )
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
    ctx = ParseContext(path_str)
    try:
        with open(path_str, "rb") as fh:
            return _read_open_file(
                ctx,
                fh,
                out_dtype,
                max_keyword_length=max_keyword_length,
                only_text=only_text,
                allow_tot_mismatch=allow_tot_mismatch,
                data_offsets=data_offsets,
            )
    except OSError as exc:
        raise InputError(f"cannot read file: {exc.strerror or exc}", path=path_str) from None
    except MemoryError:
        raise ctx.error("not enough memory to load the events") from None


def _read_open_file(
    ctx: ParseContext,
    fh: io.BufferedReader,
    out_dtype: np.dtype[Any],
    *,
    max_keyword_length: int,
    only_text: bool,
    allow_tot_mismatch: bool,
    data_offsets: DataOffsets,
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
    keywords = parse_text(ctx, raw_text, max_keyword_length)
    text_spans = [("TEXT", text_start, text_end)]
    stext = _merge_supplemental_text(ctx, fh, file_size, raw_text[:1], keywords, max_keyword_length)
    if stext is not None:
        text_spans.append(("supplemental TEXT", *stext))

    # ---- required keywords
    def required(name: str) -> str:
        if name not in keywords:
            raise ctx.error(f"required keyword {name} is missing from the TEXT segment")
        return keywords[name]

    mode = keywords.get("$MODE")
    if mode is None:
        ctx.warn("$MODE is missing; assumed list mode (L)")
    elif mode.upper() != "L":
        raise ctx.error(f"unsupported $MODE {quote_value(mode)}: only list mode (L) is supported")
    datatype = required("$DATATYPE").upper()
    if datatype not in ("I", "F", "D"):
        kind = {"A": " (ASCII)"}.get(datatype, "")
        raise ctx.error(
            f"unsupported $DATATYPE {quote_value(datatype)}{kind}: only I, F and D are supported"
        )
    par = parse_int(ctx, required("$PAR"), "$PAR")
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
        order = byte_order(ctx, required("$BYTEORD"))
    elif "$BYTEORD" in keywords:
        order = byte_order(ctx, keywords["$BYTEORD"])

    nextdata = parse_int(ctx, keywords.get("$NEXTDATA", "0"), "$NEXTDATA")
    if nextdata > 0:
        ctx.warn(
            f"file holds more than one dataset ($NEXTDATA={nextdata}); only the first was read"
        )

    spillover = None
    for key in (*SPILLOVER_KEYWORDS, "$COMP"):
        if key in keywords:
            spillover = parse_spillover(ctx, key, keywords[key], channels)
            break

    # ---- DATA
    data_start, data_end = _resolve_data_offsets(
        ctx,
        h_data_start,
        h_data_end,
        keywords,
        data_offsets=data_offsets,
        file_size=file_size,
        text_spans=text_spans,
    )
    if "$TOT" in keywords:
        tot = parse_int(ctx, keywords["$TOT"], "$TOT")
    else:
        tot = _infer_tot(ctx, version, data_start, data_end, bytes_per_event)
    _check_data_segment(
        ctx,
        data_start,
        data_end,
        file_size=file_size,
        tot=tot,
        bytes_per_event=bytes_per_event,
        par=par,
        text_spans=text_spans,
        allow_tot_mismatch=allow_tot_mismatch,
    )

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
    ctx: ParseContext,
    fh: io.BufferedReader,
    file_size: int,
    delimiter: bytes,
    keywords: dict[str, str],
    max_keyword_length: int,
) -> tuple[int, int] | None:
    """Add keywords from a supplemental TEXT segment ($BEGINSTEXT/$ENDSTEXT), if any.

    Returns the segment's (start, end) offsets, or ``None`` when there is none.
    """
    start_text = keywords.get("$BEGINSTEXT", "0")
    end_text = keywords.get("$ENDSTEXT", "0")
    start = parse_int(ctx, start_text, "$BEGINSTEXT")
    end = parse_int(ctx, end_text, "$ENDSTEXT")
    if start == 0 and end == 0:
        return None
    if start < HEADER_LENGTH or end < start or end >= file_size:
        raise ctx.error(
            f"supplemental TEXT segment ($BEGINSTEXT={start}, $ENDSTEXT={end}) lies outside "
            f"the file's {file_size} bytes"
        )
    raw = _read_at(ctx, fh, start, end - start + 1, "supplemental TEXT segment")
    if raw[:1] != delimiter:
        raw = delimiter + raw  # some writers omit the leading delimiter
    extra = parse_text(ctx, raw, max_keyword_length, segment="supplemental TEXT")
    for name, value in extra.items():
        if name not in keywords:
            keywords[name] = value
        elif keywords[name] != value:
            ctx.warn(
                f"supplemental TEXT repeats keyword {quote_value(name)}; kept the primary value"
            )
    return start, end


def _parameters(
    ctx: ParseContext, keywords: Mapping[str, str], par: int, datatype: str
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
        width = parse_int(ctx, width_text, f"$P{i}B") if width_text != "*" else -1
        if expected is not None and width != expected:
            raise ctx.error(
                f"$DATATYPE {datatype} needs $PnB={expected} but $P{i}B={quote_value(width_text, quote=False)}"
            )
        if width not in (8, 16, 32, 64):
            raise ctx.error(
                f"$P{i}B={quote_value(width_text, quote=False)} is not supported: integer bit widths must be "
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
            ranges.append(parse_float(ctx, range_text, f"$P{i}R"))

        gain_text = keywords.get(f"$P{i}G")
        gains.append(None if gain_text is None else parse_float(ctx, gain_text, f"$P{i}G"))

        e_text = keywords.get(f"$P{i}E")
        if e_text is None:
            decades.append(None)
        else:
            pieces = e_text.split(",")
            if len(pieces) != 2:
                raise ctx.error(
                    f"$P{i}E must be two comma-separated numbers (decades,offset), "
                    f"got {quote_value(e_text)}"
                )
            decades.append(
                (
                    parse_float(ctx, pieces[0], f"$P{i}E decades"),
                    parse_float(ctx, pieces[1], f"$P{i}E offset"),
                )
            )
    return channels, markers, widths, ranges, gains, decades


# --------------------------------------------------------------------------- DATA layout


def _segment_problem(
    start: int, end: int, file_size: int, text_spans: Sequence[tuple[str, int, int]]
) -> str | None:
    """Why the DATA segment ``start..end`` cannot hold events, or ``None``.

    An end offset past the end of the file is not judged here: the events may still fit.
    """
    if start < HEADER_LENGTH:
        return f"DATA segment starts at byte {start}, inside the {HEADER_LENGTH}-byte HEADER"
    if start >= file_size:
        return (
            f"DATA segment starts at byte {start} but the file has {file_size} bytes (truncated?)"
        )
    if end < start:
        return f"DATA segment ends at byte {end}, before it starts ({start})"
    for name, first, last in text_spans:
        if start <= last and first <= end:
            return (
                f"DATA segment (bytes {start}-{end}) overlaps the {name} segment "
                f"(bytes {first}-{last})"
            )
    return None


def _diagnose(
    start: int, end: int, file_size: int, text_spans: Sequence[tuple[str, int, int]]
) -> str | None:
    """:func:`_segment_problem`, or an end offset past the end of the file."""
    problem = _segment_problem(start, end, file_size, text_spans)
    if problem is None and end >= file_size:
        problem = f"DATA segment ends at byte {end} but the file has {file_size} bytes (truncated?)"
    return problem


def _resolve_data_offsets(
    ctx: ParseContext,
    header_start: int,
    header_end: int,
    keywords: Mapping[str, str],
    *,
    data_offsets: DataOffsets,
    file_size: int,
    text_spans: Sequence[tuple[str, int, int]],
) -> tuple[int, int]:
    """Return the DATA segment (start, end) from the HEADER and $BEGINDATA/$ENDDATA.

    The two must agree. A HEADER of ``0 0`` gives no offsets (TEXT is used); so does a
    HEADER offset of 0 when $ENDDATA is beyond the HEADER's 8-digit limit (large files).
    When they disagree the file is refused unless ``data_offsets`` names the source to
    trust ("header" or "text"); that choice is then recorded as a warning.
    """
    kw_start = kw_end = None
    if "$BEGINDATA" in keywords:
        kw_start = parse_int(ctx, keywords["$BEGINDATA"], "$BEGINDATA")
    if "$ENDDATA" in keywords:
        kw_end = parse_int(ctx, keywords["$ENDDATA"], "$ENDDATA")
    if header_start == 0 and header_end == 0:
        if kw_start is None or kw_end is None:
            return 0, 0  # no DATA offsets anywhere; fine only if there are no events
        return kw_start, kw_end
    large = kw_end is not None and kw_end > HEADER_OFFSET_LIMIT
    start_agrees = kw_start is None or kw_start == header_start or (large and header_start == 0)
    end_agrees = kw_end is None or kw_end == header_end or (large and header_end == 0)
    text_start = header_start if kw_start is None else kw_start
    text_end = header_end if kw_end is None else kw_end
    if start_agrees and end_agrees:
        return text_start, text_end
    header_says = f"{header_start}-{header_end}"
    text_says = f"{'?' if kw_start is None else kw_start}-{'?' if kw_end is None else kw_end}"
    if data_offsets == "strict":
        notes = [
            f"{source}: {problem}"
            for source, (first, last) in (
                ("HEADER", (header_start, header_end)),
                ("TEXT", (text_start, text_end)),
            )
            if (problem := _diagnose(first, last, file_size, text_spans)) is not None
        ]
        why = f" ({'; '.join(notes)})" if notes else ""
        raise ctx.error(
            f"HEADER and TEXT disagree on where the DATA segment is: HEADER says bytes "
            f"{header_says}, $BEGINDATA/$ENDDATA say {text_says}{why}; refusing to guess which "
            f"bytes are events (data_offsets='header' or 'text', CLI --data-offsets, "
            f"chooses the source to trust)"
        )
    ctx.warn(
        f"HEADER DATA offsets ({header_says}) differ from $BEGINDATA/$ENDDATA ({text_says}); "
        f"used the {data_offsets.upper()} offsets as requested (data_offsets={data_offsets!r})"
    )
    if data_offsets == "header":
        return header_start, header_end
    return text_start, text_end


def _infer_tot(ctx: ParseContext, version: str, start: int, end: int, bytes_per_event: int) -> int:
    """FCS 2.0 does not require $TOT: derive it from the DATA segment size.

    A remainder smaller than one event is left to :func:`_check_data_segment` (a warning).
    """
    if version != "2.0":
        raise ctx.error("required keyword $TOT is missing from the TEXT segment")
    length = end - start + 1 if end >= start and (start or end) else 0
    ctx.warn("$TOT is missing; the event count was derived from the DATA segment size")
    return length // bytes_per_event


def _check_data_segment(
    ctx: ParseContext,
    start: int,
    end: int,
    *,
    file_size: int,
    tot: int,
    bytes_per_event: int,
    par: int,
    text_spans: Sequence[tuple[str, int, int]],
    allow_tot_mismatch: bool,
) -> None:
    """Check that the DATA segment exists, lies in the file and holds exactly ``$TOT`` events.

    DATA shorter than ``$TOT`` events is refused. DATA longer by less than one event is
    tolerated (writers pad or count the end offset one byte too far) with a warning;
    longer by one event or more is refused unless ``allow_tot_mismatch``, in which case
    the first ``$TOT`` events are read and a warning says how many were ignored.
    """
    needed = tot * bytes_per_event
    if start == 0 and end == 0:
        if needed:
            raise ctx.error(
                f"$TOT={tot} events but neither the HEADER nor $BEGINDATA/$ENDDATA give the "
                f"DATA segment's offsets"
            )
        return
    problem = _segment_problem(start, end, file_size, text_spans)
    if needed == 0 and (
        problem is not None or min(end, file_size - 1) - start < bytes_per_event - 1
    ):
        return  # no events declared and no whole event in the file: nothing to lose
    if problem is not None:
        raise ctx.error(problem)
    length = end - start + 1
    if length < needed:
        raise ctx.error(
            f"DATA segment holds {length} bytes but $TOT={tot} events x $PAR={par} channels "
            f"need {needed} bytes (truncated, or $TOT too large)"
        )
    if start + needed > file_size:
        raise ctx.error(
            f"DATA segment ends at byte {end} but the file has {file_size} bytes (truncated?)"
        )
    extra = length - needed
    if extra >= bytes_per_event:
        whole, rest = divmod(length, bytes_per_event)
        holds = f"{whole} events of {bytes_per_event} bytes" + (
            f" and {rest} more bytes" if rest else ""
        )
        if end >= file_size:
            holds += f" (its end offset {end} is past the end of the file's {file_size} bytes)"
        lost = f"{whole - tot} event{'s' if whole - tot != 1 else ''}"
        if not allow_tot_mismatch:
            raise ctx.error(
                f"$TOT={tot} events but the DATA segment holds {length} bytes, {holds}: "
                f"{lost} would be ignored; refusing (allow_tot_mismatch=True, CLI "
                f"--accept-tot-mismatch, reads only the first $TOT events)"
            )
        ctx.warn(
            f"$TOT={tot} events but the DATA segment holds {holds}; read the first {tot} as "
            f"allowed by allow_tot_mismatch, {lost} ignored"
        )
    elif end >= file_size:
        ctx.warn(
            f"DATA segment end offset {end} is past the end of the file ({file_size} bytes) "
            f"but the events fit; read the {needed} bytes needed"
        )
    elif extra:
        ctx.warn(
            f"DATA segment holds {length} bytes, {extra} more than $TOT={tot} x "
            f"$PAR={par} needs (less than one {bytes_per_event}-byte event); the extra bytes "
            f"were ignored"
        )


# --------------------------------------------------------------------------- DATA


def _readinto_exact(
    ctx: ParseContext, fh: io.BufferedReader, target: npt.NDArray[np.uint8]
) -> None:
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
    ctx: ParseContext,
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
