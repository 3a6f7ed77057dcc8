"""Per-sample features in the versioned schema from an annotated single-cell object."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from blinaprofile.annotate.annotator import Labels, cell_qc, prepare, run_annotator, tim3_estimator
from blinaprofile.annotate.config import MEMORY_LABELS, PathLike, SingleCellConfig, resolve_config
from blinaprofile.features.schema import QC_COLUMNS, SCHEMA_VERSION, feature_columns, feature_names
from blinaprofile.io.singlecell import read_single_cell


# =========================================================================== features
def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den > 0 else float("nan")


def _features_for_sample(
    lab: Labels, sel: np.ndarray, n_events: int, cfg: SingleCellConfig
) -> tuple[dict[str, float], list[str]]:
    q = cfg.sample_qc
    soft = cfg.fraction_estimator == "posterior_mean"
    t = sel & lab.t_call
    c8 = sel & (lab.lineage == "CD8")
    c4 = sel & (lab.lineage == "CD4")
    n_live = int(sel.sum())
    n3, n4, n8 = int(t.sum()), int(c4.sum()), int(c8.sum())
    den = (
        int((sel & (lab.cell_type != "myeloid")).sum())
        if cfg.cd3_denominator == "lymphocytes"
        else n_live
    )
    f: dict[str, float] = {name: float("nan") for name in feature_names()}
    f["cd3_pct_lymph"] = float("nan") if cfg.t_cells_prefiltered else _pct(n3, den)
    f["cd4_pct_cd3"] = _pct(n4, n3)
    f["cd8_pct_cd3"] = _pct(n8, n3)
    f["cd4_cd8_ratio"] = n4 / n8 if n8 else float("nan")

    def frac(p: np.ndarray, parent: np.ndarray) -> float:
        v = p[parent]
        v = v[~np.isnan(v)]
        if v.size == 0:
            return float("nan")
        return float(100.0 * (v.mean() if soft else (v >= 0.5).mean()))

    for lin, parent in (("cd8", c8), ("cd4", c4)):
        mp = lab.mem_prob[parent]
        mp = mp[~np.isnan(mp).any(axis=1)]
        if mp.shape[0]:
            share = (
                mp.mean(axis=0)
                if soft
                else np.bincount(np.argmax(mp, axis=1), minlength=4) / mp.shape[0]
            )
            share = share / share.sum()
            for k, label in enumerate(MEMORY_LABELS):
                f[f"{lin}_{label.lower()}_pct_{lin}"] = float(100.0 * share[k])
    f["cd8_tim3_pct_cd8"] = frac(lab.tim3, c8)
    f["cd8_pd1_pct_cd8"] = frac(lab.pd1, c8)
    f["cd4_treg_pct_cd4"] = frac(lab.treg, c4)

    reasons: list[str] = []
    if n_live < q.min_cells:
        reasons.append(f"only {n_live} QC-passed cells (< {q.min_cells})")
        f["cd3_pct_lymph"] = float("nan")
    if n3 < q.min_cd3:
        reasons.append(f"only {n3} T cells (< {q.min_cd3})")
        for name in ("cd4_pct_cd3", "cd8_pct_cd3", "cd4_cd8_ratio"):
            f[name] = float("nan")
    for lin, n_lin, min_lin in (("cd8", n8, q.min_cd8), ("cd4", n4, q.min_cd4)):
        if n_lin < min_lin:
            reasons.append(f"only {n_lin} {lin.upper()} T cells (< {min_lin})")
            for name in f:
                if name.endswith(f"_pct_{lin}"):
                    f[name] = float("nan")
            f["cd4_cd8_ratio"] = float("nan")
    f.update(
        {
            "n_events": float(n_events),
            "n_live": float(n_live),
            "n_cd3": float(n3),
            "n_cd4": float(n4),
            "n_cd8": float(n8),
        }
    )
    return f, reasons


def featurize_single_cell(
    data: ad.AnnData | PathLike,
    *,
    sample_key: str | None = None,
    patient_key: str | None = None,
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None = None,
) -> pd.DataFrame:
    """Per-sample features in the versioned schema from a single-cell object.

    Parameters
    ----------
    data
        A path (anything :func:`read_single_cell` reads) or an AnnData (left unmodified).
    sample_key, patient_key
        ``obs`` columns of the sample and the patient. ``None`` uses the first of
        ``config.sample_key_candidates`` / ``patient_key_candidates`` present; without a
        sample column the whole object is one sample named after the file (or ``sample``);
        without a patient column each sample is its own patient.
    config
        A :class:`SingleCellConfig`, a mapping, a YAML path, or ``None`` for the default.

    Returns
    -------
    DataFrame
        One row per sample (in order of first appearance): ``sample_id``, ``patient_id``,
        ``modality`` (``"single_cell"``), ``schema_version``, every feature of
        :func:`blinaprofile.features.schema.feature_names` (flow-only ones NaN), the QC columns
        ``n_events`` (cells read), ``n_live`` (QC-passed cells), ``n_cd3``, ``n_cd4``,
        ``n_cd8``, then ``qc_pass``, ``qc_reasons`` (``""`` when passing, else ``"; "``-joined
        reasons) and ``tim3_estimator``. Percent features are 0-100 of the schema's parent;
        lineage shares come from the hard calls (``cd4_cd8_ratio = n_cd4 / n_cd8``), memory
        and state shares are the mean posterior over the parent's cells
        (``fraction_estimator``). Features whose parent has too few cells are NaN.
        ``df.attrs['blinaprofile']`` holds the evidence per label and the keys used.

    Raises
    ------
    SingleCellInputError
        Unreadable input, unknown sample/patient key, a sample spanning several patients, or
        neither protein nor genes to call T cells and CD4/CD8 (the message names the file).
    """
    cfg = resolve_config(config)
    if isinstance(data, ad.AnnData):
        adata = data
        default = "sample"
    else:
        adata = read_single_cell(data, sample_key=sample_key)
        p = Path(data)
        base = p.parent if p.name.lower().endswith((".mtx", ".mtx.gz")) else p
        default = re.sub(r"\.(h5ad|h5|hdf5)$", "", base.name, flags=re.IGNORECASE)
    inp = prepare(
        adata, cfg, sample_key=sample_key, patient_key=patient_key, default_sample=default
    )
    qc, _ = cell_qc(inp, cfg)
    lab = run_annotator(inp, qc, cfg)
    grp_qc = inp.sample[qc]
    n_events = np.bincount(inp.sample, minlength=len(inp.sample_names))
    estimator = tim3_estimator(lab)
    rows = []
    for i, sid in enumerate(inp.sample_names):
        f, reasons = _features_for_sample(lab, grp_qc == i, int(n_events[i]), cfg)
        row: dict[str, Any] = {
            "sample_id": sid,
            "patient_id": inp.patient_of_sample[i],
            "modality": "single_cell",
            "schema_version": SCHEMA_VERSION,
        }
        row.update({k: f[k] for k in feature_names()})
        row.update({k: int(f[k]) for k in QC_COLUMNS})
        row["qc_pass"] = not reasons
        row["qc_reasons"] = "; ".join(reasons)
        row["tim3_estimator"] = estimator
        rows.append(row)
    cols = [*feature_columns(), "tim3_estimator"]
    df = pd.DataFrame(rows, columns=cols)
    df["qc_pass"] = df["qc_pass"].astype(bool)
    df.attrs["blinaprofile"] = {
        "source": inp.source or "",
        "sample_key": inp.sample_key or "",
        "patient_key": inp.patient_key or "",
        "evidence": dict(lab.evidence),
        "fraction_estimator": cfg.fraction_estimator,
    }
    return df
