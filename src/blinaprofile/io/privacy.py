"""Which FCS keywords may leave the reader, and a scanner for leaked identifiers.

FCS files carry free-text TEXT keywords that often identify a patient or a person:
``$SRC`` (specimen source, frequently a patient ID), ``$FIL`` (original file name),
``$SMNO`` (specimen number), ``$PROJ``, ``$OP`` (operator), ``$DATE``/``$BTIM``/``$ETIM``
(acquisition date and times), ``$COM``, ``$CELLS``, ``$INST``, ``$EXP`` and vendor keywords
such as ``PATIENT ID``, ``TUBE NAME`` or ``SAMPLE ID``. This module is the single place
that decides what may be kept:

- :func:`select_keywords` keeps only an allow-list of technical keywords (data layout,
  parameters, cytometer, spillover) and drops everything else unless the caller opts in
  with ``allow_identifying=True``. :func:`blinaprofile.io.read.read_flow` applies it to every
  file it returns, so nothing downstream (features, MLflow runs, reports, batch outputs,
  logs) can see an identifying keyword by accident.
- :func:`is_identifying` says whether a keyword *name* suggests identity (the fixed list
  above, or a name containing words such as PATIENT, NAME, MRN, DOB, BIRTH, SUBJECT).
- :func:`redact_markers` decides which ``$PnS`` labels (free text: an operator can type a
  patient's name there) may leave the reader: a label naming a known marker (panel
  synonyms, CD antigens, the active panel's markers, names the caller declares) is kept,
  one that merely contains a known marker is shown as that marker (``'Jane Roe CD3'`` ->
  ``'CD3'``), anything else becomes ``<unrecognised $PnS>`` (:data:`REDACTED_MARKER`).
  :func:`redact_fcs` applies both rules to what :func:`blinaprofile.io.read.read_flow`
  returns.
- :func:`file_pseudonym` and :func:`withhold_file_name` keep input file names (which labs
  often make from a patient's name or MRN) out of outputs and batch records unless the
  user opts in (``keep_file_names=True``, ``--keep-file-names``).
- :func:`manifest_columns` decides which manifest columns a feature table may carry:
  :data:`DECLARED_MANIFEST_COLUMNS` and the ones the user names.
- :func:`safe_metadata` is what a report or an output table may show about a file.
- :func:`scan_for_strings` searches files and folders (including SQLite databases, zip
  archives such as ``.skops`` files, gzip, Parquet and HDF5) for forbidden strings; the
  privacy tests use it on every output of a pipeline run.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import re
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blinaprofile.gating.panel import REDACTED_MARKER, redact_markers

if TYPE_CHECKING:
    from blinaprofile.io.fcs import FCSData

__all__ = [
    "DECLARED_MANIFEST_COLUMNS",
    "IDENTIFYING_KEYWORDS",
    "IDENTIFYING_NAME_PATTERN",
    "REDACTED_MARKER",
    "SAFE_KEYWORDS",
    "WITHHELD_FILE_NAME",
    "Finding",
    "file_pseudonym",
    "identifying_values",
    "is_identifying",
    "is_safe_keyword",
    "manifest_columns",
    "redact_fcs",
    "redact_markers",
    "safe_metadata",
    "scan_for_strings",
    "select_keywords",
    "withhold_file_name",
]

#: Standard FCS keywords whose values identify a patient, a person, a site or a time.
IDENTIFYING_KEYWORDS: frozenset[str] = frozenset(
    {
        "$SRC",
        "$FIL",
        "$SMNO",
        "$PROJ",
        "$OP",
        "$DATE",
        "$BTIM",
        "$ETIM",
        "$COM",
        "$CELLS",
        "$INST",
        "$EXP",
        "$LAST_MODIFIED",
        "$LAST_MODIFIER",
        "$PLATEID",
        "$PLATENAME",
        "$WELLID",
        "$CARRIERID",
        "$LOCATIONID",
        "GUID",
        "$GUID",
    }
)

#: Words that make any keyword name count as identifying (matched on the upper-cased
#: name; ``NAME`` matches ``TUBE NAME``, ``FILENAME``, ``EXPERIMENT NAME``...).
IDENTIFYING_NAME_PATTERN = re.compile(
    r"PATIENT|PAT[ _.-]?ID|NAME|MRN|MEDICAL[ _.-]?RECORD|DOB|BIRTH|SUBJECT|DONOR|"
    r"SSN|SOCIAL|INITIALS|ACCESSION|SPECIMEN|SAMPLE|CASE|OPERATOR|OWNER|USER|ADDRESS|"
    r"PHONE|EMAIL|DATE|TIME|(?<![A-Z])AGE(?![A-Z])|(?<![A-Z])SEX(?![A-Z])|GENDER|COMMENT|NOTE|"
    r"BARCODE|LOCATION"
)

#: Technical keywords that may leave the reader (besides the per-parameter ones).
SAFE_KEYWORDS: frozenset[str] = frozenset(
    {
        "$BEGINANALYSIS",
        "$ENDANALYSIS",
        "$BEGINDATA",
        "$ENDDATA",
        "$BEGINSTEXT",
        "$ENDSTEXT",
        "$BYTEORD",
        "$DATATYPE",
        "$MODE",
        "$NEXTDATA",
        "$PAR",
        "$TOT",
        "$CYT",
        "$CYTSN",
        "$SYS",
        "$TIMESTEP",
        "$VOL",
        "$ABRT",
        "$LOST",
        "$TR",
        "$UNICODE",
        "$SPILLOVER",
        "$SPILL",
        "SPILL",
        "$COMP",
        "$CSMODE",
        "$CSVBITS",
        "$FLOWRATE",
        "$ORIGINALITY",
        "CREATOR",
    }
)

# $PnN, $PnS, $PnB, $PnE, $PnR, $PnG, $PnV, $PnL, $PnO, $PnP, $PnT, $PnD, $PnF and the
# FCS 3.2 additions ($PnTYPE, $PnDET, $PnTAG, $PnANALYTE, $PnFEATURE, $PnCALIBRATION).
_PARAMETER_KEYWORD = re.compile(
    r"\$P[1-9][0-9]*(N|S|B|E|R|G|V|L|O|P|T|D|F|TYPE|DET|TAG|ANALYTE|FEATURE|CALIBRATION)"
)


def is_identifying(name: str) -> bool:
    """Whether a keyword name denotes (or suggests) identifying information.

    Parameters
    ----------
    name
        A TEXT keyword name, any case.

    Returns
    -------
    bool
        True for the standard identifying keywords (:data:`IDENTIFYING_KEYWORDS`) and for
        any other name matching :data:`IDENTIFYING_NAME_PATTERN`; the curated technical
        keywords (:data:`SAFE_KEYWORDS`, per-parameter ones such as ``$P3N``) never match.
    """
    upper = name.strip().upper()
    if upper in IDENTIFYING_KEYWORDS:
        return True
    if upper in SAFE_KEYWORDS or _PARAMETER_KEYWORD.fullmatch(upper):
        return False
    return IDENTIFYING_NAME_PATTERN.search(upper) is not None


def is_safe_keyword(name: str) -> bool:
    """Whether a keyword may be kept without the user opting in (allow-list, not identifying)."""
    upper = name.strip().upper()
    if is_identifying(upper):
        return False
    return upper in SAFE_KEYWORDS or _PARAMETER_KEYWORD.fullmatch(upper) is not None


def select_keywords(
    keywords: Mapping[str, str],
    *,
    allow_identifying: bool = False,
    extra_allowed: Iterable[str] = (),
) -> dict[str, str]:
    """The keywords that may leave the reader.

    Parameters
    ----------
    keywords
        TEXT keywords as read (names upper-cased).
    allow_identifying
        Keep every keyword (the user has opted in to carrying identifiers).
    extra_allowed
        Further keyword names to keep, provided they are not identifying (e.g. a
        lab's harmless custom keyword); identifying names are still dropped.

    Returns
    -------
    dict
        A new dict with the kept keywords, in the original order.
    """
    if allow_identifying:
        return dict(keywords)
    extra = {n.strip().upper() for n in extra_allowed}
    return {
        k: v
        for k, v in keywords.items()
        if is_safe_keyword(k) or (k.upper() in extra and not is_identifying(k))
    }


def identifying_values(keywords: Mapping[str, str]) -> dict[str, str]:
    """The non-empty values of identifying keywords (what must never appear in outputs)."""
    return {k: v for k, v in keywords.items() if is_identifying(k) and v.strip()}


#: How a ``$PnS`` label that may not leave the reader is shown (``index`` is the ``n``).
def redact_fcs(
    data: FCSData, *, allow_identifying: bool = False, declared_markers: Iterable[str] = ()
) -> FCSData:
    """Apply the reader's privacy rules to a sample in place: keywords and ``$PnS`` labels.

    Parameters
    ----------
    data
        As returned by :func:`blinaprofile.io.fcs.read_fcs`.
    allow_identifying
        Keep everything (the user has opted in to carrying identifiers).
    declared_markers
        Names the caller declares as markers (see :func:`redact_markers`).

    Returns
    -------
    FCSData
        ``data``, whose ``keywords`` are :func:`select_keywords` and whose ``markers`` (and
        ``$PnS`` keywords) are :func:`redact_markers`.
    """
    if allow_identifying:
        return data
    data.keywords = select_keywords(data.keywords)
    data.markers = redact_markers(data.channels, data.markers, declared=declared_markers)
    for i, label in enumerate(data.markers, start=1):
        if f"$P{i}S" in data.keywords:
            data.keywords[f"$P{i}S"] = label
    return data


# --------------------------------------------------------------------------- file names
def file_pseudonym(path: str | os.PathLike[str]) -> str:
    """``S-<first 12 hex of the file's SHA-256>``, or ``""`` when the file cannot be read.

    The name an output gives a sample that has no ``sample_id``: it ties the result to
    the exact file without revealing the file's name.
    """
    from blinaprofile.errors import InputError
    from blinaprofile.io.files import file_checksum, pseudonymous_id

    p = Path(path)
    if not os.fspath(path) or not p.exists():
        return ""
    try:
        return pseudonymous_id(file_checksum(p))
    except (OSError, InputError):  # unreadable, or not a regular file: no pseudonym
        return ""


#: What a message calls an input file that has neither a sample ID nor a pseudonym
#: (a file that cannot be read).
WITHHELD_FILE_NAME = "(file name withheld)"


def withhold_file_name(text: str, path: str | os.PathLike[str], *, label: str) -> str:
    """``text`` with every mention of an input file replaced by ``label``.

    The path as given, its absolute and resolved forms and the file's name are replaced
    (longest first), so a message such as ``'/data/Roe_Jane.fcs: file not found'`` becomes
    ``'S-1a2b3c4d5e6f: file not found'``.

    Parameters
    ----------
    text
        A message (e.g. an error) that may name the file.
    path
        The input file.
    label
        What to call the sample instead (its ``sample_id`` or pseudonym).
    """
    raw = os.fspath(path)
    if not raw:
        return text
    p = Path(raw)
    forms = {raw, str(p), p.name}
    with contextlib.suppress(OSError, RuntimeError):
        forms |= {str(p.absolute()), str(p.resolve())}
    for form in sorted((f for f in forms if f), key=len, reverse=True):
        text = text.replace(form, label)
    return text


# --------------------------------------------------------------------------- manifests
#: Manifest columns a feature table carries besides those the user names.
DECLARED_MANIFEST_COLUMNS: tuple[str, ...] = (
    "sample_id",
    "patient_id",
    "response",
    "timepoint",
    "batch",
)


def manifest_columns(
    columns: Sequence[str],
    *,
    keep: Iterable[str] = (),
    keep_file_names: bool = False,
    path: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[str]]:
    """Which manifest columns may reach a feature table, and which are dropped.

    Parameters
    ----------
    columns
        The manifest's columns (``path`` is internal: neither kept nor reported).
    keep
        Further columns the user declares (``--keep-column``); matched exactly, else
        ignoring case and surrounding blanks.
    keep_file_names
        Also keep the ``file`` column (the input file names).
    path
        The manifest, for the error message.

    Returns
    -------
    kept, dropped
        Column names in manifest order. ``file`` is never in ``dropped``: it is the input,
        not an undeclared column.

    Raises
    ------
    ManifestError
        A name in ``keep`` is not a column of the manifest.
    """
    from blinaprofile.errors import ManifestError

    cols = list(columns)
    lower = {c.strip().lower(): c for c in cols}
    wanted = set(DECLARED_MANIFEST_COLUMNS)
    unknown = []
    for name in keep:
        col = name if name in cols else lower.get(name.strip().lower())
        if col is None:
            unknown.append(name)
        else:
            wanted.add(col)
    if unknown:
        raise ManifestError(
            f"column(s) {unknown} to keep are not in the manifest; it has {cols[:20]}",
            path=path,
        )
    if keep_file_names:
        wanted.add("file")
    kept = [c for c in cols if c in wanted]
    dropped = [c for c in cols if c not in wanted and c not in ("file", "path")]
    return kept, dropped


def safe_metadata(data: FCSData, *, sample_id: str) -> dict[str, Any]:
    """What outputs may say about an FCS sample: its ``sample_id`` and technical facts.

    The file's own identifiers (``$SRC``, ``$FIL``...) are never included; outputs name a
    sample by the manifest's ``sample_id``.
    """
    return {
        "sample_id": sample_id,
        "fcs_version": data.version,
        "n_events": int(data.n_events),
        "n_channels": int(data.n_channels),
        "channels": list(data.channels),
        "markers": list(data.markers),
        "cytometer": data.keywords.get("$CYT", ""),
        "has_spillover": data.spillover is not None,
    }


# --------------------------------------------------------------------------- scanning
@dataclass(frozen=True)
class Finding:
    """One forbidden string found in a file (``member`` names the part of an archive)."""

    path: Path
    needle: str
    member: str = ""

    def __str__(self) -> str:
        where = f"{self.path}!{self.member}" if self.member else str(self.path)
        return f"{where}: contains {self.needle!r}"


def _encodings(needle: str) -> list[bytes]:
    out = [needle.encode("utf-8"), needle.encode("utf-16-le")]
    return list(dict.fromkeys(out))


def _search(blob: bytes, needles: Sequence[str]) -> list[str]:
    return [n for n in needles if any(e in blob for e in _encodings(n))]


def _parquet_text(blob: bytes) -> bytes:
    import pyarrow.parquet as pq

    table = pq.read_table(io.BytesIO(blob))
    meta = table.schema.metadata or {}
    parts = [repr(table.to_pylist()), repr(meta), repr(table.column_names)]
    return "\n".join(parts).encode("utf-8", errors="replace")


def _hdf5_text(path: Path) -> bytes:
    import h5py
    import numpy as np

    parts: list[str] = []

    def visit(name: str, obj: Any) -> None:
        parts.append(name)
        parts.extend(f"{k}={v!r}" for k, v in obj.attrs.items())
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind in "OSU":  # text only
            value = obj[()]
            if isinstance(value, np.ndarray) and value.dtype.kind in "OSU":
                parts.extend(
                    x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                    for x in value.ravel()
                )
            elif isinstance(value, bytes | str):
                parts.append(
                    value.decode("utf-8", "replace") if isinstance(value, bytes) else value
                )

    with h5py.File(path, "r") as fh:
        parts.extend(f"{k}={v!r}" for k, v in fh.attrs.items())
        fh.visititems(visit)
    return "\n".join(parts).encode("utf-8", errors="replace")


def _scan_blob(
    path: Path, member: str, blob: bytes, needles: Sequence[str], depth: int
) -> list[Finding]:
    found = [Finding(path, n, member) for n in _search(blob, needles)]
    if depth > 3:
        return found
    decoded: list[tuple[str, bytes]] = []
    if blob[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as zf:
                decoded.extend(
                    (f"{member}/{info.filename}".lstrip("/"), zf.read(info))
                    for info in zf.infolist()
                    if not info.is_dir()
                )
        except (zipfile.BadZipFile, OSError, EOFError):
            pass
    elif blob[:2] == b"\x1f\x8b":
        with contextlib.suppress(OSError, EOFError):
            decoded.append((f"{member}/<gunzip>".lstrip("/"), gzip.decompress(blob)))
    elif blob[:4] == b"PAR1":
        # pyarrow's errors derive from OSError / ValueError
        with contextlib.suppress(OSError, ValueError):
            decoded.append((f"{member}/<parquet>".lstrip("/"), _parquet_text(blob)))
    for name, inner in decoded:
        for f in _scan_blob(path, name, inner, needles, depth + 1):
            if f not in found:
                found.append(f)
    return found


def scan_for_strings(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    needles: Iterable[str],
    *,
    exclude: Iterable[str | os.PathLike[str]] = (),
) -> list[Finding]:
    """Search files and folders (recursively) for forbidden strings.

    Every regular file is searched as bytes for each needle in UTF-8 and UTF-16-LE;
    zip archives (``.skops``, ``.zip``, ``.xlsx``...), gzip streams and Parquet files are
    also searched after decoding, and HDF5 files (``.h5ad``, ``.h5``) through their
    datasets and attributes (which may be compressed on disk).

    Parameters
    ----------
    paths
        Files and/or folders.
    needles
        The strings that must not appear (e.g. :func:`identifying_values` of the inputs).
    exclude
        Files or folders to skip (e.g. the input files that legitimately hold them).

    Returns
    -------
    list of Finding
        Empty when nothing was found.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    wanted = [n for n in dict.fromkeys(needles) if n]
    skipped = [Path(p).resolve() for p in exclude]

    def is_excluded(p: Path) -> bool:
        rp = p.resolve()
        return any(rp == s or s in rp.parents for s in skipped)

    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(q for q in sorted(p.rglob("*")) if q.is_file() and not q.is_symlink())
        elif p.is_file():
            files.append(p)
    findings: list[Finding] = []
    for f in files:
        if is_excluded(f):
            continue
        blob = f.read_bytes()
        findings.extend(_scan_blob(f, "", blob, wanted, 0))
        if blob[:8] == b"\x89HDF\r\n\x1a\n":
            try:
                text = _hdf5_text(f)
            except (OSError, ValueError, KeyError):
                continue
            for n in _search(text, wanted):
                hit = Finding(f, n, "<hdf5>")
                if hit not in findings and Finding(f, n) not in findings:
                    findings.append(hit)
    return findings
