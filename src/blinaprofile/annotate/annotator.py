"""The single-cell annotator: per-cell T-cell, lineage, memory and state calls from protein where present and RNA gene sets otherwise; labels in ``obs["bp_*"]``."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from blinaprofile.annotate.config import (
    CELL_TYPE_LABELS,
    EVIDENCE_LABELS,
    LINEAGE_LABELS,
    MEMORY_LABELS,
    PathLike,
    SingleCellConfig,
    resolve_config,
)
from blinaprofile.annotate.mixtures import (
    RNA,
    BinFit,
    MarkerGate,
    expit,
    fit_signature,
    logit,
    nb_loglik,
    nb_rates,
    predict_signature,
    protein_gate,
)
from blinaprofile.errors import SingleCellInputError
from blinaprofile.features.schema import SCHEMA_VERSION
from blinaprofile.io.singlecell import (
    ANTIBODY_TYPES,
    SYMBOL_COLUMNS,
    count_matrix,
    find_obsm_protein,
    protein_frame,
)


# =========================================================================== inputs
@dataclass
class _Input:
    """What the annotator needs, extracted without modifying the caller's object."""

    source: str | None
    n_obs: int
    counts: sp.csr_matrix | None  # RNA genes only
    symbols: np.ndarray  # upper-case gene symbol per RNA column
    protein: pd.DataFrame | None  # canonical names, raw counts
    sample: np.ndarray  # int code per cell
    sample_names: list[str]
    sample_key: str | None
    patient_of_sample: list[str]
    patient_key: str | None


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


def prepare(
    adata: ad.AnnData,
    cfg: SingleCellConfig,
    *,
    sample_key: str | None,
    patient_key: str | None,
    default_sample: str,
) -> _Input:
    source = _source_of(adata)
    if adata.n_obs == 0:
        raise SingleCellInputError("the object has no cells", path=source)
    skey = _resolve_key(adata, sample_key, cfg.sample_key_candidates, "sample", source)
    pkey = _resolve_key(adata, patient_key, cfg.patient_key_candidates, "patient", source)
    if skey is not None:
        svals = adata.obs[skey]
        if svals.isna().any():
            raise SingleCellInputError(
                f"sample key {skey!r} has {int(svals.isna().sum())} missing values", path=source
            )
        codes, uniq = pd.factorize(svals.astype(str), sort=False)
        names = [str(u) for u in uniq]
    else:
        codes = np.zeros(adata.n_obs, dtype=np.int64)
        names = [default_sample]
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

    protein, _, _ = find_obsm_protein(adata, cfg.protein.obsm_keys, source)
    mat, var = count_matrix(adata, source)
    keep = np.ones(var.shape[0], dtype=bool)
    if "feature_types" in var:
        ft = var["feature_types"].astype(str).str.strip().str.lower()
        ab = ft.isin(ANTIBODY_TYPES).to_numpy()
        if ab.any() and protein is None:
            protein = protein_frame(
                mat[:, np.flatnonzero(ab)], [str(n) for n in var.index[ab]], adata.obs_names
            )
        keep = (ft == "gene expression").to_numpy()
    counts: sp.csr_matrix | None = None
    symbols = np.array([], dtype=object)
    if keep.any():
        m = mat if keep.all() else mat[:, np.flatnonzero(keep)]
        counts = m if isinstance(m, sp.csr_matrix) else sp.csr_matrix(m)
        vsub = var if keep.all() else var[keep]
        gnames = pd.Index(vsub.index.astype(str))
        if len(gnames) and gnames.str.match(r"^ENS[A-Z]*G\d+").mean() > 0.5:
            col = next((c for c in SYMBOL_COLUMNS if c in vsub.columns), None)
            if col is not None:
                gnames = pd.Index(vsub[col].astype(str))
        symbols = np.asarray(gnames.str.upper(), dtype=object)
    if counts is None and protein is None:
        raise SingleCellInputError("the object has no genes and no protein", path=source)
    return _Input(
        source=source,
        n_obs=adata.n_obs,
        counts=counts,
        symbols=symbols,
        protein=protein,
        sample=np.asarray(codes, dtype=np.int64),
        sample_names=names,
        sample_key=skey,
        patient_of_sample=patients,
        patient_key=pkey,
    )


# =========================================================================== cell QC
def cell_qc(inp: _Input, cfg: SingleCellConfig) -> tuple[np.ndarray, dict[str, Any]]:
    q = cfg.cell_qc
    ok = np.ones(inp.n_obs, dtype=bool)
    rules: list[str] = []
    if inp.counts is None:
        return ok, {"rules": ["none (no RNA)"]}
    n_genes_total = inp.counts.shape[1]
    if n_genes_total >= q.min_panel_genes:
        ngen = np.diff(inp.counts.indptr)
        lib = np.asarray(inp.counts.sum(axis=1)).ravel()
        ok &= ngen >= q.min_genes
        ok &= lib >= q.min_counts
        rules += [f"genes >= {q.min_genes}", f"counts >= {q.min_counts}"]
        mito = np.flatnonzero(np.char.startswith(inp.symbols.astype(str), q.mito_prefix.upper()))
        if mito.size:
            mt = np.asarray(inp.counts[:, mito].sum(axis=1)).ravel()
            ok &= 100.0 * mt / np.maximum(lib, 1.0) <= q.max_mito_pct
            rules.append(f"mitochondrial % <= {q.max_mito_pct:g} ({mito.size} genes)")
    else:
        rules.append(
            f"gene/count rules skipped: {n_genes_total} genes < min_panel_genes {q.min_panel_genes}"
        )
    return ok, {"rules": rules}


# =========================================================================== annotation core
@dataclass
class Labels:
    """Per-cell results over the QC-passed cells (length ``m``)."""

    m: int
    t_prob: np.ndarray
    t_call: np.ndarray
    cell_type: np.ndarray
    lineage: np.ndarray
    lineage_conf: np.ndarray
    mem_prob: np.ndarray  # (m, 4): naive, CM, EM, TEMRA
    tim3: np.ndarray  # P(positive); NaN where not applicable or not estimable
    pd1: np.ndarray
    treg: np.ndarray
    evidence: dict[str, str]  # label -> description of the estimator
    kind: dict[str, str]  # label -> "protein" / "RNA" / "protein+RNA" / "prefiltered"
    scores: dict[str, np.ndarray]
    clr: pd.DataFrame | None
    params: dict[str, Any]


def _clr(prot: pd.DataFrame, axis: str, pseudocount: float) -> pd.DataFrame:
    lg = np.log(np.clip(prot.to_numpy(dtype=np.float64), 0.0, None) + pseudocount)
    lg = lg - (lg.mean(axis=1, keepdims=True) if axis == "cell" else lg.mean(axis=0, keepdims=True))
    return pd.DataFrame(lg, index=prot.index, columns=prot.columns)


def _kind(*sources: str) -> str:
    has_p = any("protein" in s for s in sources)
    has_r = any("RNA" in s for s in sources)
    return "protein+RNA" if has_p and has_r else "protein" if has_p else "RNA" if has_r else ""


class _Annotator:
    """Runs the label cascade over the QC-passed cells of one object."""

    def __init__(self, inp: _Input, qc: np.ndarray, cfg: SingleCellConfig) -> None:
        self.inp = inp
        self.cfg = cfg
        self.rows = np.flatnonzero(qc)
        self.m = self.rows.size
        self.groups = inp.sample[self.rows]
        self.names = inp.sample_names
        self.params: dict[str, Any] = {"protein": {}, "rna": {"models": {}}}
        self.rna: RNA | None = None
        self.scores: dict[str, np.ndarray] = {}
        if inp.counts is not None and self.m:
            rna = RNA(inp.counts, self.rows, inp.symbols, cfg.rna)
            if rna.present:
                self.rna = rna
                for nm, sig in cfg.rna.signatures.items():
                    s = rna.score(sig)
                    if s is not None:
                        self.scores[nm] = s
                self.params["rna"]["missing_genes"] = {
                    nm: [g for g in (*sig.up, *sig.down) if g.upper() not in rna.present]
                    for nm, sig in cfg.rna.signatures.items()
                    if any(g.upper() not in rna.present for g in (*sig.up, *sig.down))
                }
                self.params["rna"]["n_control_genes"] = int(rna.n_ctrl_genes)
        self.clr: pd.DataFrame | None = None
        if inp.protein is not None and self.m:
            self.clr = _clr(
                inp.protein.iloc[self.rows], cfg.protein.clr_axis, cfg.protein.pseudocount
            )
            self.params["protein"] = {
                "clr_axis": cfg.protein.clr_axis,
                "markers": [str(c) for c in self.clr.columns],
                "gates": {},
            }

    # ------------------------------------------------------------------ helpers
    def gate(self, marker: str, parent: np.ndarray, scope: str = "") -> MarkerGate | None:
        """Per-sample gate of ``marker`` within ``parent``; None if absent or never placed."""
        if self.clr is None or marker not in self.clr.columns:
            return None
        g = protein_gate(
            self.clr[marker].to_numpy(), parent, self.groups, self.names, marker, self.cfg.protein
        )
        self.params["protein"]["gates"][f"{marker}@{scope}" if scope else marker] = g.fits
        return g if g.available else None

    def fuse(self, marker: str, prob: np.ndarray, rows: np.ndarray) -> bool:
        """Add RNA evidence to a weak protein gate (``protein.fuse_rna``), in place on rows.

        The RNA rates of the two states are estimated once from the cells weighted by the
        protein posterior (no EM, so the states stay the protein-defined ones); each cell's
        log-likelihood ratio is added to the logit of its protein posterior.
        """
        sig_name = self.cfg.protein.fuse_rna.get(marker)
        if self.rna is None or sig_name is None or sig_name not in self.cfg.rna.signatures:
            return False
        sig = self.cfg.rna.signatures[sig_name]
        genes = self.rna.genes([*sig.up, *sig.down])
        rows = rows[~np.isnan(prob[rows])]
        if not genes or rows.size < self.cfg.rna.min_cells_per_fit:
            return False
        X = self.rna.counts(genes, rows)
        lib = self.rna.lib[rows]
        w = prob[rows]
        glob = (X.sum(axis=0) + 1e-3) / max(float(lib.sum()), 1.0)
        r1, r0, theta = nb_rates(X, X**2, lib, w, self.cfg.rna.prior_umis, glob)
        cap = self.cfg.protein.fuse_max_log_ratio
        llr = np.clip(nb_loglik(X, lib, r1, theta) - nb_loglik(X, lib, r0, theta), -cap, cap)
        lr = np.log(r1) - np.log(r0)
        prob[rows] = expit(logit(w) + llr)
        self.params["protein"].setdefault("fused_rna", {})[marker] = {
            "gene_set": sig_name,
            "genes": genes,
            "log_rate_ratio": lr,
            "n_cells": int(rows.size),
        }
        return True

    def fit(
        self, name: str, rows: np.ndarray, scope: str
    ) -> tuple[BinFit | None, np.ndarray | None]:
        key = f"{name}@{scope}"
        if self.rna is None:
            return None, None
        fit, p = fit_signature(
            self.rna, name, rows, self.groups, self.names, self.cfg.rna, self.scores
        )
        if fit is None:
            self.params["rna"]["models"][key] = {
                "ok": False,
                "note": "no genes of the set present or too few cells",
                "n_cells": int(rows.size),
            }
            return None, None
        self.params["rna"]["models"][key] = fit.as_dict()
        return fit, p

    def posterior(self, name: str, rows: np.ndarray, scope: str) -> np.ndarray | None:
        """P(high) over QC cells (NaN outside ``rows``), or None if the set is unusable."""
        fit, p = self.fit(name, rows, scope)
        if fit is None or p is None or not fit.ok:
            return None
        out = np.full(self.m, np.nan)
        out[rows] = p
        return out

    def by_lineage(self, name: str, scopes: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Fit a gene set per lineage; a lineage with too few cells or no separable states
        uses one fit over all lineages together. P(high) over QC cells and the scopes used."""
        out = np.full(self.m, np.nan)
        used: list[str] = []
        pooled: BinFit | None = None
        tried = False
        for scope, rows in scopes.items():
            if not rows.size:
                continue
            if rows.size >= self.cfg.rna.min_cells_per_fit:
                fit, p = self.fit(name, rows, scope)
                if fit is not None and p is not None and fit.ok:
                    out[rows] = p
                    used.append(scope)
                    continue
            if not tried:
                tried = True
                both = np.sort(np.concatenate([r for r in scopes.values() if r.size]))
                pooled, _ = self.fit(name, both, "+".join(k for k, r in scopes.items() if r.size))
            if pooled is not None and pooled.ok and self.rna is not None:
                out[rows] = predict_signature(self.rna, pooled, rows, self.groups)
                used.append(f"{scope} (fit pooled over lineages)")
        return out, used

    def genes_of(self, name: str) -> list[str]:
        sig = self.cfg.rna.signatures[name]
        return self.rna.genes([*sig.up, *sig.down]) if self.rna is not None else []

    # ------------------------------------------------------------------ cascade
    def run(self) -> Labels:
        m, cfg, src = self.m, self.cfg, self.inp.source
        evidence: dict[str, str] = {}
        if m == 0:  # nothing passed cell QC: every sample fails QC, nothing to annotate
            empty = np.zeros(0)
            none = "no QC-passed cells"
            return Labels(
                m=0,
                t_prob=empty,
                t_call=np.zeros(0, dtype=bool),
                cell_type=np.zeros(0, dtype=object),
                lineage=np.zeros(0, dtype=object),
                lineage_conf=empty,
                mem_prob=np.zeros((0, 4)),
                tim3=empty,
                pd1=empty,
                treg=empty,
                evidence={k: none for k in ("t_cell", "lineage", "memory", "tim3", "pd1", "treg")},
                kind={},
                scores={},
                clr=None,
                params=self.params,
            )
        everyone = np.ones(m, dtype=bool)

        # T cells --------------------------------------------------------------
        t_prob = np.full(m, np.nan)
        if cfg.t_cells_prefiltered:
            t_prob[:] = 1.0
            evidence["t_cell"] = "prefiltered (config t_cells_prefiltered: every QC-passed cell)"
        elif (g3 := self.gate("CD3", everyone)) is not None:
            t_prob = np.nan_to_num(g3.prob, nan=0.0)
            evidence["t_cell"] = "protein: CD3 (CLR, per-sample mixture)"
        else:
            t_prob, evidence["t_cell"] = self._rna_t_cells()
        t_call = t_prob >= 0.5
        tix = np.flatnonzero(t_call)

        # coarse cell type of the others (RNA scores) ------------------------------
        cell_type = np.where(t_call, "T", "non_T").astype(object)
        if all(k in self.scores for k in ("b_cell", "nk", "myeloid")):
            st = np.column_stack([self.scores["b_cell"], self.scores["nk"], self.scores["myeloid"]])
            best = np.array(["B", "NK", "myeloid"], dtype=object)[np.argmax(st, axis=1)]
            best = np.where(st.max(axis=1) > 0, best, "other")
            cell_type = np.where(t_call, "T", best).astype(object)

        # CD4 / CD8 ------------------------------------------------------------------
        lineage = np.where(t_call, "other", "non_T").astype(object)
        lin_conf = np.where(t_call, np.nan, 1.0 - t_prob)
        g4 = self.gate("CD4", t_call)
        g8 = self.gate("CD8", t_call) if g4 is not None else None
        if g4 is not None and g8 is not None:
            p4, p8 = g4.prob[tix], g8.prob[tix]
            probs = np.column_stack([p4 * (1 - p8), p8 * (1 - p4), p4 * p8 + (1 - p4) * (1 - p8)])
            lineage[tix] = np.array(["CD4", "CD8", "other"], dtype=object)[np.argmax(probs, axis=1)]
            lin_conf[tix] = probs.max(axis=1)
            evidence["lineage"] = "protein: CD4, CD8 (CLR, per-sample mixtures within T cells)"
        elif (p := self.posterior("cd8_vs_cd4", tix, "T")) is not None:
            pp = p[tix]
            lineage[tix] = np.where(pp >= 0.5, "CD8", "CD4")
            lin_conf[tix] = np.maximum(pp, 1 - pp)
            evidence["lineage"] = (
                f"RNA: cd8_vs_cd4 gene sets [{', '.join(self.genes_of('cd8_vs_cd4'))}] "
                "(NB mixture + secondary genes)"
            )
        elif tix.size:
            sig = cfg.rna.signatures["cd8_vs_cd4"]
            raise SingleCellInputError(
                "cannot call CD4/CD8 T cells: no usable CD4 and CD8 protein and the genes "
                f"{sig.up + sig.down} are absent or do not separate two states",
                path=src,
            )
        else:
            evidence["lineage"] = "no T cells"
        is8, is4 = lineage == "CD8", lineage == "CD4"
        scopes = {"CD8": np.flatnonzero(is8), "CD4": np.flatnonzero(is4)}

        mem, evidence["memory"] = self._memory(t_call, lineage, scopes)
        tim3, evidence["tim3"] = self._state("TIM3", "checkpoint", scopes)
        pd1, evidence["pd1"] = self._state("PD1", "pd1", scopes)
        treg, evidence["treg"] = self._treg(is4, scopes)
        treg[is8] = 0.0
        kind = {k: _kind(v) for k, v in evidence.items()}
        if cfg.t_cells_prefiltered:
            kind["t_cell"] = "prefiltered"
        return Labels(
            m=m,
            t_prob=t_prob,
            t_call=t_call,
            cell_type=cell_type,
            lineage=lineage,
            lineage_conf=lin_conf,
            mem_prob=mem,
            tim3=tim3,
            pd1=pd1,
            treg=treg,
            evidence=evidence,
            kind=kind,
            scores=self.scores,
            clr=self.clr,
            params=self.params,
        )

    def _rna_t_cells(self) -> tuple[np.ndarray, str]:
        """T cells from the t_cell gene set: a two-state NB mixture, or, when the set does not
        separate two populations but is detected in most cells, a homogeneous T population
        (T-cell-sorted data)."""
        cfg, m = self.cfg, self.m
        genes = self.genes_of("t_cell")
        fit, p = self.fit("t_cell", np.arange(m), "all")
        if fit is not None and p is not None and fit.ok:
            return p, f"RNA: t_cell gene set [{', '.join(genes)}] (NB mixture)"
        detected = (
            self.rna.counts(genes).sum(axis=1) > 0 if self.rna is not None and genes else None
        )
        if detected is not None and detected.mean() >= cfg.rna.homogeneous_min_detected:
            share = float(detected.mean())
            return np.where(detected, 1.0, share), (
                f"RNA: homogeneous T-cell population (t_cell set [{', '.join(genes)}] detected "
                f"in {100 * share:.0f}% of cells, no second population)"
            )
        have = f"{len(self.inp.symbols)} genes" if self.inp.counts is not None else "no RNA"
        prot = list(self.inp.protein.columns) if self.inp.protein is not None else "none"
        why = (
            f"the genes {genes} do not separate T cells from other cells and are detected in "
            f"only {100 * float(detected.mean()):.0f}% of cells"
            if detected is not None
            else f"none of the T-cell genes {cfg.rna.signatures['t_cell'].up} is present"
        )
        raise SingleCellInputError(
            f"cannot call T cells: no usable CD3 protein and {why} ({have}; protein: {prot})",
            path=self.inp.source,
        )

    def _memory(
        self, t_call: np.ndarray, lineage: np.ndarray, scopes: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, str]:
        """Quadrants of a CCR7 axis and a CD45RA axis (protein, else RNA surrogates)."""
        m = self.m
        g_ccr7 = self.gate("CCR7", t_call)
        g_ra = self.gate("CD45RA", t_call)
        ra_name = "CD45RA"
        if g_ra is None and (g_ro := self.gate("CD45RO", t_call)) is not None:
            g_ra = MarkerGate(1.0 - g_ro.prob, g_ro.fits, True)
            ra_name = "CD45RO (inverted)"
        ccr7 = np.full(m, np.nan)
        ra_hi = np.full(m, np.nan)  # P(CD45RA+) in the CCR7+ branch (naive vs CM)
        ra_lo = np.full(m, np.nan)  # P(CD45RA+) in the CCR7- branch (TEMRA vs EM)
        src_c: set[str] = set()
        src_r: set[str] = set()
        pooled: dict[str, BinFit | None] = {}
        if g_ccr7 is not None:
            ccr7 = g_ccr7.prob.copy()
            if self.fuse("CCR7", ccr7, np.flatnonzero(t_call)):
                src_c.add("protein CCR7 + RNA ccr7 set (fused)")
            else:
                src_c.add("protein CCR7")
        if g_ra is not None:
            ra_hi, ra_lo = g_ra.prob.copy(), g_ra.prob.copy()
            src_r.add(f"protein {ra_name}")
        if self.rna is not None:
            if g_ccr7 is None:
                c_rna, c_used = self.by_lineage("ccr7", scopes)
                if c_used:
                    ccr7 = c_rna
                    src_c.add("RNA ccr7 set")
            for scope, rows in scopes.items():
                if not rows.size:
                    continue
                if g_ra is None:
                    c = ccr7[rows]
                    if np.isnan(c).all():
                        continue
                    used = 0
                    for sig_name, sub, target in (
                        ("naive_vs_cm", rows[c >= 0.5], ra_hi),
                        ("temra_vs_em", rows[c < 0.5], ra_lo),
                    ):
                        fit, _ = self.fit(sig_name, sub, scope)
                        if fit is None or not fit.ok:
                            # too few cells in this lineage's branch: fit on CD4 + CD8 together
                            fit = pooled.get(sig_name)
                            if sig_name not in pooled:
                                both = np.concatenate(list(scopes.values()))
                                cb = ccr7[both]
                                branch = both[
                                    (cb >= 0.5) if sig_name == "naive_vs_cm" else (cb < 0.5)
                                ]
                                fit, _ = self.fit(sig_name, np.sort(branch), "T")
                                pooled[sig_name] = fit
                        if fit is not None and fit.ok:
                            target[rows] = predict_signature(self.rna, fit, rows, self.groups)
                            used += 1
                    if used == 2:
                        src_r.add("RNA naive_vs_cm / temra_vs_em sets")
        mem = np.column_stack(
            [ccr7 * ra_hi, ccr7 * (1 - ra_hi), (1 - ccr7) * (1 - ra_lo), (1 - ccr7) * ra_lo]
        )
        mem[~t_call] = np.nan
        if not src_c or not src_r:
            mem[:] = np.nan
            have = " and ".join(sorted(src_c | src_r)) or "neither axis"
            return mem, f"unavailable: need a CCR7 axis and a CD45RA axis (have {have})"
        return (
            mem,
            f"CCR7 axis: {', '.join(sorted(src_c))}; CD45RA axis: {', '.join(sorted(src_r))}",
        )

    def _state(
        self, marker: str, sig_name: str, scopes: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, str]:
        """A T-cell state per lineage: protein gate if the marker is present, else gene set."""
        out = np.full(self.m, np.nan)
        if self.clr is not None and marker in self.clr.columns:
            placed = []
            for scope, rows in scopes.items():
                sub = np.zeros(self.m, dtype=bool)
                sub[rows] = True
                if rows.size and (g := self.gate(marker, sub, scope)) is not None:
                    out[rows] = g.prob[rows]
                    placed.append(scope)
            if placed:
                return out, (
                    f"protein: {marker} (CLR, per-sample threshold within "
                    f"{' and '.join(placed)} T cells)"
                )
        est, used = self.by_lineage(sig_name, scopes)
        if used:
            return est, (
                f"RNA: {sig_name} gene set [{', '.join(self.genes_of(sig_name))}] (NB "
                f"mixture per lineage: {', '.join(used)}; fraction = mean posterior)"
            )
        return out, f"unavailable: no {marker} protein and no separable {sig_name} gene set"

    def _treg(self, is4: np.ndarray, scopes: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
        """CD25+ CD127lo within CD4: one gate on CLR(CD25) - CLR(CD127), the diagonal a flow
        gater draws on CD25 vs CD127 (rare positive); CD25 alone without CD127 protein."""
        out = np.full(self.m, np.nan)
        clr = self.clr
        if clr is not None and "CD25" in clr.columns:
            if "CD127" in clr.columns:
                clr["CD25-CD127"] = clr["CD25"] - clr["CD127"]
                g = self.gate("CD25-CD127", is4)
                del clr["CD25-CD127"]
                what = "CD25+ CD127lo (gate on CLR CD25 - CLR CD127)"
            else:
                g = self.gate("CD25", is4)
                what = "CD25+ (no CD127 protein)"
            if g is not None:
                out[is4] = g.prob[is4]
                return out, f"protein: {what} within CD4, per-sample threshold"
        rows = scopes["CD4"]
        if rows.size and (p := self.posterior("treg", rows, "CD4")) is not None:
            out[rows] = p[rows]
            return out, (
                f"RNA: treg gene set [{', '.join(self.genes_of('treg'))}] (NB mixture; "
                "fraction = mean posterior)"
            )
        return out, "unavailable: no CD25 protein and no separable treg gene set"


def _single_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread: the many small matrix-vector products here are otherwise
    dominated by waking BLAS worker threads (x20 slower, worse on a loaded machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def run_annotator(inp: _Input, qc: np.ndarray, cfg: SingleCellConfig) -> Labels:
    with _single_blas_thread():
        return _Annotator(inp, qc, cfg).run()


def tim3_estimator(lab: Labels) -> str:
    e = lab.evidence.get("tim3", "unavailable")
    if e.startswith("protein"):
        return "protein:TIM3(CD366):per_sample_threshold"
    if e.startswith("RNA"):
        found = re.search(r"\[(.*?)\]", e)
        genes = found.group(1).replace(" ", "") if found else ""
        return f"rna_checkpoint_set:{genes}:mixture_posterior_mean"
    return "unavailable"


# =========================================================================== obs output
def _obs_frame(
    inp: _Input, qc: np.ndarray, lab: Labels, index: pd.Index
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    n = inp.n_obs
    rows = np.flatnonzero(qc)

    def full(values: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
        out = np.full(n, fill, dtype=dtype)
        out[rows] = values
        return out

    mem_ok = ~np.isnan(lab.mem_prob).any(axis=1)
    mem_filled = np.nan_to_num(lab.mem_prob, nan=-1.0)
    memory = np.where(
        mem_ok, np.array(MEMORY_LABELS, dtype=object)[np.argmax(mem_filled, axis=1)], "NA"
    )
    mem_conf = np.where(mem_ok, mem_filled.max(axis=1), np.nan)
    t_conf = np.where(lab.t_call, lab.t_prob, 1 - lab.t_prob)

    obs = pd.DataFrame(index=index)
    obs["bp_qc_pass"] = qc
    obs["bp_cell_type"] = pd.Categorical(
        full(lab.cell_type, "NA", object), categories=list(CELL_TYPE_LABELS)
    )
    obs["bp_t_cell"] = full(lab.t_call, False, bool)
    obs["bp_lineage"] = pd.Categorical(
        full(lab.lineage, "NA", object), categories=list(LINEAGE_LABELS)
    )
    obs["bp_memory"] = pd.Categorical(full(memory, "NA", object), categories=[*MEMORY_LABELS, "NA"])
    confs: dict[str, np.ndarray] = {
        "t_cell": full(t_conf, np.nan, np.float64),
        "lineage": full(lab.lineage_conf, np.nan, np.float64),
        "memory": full(mem_conf, np.nan, np.float64),
    }
    applies: dict[str, np.ndarray] = {
        "t_cell": np.ones(lab.m, dtype=bool),
        "lineage": lab.t_call,
        "memory": mem_ok,
    }
    for name, p in (("tim3", lab.tim3), ("pd1", lab.pd1), ("treg", lab.treg)):
        vals = full(p, np.nan, np.float64)
        known = ~np.isnan(vals)
        call = pd.array([pd.NA] * n, dtype="boolean")
        call[known] = vals[known] >= 0.5
        obs[f"bp_{name}"] = call
        obs[f"bp_{name}_prob"] = vals
        confs[name] = np.where(known, np.maximum(vals, 1 - vals), np.nan)
        applies[name] = ~np.isnan(p)
    applies["treg"] = applies["treg"] & (lab.lineage == "CD4")
    for name, c in confs.items():
        obs[f"bp_{name}_conf"] = c
    conf_mat = np.column_stack(list(confs.values()))
    some = ~np.isnan(conf_mat).all(axis=1)
    overall = np.full(n, np.nan)
    overall[some] = np.nanmin(conf_mat[some], axis=1)
    obs["bp_confidence"] = overall
    # per cell: the kinds of evidence behind the labels that apply to it
    has_p = np.zeros(lab.m, dtype=bool)
    has_r = np.zeros(lab.m, dtype=bool)
    for name, a in applies.items():
        k = lab.kind.get(name, "")
        if "protein" in k:
            has_p |= a
        if "RNA" in k:
            has_r |= a
    kinds = np.where(
        has_p & has_r, "protein+RNA", np.where(has_p, "protein", np.where(has_r, "RNA", "none"))
    )
    if lab.kind.get("t_cell") == "prefiltered":
        kinds = np.where(kinds == "none", "prefiltered", kinds)
    obs["bp_evidence"] = pd.Categorical(
        full(kinds.astype(object), "none", object), categories=list(EVIDENCE_LABELS)
    )
    for nm, s in lab.scores.items():
        obs[f"bp_score_{nm}"] = full(s.astype(np.float32), np.nan, np.float32)
    clr_full = None
    if lab.clr is not None:
        arr = np.full((n, lab.clr.shape[1]), np.nan)
        arr[rows] = lab.clr.to_numpy()
        clr_full = pd.DataFrame(arr, index=index, columns=lab.clr.columns)
    return obs, clr_full


def _uns_params(
    inp: _Input, qc: np.ndarray, qc_info: dict[str, Any], lab: Labels, cfg: SingleCellConfig
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "config_name": cfg.name,
        "config_version": cfg.version,
        "sample_key": inp.sample_key or "",
        "samples": list(inp.sample_names),
        "cell_qc": {
            "rules": list(qc_info["rules"]),
            "n_pass": {s: int(qc[inp.sample == i].sum()) for i, s in enumerate(inp.sample_names)},
        },
        "evidence": dict(lab.evidence),
        "tim3_estimator": tim3_estimator(lab),
        "fraction_estimator": cfg.fraction_estimator,
        "protein": lab.params["protein"],
        "rna": lab.params["rna"],
    }


def annotate(
    adata: ad.AnnData,
    *,
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None = None,
    sample_key: str | None = None,
    copy: bool = False,
) -> ad.AnnData:
    """Label cells: T cells, CD4/CD8, naive/CM/EM/TEMRA, TIM3/checkpoint-high, PD-1, Treg.

    Parameters
    ----------
    adata
        An object as :func:`read_single_cell` returns (raw counts in ``layers['counts']`` or
        ``X``; protein in ``obsm``), possibly holding many samples.
    config
        A :class:`SingleCellConfig`, a mapping, a YAML path, or ``None`` for the default.
    sample_key
        ``obs`` column of the sample: protein thresholds and state priors are per sample.
        ``None`` uses the first of ``config.sample_key_candidates`` present, else treats the
        object as one sample.
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    AnnData
        ``adata`` (or its copy) with, in ``obs``: ``bp_qc_pass``; ``bp_cell_type``
        (T/B/NK/myeloid/other/non_T); ``bp_t_cell`` (bool); ``bp_lineage``
        (CD4/CD8/other/non_T; ``NA`` for QC-failed cells); ``bp_memory``
        (naive/CM/EM/TEMRA; ``NA`` where not applicable or not determinable); ``bp_tim3``,
        ``bp_pd1``, ``bp_treg`` (nullable booleans, ``<NA>`` where not applicable or not
        estimable) with ``bp_<state>_prob``; ``bp_evidence`` (protein/RNA/protein+RNA/
        prefiltered/none: the evidence behind the cell's labels); ``bp_confidence`` (0-1, the
        smallest of the cell's per-label confidences ``bp_<label>_conf``); gene-set scores
        ``bp_score_<set>``. ``obsm['bp_protein_clr']`` holds the CLR-normalised protein, and
        ``uns['blinaprofile']`` the estimator behind each label (``evidence``), the TIM3
        estimator, per-sample protein thresholds (``protein.gates.<marker>.<sample>``) and the
        RNA mixture parameters (``rna.models.<set>@<scope>``).

    Raises
    ------
    SingleCellInputError
        ``sample_key`` is not an ``obs`` column, the counts are not raw counts, or neither
        protein nor genes allow calling T cells and CD4/CD8 (the message names the file).
    """
    cfg = resolve_config(config)
    target = adata.copy() if copy else adata
    inp = prepare(target, cfg, sample_key=sample_key, patient_key=None, default_sample="sample")
    qc, qc_info = cell_qc(inp, cfg)
    lab = run_annotator(inp, qc, cfg)
    obs, clr = _obs_frame(inp, qc, lab, target.obs_names)
    for c in obs.columns:
        target.obs[c] = (
            obs[c].array if not isinstance(obs[c].dtype, np.dtype) else obs[c].to_numpy()
        )
    if clr is not None:
        target.obsm["bp_protein_clr"] = clr
    info = dict(target.uns.get("blinaprofile", {}))
    info.update(_uns_params(inp, qc, qc_info, lab, cfg))
    target.uns["blinaprofile"] = info
    return target
