"""Reading inputs: FCS samples, single-cell objects and cohort manifests.

A manifest is a CSV with one row per sample: ``sample_id`` and ``file`` (relative to
the manifest's folder or absolute) are required; ``patient_id``, ``timepoint`` and
``response`` (``responder``/``nonresponder``; also ``R``/``NR``, ``1``/``0``) are optional
(``response`` is required for training).

FCS files are read strictly (see :func:`blinaprofile.io.fcs.read_fcs`). The two documented
overrides, accepting a DATA segment longer than ``$TOT`` and choosing which DATA offsets to
trust, travel as one :class:`FCSReadOptions`: passed explicitly (``read_flow(...,
fcs_options=...)``, ``featurize_manifest``, ``score_samples``) or set for a block of code with
:func:`fcs_read_options` (how ``score_sample`` and the report's re-read of the file get
them). The reader's warnings travel with each sample as one text value
(:func:`join_warnings` / :func:`split_warnings`).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from blinaprofile.errors import FCSFormatError, ManifestError, one_line

if TYPE_CHECKING:
    import pandas as pd

    from blinaprofile.io.fcs import DataOffsets, FCSData

__all__ = [
    "RESPONSE_CODES",
    "WARNING_SEPARATOR",
    "FCSReadOptions",
    "current_fcs_read_options",
    "fcs_read_options",
    "join_warnings",
    "modality_of",
    "read_flow",
    "read_manifest",
    "split_warnings",
]

RESPONSE_CODES: dict[str, int] = {
    "responder": 1,
    "r": 1,
    "1": 1,
    "cr": 1,
    "yes": 1,
    "nonresponder": 0,
    "non-responder": 0,
    "non_responder": 0,
    "nr": 0,
    "0": 0,
    "no": 0,
}

SINGLE_CELL_SUFFIXES = (".h5ad", ".h5", ".mtx", ".mtx.gz")


def modality_of(path: str | os.PathLike[str]) -> Literal["flow", "single_cell"]:
    """``'flow'`` for FCS files, ``'single_cell'`` for h5ad/10x inputs.

    A folder is a 10x matrix folder unless it is named like an FCS file (then it is a
    flow sample that will be refused as "not a regular file").
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith(SINGLE_CELL_SUFFIXES) or (p.is_dir() and not name.endswith((".fcs", ".lmd"))):
        return "single_cell"
    return "flow"


# --------------------------------------------------------------------------- FCS options


@dataclass(frozen=True)
class FCSReadOptions:
    """The documented ways to read an FCS file less strictly (both off by default), and
    how to label and scale its channels.

    Attributes
    ----------
    allow_tot_mismatch
        Accept a DATA segment holding one or more events more than ``$TOT``: the first
        ``$TOT`` events are read and a warning says how many were ignored (CLI
        ``--accept-tot-mismatch``).
    data_offsets
        ``"strict"`` refuses a file whose HEADER and ``$BEGINDATA``/``$ENDDATA`` disagree
        on where DATA is; ``"header"`` or ``"text"`` trusts that source and records a
        warning (CLI ``--data-offsets header|text``).
    markers
        ``(channel, marker)`` pairs that replace the file's ``$PnS`` labels and are
        declared to the privacy filter (CLI ``--marker CHANNEL=MARKER``); a channel the
        file lacks is a :class:`~blinaprofile.errors.PanelMismatchError`.
    panel
        A panel YAML that labels the channels it lists whose ``$PnS`` is empty and whose
        markers are declared (CLI ``--panel``; see
        :func:`blinaprofile.gating.panel.label_channels`).
    display_scale
        The values are display-scale channel numbers (0-``$PnR``), not intensities: they
        are mapped back to intensities (:func:`blinaprofile.io.table.from_display_scale`;
        CLI ``--display-scale``).
    """

    allow_tot_mismatch: bool = False
    data_offsets: DataOffsets = "strict"
    markers: tuple[tuple[str, str], ...] = ()
    panel: str | None = None
    display_scale: bool = False

    def __post_init__(self) -> None:
        from blinaprofile.io.fcs import DATA_OFFSET_CHOICES

        if self.data_offsets not in DATA_OFFSET_CHOICES:
            raise ValueError(
                f"data_offsets must be one of {', '.join(DATA_OFFSET_CHOICES)}, "
                f"not {self.data_offsets!r}"
            )
        # a mapping is accepted; kept as pairs so that the options stay hashable
        object.__setattr__(self, "markers", tuple(dict(self.markers).items()))

    @property
    def is_strict(self) -> bool:
        """True when nothing is relaxed (the default)."""
        return not self.allow_tot_mismatch and self.data_offsets == "strict"

    @property
    def is_default(self) -> bool:
        """True when nothing is relaxed, relabelled or rescaled."""
        return self.is_strict and not (self.markers or self.panel or self.display_scale)

    def as_dict(self) -> dict[str, Any]:
        """The options as plain JSON values (for run records; labelling only when set)."""
        out: dict[str, Any] = {
            "allow_tot_mismatch": self.allow_tot_mismatch,
            "data_offsets": self.data_offsets,
        }
        if self.markers:
            out["markers"] = dict(self.markers)
        if self.panel:
            out["panel"] = self.panel
        if self.display_scale:
            out["display_scale"] = True
        return out


_FCS_OPTIONS: ContextVar[FCSReadOptions | None] = ContextVar("fcs_read_options", default=None)


def current_fcs_read_options() -> FCSReadOptions:
    """The options set by the innermost :func:`fcs_read_options` block (default: strict)."""
    return _FCS_OPTIONS.get() or FCSReadOptions()


@contextlib.contextmanager
def fcs_read_options(options: FCSReadOptions | None) -> Iterator[FCSReadOptions]:
    """Read FCS files with ``options`` inside the ``with`` block (``None``: unchanged).

    :func:`read_flow` calls without an explicit ``fcs_options`` use them, so a whole
    :func:`blinaprofile.scoring.score.score_sample` (and the report that re-reads the file
    for its gating plots) can run with an override. The setting is per thread and per
    task; worker processes receive options explicitly.

    Parameters
    ----------
    options
        The options for the block; ``None`` keeps the current ones.

    Yields
    ------
    FCSReadOptions
        The options in force inside the block.
    """
    if options is None:
        yield current_fcs_read_options()
        return
    token = _FCS_OPTIONS.set(options)
    try:
        yield options
    finally:
        _FCS_OPTIONS.reset(token)


#: Separates the reader's warnings in one table cell (``warnings`` columns).
WARNING_SEPARATOR = " | "


def join_warnings(warnings: Iterable[str]) -> str:
    """The warnings as one table cell, each on one line, joined by :data:`WARNING_SEPARATOR`.

    Parameters
    ----------
    warnings
        Warnings such as :attr:`blinaprofile.io.fcs.FCSData.warnings`.

    Returns
    -------
    str
        ``""`` when there are none.
    """
    sep = WARNING_SEPARATOR
    return sep.join(one_line(w).replace(sep, " / ") for w in warnings if w)


def split_warnings(cell: object) -> list[str]:
    """The list :func:`join_warnings` made.

    Parameters
    ----------
    cell
        A ``warnings`` value from a feature row or result row.

    Returns
    -------
    list of str
        Empty for ``None``, NaN or ``""``.
    """
    if not isinstance(cell, str) or not cell.strip():
        return []
    return [w for w in cell.split(WARNING_SEPARATOR) if w.strip()]


# --------------------------------------------------------------------------- reading


def read_flow(
    path: str | os.PathLike[str],
    *,
    allow_nonfinite: bool = False,
    keep_identifiers: bool = False,
    fcs_options: FCSReadOptions | None = None,
    declared_markers: Iterable[str] = (),
) -> FCSData:
    """Read an FCS file and check it is usable for gating.

    Parameters
    ----------
    path
        The FCS file.
    allow_nonfinite
        Accept NaN/inf event values (they are refused by default).
    keep_identifiers
        Keep every TEXT keyword. By default only the technical keywords that
        :func:`blinaprofile.io.privacy.select_keywords` allows are kept, so identifying
        ones (``$SRC``, ``$FIL``, ``$SMNO``, ``$PROJ``, ``$OP``, ``$DATE``, ``PATIENT ID``...)
        never reach features, MLflow, reports, batch outputs or logs; and ``$PnS`` labels
        that do not name a known marker are redacted
        (:func:`blinaprofile.io.privacy.redact_markers`: ``'Jane Roe CD3'`` -> ``'CD3'``,
        free text -> ``'<unrecognised $P5S>'``).
    declared_markers
        Further ``$PnS`` labels to keep verbatim, e.g. the names a gating strategy reads
        (:meth:`GateTree.needed_names`); the active panel's markers and the panel synonyms
        are always kept.
    fcs_options
        Relaxations of the reader's integrity checks; ``None`` uses
        :func:`current_fcs_read_options` (strict unless a :func:`fcs_read_options` block
        says otherwise).

    Returns
    -------
    FCSData
        The file's first dataset; :attr:`FCSData.warnings` lists what was tolerated.

    Raises
    ------
    InputError
        The file is missing or unreadable.
    FCSFormatError
        Malformed FCS (including ``$TOT`` disagreeing with the DATA segment, or HEADER and
        TEXT disagreeing on its offsets, unless ``fcs_options`` accepts it), zero events,
        or NaN/inf values (unless ``allow_nonfinite``).
    """
    from blinaprofile.io.fcs import read_fcs
    from blinaprofile.io.privacy import redact_fcs

    options = fcs_options if fcs_options is not None else current_fcs_read_options()
    data = read_fcs(
        path,
        allow_tot_mismatch=options.allow_tot_mismatch,
        data_offsets=options.data_offsets,
    )
    declared = list(declared_markers)
    if options.markers or options.panel:
        from blinaprofile.gating.panel import label_channels

        declared += label_channels(data, markers=dict(options.markers), panel=options.panel)
    redact_fcs(data, allow_identifying=keep_identifiers, declared_markers=declared)
    if data.n_events == 0:
        raise FCSFormatError("the file has zero events", path=path)
    if data.n_nonfinite and not allow_nonfinite:
        raise FCSFormatError(
            f"{data.n_nonfinite} event values are NaN or infinite; refusing to gate", path=path
        )
    if data.events.dtype != np.float64 and data.events.dtype != np.float32:
        data.events = data.events.astype(np.float64)
    if options.display_scale:
        from blinaprofile.io.table import from_display_scale

        from_display_scale(data)
    return data


def _describe_bytes(raw: bytes) -> str:
    """A hint about what a file that is not UTF-8 text actually is."""
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "it is UTF-16 encoded; save the manifest as UTF-8 CSV"
    if raw.startswith(b"PK\x03\x04"):
        return "it looks like an Excel workbook or zip archive; export it as UTF-8 CSV"
    if raw.startswith(b"\xd0\xcf\x11\xe0"):
        return "it looks like a legacy Excel (.xls) file; export it as UTF-8 CSV"
    if raw.startswith(b"FCS"):
        return "it is an FCS file, not a manifest"
    return "save the manifest as UTF-8 CSV"


_BAD_ID_CHARS = re.compile(r"[/\\\x00-\x1f\x7f]")


def _parse_csv(text: str, p: Path) -> pd.DataFrame:
    """Parse CSV text strictly: no row has more (non-empty) fields than the header.

    The delimiter is ``,`` unless the header has none and uses tabs or ``;``.
    """
    import csv
    import io

    import pandas as pd

    first = next((line for line in text.splitlines() if line.strip()), "")
    # spreadsheet exports: tab-separated, or ';' where ',' is the decimal separator
    delimiter = next((d for d in ("\t", ";") if d in first and "," not in first), ",")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    rows: list[list[str]] = []
    header: list[str] | None = None
    try:
        for row in reader:
            cells = [c.strip() for c in row]
            if not any(cells):
                continue  # blank line
            if header is None:
                header = [c.lower() for c in cells]
                continue
            if len(cells) > len(header):
                if any(cells[len(header) :]):
                    raise ManifestError(
                        f"not a valid CSV: line {reader.line_num} has {len(cells)} fields but "
                        f"the header has {len(header)}",
                        path=p,
                    )
                cells = cells[: len(header)]  # trailing empty cells (spreadsheet exports)
            rows.append(cells + [""] * (len(header) - len(cells)))
    except csv.Error as err:
        raise ManifestError(f"not a valid CSV: {err} (line {reader.line_num})", path=p) from None
    if header is None:
        raise ManifestError("the manifest is empty", path=p)
    dup_cols = sorted({c for c in header if header.count(c) > 1 and c})
    if dup_cols:
        raise ManifestError(f"column(s) {dup_cols} appear more than once", path=p)
    if "" in header:
        raise ManifestError(f"column {header.index('') + 1} of the header has no name", path=p)
    return pd.DataFrame(rows, columns=header, dtype=str)


def read_manifest(
    path: str | os.PathLike[str], *, require_response: bool = False, check_files: bool = True
) -> pd.DataFrame:
    """Read and validate a cohort manifest.

    Returns a DataFrame with ``sample_id``, ``patient_id`` (defaults to ``sample_id``),
    ``timepoint``, ``path`` (absolute) and ``response`` (1/0 or missing) plus any extra
    columns. Raises :class:`ManifestError` naming the manifest and the problem (missing
    columns, duplicate sample IDs, unknown response labels, missing files, bad encoding).
    """
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise ManifestError("manifest not found", path=p)
    if not p.is_file():
        raise ManifestError("the manifest is not a regular file (a folder?)", path=p)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ManifestError(f"cannot read manifest: {err.strerror or err}", path=p) from None
    if not raw.strip():
        raise ManifestError("the manifest is empty", path=p)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ManifestError(
            f"not UTF-8 text (line {line}, byte {err.start}): {_describe_bytes(raw)}", path=p
        ) from None
    if "\x00" in text:
        raise ManifestError(
            f"contains NUL characters, so it is not a text CSV: {_describe_bytes(raw)}", path=p
        )
    df = _parse_csv(text, p)
    missing = [c for c in ("sample_id", "file") if c not in df.columns]
    if missing:
        raise ManifestError(f"missing column(s) {missing}; found {list(df.columns)[:20]}", path=p)
    if df.empty:
        raise ManifestError("the manifest has a header but no samples", path=p)
    if (df["sample_id"] == "").any():
        rows = (df.index[df["sample_id"] == ""] + 2).tolist()
        raise ManifestError(f"empty sample_id on line(s) {rows[:10]}", path=p)
    bad_ids = [s for s in df["sample_id"] if _BAD_ID_CHARS.search(s) or s in (".", "..")]
    if bad_ids:
        raise ManifestError(
            f"sample_id(s) {bad_ids[:5]!r} contain a path separator or control character; "
            f"sample IDs name output files",
            path=p,
        )
    dup = df["sample_id"][df["sample_id"].duplicated()].unique().tolist()
    if dup:
        raise ManifestError(f"duplicate sample_id(s) {dup[:10]}", path=p)
    if "patient_id" not in df.columns:
        df["patient_id"] = df["sample_id"]
        # read by `train`, which warns that CV then groups by sample
        df.attrs["patient_id_from_sample"] = True
    df["patient_id"] = df["patient_id"].where(df["patient_id"].str.strip() != "", df["sample_id"])
    if "timepoint" not in df.columns:
        df["timepoint"] = ""
    base = p.parent
    paths: list[str] = []
    for f in df["file"]:
        try:
            paths.append(str((base / f).resolve()) if f else "")
        except (OSError, RuntimeError, ValueError) as err:
            raise ManifestError(f"file path {f[:200]!r} cannot be used: {err}", path=p) from None
    df["path"] = paths

    def _exists(q: str) -> bool:
        try:
            return bool(q) and Path(q).exists()
        except (OSError, ValueError):
            return False

    if check_files:
        absent = [f for f, q in zip(df["file"], df["path"], strict=True) if not _exists(q)]
        if absent:
            more = f" (+{len(absent) - 5} more)" if len(absent) > 5 else ""
            raise ManifestError(f"file(s) not found: {absent[:5]}{more}", path=p)
    if "response" in df.columns:
        codes = []
        bad = []
        for v in df["response"]:
            key = str(v).strip().lower()
            if key == "":
                codes.append(np.nan)
            elif key in RESPONSE_CODES:
                codes.append(RESPONSE_CODES[key])
            else:
                bad.append(v)
        if bad:
            raise ManifestError(
                f"unknown response label(s) {sorted(set(bad))[:10]}; use responder/nonresponder",
                path=p,
            )
        df["response"] = pd.array(codes, dtype="Int64")
    elif require_response:
        raise ManifestError("training needs a 'response' column", path=p)
    else:
        df["response"] = pd.array([pd.NA] * len(df), dtype="Int64")
    if require_response:
        if df["response"].isna().any():
            raise ManifestError("some samples have no response label", path=p)
        if df["response"].nunique() < 2:
            raise ManifestError("training needs both responders and nonresponders", path=p)
    return df


def read_feature_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a feature table CSV (from ``blinaprofile featurize``) for training.

    ``response`` may be coded as in manifests (``responder``/``nonresponder``, ``R``/``NR``,
    ``1``/``0``). ``sample_id``, ``patient_id`` and ``timepoint`` are read as text, as
    written (patient ``7`` stays ``"7"``, not ``7.0``; a blank cell is missing). Raises
    :class:`ManifestError` naming the file when it is missing, not a CSV, lacks
    ``response``/``patient_id``, or has unknown response labels.
    """
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise ManifestError("feature table not found", path=p)
    try:
        # IDs as written: a numeric column would make patient 7 into 7.0 (and blank into NaN)
        table = pd.read_csv(p, dtype=dict.fromkeys(("sample_id", "patient_id", "timepoint"), str))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise ManifestError(
            f"not a readable CSV feature table: {one_line(str(err))}", path=p
        ) from None
    from blinaprofile.features.schema import MODEL_FEATURES

    if {"file", "path"} & set(table.columns) and not set(MODEL_FEATURES) & set(table.columns):
        raise ManifestError(
            "this is a manifest (it lists files), not a feature table: use "
            f"`blinaprofile train --manifest {p}` (or `blinaprofile featurize --manifest {p} "
            "--out features.csv` first)",
            path=p,
        )
    missing = [c for c in ("response", "patient_id") if c not in table.columns]
    if missing:
        raise ManifestError(
            f"feature table lacks column(s) {missing}; training needs response labels "
            "(featurize a manifest with a 'response' column)",
            path=p,
        )
    raw = table["response"]
    if raw.dtype == object:
        mapped = raw.astype(str).str.strip().str.lower().map(RESPONSE_CODES)
        bad = sorted(set(raw[mapped.isna() & raw.notna()].astype(str)))
        if bad:
            raise ManifestError(
                f"unknown response label(s) {bad[:10]}; use responder/nonresponder", path=p
            )
        table["response"] = mapped
    return table
