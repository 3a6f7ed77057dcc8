"""Parsing the TEXT segment of an FCS file and the values of its technical keywords.

Used by :mod:`blinaprofile.io.fcs` (the reader); kept apart so that the reader's module
deals with the file's layout (HEADER, segment offsets, DATA) and this one with what
TEXT says. Every problem is raised as :class:`~blinaprofile.errors.FCSFormatError`
through a :class:`ParseContext`, which also collects the reader's warnings.

Warnings never quote a TEXT keyword *value* (patient identifiers live in values such as
``$SRC`` or ``PATIENT ID``): they name keywords and give counts or offsets only.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from blinaprofile.errors import FCSFormatError

__all__ = [
    "MATRIX_KEYWORDS",
    "MATRIX_LENGTH_FACTOR",
    "MAX_INT_DIGITS",
    "SPILLOVER_KEYWORDS",
    "ParseContext",
    "byte_order",
    "decode_field",
    "parse_float",
    "parse_int",
    "parse_spillover",
    "parse_text",
    "short",
    "split_text",
]

#: Integers in TEXT longer than this many digits are rejected (also keeps int() safe).
MAX_INT_DIGITS = 18
#: Keywords holding a spillover matrix, in the order they are looked for.
SPILLOVER_KEYWORDS: tuple[str, ...] = ("$SPILLOVER", "SPILL", "$SPILL")
#: Keywords holding a spillover or compensation matrix (allowed longer values).
MATRIX_KEYWORDS: frozenset[str] = frozenset({*SPILLOVER_KEYWORDS, "$COMP"})
#: Spillover/compensation values may be this many times ``max_keyword_length``.
MATRIX_LENGTH_FACTOR = 100


class ParseContext:
    """Per-file parsing context: the path (for messages) and collected warnings."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.warnings: list[str] = []

    def error(self, message: str) -> FCSFormatError:
        return FCSFormatError(message, path=self.path)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def short(name: str, limit: int = 40) -> str:
    """Return ``name`` cut to ``limit`` characters (with an ellipsis) for messages."""
    return name if len(name) <= limit else name[:limit] + "..."


#: what a TEXT value may look like to be quoted in a message: numbers, number lists and
#: short codes ("L", "F", "1,2,3,4", "4.0,1.0", "$P5N"); never free text, which may name a
#: patient (a value after an escaped delimiter joins the one before it, per the standard)
_QUOTABLE = re.compile(
    r"\$?[A-Za-z]?[0-9.,eE+\- ]{0,24}|\$[A-Za-z0-9]{1,12}|[-+]?(?i:nan|inf|infinity)"
)


def quote_value(value: str, *, quote: bool = True) -> str:
    """``value`` (``repr`` when ``quote``) for numbers and short codes; otherwise only its
    length (privacy: free text in TEXT may name a patient)."""
    if _QUOTABLE.fullmatch(value):
        return repr(value) if quote else value
    return f"a {len(value)}-character text"


def parse_int(ctx: ParseContext, value: str, what: str) -> int:
    """Parse a non-negative decimal integer from a TEXT value or HEADER field."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise ctx.error(f"{what} is not a non-negative integer: {quote_value(value)}")
    if len(text.lstrip("0")) > MAX_INT_DIGITS:
        raise ctx.error(f"{what} is implausibly large: {quote_value(text)}")
    return int(text)


def parse_float(ctx: ParseContext, value: str, what: str) -> float:
    """Parse a finite float from a TEXT value."""
    try:
        number = float(value.strip())
    except ValueError:
        raise ctx.error(f"{what} is not a number: {quote_value(value)}") from None
    if not math.isfinite(number):
        raise ctx.error(f"{what} is not a finite number: {quote_value(value)}")
    return number


def split_text(ctx: ParseContext, raw: bytes) -> list[bytes]:
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


def decode_field(ctx: ParseContext, token: bytes) -> str:
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        ctx.warn("TEXT segment is not valid UTF-8; non-UTF-8 fields were decoded as Latin-1")
        return token.decode("latin-1")


def parse_text(
    ctx: ParseContext, raw: bytes, max_keyword_length: int, segment: str = "TEXT"
) -> dict[str, str]:
    """Parse a TEXT (or supplemental TEXT) segment into an upper-cased keyword dict."""
    if len(raw) < 2:
        raise ctx.error(f"{segment} segment is {len(raw)} byte(s) long; it holds no keywords")
    fields = split_text(ctx, raw)
    if len(fields) % 2:
        # never quote the fields: with a value lost, names and values shift and a quoted
        # "keyword" may be a patient identifier
        raise ctx.error(
            f"{segment} segment has an odd number of fields ({len(fields)}): a keyword has "
            f"no value (an unescaped delimiter inside a value?)"
        )
    keywords: dict[str, str] = {}
    for k in range(0, len(fields), 2):
        name = decode_field(ctx, fields[k]).strip().upper()
        value = decode_field(ctx, fields[k + 1]).strip()
        if not name:
            raise ctx.error(
                f"{segment} segment contains an empty keyword name (field {k + 1} of {len(fields)})"
            )
        if len(name) > max_keyword_length:
            raise ctx.error(
                f"keyword name {short(name)!r} is {len(name)} characters long, more than "
                f"max_keyword_length={max_keyword_length}"
            )
        limit = max_keyword_length
        if name in MATRIX_KEYWORDS:
            # n names + n*n numbers: a 40-colour spectral matrix alone is ~40,000 characters.
            limit = max_keyword_length * MATRIX_LENGTH_FACTOR
        if len(value) > limit:
            raise ctx.error(
                f"keyword {short(name)!r} has a value of {len(value)} characters, more than "
                f"the limit of {limit} (max_keyword_length={max_keyword_length})"
            )
        if name in keywords:
            if keywords[name] != value:
                if name.startswith("$"):
                    raise ctx.error(
                        f"keyword {short(name)!r} appears more than once with different values"
                    )
                ctx.warn(
                    f"keyword {short(name)!r} appears more than once with different values; "
                    f"kept the first"
                )
            continue
        keywords[name] = value
    return keywords


def byte_order(ctx: ParseContext, value: str) -> str:
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
        f"unsupported $BYTEORD {quote_value(value)} (only 1,2,3,4 little-endian and "
        f"4,3,2,1 big-endian are supported)"
    )


def parse_spillover(
    ctx: ParseContext, keyword: str, value: str, channels: Sequence[str]
) -> tuple[list[str], npt.NDArray[np.float64]] | None:
    """Parse ``n,name_1..name_n,v_11,v_12..v_nn`` (row-major) into names and matrix."""
    parts = [p.strip() for p in value.split(",")]
    n = parse_int(ctx, parts[0], f"{keyword} channel count n")
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
            f"{keyword} names a channel more than once: {short(', '.join(duplicates), 200)}"
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
                f"{keyword} value {quote_value(text)} at row {row + 1}, column {col + 1} "
                f"is not a finite number"
            )
        matrix[idx] = number
    missing = [x for x in names if x not in channels]
    if missing:
        # counted, not quoted: warnings reach reports and batch tables, and the names are
        # part of a TEXT value
        ctx.warn(f"{keyword} names {len(missing)} channel(s) that are not in $PnN")
    return names, matrix.reshape(n, n)
