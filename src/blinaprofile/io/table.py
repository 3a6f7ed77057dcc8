"""Events that do not come as raw FCS intensities: CSV/TSV tables and display-scale values.

:func:`read_table` reads a table of events (one row per event, one column per channel or
marker, as FlowJo's "export to CSV" writes it) and :func:`convert_table` writes it as an
FCS file every command reads (``blinaprofile convert table.csv --out sample.fcs``). A
header ``BV421-A :: CCR7`` (FlowJo) names the channel and its marker; any other header is
both (scatter, time and event-length columns get no marker).

:func:`from_display_scale` maps display-scale channel numbers (``0-$PnR``, e.g. a FlowJo
"channel values" export with ``$PnR`` 1,024) back to intensities (``--display-scale``):
fluorescence through the inverse of logicle ``T=262144, W=0.5, M=4.5, A=0`` (FlowJo's
default display), scatter linearly onto ``0-262144``. Any strategy then gates them as it
gates raw data, with thresholds as good as that approximation of the export's display.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from blinaprofile.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

    from blinaprofile.io.fcs import FCSData

__all__ = [
    "DISPLAY_LOGICLE",
    "EventTable",
    "convert_table",
    "from_display_scale",
    "read_table",
]

#: The logicle display (``t, w, m, a``) display-scale values are assumed to come from.
DISPLAY_LOGICLE = (262144.0, 0.5, 4.5, 0.0)
#: The raw range scatter channel numbers are mapped onto.
SCATTER_TOP = 262144.0
#: Columns that are not markers: scatter, time and event length.
_NOT_MARKERS = re.compile(r"^(?:FSC|SSC|time|event[_ ]?length)", re.IGNORECASE)
_DECIMAL_COMMA = re.compile(r"^[-+]?\d+,\d+$")


@dataclass(frozen=True)
class EventTable:
    """A table of events ready to be written as FCS.

    Attributes
    ----------
    channels
        ``$PnN`` names, one per column.
    markers
        ``$PnS`` labels (``""`` for scatter, time and event length).
    events
        ``n_events x n_channels`` float64 values.
    """

    channels: list[str]
    markers: list[str]
    events: np.ndarray

    @property
    def n_events(self) -> int:
        """Number of rows."""
        return int(self.events.shape[0])

    def scale_note(self) -> str:
        """What the values look like, when they do not look like raw intensities (else ``""``)."""
        cols = [i for i, m in enumerate(self.markers) if m]
        if not cols or not self.n_events:
            return ""
        top = float(np.max(self.events[:, cols]))
        if top < 10.0:
            return (
                f"every marker value is below 10 (max {top:.3g}): already transformed; gate "
                "with a strategy whose transforms are `none`, bounds in these units"
            )
        if top <= 4096.0:
            return (
                f"marker values reach only {top:.6g}: if they are display channel numbers "
                "(0-1023 or 0-4095), gate with --display-scale"
            )
        return ""


def _delimiter(path: Path, first_line: str) -> str:
    if path.suffix.lower() in (".tsv", ".tab"):
        return "\t"
    return next((d for d in ("\t", ";") if d in first_line and "," not in first_line), ",")


def _names(header: list[str], path: Path) -> tuple[list[str], list[str]]:
    channels: list[str] = []
    markers: list[str] = []
    for j, raw in enumerate(header, start=1):
        name = raw.strip()
        if not name:
            raise InputError(f"column {j} of the header has no name", path=path)
        channel, sep, marker = name.partition("::")
        channel, marker = channel.strip(), marker.strip()
        if not sep:
            marker = "" if _NOT_MARKERS.match(channel) else channel
        if not channel or "," in channel or "|" in channel:
            raise InputError(
                f"column {j} ({name!r}) cannot be a channel name (empty, or holds ',' or '|')",
                path=path,
            )
        channels.append(channel)
        markers.append(marker)
    dup = sorted({c for c in channels if channels.count(c) > 1})
    if dup:
        raise InputError(f"column name(s) {dup} appear more than once", path=path)
    return channels, markers


def _numbers(frame: pd.DataFrame, channels: list[str], path: Path) -> np.ndarray:
    """The cells as float64; the first one that is not a finite number is an error."""
    import pandas as pd

    out = np.empty(frame.shape, dtype=np.float64)
    first: tuple[int, int] | None = None
    for j in range(frame.shape[1]):
        text = frame.iloc[:, j].astype(str).str.strip()
        values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            i = int(np.argmax(bad))
            if first is None or i < first[0]:
                first = (i, j)
        out[:, j] = values
    if first is not None:
        i, j = first
        cell = str(frame.iat[i, j]).strip()
        what = "an empty cell" if not cell else f"{cell[:40]!r} is not a finite number"
        hint = " (a decimal comma? write decimals with '.')" if _DECIMAL_COMMA.match(cell) else ""
        line = int(frame.index[i]) + 2  # the header is line 1
        raise InputError(
            f"line {line} (event {i + 1}), column {j + 1} ({channels[j]!r}): {what}{hint}",
            path=path,
        )
    return out


def read_table(path: str | os.PathLike[str]) -> EventTable:
    """Read a CSV/TSV table of events (one row per event, one column per channel).

    The delimiter is a tab for ``.tsv``/``.tab`` files, else ``,`` unless the header
    has none and uses tabs or ``;``. Blank lines are ignored.

    Parameters
    ----------
    path
        The table.

    Returns
    -------
    EventTable
        Channels, markers and values.

    Raises
    ------
    InputError
        The file is missing, is not UTF-8 text, has no rows, a header cell without a name
        or a duplicate one, a ragged row, or a cell that is not a finite number (the
        message names the line, the event and the column).
    """
    import pandas as pd

    from blinaprofile.io.files import ensure_file

    p = ensure_file(path, allow_dir=False)
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            first = fh.readline()
    except UnicodeDecodeError as err:
        raise InputError(
            f"not UTF-8 text (byte {err.start}); export as UTF-8 CSV", path=p
        ) from None
    if not first.strip():
        raise InputError("the table is empty (no header line)", path=p)
    sep = _delimiter(p, first)
    header = next(csv.reader([first.rstrip("\r\n")], delimiter=sep))
    channels, markers = _names(header, p)
    try:
        frame = pd.read_csv(
            p,
            sep=sep,
            header=None,
            skiprows=1,
            dtype=str,
            keep_default_na=False,
            skip_blank_lines=False,
            encoding="utf-8-sig",
            engine="c",
        )
    except pd.errors.EmptyDataError:
        raise InputError("the table has a header but no events", path=p) from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise InputError(f"not a valid table: {' '.join(str(err).split())}", path=p) from None
    if frame.shape[1] != len(channels):
        raise InputError(
            f"not a valid table: the rows have {frame.shape[1]} fields but the header has "
            f"{len(channels)}",
            path=p,
        )
    frame = frame.fillna("")  # short rows
    frame = frame[~(frame == "").all(axis=1)]  # blank lines (their index keeps line numbers)
    if frame.empty:
        raise InputError("the table has a header but no events", path=p)
    return EventTable(channels, markers, _numbers(frame, channels, p))


def convert_table(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> EventTable:
    """Write a CSV/TSV table of events as an FCS 3.1 file (atomically).

    Parameters
    ----------
    path
        The table (see :func:`read_table`).
    out
        The FCS file to write.

    Returns
    -------
    EventTable
        What was written.

    Raises
    ------
    InputError
        The table cannot be read (see :func:`read_table`) or its values cannot be stored as
        float32.
    """
    from blinaprofile.io.fcs_write import write_fcs

    table = read_table(path)
    try:
        write_fcs(out, table.events, channels=table.channels, markers=table.markers)
    except ValueError as err:
        raise InputError(f"cannot be written as FCS: {err}", path=path) from None
    return table


def from_display_scale(data: FCSData) -> FCSData:
    """Map display-scale channel numbers back to intensities, in place.

    Every channel but ``Time`` and ``Event_length`` is divided by its ``$PnR`` (its
    maximum when ``$PnR`` is absent); fluorescence is then mapped through the inverse of
    the logicle :data:`DISPLAY_LOGICLE`, scatter onto ``0-262144``. ``$PnR`` becomes
    262,144 and ``$PnE``/``$PnG`` are dropped. A warning records it.

    Parameters
    ----------
    data
        A sample read by :func:`blinaprofile.io.read.read_flow`.

    Returns
    -------
    FCSData
        ``data``.
    """
    from blinaprofile.gating.transforms import LogicleTransform

    t, w, m, a = DISPLAY_LOGICLE
    logicle = LogicleTransform(t=t, w=w, m=m, a=a)
    events = np.array(data.events, dtype=np.float64)
    n = len(data.channels)
    ranges = list(data.ranges) + [float("nan")] * (n - len(data.ranges))
    converted = 0
    for i, ch in enumerate(data.channels):
        if re.match(r"^(?:time|event[_ ]?length)", ch, re.IGNORECASE):
            continue
        col = events[:, i]
        top = ranges[i] if np.isfinite(ranges[i]) and ranges[i] > 0 else float(np.max(col))
        unit = col / max(top, 1.0)
        if ch.upper().startswith(("FSC", "SSC")):
            events[:, i] = unit * SCATTER_TOP
        else:
            events[:, i] = np.asarray(logicle.inverse(unit), dtype=np.float64)
        ranges[i] = SCATTER_TOP
        converted += 1
    data.events = events
    data.ranges = ranges
    data.decades = [None] * n
    data.gains = [None] * n
    data.warnings.append(
        f"values declared display-scale (--display-scale): {converted} channels mapped from "
        f"0-$PnR back to intensities through logicle(T={t:g}, W={w:g}, M={m:g}, A={a:g}), "
        f"scatter onto 0-{SCATTER_TOP:g}; thresholds are as good as that display's match"
    )
    return data
