"""What the annotator reads from an AnnData (without modifying it) and the per-cell QC."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from blinaprofile.annotate.config import SingleCellConfig
from blinaprofile.errors import SingleCellInputError
from blinaprofile.io.singlecell import (
    ANTIBODY_TYPES,
    GENE_PANEL_KEY,
    PANEL_DETECTED_COLUMN,
    PANEL_TOTAL_COLUMN,
    MatrixInfo,
    find_obsm_protein,
    gene_symbols,
    linear_values,
    protein_frame,
    rna_matrix,
)

__all__ = [
    "READER_PROTEIN_KEY",
    "CellInput",
    "CellQC",
    "PanelSums",
    "cell_qc",
    "prepare",
    "protein_keys",
    "sample_codes",
]

#: where ``read_single_cell`` puts CITE-seq protein (canonical antibody names, raw counts)
READER_PROTEIN_KEY = "protein"


@dataclass(frozen=True)
class PanelSums:
    """Per-cell sums over every gene of a gene-panel object (``matrix`` holds only some genes).

    Attributes
    ----------
    n_genes
        Genes of the whole matrix.
    total
        Each cell's sum over every gene on the linear scale (float32 for raw counts, as the
        float32 matrix's row sum; float64 for normalised data).
    detected
        Each cell's number of stored values (genes detected).
    """

    n_genes: int
    total: np.ndarray
    detected: np.ndarray


@dataclass
class CellInput:
    """What the annotator needs, extracted without modifying the caller's object."""

    source: str | None
    n_obs: int
    matrix: sp.csr_matrix | None  # RNA genes only: raw counts or normalised (``info``)
    info: MatrixInfo | None
    symbols: np.ndarray  # upper-case gene symbol per RNA column
    symbol_source: str
    protein: pd.DataFrame | None  # canonical names, raw counts
    protein_source: str
    sample: np.ndarray  # int code per cell
    sample_names: list[str]
    sample_key: str | None
    patient_of_sample: list[str]
    patient_key: str | None
    panel: PanelSums | None = None  # the object is a gene panel: sums over every gene

    @property
    def x_kind(self) -> str:
        return self.info.kind if self.info is not None else "none"


def _source_of(adata: ad.AnnData) -> str | None:
    info = adata.uns.get("blinaprofile", {})
    src = info.get("source") if isinstance(info, Mapping) else None
    return str(src) if src else None


def _resolve_key(
    adata: ad.AnnData,
    key: str | None,
    candidates: Sequence[str],
    what: str,
    source: str | None,
) -> str | None:
    if key is not None:
        if key not in adata.obs.columns:
            cols = ", ".join(map(str, adata.obs.columns)) or "no columns"
            raise SingleCellInputError(
                f"{what} key {key!r} is not an obs column (obs has: {cols})", path=source
            )
        return key
    return next((c for c in candidates if c in adata.obs.columns), None)


def _signature_genes(cfg: SingleCellConfig) -> list[str]:
    out = [g for s in cfg.rna.signatures.values() for g in (*s.up, *s.down, *s.secondary)]
    return [*out, *(f"{cfg.cell_qc.mito_prefix}{g}" for g in ("CO1", "CO2", "ND1", "ATP6"))]


def sample_codes(
    adata: ad.AnnData,
    cfg: SingleCellConfig,
    *,
    sample_key: str | None,
    default_sample: str = "sample",
) -> tuple[np.ndarray, list[str], str | None]:
    """Each cell's sample as the annotator resolves it.

    Parameters
    ----------
    adata
        The object (only ``obs`` and ``uns`` are read).
    cfg
        Its ``sample_key_candidates`` are tried when ``sample_key`` is ``None``.
    sample_key
        ``obs`` column of the sample.
    default_sample
        The name of the one sample of an object without a sample column.

    Returns
    -------
    codes, names, key
        An int code per cell, the sample names in order of first appearance, and the column
        used (``None``: one sample).

    Raises
    ------
    SingleCellInputError
        An unknown key, or missing values in the sample column.
    """
    source = _source_of(adata)
    skey = _resolve_key(adata, sample_key, cfg.sample_key_candidates, "sample", source)
    if skey is None:
        return np.zeros(adata.n_obs, dtype=np.int64), [default_sample], None
    svals = adata.obs[skey]
    if svals.isna().any():
        raise SingleCellInputError(
            f"sample key {skey!r} has {int(svals.isna().sum())} missing values", path=source
        )
    codes, uniq = pd.factorize(svals.astype(str), sort=False)
    return np.asarray(codes, dtype=np.int64), [str(u) for u in uniq], skey


def prepare(
    adata: ad.AnnData,
    cfg: SingleCellConfig,
    *,
    sample_key: str | None,
    patient_key: str | None,
    default_sample: str,
    x_kind: str = "auto",
    use_protein: bool = True,
) -> CellInput:
    """Extract samples, patients, the RNA matrix (and its kind), gene symbols and protein.

    Protein comes from one place. An object from
    :func:`~blinaprofile.io.singlecell.read_single_cell` (``uns['blinaprofile']`` records its
    ``protein_source``) has it in ``obsm['protein']`` only: the original matrix the reader
    took it from (``obsm['protein_expression']``...) is not read, so deleting
    ``obsm['protein']`` gives an RNA-only run. Other objects: the first of
    ``cfg.protein.obsm_keys`` present, else Antibody Capture features. ``use_protein=False``
    reads no protein at all (Antibody Capture features are still kept out of the genes).

    Raises
    ------
    SingleCellInputError
        No cells, an unknown key, a sample spanning several patients, a cytometry object,
        an unusable matrix, or neither genes nor protein.
    """
    source = _source_of(adata)
    if adata.n_obs == 0:
        raise SingleCellInputError("the object has no cells", path=source)
    codes, names, skey = sample_codes(
        adata, cfg, sample_key=sample_key, default_sample=default_sample
    )
    pkey = _resolve_key(adata, patient_key, cfg.patient_key_candidates, "patient", source)
    patients: list[str] = []
    pvals = adata.obs[pkey].astype(str).to_numpy() if pkey is not None else None
    for i, s in enumerate(names):
        if pvals is None:
            patients.append(s)
            continue
        pv = pd.unique(pvals[codes == i])
        if len(pv) != 1:
            raise SingleCellInputError(
                f"sample {s!r} maps to {len(pv)} patients in obs[{pkey!r}]: {sorted(pv)[:5]}",
                path=source,
            )
        patients.append(str(pv[0]))

    keys = protein_keys(adata, cfg) if use_protein else []
    protein, _, pkey_src = find_obsm_protein(adata, keys, source)
    prot_src = f"obsm[{pkey_src!r}]" if pkey_src else ""
    if not use_protein:
        prot_src = "not used (use_protein=False)"
    mat, var, info = rna_matrix(adata, x_kind=x_kind, source=source)
    keep = np.ones(var.shape[0], dtype=bool)
    if "feature_types" in var:
        ft = var["feature_types"].astype(str).str.strip().str.lower()
        ab = ft.isin(ANTIBODY_TYPES).to_numpy()
        if ab.any() and protein is None and use_protein and not _from_reader(adata):
            protein = protein_frame(
                sp.csr_matrix(mat)[:, np.flatnonzero(ab)],
                [str(n) for n in var.index[ab]],
                adata.obs_names,
            )
            prot_src = "Antibody Capture features"
        keep = (ft == "gene expression").to_numpy()
    matrix: sp.csr_matrix | None = None
    symbols = np.array([], dtype=object)
    sym_src = ""
    panel = _panel_sums(adata)
    if keep.any():
        m = mat if keep.all() else sp.csr_matrix(mat)[:, np.flatnonzero(keep)]
        matrix = m if isinstance(m, sp.csr_matrix) else sp.csr_matrix(m)
        vsub = var if keep.all() else var[keep]
        symbols, sym_src = gene_symbols(
            vsub, _signature_genes(cfg), source=panel[1] if panel is not None else None
        )
    if matrix is None and protein is None:
        raise SingleCellInputError("the object has no genes and no protein", path=source)
    return CellInput(
        source=source,
        n_obs=adata.n_obs,
        matrix=matrix,
        info=info if matrix is not None else None,
        symbols=symbols,
        symbol_source=sym_src,
        protein=protein,
        protein_source=prot_src,
        sample=np.asarray(codes, dtype=np.int64),
        sample_names=names,
        sample_key=skey,
        patient_of_sample=patients,
        patient_key=pkey,
        panel=panel[0] if panel is not None and matrix is not None else None,
    )


def _from_reader(adata: ad.AnnData) -> bool:
    """Whether ``adata`` comes from ``read_single_cell`` (or the chunked reader), which
    records where it found protein and exposes it as ``obsm['protein']`` only."""
    meta = adata.uns.get("blinaprofile", {})
    return isinstance(meta, Mapping) and "protein_source" in meta


def protein_keys(adata: ad.AnnData, cfg: SingleCellConfig) -> list[str]:
    """The ``obsm`` keys the annotator reads protein from: ``["protein"]`` for an object from
    :func:`~blinaprofile.io.singlecell.read_single_cell`, else ``cfg.protein.obsm_keys``."""
    return [READER_PROTEIN_KEY] if _from_reader(adata) else list(cfg.protein.obsm_keys)


def _panel_sums(adata: ad.AnnData) -> tuple[PanelSums, str] | None:
    """The sums over every gene and the symbol source of a gene-panel object, else ``None``."""
    meta = adata.uns.get("blinaprofile", {})
    panel = meta.get(GENE_PANEL_KEY) if isinstance(meta, Mapping) else None
    if not isinstance(panel, Mapping):
        return None
    sums = PanelSums(
        n_genes=int(panel["n_genes"]),
        total=adata.obs[PANEL_TOTAL_COLUMN].to_numpy(),
        detected=adata.obs[PANEL_DETECTED_COLUMN].to_numpy(),
    )
    return sums, str(panel["symbol_source"])


@dataclass
class CellQC:
    """Per-cell QC: which cells pass, the rules applied and the cells each rule fails."""

    passed: np.ndarray
    rules: list[str]
    fails: dict[str, np.ndarray] = field(default_factory=dict)

    def per_sample(self, inp: CellInput) -> dict[str, dict[str, Any]]:
        """Per sample: cells read, passed, and removed by each rule (a cell can fail several)."""
        out: dict[str, dict[str, Any]] = {}
        for i, s in enumerate(inp.sample_names):
            sel = inp.sample == i
            out[s] = {
                "n_cells": int(sel.sum()),
                "n_pass": int((self.passed & sel).sum()),
                "n_removed": int((~self.passed & sel).sum()),
                "removed_by_rule": {r: int((m & sel).sum()) for r, m in self.fails.items()},
            }
        return out


def cell_qc(inp: CellInput, cfg: SingleCellConfig) -> CellQC:
    """Apply ``cell_qc``: detected genes, counts (raw counts only) and mitochondrial share.

    The rules apply only when the RNA matrix has at least ``min_panel_genes`` genes. With
    normalised data the counts rule is skipped and the mitochondrial share is computed on the
    values brought back to the linear scale.
    """
    q = cfg.cell_qc
    ok = np.ones(inp.n_obs, dtype=bool)
    if inp.matrix is None or inp.info is None:
        return CellQC(ok, ["none (no RNA)"])
    mat, info, panel = inp.matrix, inp.info, inp.panel
    rules: list[str] = []
    fails: dict[str, np.ndarray] = {}
    n_genes_total = mat.shape[1] if panel is None else panel.n_genes
    if n_genes_total < q.min_panel_genes:
        rules.append(
            f"gene/count rules skipped: {n_genes_total} genes < min_panel_genes {q.min_panel_genes}"
        )
        return CellQC(ok, rules)
    ngen = np.diff(mat.indptr) if panel is None else panel.detected
    fails[f"genes >= {q.min_genes}"] = ngen < q.min_genes
    if info.is_counts:
        lib = np.asarray(mat.sum(axis=1)).ravel() if panel is None else panel.total
        fails[f"counts >= {q.min_counts}"] = lib < q.min_counts
    else:
        rules.append(f"counts rule skipped: {info.kind} data, not raw counts")
    mito = np.flatnonzero(np.char.startswith(inp.symbols.astype(str), q.mito_prefix.upper()))
    if mito.size:
        if info.is_counts:
            mt = np.asarray(mat[:, mito].sum(axis=1)).ravel()
            tot = lib
        else:
            lin = mat.copy()
            lin.data = linear_values(lin.data, info)
            mt = np.asarray(lin[:, mito].sum(axis=1)).ravel()
            tot = np.asarray(lin.sum(axis=1)).ravel() if panel is None else panel.total
        rule = f"mitochondrial % <= {q.max_mito_pct:g} ({mito.size} genes)"
        fails[rule] = ~(100.0 * mt / np.maximum(tot, 1.0) <= q.max_mito_pct)
    for m in fails.values():
        ok &= ~m
    return CellQC(ok, [*fails, *rules], fails)
