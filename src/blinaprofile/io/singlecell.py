"""Reading single-cell objects: ``.h5ad``, 10x matrix folders and 10x ``.h5`` into AnnData.

Raw counts go to ``X``/``layers["counts"]``; normalised matrices (log1p of counts per 10k,
TPM, log TPM) are kept as they are and their kind is recorded; CITE-seq protein goes to
``obsm["protein"]``. The 10x formats are read with scanpy's own readers. The matrix-kind
detection (:func:`detect_x_kind`), gene-symbol lookup (:func:`gene_symbols`) and cytometry
detection (:func:`cytometry_reason`) are shared with the annotator.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from blinaprofile.annotate.config import PathLike, ProteinSpec
from blinaprofile.errors import SingleCellInputError
from blinaprofile.gating.panel import canonical_marker

__all__ = [
    "ANTIBODY_TYPES",
    "GENE_PANEL_KEY",
    "PANEL_DETECTED_COLUMN",
    "PANEL_TOTAL_COLUMN",
    "SYMBOL_COLUMNS",
    "X_KINDS",
    "MatrixInfo",
    "XKind",
    "constant_row_total",
    "cytometry_reason",
    "detect_rows",
    "detect_x_kind",
    "detect_x_kind_from",
    "find_obsm_protein",
    "gene_panel_info",
    "gene_symbols",
    "linear_row_sums",
    "linear_values",
    "protein_frame",
    "read_single_cell",
    "rna_matrix",
]

_DEFAULT_OBSM_KEYS: tuple[str, ...] = tuple(ProteinSpec().obsm_keys)
#: ``var`` columns holding gene symbols (tried when ``var_names`` are not symbols)
SYMBOL_COLUMNS: tuple[str, ...] = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "gene_name",
    "gene_names",
    "symbol",
    "symbols",
    "feature_names",
    "gene",
)
ANTIBODY_TYPES = {"antibody capture", "antibody_capture", "adt", "protein"}
_REAGENT_SUFFIX = re.compile(r"[_\-.\s]*(totalseq[abc]?|adt|antibody)$", re.IGNORECASE)

#: what an RNA matrix can hold (``x_kind``); ``auto`` detects it
XKind = Literal["auto", "counts", "log1p-cp10k", "log-tpm", "tpm"]
X_KINDS: tuple[str, ...] = tuple(k for k in get_args(XKind) if k != "auto")
#: largest value a log-scale matrix holds (log1p of 1e21 counts per 10k); above: linear
_LOG_MAX = 50.0
#: rows whose linear sums agree to this relative spread were normalised to a fixed total
_CONSTANT_ROWS = 1e-3
#: values of a matrix looked at to decide its kind (evenly spaced over the stored values)
DETECT_SAMPLE_VALUES = 200_000
#: cells whose row sums decide whether a normalised matrix has one shared total
DETECT_ROWS = 500

#: ``uns['blinaprofile'][GENE_PANEL_KEY]`` marks an object whose ``X`` holds only some genes
#: of the file (a gene panel read by :mod:`blinaprofile.io.h5ad_stream`): the matrix kind and
#: the gene-symbol source decided on the whole matrix, and its number of genes; the per-cell
#: sums over every gene are in ``obs[PANEL_TOTAL_COLUMN]`` and ``obs[PANEL_DETECTED_COLUMN]``
GENE_PANEL_KEY = "gene_panel"
PANEL_TOTAL_COLUMN = "bp_all_genes_total"
PANEL_DETECTED_COLUMN = "bp_all_genes_detected"


# =========================================================================== protein
def _clean_antibody_name(name: str) -> str:
    """Canonical marker (``CD197_TotalSeqB`` -> ``CCR7``), else the name without reagent suffix."""
    canon = canonical_marker(name)
    if canon:
        return canon
    stripped = _REAGENT_SUFFIX.sub("", str(name).strip())
    return canonical_marker(stripped) or stripped or str(name)


def protein_frame(values: Any, names: Sequence[str], index: pd.Index) -> pd.DataFrame:
    """Antibody counts as a DataFrame with canonical marker names (duplicates get ``_2``...)."""
    arr = values.toarray() if sp.issparse(values) else np.asarray(values)
    arr = np.asarray(arr, dtype=np.float64)
    cols: list[str] = []
    for n in names:
        base = _clean_antibody_name(str(n))
        c, k = base, 2
        while c in cols:  # a second antibody against the same antigen keeps its own column
            c = f"{base}_{k}"
            k += 1
        cols.append(c)
    return pd.DataFrame(arr, index=index, columns=cols)


def find_obsm_protein(
    adata: ad.AnnData, keys: Sequence[str], source: str | None
) -> tuple[pd.DataFrame | None, dict[str, str], str | None]:
    """Protein counts from ``obsm`` (a DataFrame, or an array with names in ``uns``)."""
    for key in keys:
        if key not in adata.obsm:
            continue
        val = adata.obsm[key]
        if isinstance(val, pd.DataFrame):
            names = [str(c) for c in val.columns]
            frame = protein_frame(val.to_numpy(), names, adata.obs_names)
        else:
            arr = np.asarray(sp.csr_matrix(val).toarray() if sp.issparse(val) else val)
            cand = [f"{key}_names", "protein_names", f"{key.removeprefix('X_')}_names"]
            names_val = next((adata.uns[c] for c in cand if c in adata.uns), None)
            if names_val is None:
                raise SingleCellInputError(
                    f"obsm['{key}'] holds protein counts without antibody names "
                    f"(looked for uns keys {cand})",
                    path=source,
                )
            names = [str(x) for x in np.asarray(names_val).ravel()]
            if arr.ndim != 2 or arr.shape[1] != len(names):
                raise SingleCellInputError(
                    f"obsm['{key}'] has {arr.shape[-1]} columns but {len(names)} antibody names",
                    path=source,
                )
            frame = protein_frame(arr, names, adata.obs_names)
        values = frame.to_numpy()
        if values.size and (np.isnan(values).any() or values.min() < 0):
            raise SingleCellInputError(
                f"obsm['{key}'] holds negative or missing values: protein must be raw "
                "antibody counts",
                path=source,
            )
        return frame, dict(zip(frame.columns, names, strict=True)), key
    return None, {}, None


# =========================================================================== matrix kinds
@dataclass(frozen=True)
class MatrixInfo:
    """What an RNA matrix holds and how to bring it to log1p counts per 10,000.

    Attributes
    ----------
    kind
        ``counts``, ``log1p-cp10k``, ``log-tpm`` or ``tpm``.
    where
        The matrix used: ``layers['counts']``, ``X`` or ``raw.X``.
    declared
        ``True`` when the caller named the kind, ``False`` when it was detected.
    log_base
        ``"e"`` or ``"2"`` for log kinds, ``""`` otherwise.
    row_total
        The total every cell was normalised to (detected from the rows), ``nan`` when the
        rows do not share one total (genes removed after normalising) or for counts.
    note
        How the kind was decided, in words (reported as evidence).
    """

    kind: str
    where: str
    declared: bool
    log_base: str
    row_total: float
    note: str

    @property
    def is_counts(self) -> bool:
        return self.kind == "counts"


def _data_sample(m: Any, n: int = DETECT_SAMPLE_VALUES) -> np.ndarray:
    data = m.data if sp.issparse(m) else np.asarray(m).ravel()
    if data.size > n:  # evenly spaced, so a matrix sorted by cell is sampled throughout
        data = data[np.linspace(0, data.size - 1, n).astype(np.int64)]
    return np.asarray(data, dtype=np.float64)


def _max_value(m: Any) -> float:
    data = m.data if sp.issparse(m) else np.asarray(m)
    return float(np.max(data)) if data.size else 0.0


def _is_integer(vals: np.ndarray) -> bool:
    return bool(np.all(np.abs(vals - np.round(vals)) < 1e-6))


def _inverse(base: str) -> Callable[[np.ndarray], np.ndarray]:
    if base == "e":
        return np.expm1
    if base == "2":
        return lambda v: np.exp2(v) - 1.0
    return lambda v: v


def linear_values(values: np.ndarray, info: MatrixInfo) -> np.ndarray:
    """Values back on the linear scale (counts, counts per total or TPM)."""
    return np.asarray(_inverse(info.log_base)(np.asarray(values, dtype=np.float64)))


def linear_row_sums(m: Any, base: str) -> np.ndarray:
    """Row sums of ``m`` on the linear scale (``base`` ``""``, ``"e"`` or ``"2"``), float64."""
    return _row_sums(m, base)


def _row_sums(m: Any, base: str, rows: np.ndarray | None = None, chunk: int = 20_000) -> np.ndarray:
    """Row sums on the linear scale (inverse log applied to the stored values only)."""
    csr = m if sp.issparse(m) and m.format == "csr" else sp.csr_matrix(m)
    if rows is not None:
        csr = csr[rows]
    inv = _inverse(base)
    out = np.empty(csr.shape[0])
    for start in range(0, csr.shape[0], chunk):
        part = csr[start : start + chunk]
        lin = part.copy()
        lin.data = inv(np.asarray(lin.data, dtype=np.float64))
        out[start : start + chunk] = np.asarray(lin.sum(axis=1)).ravel()
    return out


def detect_rows(n_obs: int) -> np.ndarray:
    """The (up to 500) evenly spaced cells whose row sums :func:`detect_x_kind` compares."""
    return np.unique(np.linspace(0, n_obs - 1, min(n_obs, DETECT_ROWS)).astype(np.int64))


def _constant_total(m: Any, base: str) -> float:
    """The shared linear row total of up to 500 evenly spaced cells, or ``nan``."""
    n = m.shape[0]
    if n == 0:
        return float("nan")
    return constant_row_total(_row_sums(m, base, detect_rows(n)))


def constant_row_total(sums: np.ndarray) -> float:
    """The total the given linear row sums share (their median), or ``nan`` when they spread.

    Parameters
    ----------
    sums
        Linear row sums of the cells of :func:`detect_rows`.

    Returns
    -------
    float
    """
    if sums.size == 0:
        return float("nan")
    med = float(np.median(sums))
    if med <= 0 or (float(sums.max()) - float(sums.min())) / med > _CONSTANT_ROWS:
        return float("nan")
    return med


def detect_x_kind(m: Any, *, declared: str = "auto", where: str = "X") -> MatrixInfo:
    """What a matrix holds: raw counts, log1p counts per 10k, log TPM or TPM.

    Parameters
    ----------
    m
        Cells x genes, sparse or dense.
    declared
        ``auto`` to detect, else the kind the caller states (checked for consistency).
    where
        Where the matrix was found (for the messages).

    Returns
    -------
    MatrixInfo

    Raises
    ------
    SingleCellInputError
        Negative values (centred or scaled data), non-finite values, a declared kind the
        values contradict (``counts`` that are not integers, log data above 50).

    Notes
    -----
    Integer-valued non-negative data are counts. Other data up to 50 are log-scale: the rows
    are transformed back (``expm1``, else ``2**x - 1``); if 500 evenly spaced cells then share
    one total, the data were normalised to it (about 1e4: ``log1p-cp10k``; about 1e6:
    ``log-tpm``, which includes log1p CPM). Without a shared total (genes removed after
    normalising) ``log1p-cp10k`` is assumed. Data above 50 are linear (``tpm``).
    """
    return detect_x_kind_from(
        _data_sample(m),
        _max_value(m),
        lambda base: _constant_total(m, base),
        declared=declared,
        where=where,
    )


def detect_x_kind_from(
    vals: np.ndarray,
    vmax: float,
    total_of: Callable[[str], float],
    *,
    declared: str = "auto",
    where: str = "X",
) -> MatrixInfo:
    """:func:`detect_x_kind` from what it looks at, for a matrix read in pieces.

    Parameters
    ----------
    vals
        The stored values at ``np.linspace(0, nnz - 1, 200_000)`` (all of them when fewer),
        as float64.
    vmax
        The largest stored value (0 for an empty matrix).
    total_of
        ``base -> `` :func:`constant_row_total` of the linear row sums (``""``: as stored,
        ``"e"``: ``expm1``, ``"2"``: ``2**x - 1``) of the cells of :func:`detect_rows`.
    declared, where
        As :func:`detect_x_kind`.

    Returns
    -------
    MatrixInfo
    """
    if vals.size and not np.all(np.isfinite(vals)):
        raise SingleCellInputError(f"the RNA matrix ({where}) holds NaN or infinite values")
    if vals.size and vals.min() < 0:
        raise SingleCellInputError(
            f"the RNA matrix ({where}) holds negative values: centred or scaled data (e.g. after "
            "sc.pp.scale) cannot be used; provide raw counts (layers['counts'] or .raw) or "
            "log-normalised values"
        )
    integer = _is_integer(vals)
    if declared == "counts":
        if not integer:
            raise SingleCellInputError(
                f"x_kind='counts' was declared but the matrix ({where}) holds non-integer values"
            )
        return MatrixInfo("counts", where, True, "", float("nan"), f"raw counts ({where})")
    if declared == "auto" and integer:
        note = f"integer values in {where}: raw counts"
        return MatrixInfo("counts", where, False, "", float("nan"), note)
    if declared in ("log1p-cp10k", "log-tpm") and vmax > _LOG_MAX:
        raise SingleCellInputError(
            f"x_kind={declared!r} was declared but the matrix ({where}) holds values up to "
            f"{vmax:.3g}, which is not log-scale"
        )
    if declared == "tpm" or (declared == "auto" and vmax > _LOG_MAX):
        total = total_of("")
        note = (
            f"linear normalised values, every cell sums to {total:.4g}"
            if np.isfinite(total)
            else "linear normalised values (cells do not share one total)"
        )
        return MatrixInfo("tpm", where, declared != "auto", "", total, f"{note}: TPM")
    for base in ("e", "2"):
        total = total_of(base)
        if np.isfinite(total):
            kind = "log-tpm" if total > 1e5 else "log1p-cp10k"
            if declared != "auto":
                kind = declared
            log = "log1p" if base == "e" else "log2(x + 1)"
            return MatrixInfo(
                kind,
                where,
                declared != "auto",
                base,
                total,
                f"{log} of values normalised to {total:.4g} per cell",
            )
    kind = "log1p-cp10k" if declared == "auto" else declared
    return MatrixInfo(
        kind,
        where,
        declared != "auto",
        "e",
        float("nan"),
        "log-scale values whose cells do not share one total (genes removed after normalising?);"
        f" read as {kind} with natural log",
    )


def rna_matrix(
    adata: ad.AnnData, *, x_kind: str = "auto", source: str | None = None
) -> tuple[Any, pd.DataFrame, MatrixInfo]:
    """The RNA matrix to use, its ``var`` and what it holds.

    With ``x_kind="auto"``: raw counts from ``layers['counts']``, else ``X`` if integer,
    else ``.raw`` if integer; otherwise ``X`` as normalised data (kind detected, or the kind
    recorded in ``uns['blinaprofile']['x_kind']`` by :func:`read_single_cell`). A declared
    ``counts`` takes the same places; a declared normalised kind uses ``X``.

    Raises
    ------
    SingleCellInputError
        A cytometry object (see :func:`cytometry_reason`), negative or non-finite values, or
        a declared kind the values contradict.
    """
    if x_kind not in ("auto", *X_KINDS):
        raise SingleCellInputError(
            f"x_kind must be one of auto, {', '.join(X_KINDS)}; got {x_kind!r}", path=source
        )
    panel = gene_panel_info(adata)
    if panel is not None:  # a gene panel: kind decided on the whole matrix when it was read
        if x_kind not in ("auto", panel.kind):
            raise SingleCellInputError(
                f"x_kind={x_kind!r} was given but this gene panel was read as {panel.kind}",
                path=source,
            )
        return adata.X, adata.var, panel
    reason = cytometry_reason(adata)
    if reason is not None:
        raise SingleCellInputError(reason, path=source)
    try:
        if x_kind in ("auto", "counts"):
            if "counts" in adata.layers:
                m = adata.layers["counts"]
                return m, adata.var, detect_x_kind(m, declared="counts", where="layers['counts']")
            info = detect_x_kind(adata.X, declared="auto", where="X")
            if info.is_counts:
                return adata.X, adata.var, info
            raw = adata.raw
            if raw is not None and raw.n_obs == adata.n_obs:
                rinfo = detect_x_kind(raw.X, declared="auto", where="raw.X")
                if rinfo.is_counts:
                    return raw.X, raw.var, rinfo
            if x_kind == "counts":
                raise SingleCellInputError(
                    "x_kind='counts' but X holds non-integer values and there is no "
                    "layers['counts'] or .raw with raw counts",
                    path=source,
                )
            recorded = adata.uns.get("blinaprofile", {})
            rec_kind = recorded.get("x_kind") if isinstance(recorded, dict) else None
            if rec_kind in X_KINDS and rec_kind != "counts" and rec_kind != info.kind:
                info = detect_x_kind(adata.X, declared=str(rec_kind), where="X")
            return adata.X, adata.var, info
        return adata.X, adata.var, detect_x_kind(adata.X, declared=x_kind, where="X")
    except SingleCellInputError as err:
        if err.path is None and source is not None:
            raise SingleCellInputError(err.message, path=source) from None
        raise


def gene_panel_info(adata: ad.AnnData) -> MatrixInfo | None:
    """The matrix kind recorded for a gene panel (see :data:`GENE_PANEL_KEY`), else ``None``."""
    meta = adata.uns.get("blinaprofile", {})
    panel = meta.get(GENE_PANEL_KEY) if isinstance(meta, dict) else None
    if not isinstance(panel, dict):
        return None
    return MatrixInfo(
        kind=str(panel["kind"]),
        where=str(panel["where"]),
        declared=bool(panel["declared"]),
        log_base=str(panel["log_base"]),
        row_total=float(panel["row_total"]),
        note=str(panel["note"]),
    )


# =========================================================================== gene symbols
_ENSEMBL = r"^ENS[A-Z]*G\d+"


def gene_symbols(
    var: pd.DataFrame, wanted: Sequence[str] = (), *, source: str | None = None
) -> tuple[np.ndarray, str]:
    """Upper-case gene symbols per ``var`` row and where they came from.

    ``var_names`` are used unless a column of :data:`SYMBOL_COLUMNS` matches more of the
    ``wanted`` genes (e.g. the annotator's gene sets), or, without ``wanted`` matches, the
    ``var_names`` are mostly Ensembl IDs and such a column exists.

    ``source`` (a source this function returned for the same genes, e.g. recorded for a
    gene panel) takes the symbols from there instead of choosing.

    Returns
    -------
    symbols, source
        ``source`` is ``"var_names"`` or ``"var['<column>']"``.
    """
    names = pd.Index(var.index.astype(str))
    cands: list[tuple[str, pd.Index]] = [("var_names", names)]
    for col in SYMBOL_COLUMNS:
        if col in var.columns:
            cands.append((f"var[{col!r}]", pd.Index(var[col].astype(str))))
    fixed = [c for c in cands if c[0] == source]
    if fixed:
        return np.asarray(fixed[0][1].str.upper(), dtype=object), fixed[0][0]
    want = {g.upper() for g in wanted}
    best_src, best = cands[0]
    if want:
        hits = [len(want.intersection(idx.str.upper())) for _, idx in cands]
        k = int(np.argmax(hits))
        if hits[k] > hits[0]:
            best_src, best = cands[k]
    if best_src == "var_names" and len(cands) > 1 and len(names):
        ensembl = float(names.str.match(_ENSEMBL).mean())
        if ensembl > 0.5:
            best_src, best = cands[1]
    return np.asarray(best.str.upper(), dtype=object), best_src


# =========================================================================== cytometry
_CYTO_CHANNEL = re.compile(
    r"^(fsc|ssc|time|event_?length|width|height|center|offset|residual|beaddist|"
    r"dna\d|ir19[13]|pt19[4-8]|cisplatin|fl\d+)([-_ ].*)?$",
    re.IGNORECASE,
)
_MARKER_COLUMNS = ("marker", "markers", "antigen", "pns", "$pns", "channel", "pnn", "$pnn")


def cytometry_reason(adata: ad.AnnData) -> str | None:
    """Why ``adata`` looks like cytometry (events x channels), or ``None``.

    A cytometry AnnData (e.g. written by ``blinaprofile gate --h5ad``, pytometry or
    readfcs) has a few dozen channels named after fluorochromes, metals or antigens, scatter
    or time channels, or marker/channel columns in ``var``, and intensities rather than gene
    counts. The single-cell RNA path cannot use it; the flow path can.
    """
    if adata.n_vars == 0 or adata.n_vars > 300:
        return None
    names = [str(v) for v in adata.var_names]
    cols = [c for c in adata.var.columns if str(c).lower() in _MARKER_COLUMNS]
    labels = names + [str(x) for c in cols for x in adata.var[c].astype(str)]
    scatter = [n for n in names if _CYTO_CHANNEL.match(n.strip())]
    mapped = sorted({m for lab in labels if (m := canonical_marker(lab))})
    vals = _data_sample(adata.X, 50_000)
    intensities = bool(vals.size) and (
        bool(np.any(vals < 0)) or not _is_integer(vals[np.isfinite(vals)])
    )
    if (scatter or cols) and len(mapped) >= 2:
        why = f"scatter/time channels {scatter[:4]}" if scatter else f"var columns {cols}"
    elif intensities and len(mapped) >= max(3, int(0.3 * adata.n_vars)):
        why = "non-integer intensities"
    else:
        return None
    shown = ", ".join(mapped[:8]) + (", ..." if len(mapped) > 8 else "")
    return (
        f"this looks like cytometry data, not single-cell RNA: {adata.n_vars} channels with "
        f"markers {shown} and {why}; use the flow path instead (FCS files with "
        "'blinaprofile featurize' / 'blinaprofile score', or blinaprofile.gating.sample.gate_sample)"
    )


# =========================================================================== readers
def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        for cand in (folder / n, folder / f"{n}.gz"):
            if cand.is_file():
                return cand
    return None


def _read_10x_mtx(folder: Path) -> ad.AnnData:
    """A 10x matrix folder through :func:`scanpy.read_10x_mtx` (antibody capture kept)."""
    import scanpy as sc

    if not _first_existing(folder, ["matrix.mtx"]):
        for sub in ("filtered_feature_bc_matrix", "outs/filtered_feature_bc_matrix"):
            if _first_existing(folder / sub, ["matrix.mtx"]):
                folder = folder / sub
                break
    mtx = _first_existing(folder, ["matrix.mtx"])
    feats = _first_existing(folder, ["features.tsv", "genes.tsv"])
    bcs = _first_existing(folder, ["barcodes.tsv"])
    if mtx is None or feats is None or bcs is None:
        missing = [
            n
            for n, p in (
                ("matrix.mtx(.gz)", mtx),
                ("features.tsv(.gz) or genes.tsv(.gz)", feats),
                ("barcodes.tsv(.gz)", bcs),
            )
            if p is None
        ]
        raise SingleCellInputError(
            f"not a 10x matrix folder: missing {', '.join(missing)}", path=folder
        )
    legacy = feats.name == "genes.tsv"
    gz = {p.suffix == ".gz" for p in (mtx, feats, bcs)}
    if legacy and gz != {False}:
        raise SingleCellInputError(
            "a Cell Ranger 2 folder (genes.tsv) must hold uncompressed matrix.mtx, genes.tsv "
            "and barcodes.tsv",
            path=folder,
        )
    if len(gz) > 1:
        raise SingleCellInputError(
            "matrix.mtx, features.tsv and barcodes.tsv must be all gzipped or all plain",
            path=folder,
        )
    try:
        adata = sc.read_10x_mtx(
            folder, var_names="gene_symbols", gex_only=False, compressed=gz == {True}
        )
    except (OSError, ValueError, EOFError, IndexError, KeyError, pd.errors.ParserError) as err:
        raise SingleCellInputError(
            f"cannot read the 10x matrix folder: {err}", path=folder
        ) from None
    if "feature_types" not in adata.var:
        adata.var["feature_types"] = "Gene Expression"
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def _read_10x_h5(path: Path) -> ad.AnnData:
    """A Cell Ranger 2 or 3+ ``.h5`` through :func:`scanpy.read_10x_h5` (all feature types)."""
    import h5py
    import scanpy as sc

    try:
        with h5py.File(path, "r") as h5:
            groups = [k for k in h5 if isinstance(h5[k], h5py.Group)]
    except OSError as err:
        raise SingleCellInputError(f"cannot read as a 10x .h5 file: {err}", path=path) from None
    if not groups:
        raise SingleCellInputError("not a 10x .h5 file: no 'matrix' or genome group", path=path)
    genome = None if "matrix" in groups else groups[0]
    try:
        adata = sc.read_10x_h5(path, genome=genome, gex_only=False)
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise SingleCellInputError(f"cannot read as a 10x .h5 file: {err}", path=path) from None
    if "feature_types" not in adata.var:
        adata.var["feature_types"] = "Gene Expression"
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def _read_h5ad(path: Path) -> ad.AnnData:
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise SingleCellInputError(f"cannot read as .h5ad: {err}", path=path) from None


def read_single_cell(
    path: PathLike, *, sample_key: str | None = None, x_kind: XKind = "auto"
) -> ad.AnnData:
    """Read a single-cell object with RNA (counts or normalised) and optional CITE-seq protein.

    Parameters
    ----------
    path
        An ``.h5ad`` file, a 10x matrix folder (``matrix.mtx``, ``features.tsv`` or
        ``genes.tsv``, ``barcodes.tsv``, all gzipped or all plain; also its ``matrix.mtx(.gz)``
        file or a parent holding ``filtered_feature_bc_matrix/``) or a 10x ``.h5`` file (Cell
        Ranger 2 or 3+). 10x inputs are read with :func:`scanpy.read_10x_mtx` /
        :func:`scanpy.read_10x_h5`.
    sample_key
        ``obs`` column holding each cell's sample; checked to exist.
    x_kind
        What the RNA matrix holds: ``counts``, ``log1p-cp10k`` (scanpy's ``normalize_total``
        + ``log1p``), ``log-tpm`` (log of TPM + 1) or ``tpm``; ``auto`` (default) takes raw
        counts where they exist (``layers['counts']``, integer ``X``, ``.raw``) and otherwise
        detects the kind of ``X`` (:func:`detect_x_kind`).

    Returns
    -------
    AnnData
        With raw counts, ``X`` and ``layers['counts']`` are the same float32 CSR matrix of
        raw RNA counts (Gene Expression features only; ``.raw`` replaces ``X`` and ``var``
        when it holds the counts). With normalised data, ``X`` is that float32 CSR matrix
        and there is no ``layers['counts']``. Nothing is normalised in place.
        ``uns['blinaprofile']`` records the source file, ``x_kind`` (and ``x_kind_note``,
        how it was decided) and the original antibody names. CITE-seq antibody counts, from
        ``obsm`` (``protein``, ``protein_expression``, ``adt``...; names from the DataFrame
        columns or ``uns['protein_names']``) or from Antibody Capture features, are put in
        ``obsm['protein']``: a DataFrame whose columns are canonical marker names where known
        (``CD197_TotalSeqB`` -> ``CCR7``, ``PD-1`` -> ``PD1``, ``CD8a`` -> ``CD8``), else the
        name without its reagent suffix.

    Raises
    ------
    SingleCellInputError
        The file is missing or unreadable, the format is unknown, there are no cells or no
        genes, the object is cytometry data (the message points to the flow path), the
        matrix is scaled (negative values) or contradicts the declared ``x_kind``, protein
        lacks names, or ``sample_key`` is not an ``obs`` column. The message starts with the
        file name.
    """
    p = Path(path)
    if not p.exists():
        raise SingleCellInputError("file not found", path=p)
    name = p.name.lower()
    if p.is_dir():
        adata = _read_10x_mtx(p)
    elif name.endswith((".mtx", ".mtx.gz")):
        adata = _read_10x_mtx(p.parent)
    elif name.endswith(".h5ad"):
        adata = _read_h5ad(p)
    elif name.endswith((".h5", ".hdf5")):
        adata = _read_10x_h5(p)
    else:
        raise SingleCellInputError(
            f"unsupported single-cell format {p.suffix!r}: expected .h5ad, a 10x .h5 file or "
            "a 10x matrix folder",
            path=p,
        )
    return _standardise(adata, source=str(p), sample_key=sample_key, x_kind=x_kind)


def _standardise(
    adata: ad.AnnData, *, source: str, sample_key: str | None, x_kind: str
) -> ad.AnnData:
    if sample_key is not None and sample_key not in adata.obs.columns:
        cols = ", ".join(map(str, adata.obs.columns)) or "no columns"
        raise SingleCellInputError(
            f"sample key {sample_key!r} is not an obs column (obs has: {cols})", path=source
        )
    if adata.n_obs == 0:
        raise SingleCellInputError("the object has no cells", path=source)
    prot, originals, key = find_obsm_protein(adata, _DEFAULT_OBSM_KEYS, source)
    mat, var, info = rna_matrix(adata, x_kind=x_kind, source=source)
    if var is not adata.var:  # counts from .raw: rebuild on the raw genes
        new = ad.AnnData(X=sp.csr_matrix(mat, dtype=np.float32), obs=adata.obs, var=var.copy())
        for k, v in adata.obsm.items():
            new.obsm[k] = v
        new.uns.update(adata.uns)
        adata = new
    else:
        adata.X = sp.csr_matrix(mat, dtype=np.float32)
        if "counts" in adata.layers:
            del adata.layers["counts"]
    dropped: list[str] = []
    if "feature_types" in adata.var:
        ft = adata.var["feature_types"].astype(str).str.strip().str.lower()
        ab = ft.isin(ANTIBODY_TYPES).to_numpy()
        other = ~ab & (ft != "gene expression").to_numpy()
        if ab.any() and prot is None:
            xmat = sp.csr_matrix(adata.X)
            prot = protein_frame(
                xmat[:, np.flatnonzero(ab)], list(adata.var_names[ab]), adata.obs_names
            )
            originals = dict(zip(prot.columns, map(str, adata.var_names[ab]), strict=True))
            key = "feature_types"
        dropped = sorted(set(adata.var["feature_types"].astype(str)[ab | other]))
        if (ab | other).any():
            adata = adata[:, ~(ab | other)].copy()
    if adata.n_vars == 0:
        raise SingleCellInputError(
            "the object has no genes (no Gene Expression features)", path=source
        )
    adata.var_names_make_unique()
    if not isinstance(adata.X, sp.csr_matrix):
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    if info.is_counts:
        adata.layers["counts"] = adata.X
    if prot is not None:
        adata.obsm["protein"] = prot
    meta = dict(adata.uns.get("blinaprofile", {}))
    meta.update(
        {
            "source": source,
            "x_kind": info.kind,
            "x_kind_note": info.note,
            "protein_source": key or "",
            "protein_names_original": {str(k): str(v) for k, v in originals.items()},
            "dropped_feature_types": list(dropped),
        }
    )
    adata.uns["blinaprofile"] = meta
    return adata
