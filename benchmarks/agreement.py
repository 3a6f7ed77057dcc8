"""Agreement of the single-cell annotator with published labels and with a protein reference.

Issue 13. Prints markdown tables:

1. **wu2020** (200 tumour/NAT/blood T cells, scirpy's test subset of Wu et al. 2020): each
   published cluster (``obs['cluster_orig']``) against our calls (lineage, memory,
   exhausted, Treg), then summary numbers: CD4/CD8 against the cluster prefix (``4.x`` /
   ``8.x``), the CD8 ``8.1-Teff`` vs ``8.2-Tem`` split against our TEMRA vs EM call (a
   cytometrist expects Teff ~ CD45RA+CCR7- TEMRA/effector and Tem ~ EM), and the
   ``4.6a/4.6b-Treg`` clusters against our Treg call. The annotator runs as a user runs it:
   ``annotate(adata)`` (model-free: fitted on the object; the ``sample`` column is found
   automatically, as ``featurize --sample-key sample`` does), the same with the object as one
   sample, and the annotator fitted on the object applied to each sample alone (what
   ``score-batch`` does).
2. **CITE-seq** (scvi-tools test files, 10x PBMC): our calls against a transparent protein
   reference computed here from the antibody counts, and the protein-based run against an
   RNA-only run (the same object with its protein removed).

The reference (no published labels exist): per cell, ``CLR = log1p(count) - mean over the
antibodies of log1p(count)``, isotype controls left out. Then, with fixed thresholds stated in
the output:

- T cell: ``CLR(CD3) > 1.5``; within those, CD4 = ``CLR(CD4) > 1.5`` and ``CLR(CD8) <= 1.5``,
  CD8 the converse, DP/DN "other";
- CD45RA axis: ``CLR(CD45RA) > CLR(CD45RO)`` (the two isoforms, no threshold);
- CCR7 axis (5k only): ``CLR(CD197) > 0`` and, separately, ``CLR(CD62L) > 0``;
- Treg: ``CLR(CD25) > 0`` and ``CLR(CD127)`` below the median of the reference CD4 T cells;
- PD-1: ``CLR(PD-1) > 1``.

Usage::

    .venv/bin/python benchmarks/agreement.py
    .venv/bin/python benchmarks/agreement.py --data-dir ../shared/data/single-cell --no-alone
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import shlex
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "single-cell"
WU_FILE = "wu2020_200_v0_11.h5ad"
CITE_FILES = (
    "citeseq_scvi_tests/pbmc_5k_protein_v3.h5ad",
    "citeseq_scvi_tests/pbmc_10k_protein_v3.h5ad",
    "citeseq_scvi_tests/10x_pbmc10k_protein_v3_mtx",
)
TEFF, TEM = "8.1-Teff", "8.2-Tem"
TREG_CLUSTERS = ("4.6a-Treg", "4.6b-Treg")
LABELS = ("t_cell", "lineage", "memory", "effector", "treg", "pd1", "tim3", "exhausted")
MEMORY_ORDER = ("naive", "CM", "EM", "TEMRA")
NA = "n/a"

#: the reference thresholds (CLR units, natural log), printed with the tables
T_CUT = 1.5  # CD3, CD4, CD8
CCR7_CUT = 0.0  # CD197 (CCR7) and CD62L
CD25_CUT = 0.0
PD1_CUT = 1.0


# =========================================================================== statistics
@dataclass(frozen=True)
class Binary:
    """A 2x2 agreement between a reference (``truth``) and a yes/no call.

    Attributes
    ----------
    tp, fp, fn, tn
        Cell counts: reference positive and called, reference negative and called, reference
        positive and not called, neither.
    kappa
        Cohen's kappa (:func:`sklearn.metrics.cohen_kappa_score`); NaN when undefined (one
        class only on both sides).
    """

    tp: int
    fp: int
    fn: int
    tn: int
    kappa: float

    @property
    def n(self) -> int:
        """Cells compared."""
        return self.tp + self.fp + self.fn + self.tn

    @property
    def agreement(self) -> float:
        """Fraction of cells where call and reference agree."""
        return (self.tp + self.tn) / self.n if self.n else math.nan

    @property
    def sensitivity(self) -> float:
        """Called among reference positives."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else math.nan

    @property
    def precision(self) -> float:
        """Reference positives among called."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else math.nan


def kappa(a: Sequence[Any] | np.ndarray, b: Sequence[Any] | np.ndarray) -> float:
    """Cohen's kappa of two label vectors; NaN when there are no cells or it is undefined.

    Parameters
    ----------
    a, b
        Labels of the same cells (any hashable values, compared as strings).

    Returns
    -------
    float
        :func:`sklearn.metrics.cohen_kappa_score`, or NaN.
    """
    from sklearn.metrics import cohen_kappa_score

    sa, sb = np.asarray(a).astype(str), np.asarray(b).astype(str)
    if sa.size == 0:
        return math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = float(cohen_kappa_score(sa, sb))
    return k


def binary(truth: Iterable[bool], call: Iterable[bool]) -> Binary:
    """The 2x2 table, agreement and kappa of a yes/no call against a yes/no reference.

    Parameters
    ----------
    truth, call
        Booleans of the same cells (the caller has removed cells without a call or reference).

    Returns
    -------
    Binary
    """
    t = np.asarray(list(truth), dtype=bool)
    c = np.asarray(list(call), dtype=bool)
    return Binary(
        tp=int((t & c).sum()),
        fp=int((~t & c).sum()),
        fn=int((t & ~c).sum()),
        tn=int((~t & ~c).sum()),
        kappa=kappa(t, c),
    )


def auc(positive: Iterable[bool], score: Iterable[float]) -> float:
    """Area under the ROC curve of ``score`` for ``positive``; NaN with one class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(list(positive), dtype=bool)
    s = np.asarray(list(score), dtype=float)
    ok = np.isfinite(s)
    y, s = y[ok], s[ok]
    if y.all() or not y.any():
        return math.nan
    return float(roc_auc_score(y, s))


def label_str(col: pd.Series) -> pd.Series:
    """A label column as strings with missing values spelled ``n/a``."""
    out = col.astype(object).where(col.notna(), NA)
    return out.map(str)


# =========================================================================== markdown
def fmt(x: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` decimals, NaN as ``-``."""
    if isinstance(x, float | np.floating):
        return "-" if not np.isfinite(x) else f"{x:.{digits}f}"
    return str(x)


def md_table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """A markdown table from rows of cells.

    Parameters
    ----------
    rows
        Cells per row (formatted with :func:`fmt`).
    header
        Column names.

    Returns
    -------
    str
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def md_crosstab(rows: pd.Series, cols: pd.Series, *, col_order: Sequence[str] = ()) -> str:
    """Counts of ``rows`` x ``cols`` as a markdown table with totals.

    Parameters
    ----------
    rows, cols
        Labels of the same cells (missing values become ``n/a``).
    col_order
        Columns to put first, in this order (others follow sorted, ``n/a`` last).

    Returns
    -------
    str
    """
    r, c = label_str(rows), label_str(cols)
    tab = pd.crosstab(r, c)
    rest = sorted(x for x in tab.columns if x not in col_order and x != NA)
    order = [x for x in col_order if x in tab.columns] + rest
    order += [NA] if NA in tab.columns else []
    tab = tab[order]
    header = [f"{rows.name} \\ {cols.name}", *order, "total"]
    body = [[idx, *(int(v) for v in tab.loc[idx]), int(tab.loc[idx].sum())] for idx in tab.index]
    body.append(["**total**", *(int(tab[x].sum()) for x in order), int(tab.values.sum())])
    return md_table(body, header)


def binary_row(name: str, b: Binary, *extra: Any) -> list[Any]:
    """One summary-table row: name, n, 2x2, agreement, sensitivity, precision, kappa."""
    return [
        name,
        b.n,
        f"{b.tp}/{b.fp}/{b.fn}/{b.tn}",
        b.agreement,
        b.sensitivity,
        b.precision,
        b.kappa,
        *extra,
    ]


BINARY_HEADER = ("comparison", "n", "TP/FP/FN/TN", "agreement", "sensitivity", "precision", "kappa")


# =========================================================================== provenance
def checksum(path: Path) -> str:
    """The first 12 hex digits of the SHA-256 of a file, or of a folder's files in name order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(p.relative_to(path).as_posix().encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def versions() -> dict[str, str]:
    """Versions of the package and of the libraries behind the numbers."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str] = {}
    for name in ("blinaprofile", "anndata", "scanpy", "scikit-learn", "numpy", "pandas"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def evidence_source(uns: Mapping[str, Any], label: str) -> str:
    """The evidence kind behind ``label`` (protein, RNA, protein+RNA, unavailable...), over
    the samples of an annotated object (several kinds are joined with ``/``)."""
    per_sample = uns.get("blinaprofile", uns).get("sample_evidence", {})
    kinds = sorted({str(ev["labels"][label]["source"]) for ev in per_sample.values()})
    return "/".join(kinds) or "?"


def evidence_line(uns: Mapping[str, Any], label: str) -> str:
    """The one-line estimator description behind ``label``."""
    return str(uns.get("blinaprofile", uns).get("evidence", {}).get(label, "?"))


# =========================================================================== wu2020
@dataclass
class WuRun:
    """One way of running the annotator on wu2020.

    Attributes
    ----------
    name
        What was run (printed).
    obs
        ``cluster_orig`` plus the ``bp_*`` columns.
    evidence
        Label -> evidence kind (protein/RNA/unavailable...).
    estimators
        Label -> the one-line estimator.
    seconds
        Wall time of the run.
    """

    name: str
    obs: pd.DataFrame
    evidence: dict[str, str] = field(default_factory=dict)
    estimators: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def run_wu2020(path: Path, *, alone: bool = True) -> list[WuRun]:
    """Annotate wu2020 the ways a user would.

    Parameters
    ----------
    path
        ``wu2020_200_v0_11.h5ad``.
    alone
        Also fit on the object by sample and apply the fitted annotator to each sample alone.

    Returns
    -------
    list of WuRun
        ``cohort`` (``annotate(adata)``: fitted on the object, sample column ``sample`` found
        automatically, 30 samples; what ``featurize --sample-key sample`` computes),
        ``one sample`` (the same object without its sample and patient columns) and, with ``alone``,
        ``each sample alone`` (``TCellAnnotator().fit(adata, sample_key='sample')`` then
        ``transform`` of each sample's cells in an object of their own).
    """
    from blinaprofile.annotate.annotator import annotate
    from blinaprofile.annotate.estimator import TCellAnnotator
    from blinaprofile.io.singlecell import read_single_cell

    runs: list[WuRun] = []
    base = read_single_cell(path)

    def _done(name: str, a: Any, t0: float) -> WuRun:
        return WuRun(
            name,
            a.obs,
            {lab: evidence_source(a.uns, lab) for lab in LABELS},
            {lab: evidence_line(a.uns, lab) for lab in LABELS},
            time.perf_counter() - t0,
        )

    t0 = time.perf_counter()
    a = base.copy()
    annotate(a)
    runs.append(_done("cohort: annotate(adata), samples from obs 'sample' (30)", a, t0))

    t0 = time.perf_counter()
    b = base.copy()
    # without 'sample' the object is one sample; 'patient' must go too, or that one sample
    # spans 14 patients (SingleCellInputError)
    del b.obs["sample"], b.obs["patient"]
    annotate(b)
    runs.append(_done("one sample: annotate(adata) without obs 'sample'/'patient'", b, t0))

    if alone:
        t0 = time.perf_counter()
        ann = TCellAnnotator().fit(base, sample_key="sample")
        parts = []
        sources: dict[str, set[str]] = {lab: set() for lab in LABELS}
        for s in pd.unique(base.obs["sample"].astype(str)):
            one = base[base.obs["sample"].astype(str) == s].copy()
            lab = ann.transform(one, sample_key="sample")
            for ev in lab.attrs["blinaprofile"]["evidence"].values():
                for k in LABELS:
                    sources[k].add(str(ev["labels"][k]["source"]))
            parts.append(lab)  # fixed categories: the samples concatenate as they are
        lab_all = pd.concat(parts).reindex(base.obs_names)
        obs = base.obs[["cluster_orig", "sample"]].join(lab_all)
        runs.append(
            WuRun(
                "each sample alone: TCellAnnotator().fit(adata, sample_key='sample'), "
                "then transform(sample) x 30",
                obs,
                {k: "/".join(sorted(v)) for k, v in sources.items()},
                dict(runs[0].estimators),
                time.perf_counter() - t0,
            )
        )
    return runs


def published_lineage(cluster: pd.Series) -> pd.Series:
    """``CD4``/``CD8`` from the cluster prefix (``4.x``/``8.x``), ``other`` for ``3.1-MT``."""
    first = cluster.astype(str).str[0]
    return first.map({"4": "CD4", "8": "CD8"}).fillna("other").rename("published lineage")


@dataclass
class WuSummary:
    """The wu2020 summary numbers of one run.

    Attributes
    ----------
    lineage
        CD8 (positive) vs CD4 over cells in 4.x/8.x clusters called CD4 or CD8.
    n_lineage_uncalled
        Cells of 4.x/8.x clusters without a CD4/CD8 call (QC-failed, ``other``).
    teff_tem_counts
        Rows ``8.1-Teff``/``8.2-Tem`` (cells called CD8), columns naive/CM/EM/TEMRA/n/a.
    teff_tem_effector
        Teff (positive) vs ``bp_effector`` TEMRA over CD8-called cells of the two clusters with
        an effector call (``None`` when none has one).
    teff_tem
        Teff (positive) vs TEMRA call over CD8-called cells of the two clusters called EM or
        TEMRA; ``None`` when no such cell (memory unavailable).
    teff_tem_score
        The same 2x2 with the ``temra_vs_em`` gene-set score's sign instead of a call
        (``bp_score_temra_vs_em > 0``): not a call, a diagnostic.
    teff_tem_score_auc
        AUC of ``bp_score_temra_vs_em`` for Teff vs Tem (CD8-called cells).
    treg
        Treg clusters (positive) vs ``bp_treg`` over all QC-passed cells (no call = not Treg).
    treg_in_cd4
        The same over cells of 4.x clusters called CD4 (the call's own parent).
    """

    lineage: Binary
    n_lineage_uncalled: int
    teff_tem_counts: pd.DataFrame
    teff_tem: Binary | None
    teff_tem_effector: Binary | None
    teff_tem_score: Binary
    teff_tem_score_auc: float
    treg: Binary
    treg_in_cd4: Binary


def wu2020_summary(obs: pd.DataFrame) -> WuSummary:
    """Summary numbers of one wu2020 run (see :class:`WuSummary`).

    Parameters
    ----------
    obs
        ``cluster_orig`` plus the ``bp_*`` columns.

    Returns
    -------
    WuSummary
    """
    cl = obs["cluster_orig"].astype(str)
    pub = published_lineage(obs["cluster_orig"])
    lin = label_str(obs["bp_lineage"])
    in_lin = pub.isin(["CD4", "CD8"])
    called = in_lin & lin.isin(["CD4", "CD8"])
    lineage = binary(pub[called] == "CD8", lin[called] == "CD8")

    pair = cl.isin([TEFF, TEM]) & (lin == "CD8")
    mem = label_str(obs["bp_memory"])
    counts = pd.crosstab(cl[pair], mem[pair]).reindex(
        index=[TEFF, TEM], columns=[*MEMORY_ORDER, NA], fill_value=0
    )
    em_temra = pair & mem.isin(["EM", "TEMRA"])
    teff_tem = binary(cl[em_temra] == TEFF, mem[em_temra] == "TEMRA") if em_temra.any() else None
    eff = label_str(obs["bp_effector"])
    has_eff = pair & eff.isin(["EM", "TEMRA"])
    teff_tem_effector = (
        binary(cl[has_eff] == TEFF, eff[has_eff] == "TEMRA") if has_eff.any() else None
    )
    score = obs["bp_score_temra_vs_em"].astype(float)
    ok = pair & score.notna()
    teff_tem_score = binary(cl[ok] == TEFF, score[ok] > 0)
    score_auc = auc(cl[ok] == TEFF, score[ok])

    qc = obs["bp_qc_pass"].eq(True)
    is_treg = cl.isin(TREG_CLUSTERS)
    call_treg = obs["bp_treg"].eq(True)
    treg = binary(is_treg[qc], call_treg[qc])
    cd4 = qc & (pub == "CD4") & (lin == "CD4")
    treg_in_cd4 = binary(is_treg[cd4], call_treg[cd4])
    return WuSummary(
        lineage=lineage,
        n_lineage_uncalled=int((in_lin & ~lin.isin(["CD4", "CD8"])).sum()),
        teff_tem_counts=counts,
        teff_tem=teff_tem,
        teff_tem_effector=teff_tem_effector,
        teff_tem_score=teff_tem_score,
        teff_tem_score_auc=score_auc,
        treg=treg,
        treg_in_cd4=treg_in_cd4,
    )


def same_labels(a: pd.DataFrame, b: pd.DataFrame) -> dict[str, float]:
    """Per label, the fraction of cells with the same call in two runs (NaN = NaN counts)."""
    out = {}
    for lab in LABELS:
        col = f"bp_{lab}"
        out[lab] = float((label_str(a[col]) == label_str(b[col].reindex(a.index))).mean())
    return out


def print_wu2020(path: Path, runs: list[WuRun]) -> None:
    """Print the wu2020 tables of every run (the cluster tables for the first run only)."""
    main = runs[0]
    obs = main.obs
    print(f"## wu2020 (`{path.name}`, {obs.shape[0]} cells)\n")
    print(f"Run shown in the cluster tables: **{main.name}** ({main.seconds:.1f} s).\n")
    print(
        md_table(
            [[lab, main.evidence[lab], main.estimators[lab]] for lab in LABELS],
            ["label", "evidence", "estimator"],
        )
    )
    cluster = obs["cluster_orig"].astype(str).rename("cluster")
    for col, order, title in (
        ("bp_lineage", ("CD4", "CD8", "other"), "lineage"),
        ("bp_memory", MEMORY_ORDER, "memory state"),
        ("bp_effector", ("EM", "TEMRA"), "effector split of CCR7-low cells"),
        ("bp_exhausted", ("True", "False"), "exhausted (CD8 only)"),
        ("bp_treg", ("True", "False"), "Treg (CD4 only)"),
    ):
        print(f"\n### published cluster x our {title}\n")
        print(md_crosstab(cluster, obs[col].rename(col), col_order=order))

    print("\n### summary numbers per run\n")
    rows = []
    for run in runs:
        s = wu2020_summary(run.obs)
        tag = run.name.split(":")[0]
        rows.append(binary_row(f"{tag}: CD8 vs CD4 (published 8.x vs 4.x)", s.lineage))
        if s.teff_tem is None:
            rows.append([f"{tag}: Teff->TEMRA vs Tem->EM (calls)", 0, "-", "-", "-", "-", "-"])
        else:
            rows.append(binary_row(f"{tag}: Teff->TEMRA vs Tem->EM (calls)", s.teff_tem))
        if s.teff_tem_effector is None:
            rows.append([f"{tag}: Teff->TEMRA vs Tem->EM (bp_effector)", 0, *("-",) * 5])
        else:
            rows.append(
                binary_row(f"{tag}: Teff->TEMRA vs Tem->EM (bp_effector)", s.teff_tem_effector)
            )
        rows.append(
            binary_row(f"{tag}: Teff vs Tem, temra_vs_em score > 0 (not a call)", s.teff_tem_score)
        )
        rows.append(binary_row(f"{tag}: Treg clusters vs bp_treg (all QC cells)", s.treg))
        rows.append(binary_row(f"{tag}: Treg clusters vs bp_treg (CD4 called CD4)", s.treg_in_cd4))
    print(md_table(rows, BINARY_HEADER))

    s = wu2020_summary(obs)
    print(
        f"\nCD4/CD8: {s.lineage.n} of {s.lineage.n + s.n_lineage_uncalled} cells of 4.x/8.x "
        f"clusters got a CD4/CD8 call ({s.n_lineage_uncalled} QC-failed or 'other'); "
        "positive class = CD8.\n"
    )
    print("#### 8.1-Teff vs 8.2-Tem, cells called CD8: our memory call\n")
    c = s.teff_tem_counts
    frac = c.div(c.sum(axis=1).replace(0, np.nan), axis=0)
    print(
        md_table(
            [
                [idx, *(f"{int(c.loc[idx, k])} ({frac.loc[idx, k]:.2f})" for k in c.columns)]
                for idx in c.index
            ],
            ["cluster", *c.columns],
        )
    )
    print(
        f"\nmemory evidence: {main.estimators['memory']}. "
        f"effector evidence: {main.estimators['effector']}. "
        f"AUC of bp_score_temra_vs_em for Teff vs Tem (CD8-called cells): "
        f"{fmt(s.teff_tem_score_auc)}."
    )
    if len(runs) > 1:
        print("\n### the same calls across runs (fraction of the 200 cells, NaN = NaN)\n")
        rows = []
        for run in runs[1:]:
            same = same_labels(main.obs, run.obs)
            rows.append([f"{run.name.split(':')[0]} vs cohort", *(same[k] for k in LABELS)])
        print(md_table(rows, ["runs", *LABELS]))
        print("\n" + ", ".join(f"{r.name.split(':')[0]} {r.seconds:.1f} s" for r in runs))


# =========================================================================== CITE-seq
def protein_clr(protein: pd.DataFrame) -> pd.DataFrame:
    """The reference CLR: ``log1p(count)`` minus the cell's mean over the antibodies, isotype
    controls left out.

    Parameters
    ----------
    protein
        Antibody counts (cells x antibodies, canonical names as the reader gives them).

    Returns
    -------
    DataFrame
    """
    keep = [c for c in protein.columns if not any(k in c.lower() for k in ("control", "igg"))]
    lg = np.log1p(protein[keep].astype(float))
    return lg.sub(lg.mean(axis=1), axis=0)


def reference_calls(clr: pd.DataFrame) -> pd.DataFrame:
    """The transparent protein reference (module docstring) for every cell.

    Parameters
    ----------
    clr
        :func:`protein_clr`.

    Returns
    -------
    DataFrame
        ``ref_t`` (bool), ``ref_lineage`` (CD4/CD8/other/non_T), ``ref_ra`` (CD45RA > CD45RO,
        T cells), ``ref_ccr7``/``ref_cd62l`` (T cells, when the antibody exists),
        ``ref_quadrant`` / ``ref_quadrant_cd62l`` (naive/CM/EM/TEMRA from RA x CD197 / x
        CD62L, when the antibody exists), ``ref_treg``
        (CD4 T cells), ``ref_pd1`` (T cells); NaN outside the parent.
    """
    t = clr["CD3"] > T_CUT
    p4, p8 = clr["CD4"] > T_CUT, clr["CD8"] > T_CUT
    lineage = np.select([~t, p4 & ~p8, p8 & ~p4], ["non_T", "CD4", "CD8"], "other")
    out = pd.DataFrame({"ref_t": t, "ref_lineage": lineage}, index=clr.index)
    nan = pd.Series(np.nan, index=clr.index, dtype=object)
    out["ref_ra"] = nan.where(~t, clr["CD45RA"] > clr["CD45RO"])
    for marker, col in (("CCR7", "ref_ccr7"), ("CD62L", "ref_cd62l")):
        if marker in clr:
            out[col] = nan.where(~t, clr[marker] > CCR7_CUT)
    for marker, col in (("CCR7", "ref_quadrant"), ("CD62L", "ref_quadrant_cd62l")):
        if marker in clr:
            ra, c7 = clr["CD45RA"] > clr["CD45RO"], clr[marker] > CCR7_CUT
            quad = np.select([ra & c7, ~ra & c7, ~ra & ~c7], ["naive", "CM", "EM"], "TEMRA")
            out[col] = nan.where(~t, pd.Series(quad, index=clr.index))
    cd4 = out["ref_lineage"] == "CD4"
    if {"CD25", "CD127"} <= set(clr.columns) and cd4.any():
        cut127 = float(clr.loc[cd4, "CD127"].median())
        treg = (clr["CD25"] > CD25_CUT) & (clr["CD127"] < cut127)
        out["ref_treg"] = nan.where(~cd4, treg)
        out.attrs["cd127_cut"] = cut127
    if "PD1" in clr:
        out["ref_pd1"] = nan.where(~t, clr["PD1"] > PD1_CUT)
    return out


def strip_protein(adata: Any) -> Any:
    """A copy of ``adata`` without protein, as a user removes it: ``obsm['protein']`` (the
    one protein matrix :func:`read_single_cell` exposes and the annotator reads) deleted."""
    b = adata.copy()
    del b.obsm["protein"]
    return b


@dataclass
class CiteRun:
    """The annotator on one CITE-seq object, with and without its protein.

    Attributes
    ----------
    name
        File or folder name.
    n_cells, n_genes
        Shape of the RNA matrix as read.
    antibodies
        Antibody names as the reader gives them.
    obs
        ``bp_*`` columns of the protein run joined with the reference columns.
    rna
        ``bp_*`` columns of the RNA-only run, or ``None``.
    rna_error
        Why the RNA-only run failed, or ``""``.
    evidence, evidence_rna
        Label -> evidence kind, per run.
    estimators, estimators_rna
        Label -> one-line estimator, per run.
    clr
        The reference CLR.
    cd127_cut
        The Treg reference's CD127 cut (median of the reference CD4 T cells).
    """

    name: str
    n_cells: int
    n_genes: int
    antibodies: list[str]
    obs: pd.DataFrame
    rna: pd.DataFrame | None
    rna_error: str
    evidence: dict[str, str]
    evidence_rna: dict[str, str]
    estimators: dict[str, str]
    estimators_rna: dict[str, str]
    clr: pd.DataFrame
    cd127_cut: float


def run_cite(path: Path) -> CiteRun:
    """Read a CITE-seq object with the project's reader and annotate it twice: with protein
    (``annotate(adata)``) and RNA only (:func:`strip_protein`).

    Parameters
    ----------
    path
        An ``.h5ad`` with ``obsm['protein_expression']`` or a 10x matrix folder.

    Returns
    -------
    CiteRun
    """
    from blinaprofile.annotate.annotator import annotate
    from blinaprofile.errors import SingleCellInputError
    from blinaprofile.io.singlecell import read_single_cell

    a = read_single_cell(path)
    b = strip_protein(a)
    clr = protein_clr(a.obsm["protein"])
    ref = reference_calls(clr)
    annotate(a)
    obs = a.obs[[c for c in a.obs.columns if c.startswith("bp_")]].join(ref)
    rna, err = None, ""
    ev_rna: dict[str, str] = {}
    est_rna: dict[str, str] = {}
    try:
        annotate(b)
    except SingleCellInputError as exc:
        err = str(exc)
    else:
        rna = b.obs[[c for c in b.obs.columns if c.startswith("bp_")]]
        ev_rna = {lab: evidence_source(b.uns, lab) for lab in LABELS}
        est_rna = {lab: evidence_line(b.uns, lab) for lab in LABELS}
    return CiteRun(
        name=path.name,
        n_cells=a.n_obs,
        n_genes=a.n_vars,
        antibodies=list(a.obsm["protein"].columns),
        obs=obs,
        rna=rna,
        rna_error=err,
        evidence={lab: evidence_source(a.uns, lab) for lab in LABELS},
        evidence_rna=ev_rna,
        estimators={lab: evidence_line(a.uns, lab) for lab in LABELS},
        estimators_rna=est_rna,
        clr=clr,
        cd127_cut=float(ref.attrs.get("cd127_cut", math.nan)),
    )


def cite_vs_reference(run: CiteRun) -> dict[str, Binary]:
    """Our protein-run calls against the reference, per comparison.

    Keys: ``T cell`` (all QC cells), ``CD8 vs CD4`` (reference CD4/CD8 T cells called CD4 or
    CD8), ``CD45RA+ = naive/TEMRA`` (reference T cells with a memory call), ``CCR7+ = naive/CM
    (CD197)`` and ``(CD62L)`` (5k), ``Treg`` (reference CD4 T cells called CD4), ``PD-1``
    (reference T cells called CD4/CD8).

    Parameters
    ----------
    run
        :func:`run_cite`.

    Returns
    -------
    dict of str to Binary
    """
    o = run.obs
    qc = o["bp_qc_pass"].eq(True)
    out = {"T cell": binary(o["ref_t"][qc], o["bp_t_cell"][qc].eq(True))}
    lin = label_str(o["bp_lineage"])
    both = qc & o["ref_lineage"].isin(["CD4", "CD8"]) & lin.isin(["CD4", "CD8"])
    out["CD8 vs CD4"] = binary(o["ref_lineage"][both] == "CD8", lin[both] == "CD8")
    mem = label_str(o["bp_memory"])
    m = qc & o["ref_t"] & mem.isin(MEMORY_ORDER)
    out["CD45RA+ (RA > RO) = naive/TEMRA"] = binary(
        o["ref_ra"][m].astype(bool), mem[m].isin(["naive", "TEMRA"])
    )
    for col, marker in (("ref_ccr7", "CD197"), ("ref_cd62l", "CD62L")):
        if col in o:
            out[f"CCR7+ ({marker} > {CCR7_CUT:g}) = naive/CM"] = binary(
                o[col][m].astype(bool), mem[m].isin(["naive", "CM"])
            )
    if "ref_treg" in o:
        t4 = qc & (o["ref_lineage"] == "CD4") & (lin == "CD4")
        out["Treg (CD25+ CD127lo) in CD4"] = binary(
            o["ref_treg"][t4].astype(bool), o["bp_treg"][t4].eq(True)
        )
    if "ref_pd1" in o:
        tp = qc & o["ref_t"] & lin.isin(["CD4", "CD8"]) & o["bp_pd1"].notna()
        out[f"PD-1 (CLR > {PD1_CUT:g}) in T"] = binary(
            o["ref_pd1"][tp].astype(bool), o["bp_pd1"][tp].eq(True)
        )
    return out


def quadrant_kappa(run: CiteRun, col: str = "ref_quadrant") -> tuple[float, float, int]:
    """Four-class memory agreement and kappa against a reference quadrant column
    (``ref_quadrant``: CD197, ``ref_quadrant_cd62l``: CD62L) over reference T cells with a
    memory call; NaNs and 0 when the file lacks the antibody or no cell has a call."""
    o = run.obs
    if col not in o:
        return math.nan, math.nan, 0
    mem = label_str(o["bp_memory"])
    m = o["ref_t"] & mem.isin(MEMORY_ORDER)
    if not m.any():
        return math.nan, math.nan, 0
    ref = o[col][m].astype(str)
    return float((ref == mem[m]).mean()), kappa(ref, mem[m]), int(m.sum())


def protein_vs_rna(run: CiteRun) -> list[list[Any]]:
    """Per label: cells with a call in both runs, agreement, kappa and each run's evidence.

    Parameters
    ----------
    run
        :func:`run_cite` with an RNA-only run.

    Returns
    -------
    list of rows
        ``label, n both, agreement, kappa, evidence (protein run), evidence (RNA run)``.
    """
    rows: list[list[Any]] = []
    if run.rna is None:
        return rows
    for lab in LABELS:
        a = label_str(run.obs[f"bp_{lab}"])
        b = label_str(run.rna[f"bp_{lab}"].reindex(run.obs.index))
        ok = (a != NA) & (b != NA)
        agree = float((a[ok] == b[ok]).mean()) if ok.any() else math.nan
        rows.append(
            [
                lab,
                int(ok.sum()),
                agree,
                kappa(a[ok], b[ok]),
                run.evidence[lab],
                run.evidence_rna[lab],
            ]
        )
    return rows


def print_cite(path: Path, run: CiteRun) -> None:
    """Print the tables of one CITE-seq object."""
    print(
        f"\n## CITE-seq `{run.name}` ({run.n_cells} cells, {run.n_genes} genes, "
        f"{len(run.antibodies)} antibodies: {', '.join(run.antibodies)})\n"
    )
    print(
        md_table(
            [[lab, run.evidence[lab], run.estimators[lab]] for lab in LABELS],
            ["label", "evidence (protein run)", "estimator"],
        )
    )
    o = run.obs
    print("\n### reference lineage (protein CLR) x our bp_lineage\n")
    print(
        md_crosstab(
            o["ref_lineage"].rename("reference"),
            o["bp_lineage"].rename("bp_lineage"),
            col_order=("CD4", "CD8", "other", "non_T"),
        )
    )
    t = o["ref_t"]
    if "ref_quadrant" in o:
        for col, marker in (("ref_quadrant", "CD197"), ("ref_quadrant_cd62l", "CD62L")):
            print(
                f"\n### reference quadrant (CD45RA vs CD45RO x {marker} > {CCR7_CUT:g}), "
                "T cells x our bp_memory\n"
            )
            print(
                md_crosstab(
                    o[col][t].rename("reference"),
                    o["bp_memory"][t].rename("bp_memory"),
                    col_order=MEMORY_ORDER,
                )
            )
    else:
        print("\n### reference CD45RA axis (CD45RA > CD45RO), T cells x our bp_memory\n")
        ra = o["ref_ra"][t].map({True: "CD45RA+", False: "CD45RA-"})
        print(
            md_crosstab(
                ra.rename("reference"),
                o["bp_memory"][t].rename("bp_memory"),
                col_order=MEMORY_ORDER,
            )
        )
    print("\n### our protein-run calls vs the reference\n")
    rows = [binary_row(k, b) for k, b in cite_vs_reference(run).items()]
    print(md_table(rows, BINARY_HEADER))
    print()
    for col, marker in (("ref_quadrant", "CD197"), ("ref_quadrant_cd62l", "CD62L")):
        acc, kq, nq = quadrant_kappa(run, col)
        if nq:
            print(
                f"four-class memory vs the CD45RA x {marker} quadrant: agreement {fmt(acc)}, "
                f"kappa {fmt(kq)} (n = {nq})."
            )
    if "CCR7" in run.clr and "bp_memory" in o:
        mem = label_str(o["bp_memory"])
        m = t & mem.isin(MEMORY_ORDER)
        pos = mem[m].isin(["naive", "CM"])
        print(
            "threshold-free: AUC of CLR(CD197) for our CCR7+ (naive/CM) calls "
            f"{fmt(auc(pos, run.clr['CCR7'][m]))}, of CLR(CD62L) "
            f"{fmt(auc(pos, run.clr['CD62L'][m]) if 'CD62L' in run.clr else math.nan)}."
        )
    if np.isfinite(run.cd127_cut):
        print(
            f"Treg reference: CLR(CD25) > {CD25_CUT:g} and CLR(CD127) < {run.cd127_cut:.2f} "
            "(median of the reference CD4 T cells)."
        )
    print("\n### protein run vs RNA-only run (same object, protein removed)\n")
    if run.rna is None:
        print(f"RNA-only run not possible: `{run.rna_error}`")
    else:
        print(
            md_table(
                protein_vs_rna(run),
                ["label", "n (both called)", "agreement", "kappa", "protein run", "RNA-only run"],
            )
        )


# =========================================================================== main
def main(argv: Sequence[str] | None = None) -> int:
    """Print every table; return 0, or 2 when the data folder is missing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help=f"the shared single-cell folder (default: {DEFAULT_DATA})",
    )
    parser.add_argument(
        "--no-alone",
        action="store_true",
        help="skip the fitted annotator applied to each wu2020 sample alone",
    )
    args = parser.parse_args(argv)
    data: Path = args.data_dir
    if not data.is_dir():
        print(f"error: {data}: shared single-cell data not found", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=FutureWarning)
    files = [data / WU_FILE, *(data / f for f in CITE_FILES)]
    print("# Annotator agreement (issue 13)\n")
    exe = Path(sys.executable)
    with contextlib.suppress(ValueError):
        exe = exe.relative_to(Path.cwd())
    print(f"command: `{shlex.join([str(exe), *sys.argv])}`\n")
    print(", ".join(f"{k} {v}" for k, v in versions().items()) + "\n")
    print(md_table([[f.name, checksum(f)] for f in files], ["data", "sha256 (12)"]))
    print()
    print_wu2020(files[0], run_wu2020(files[0], alone=not args.no_alone))
    for f in files[1:]:
        print_cite(f, run_cite(f))
    print(
        "\nReference rules (CITE-seq): CLR = log1p(count) - the cell's mean log1p over the "
        f"antibodies (isotype controls left out); T = CLR(CD3) > {T_CUT:g}; CD4 = CLR(CD4) > "
        f"{T_CUT:g} and CLR(CD8) <= {T_CUT:g}, CD8 the converse; CD45RA+ = CLR(CD45RA) > "
        f"CLR(CD45RO); CCR7+ = CLR(CD197) > {CCR7_CUT:g} (CD62L likewise); Treg = CLR(CD25) > "
        f"{CD25_CUT:g} and CLR(CD127) < the CD4 T cells' median; PD-1+ = CLR(PD-1) > {PD1_CUT:g}."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
