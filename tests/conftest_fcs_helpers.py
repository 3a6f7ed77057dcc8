"""Helpers that build FCS files byte by byte, including deliberately broken ones.

Independent of ``blinaprofile.io.fcs`` so that the reader is tested against files it
did not write itself (other versions, delimiters, data types, byte orders, lies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

HEADER_LENGTH = 58


def standard_keywords(
    channels: Sequence[str],
    n_events: int,
    *,
    datatype: str = "F",
    bits: int | Sequence[int] = 32,
    byteord: str = "1,2,3,4",
    ranges: int | Sequence[int] = 262144,
    markers: Sequence[str] | None = None,
) -> dict[str, str]:
    """Return the required keywords for a list-mode dataset."""
    n = len(channels)
    widths = [bits] * n if isinstance(bits, int) else list(bits)
    maxima = [ranges] * n if isinstance(ranges, int) else list(ranges)
    kw = {
        "$BYTEORD": byteord,
        "$DATATYPE": datatype,
        "$MODE": "L",
        "$NEXTDATA": "0",
        "$PAR": str(n),
        "$TOT": str(n_events),
    }
    for i, name in enumerate(channels, start=1):
        kw[f"$P{i}N"] = name
        kw[f"$P{i}B"] = str(widths[i - 1])
        kw[f"$P{i}E"] = "0,0"
        kw[f"$P{i}R"] = str(maxima[i - 1])
        if markers is not None and markers[i - 1]:
            kw[f"$P{i}S"] = markers[i - 1]
    return kw


def encode_text(keywords: Mapping[str, str], delimiter: bytes = b"/") -> bytes:
    """Encode keywords as a TEXT segment, doubling the delimiter inside fields."""
    out = bytearray(delimiter)
    for key, value in keywords.items():
        for part in (key, value):
            out += part.encode("utf-8").replace(delimiter, delimiter * 2)
            out += delimiter
    return bytes(out)


def header_bytes(version: str, offsets: Sequence[int | bytes]) -> bytes:
    """Build a 58-byte HEADER; each offset is an int or 8 raw bytes."""
    fields = b"".join(
        x if isinstance(x, bytes) else str(x).rjust(8).encode("ascii") for x in offsets
    )
    return f"FCS{version}    ".encode("ascii") + fields


def build_fcs(
    keywords: Mapping[str, str],
    data: bytes,
    *,
    version: str = "3.1",
    delimiter: bytes = b"/",
    data_keywords: bool = True,
    header_data_zero: bool = False,
    header: Mapping[int, int | bytes] | None = None,
    text: bytes | None = None,
    gap: int = 0,
    trailer: bytes = b"",
) -> bytes:
    """Assemble HEADER + TEXT + DATA.

    Parameters
    ----------
    keywords
        TEXT keywords (without $BEGINDATA/$ENDDATA, which are added when
        ``data_keywords`` is true, space-padded to a fixed width).
    data
        The raw DATA segment bytes.
    version
        FCS version written in the HEADER.
    delimiter
        TEXT delimiter byte.
    data_keywords
        Add $BEGINDATA/$ENDDATA with the true offsets.
    header_data_zero
        Write 0 for the DATA offsets in the HEADER (FCS 3.x large-file style).
    header
        Overrides for the six HEADER offsets by index (0 = TEXT start ... 5 = ANALYSIS end).
    text
        Raw TEXT segment to use instead of encoding ``keywords``.
    gap
        Blank bytes between TEXT and DATA.
    trailer
        Bytes appended after DATA (e.g. a CRC).
    """
    kw = dict(keywords)
    if data_keywords and text is None:
        kw["$BEGINDATA"] = "0" * 12
        kw["$ENDDATA"] = "0" * 12
    raw_text = text if text is not None else encode_text(kw, delimiter)
    text_end = HEADER_LENGTH + len(raw_text) - 1
    data_start = text_end + 1 + gap if data else 0
    data_end = data_start + len(data) - 1 if data else 0
    if data_keywords and text is None:
        kw["$BEGINDATA"] = str(data_start).rjust(12)
        kw["$ENDDATA"] = str(data_end).rjust(12)
        raw_text = encode_text(kw, delimiter)
        assert HEADER_LENGTH + len(raw_text) - 1 == text_end
    offsets: list[int | bytes] = [
        HEADER_LENGTH,
        text_end,
        0 if header_data_zero else data_start,
        0 if header_data_zero else data_end,
        0,
        0,
    ]
    for index, value in (header or {}).items():
        offsets[index] = value
    return header_bytes(version, offsets) + raw_text + b" " * gap + data + trailer


def float_file(
    events: np.ndarray,
    channels: Sequence[str],
    *,
    extra: Mapping[str, str] | None = None,
    big_endian: bool = False,
    **kwargs: object,
) -> bytes:
    """A float32 FCS file built by hand (not by ``write_fcs``)."""
    events = np.asarray(events, dtype=np.float32)
    kw = standard_keywords(
        channels, events.shape[0], byteord="4,3,2,1" if big_endian else "1,2,3,4"
    )
    kw.update(extra or {})
    data = events.astype(">f4" if big_endian else "<f4").tobytes()
    return build_fcs(kw, data, **kwargs)  # type: ignore[arg-type]
