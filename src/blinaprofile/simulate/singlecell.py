"""Simulated single-cell cohorts (RNA counts and optional CITE-seq protein) with known truth.

The per-sample subset fractions come from :func:`blinaprofile.simulate.cohort.draw_cohort`, the same
generative model the flow simulator uses, so a simulated single-cell cohort and a simulated
flow cohort drawn from one :class:`~blinaprofile.config.SimulationConfig` share patients,
labels and true fractions.

Cells
-----
Each sample's droplets are drawn from the scenario's ``composition``: empty droplets with
ambient RNA (share ``debris``), dying lymphocytes with a high mitochondrial fraction
(``dead_lymphocytes``), monocytes (``monocytes``) and live lymphocytes (the rest; doublets are
not simulated because the single-cell path has no doublet detector). Live lymphocytes are T
cells (``cd3_pct_lymph``), B cells (``b_of_non_t`` of the rest) and NK cells. T cells are
CD4-CD8- (``dn_of_t``), CD8 (``cd8_pct_cd3`` of the others) or CD4. CD8 cells take a memory
state (naive/CM/EM/TEMRA) from the sample's CD8 split, a TIM3+ (checkpoint-high) state with
probability ``cd8_tim3_pct_cd8`` and a PD-1+ state such that TIM3+ cells are mostly PD-1+ and
the marginal PD-1+ share is ``cd8_pd1_pct_cd8``. CD4 cells take a memory state from the CD4
split and a Treg state with probability ``cd4_treg_pct_cd4``.

Counts
------
RNA: negative binomial (gamma-Poisson) counts around ``library size x expression profile``.
The profile is a heavy-tailed background over ``n_genes`` genes plus 13 mitochondrial genes
plus cell-state programs for ~70 marker genes (in counts per 10,000 UMIs; HAVCR2 is captured
poorly, as in droplet data). Protein (ADT): negative binomial counts around
``cell depth x (ambient + specific binding)`` for CD3, CD4, CD8a, CD45RA, CD197 (CCR7),
CD279 (PD-1), CD366 (TIM-3), CD25 and CD127; every cell gets the ambient component.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from blinaprofile.config import SimulationConfig
from blinaprofile.errors import ConfigError
from blinaprofile.io.atomic import write_csv
from blinaprofile.simulate.cohort import draw_cohort

__all__ = [
    "ADT_NAMES",
    "MARKER_GENES",
    "simulate_single_cell_cohort",
    "truth_feature_table",
]

# --------------------------------------------------------------------------- programs
#: cell states (rows of the program tables); every simulated cell is one of these
_STATES: tuple[str, ...] = (
    "CD4_naive",
    "CD4_CM",
    "CD4_EM",
    "CD4_TEMRA",
    "CD8_naive",
    "CD8_CM",
    "CD8_EM",
    "CD8_TEMRA",
    "DN_T",
    "B",
    "NK",
    "monocyte",
    "empty",
)

# marker gene -> {state or flag: counts per 10,000 UMIs}. Keys starting with "+" are
# additive flags (treg, tim3, pd1); "T" applies to every T state, "CD4"/"CD8" to each lineage.
_RNA_PROGRAM: dict[str, dict[str, float]] = {
    "CD3E": {"T": 20.0, "NK": 0.6},
    "CD3D": {"T": 15.0, "NK": 0.3},
    "CD3G": {"T": 5.0},
    "TRAC": {"T": 14.0},
    "CD2": {"T": 8.0, "NK": 8.0},
    "CD4": {"CD4": 2.0, "monocyte": 3.0},
    "CD40LG": {"CD4": 2.0},
    "CD8A": {"CD8": 10.0, "NK": 1.5},
    "CD8B": {"CD8": 8.0},
    "CCR7": {
        "CD4_naive": 6.0,
        "CD8_naive": 6.0,
        "CD4_CM": 4.0,
        "CD8_CM": 4.0,
        "CD4_EM": 0.6,
        "CD8_EM": 0.5,
        "CD4_TEMRA": 0.3,
        "CD8_TEMRA": 0.3,
        "B": 5.0,
    },
    "SELL": {
        "CD4_naive": 8.0,
        "CD8_naive": 8.0,
        "CD4_CM": 5.0,
        "CD8_CM": 5.0,
        "CD4_EM": 1.5,
        "CD8_EM": 1.5,
        "CD4_TEMRA": 1.5,
        "CD8_TEMRA": 1.5,
        "B": 6.0,
        "NK": 4.0,
        "monocyte": 6.0,
    },
    "LEF1": {
        "CD4_naive": 6.0,
        "CD8_naive": 6.0,
        "CD4_CM": 2.5,
        "CD8_CM": 2.5,
        "CD4_EM": 0.7,
        "CD8_EM": 0.6,
        "CD4_TEMRA": 0.4,
        "CD8_TEMRA": 0.4,
    },
    "TCF7": {
        "CD4_naive": 8.0,
        "CD8_naive": 8.0,
        "CD4_CM": 5.0,
        "CD8_CM": 5.0,
        "CD4_EM": 2.0,
        "CD8_EM": 2.0,
        "CD4_TEMRA": 0.8,
        "CD8_TEMRA": 0.8,
    },
    "MAL": {"CD4_naive": 4.0, "CD8_naive": 2.0, "CD4_CM": 1.5, "CD8_CM": 0.8},
    "S100A4": {
        "CD4_naive": 3.0,
        "CD8_naive": 3.0,
        "CD4_CM": 10.0,
        "CD8_CM": 10.0,
        "CD4_EM": 15.0,
        "CD8_EM": 15.0,
        "CD4_TEMRA": 15.0,
        "CD8_TEMRA": 15.0,
        "NK": 15.0,
        "monocyte": 30.0,
    },
    "ANXA1": {
        "CD4_naive": 2.0,
        "CD8_naive": 2.0,
        "CD4_CM": 6.0,
        "CD8_CM": 6.0,
        "CD4_EM": 10.0,
        "CD8_EM": 10.0,
        "CD4_TEMRA": 10.0,
        "CD8_TEMRA": 10.0,
        "NK": 6.0,
        "monocyte": 10.0,
    },
    "KLRB1": {"CD4_CM": 1.5, "CD4_EM": 3.0, "CD8_CM": 1.0, "CD8_EM": 4.0, "NK": 3.0},
    "IL7R": {
        "CD4_naive": 8.0,
        "CD8_naive": 8.0,
        "CD4_CM": 10.0,
        "CD8_CM": 8.0,
        "CD4_EM": 8.0,
        "CD8_EM": 6.0,
        "CD4_TEMRA": 3.0,
        "CD8_TEMRA": 2.0,
        "+treg": -7.0,
    },
    "LTB": {"CD4_naive": 15.0, "CD4_CM": 15.0, "CD8_naive": 10.0, "CD8_CM": 8.0, "B": 20.0},
    "GZMK": {
        "CD4_CM": 0.5,
        "CD8_CM": 1.0,
        "CD4_EM": 2.0,
        "CD8_EM": 8.0,
        "CD4_TEMRA": 0.5,
        "CD8_TEMRA": 1.0,
        "NK": 2.0,
    },
    "GZMB": {"CD4_EM": 0.3, "CD8_EM": 1.5, "CD4_TEMRA": 6.0, "CD8_TEMRA": 12.0, "NK": 15.0},
    "PRF1": {"CD4_EM": 0.3, "CD8_EM": 1.5, "CD4_TEMRA": 4.0, "CD8_TEMRA": 8.0, "NK": 10.0},
    "GNLY": {"CD4_EM": 0.5, "CD8_EM": 3.0, "CD4_TEMRA": 10.0, "CD8_TEMRA": 25.0, "NK": 40.0},
    "KLRG1": {"CD4_EM": 1.0, "CD8_EM": 2.0, "CD4_TEMRA": 3.0, "CD8_TEMRA": 5.0, "NK": 3.0},
    "CX3CR1": {"CD8_EM": 0.3, "CD4_TEMRA": 2.0, "CD8_TEMRA": 3.0, "NK": 2.0, "monocyte": 1.0},
    "FGFBP2": {"CD4_TEMRA": 2.0, "CD8_TEMRA": 5.0, "NK": 6.0},
    "GZMH": {"CD8_EM": 1.5, "CD4_TEMRA": 4.0, "CD8_TEMRA": 10.0, "NK": 3.0},
    "NKG7": {
        "CD8_naive": 2.0,
        "CD8_CM": 4.0,
        "CD8_EM": 10.0,
        "CD8_TEMRA": 25.0,
        "CD4_EM": 2.0,
        "CD4_TEMRA": 10.0,
        "NK": 40.0,
    },
    "CCL5": {
        "CD8_naive": 1.0,
        "CD8_CM": 6.0,
        "CD8_EM": 30.0,
        "CD8_TEMRA": 40.0,
        "CD4_EM": 5.0,
        "CD4_TEMRA": 15.0,
        "DN_T": 15.0,
        "NK": 20.0,
    },
    "KLRD1": {"CD8_EM": 1.0, "CD8_TEMRA": 3.0, "NK": 8.0},
    "FOXP3": {"+treg": 3.0},
    "IL2RA": {"+treg": 4.0, "CD4_CM": 0.2, "CD4_EM": 0.2},
    "IKZF2": {"+treg": 2.0},
    "CTLA4": {"+treg": 3.0, "+tim3": 2.0, "CD4": 0.2, "CD8": 0.1},
    "HAVCR2": {"+tim3": 0.8, "T": 0.03, "NK": 1.0, "monocyte": 2.0},
    "PDCD1": {"+pd1": 2.5, "T": 0.1},
    "LAG3": {"+tim3": 2.5, "T": 0.2, "NK": 0.5},
    "TIGIT": {"+tim3": 3.0, "+pd1": 1.0, "+treg": 2.0, "T": 0.4, "NK": 0.5},
    "TOX": {"+tim3": 2.5, "+pd1": 1.0, "T": 0.4, "NK": 0.5},
    "ENTPD1": {"+tim3": 1.5, "+treg": 1.0, "T": 0.1},
    "LAYN": {"+tim3": 0.8, "T": 0.02},
    "MS4A1": {"B": 15.0},
    "CD19": {"B": 3.0},
    "CD79A": {"B": 20.0},
    "CD79B": {"B": 10.0},
    "KLRF1": {"NK": 4.0},
    "NCAM1": {"NK": 1.5},
    "FCER1G": {"NK": 6.0, "monocyte": 20.0},
    "TYROBP": {"NK": 15.0, "monocyte": 30.0},
    "LYZ": {"monocyte": 150.0, "B": 1.0},
    "CD14": {"monocyte": 15.0},
    "S100A8": {"monocyte": 100.0},
    "S100A9": {"monocyte": 120.0},
    "FCN1": {"monocyte": 20.0},
    "CST3": {"monocyte": 40.0},
    "PTPRC": {"T": 10.0, "B": 10.0, "NK": 10.0, "monocyte": 8.0},
}

#: marker genes the simulator models explicitly
MARKER_GENES: tuple[str, ...] = tuple(_RNA_PROGRAM)

_MT_GENES: tuple[str, ...] = (
    "MT-ND1",
    "MT-ND2",
    "MT-CO1",
    "MT-CO2",
    "MT-ATP8",
    "MT-ATP6",
    "MT-CO3",
    "MT-ND3",
    "MT-ND4L",
    "MT-ND4",
    "MT-ND5",
    "MT-ND6",
    "MT-CYB",
)

#: antibody name as written to ``obsm['protein']`` -> {state or flag: specific counts}
_ADT_PROGRAM: dict[str, dict[str, float]] = {
    "CD3": {"T": 300.0},
    "CD4": {"CD4": 600.0, "monocyte": 150.0},
    "CD8a": {"CD8": 500.0, "NK": 40.0},
    "CD45RA": {
        "CD4_naive": 600.0,
        "CD8_naive": 600.0,
        "CD4_TEMRA": 450.0,
        "CD8_TEMRA": 500.0,
        "CD4_CM": 40.0,
        "CD8_CM": 40.0,
        "CD4_EM": 40.0,
        "CD8_EM": 40.0,
        "DN_T": 200.0,
        "B": 800.0,
        "NK": 500.0,
        "monocyte": 30.0,
    },
    "CD197": {
        "CD4_naive": 30.0,
        "CD8_naive": 30.0,
        "CD4_CM": 25.0,
        "CD8_CM": 25.0,
        "B": 15.0,
    },
    "CD279": {"+pd1": 40.0},
    "CD366": {"+tim3": 25.0, "monocyte": 80.0, "NK": 20.0},
    "CD25": {"+treg": 60.0, "CD4": 8.0},
    "CD127": {
        "CD4_naive": 60.0,
        "CD8_naive": 60.0,
        "CD4_CM": 50.0,
        "CD8_CM": 50.0,
        "CD4_EM": 50.0,
        "CD8_EM": 45.0,
        "CD4_TEMRA": 15.0,
        "CD8_TEMRA": 15.0,
        "DN_T": 30.0,
        "+treg": -45.0,
    },
}
_ADT_AMBIENT: dict[str, float] = {
    "CD3": 20.0,
    "CD4": 30.0,
    "CD8a": 10.0,
    "CD45RA": 20.0,
    "CD197": 6.0,
    "CD279": 8.0,
    "CD366": 6.0,
    "CD25": 5.0,
    "CD127": 6.0,
}
#: antibody names written to ``obsm['protein']``
ADT_NAMES: tuple[str, ...] = tuple(_ADT_PROGRAM)

_T_STATES = {s for s in _STATES if s.startswith(("CD4_", "CD8_", "DN_"))}
_FLAGS = ("+treg", "+tim3", "+pd1")

# NB dispersion (gamma shape) for marker genes, background genes and antibodies
_THETA_MARKER = 4.0
_THETA_BACKGROUND = 8.0
_THETA_ADT = 8.0
_MEDIAN_LIBRARY = 3500.0
_LIBRARY_SD = 0.45
_MT_SHARE_LIVE = 0.04
_MT_SHARE_DEAD = 0.35
_EMPTY_LIBRARY = 120.0


def _program_matrix(
    program: dict[str, dict[str, float]], names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Expand a {feature: {state/flag: level}} table to (states x features, flags x features)."""
    base = np.zeros((len(_STATES), len(names)))
    flags = np.zeros((len(_FLAGS), len(names)))
    for j, name in enumerate(names):
        for key, level in program[name].items():
            if key in _FLAGS:
                flags[_FLAGS.index(key), j] += level
                continue
            for i, state in enumerate(_STATES):
                if (
                    key == state
                    or (key == "T" and state in _T_STATES)
                    or (key in ("CD4", "CD8") and state.startswith(key + "_"))
                ):
                    base[i, j] += level
    return base, flags


def _draw_sample_cells(
    row: pd.Series, config: SimulationConfig, n_cells: int, rng: np.random.Generator
) -> pd.DataFrame:
    """Per-cell truth (state, flags, QC class) of one sample from its true fractions."""
    comp = config.composition
    debris = comp.get("debris", 0.0)
    dead = comp.get("dead_lymphocytes", 0.0)
    mono = comp.get("monocytes", 0.0)
    live = 1.0 - debris - dead - mono - comp.get("doublets", 0.0)
    if live <= 0:
        raise ConfigError("composition: the shares leave no live lymphocytes")
    kinds = np.array(["empty", "dead", "monocyte", "lymphocyte"])
    p_kind = np.array([debris, dead, mono, live])
    kind = kinds[rng.choice(4, size=n_cells, p=p_kind / p_kind.sum())]
    # lymphocytes (also the dying ones, which keep a lymphocyte identity)
    lymph = (kind == "lymphocyte") | (kind == "dead")
    n_l = int(lymph.sum())
    cd3 = float(row["cd3_pct_lymph"])
    b_share = float(comp.get("b_of_non_t", 0.35))
    dn = float(comp.get("dn_of_t", 0.0))
    cd8 = float(row["cd8_pct_cd3"])
    u = rng.random(n_l)
    lin = np.where(u < cd3, "T", np.where(u < cd3 + (1 - cd3) * b_share, "B", "NK"))
    v = rng.random(n_l)
    tl = np.where(v < dn, "DN", np.where(v < dn + (1 - dn) * cd8, "CD8", "CD4"))
    lineage = np.where(lin == "T", tl, lin)
    mem8_keys = ["naive", "cm", "em", "temra"]
    p8 = np.array([float(row[f"cd8_{k}_pct_cd8"]) for k in mem8_keys])
    p4 = np.array([float(row[f"cd4_{k}_pct_cd4"]) for k in mem8_keys])
    mem_names = np.array(["naive", "CM", "EM", "TEMRA"])
    memory = np.full(n_l, "NA", dtype=object)
    is8 = lineage == "CD8"
    is4 = lineage == "CD4"
    memory[is8] = mem_names[rng.choice(4, size=int(is8.sum()), p=p8 / p8.sum())]
    memory[is4] = mem_names[rng.choice(4, size=int(is4.sum()), p=p4 / p4.sum())]
    memory[lineage == "DN"] = "EM"  # gamma-delta-like effector cells; not scored
    f_tim3 = float(row["cd8_tim3_pct_cd8"])
    f_pd1 = float(row["cd8_pd1_pct_cd8"])
    tim3 = np.zeros(n_l, dtype=bool)
    pd1 = np.zeros(n_l, dtype=bool)
    treg = np.zeros(n_l, dtype=bool)
    tim3[is8] = rng.random(int(is8.sum())) < f_tim3
    q = min(0.8, f_pd1 / f_tim3) if f_tim3 > 0 else 0.0  # P(PD-1+ | TIM3+)
    p_rest = max(0.0, (f_pd1 - q * f_tim3) / (1.0 - f_tim3))
    r = rng.random(n_l)
    pd1[is8] = np.where(tim3[is8], r[is8] < q, r[is8] < p_rest)
    # CD4 cells: a small checkpoint-positive share for realism (not a schema feature)
    pd1[is4] = rng.random(int(is4.sum())) < 0.10
    treg[is4] = rng.random(int(is4.sum())) < float(row["cd4_treg_pct_cd4"])

    state = np.full(n_cells, "empty", dtype=object)
    cell_type = np.full(n_cells, "empty", dtype=object)
    lineage_all = np.full(n_cells, "non_T", dtype=object)
    memory_all = np.full(n_cells, "NA", dtype=object)
    tim3_all = np.zeros(n_cells, dtype=bool)
    pd1_all = np.zeros(n_cells, dtype=bool)
    treg_all = np.zeros(n_cells, dtype=bool)
    l_state = np.where(
        np.isin(lineage, ["CD4", "CD8"]),
        np.char.add(np.char.add(lineage.astype(str), "_"), memory.astype(str)),
        np.where(lineage == "DN", "DN_T", lineage),
    )
    state[lymph] = l_state
    state[kind == "monocyte"] = "monocyte"
    cell_type[lymph] = np.where(np.isin(lineage, ["CD4", "CD8", "DN"]), "T", lineage)
    cell_type[kind == "monocyte"] = "myeloid"
    lineage_all[lymph] = np.where(lineage == "DN", "other", np.where(lin == "T", lineage, "non_T"))
    memory_all[lymph] = np.where(np.isin(lineage, ["CD4", "CD8"]), memory, "NA")
    tim3_all[lymph] = tim3
    pd1_all[lymph] = pd1
    treg_all[lymph] = treg
    qc_ok = kind == "lymphocyte"
    qc_ok |= kind == "monocyte"
    cell_type[kind == "dead"] = "dead"
    return pd.DataFrame(
        {
            "truth_state": state,
            "truth_cell_type": cell_type,
            "truth_t_cell": cell_type == "T",
            "truth_lineage": lineage_all,
            "truth_memory": memory_all,
            "truth_tim3": tim3_all,
            "truth_pd1": pd1_all,
            "truth_treg": treg_all,
            "truth_qc_ok": qc_ok,
            "truth_dead": kind == "dead",
        }
    )


def _nb(mean: np.ndarray, theta: float, rng: np.random.Generator) -> np.ndarray:
    """Negative-binomial draws with the given means (gamma-Poisson, shape ``theta``)."""
    lam = mean * rng.gamma(theta, 1.0 / theta, size=mean.shape)
    return rng.poisson(lam)


def truth_feature_table(obs: pd.DataFrame) -> pd.DataFrame:
    """Per-sample feature values a perfect annotator would report, from ``obs['truth_*']``.

    Parameters
    ----------
    obs
        ``obs`` of a simulated object (needs ``sample_id`` and the ``truth_*`` columns).

    Returns
    -------
    DataFrame
        Indexed by ``sample_id``; schema feature names in schema units (percent of the
        parent, ratio), computed over the cells that a perfect QC keeps (not dead, not empty),
        plus ``n_live``, ``n_cd3``, ``n_cd4``, ``n_cd8``.
    """
    rows = {}
    for sid, g in obs.groupby("sample_id", observed=True, sort=False):
        ok = g[g["truth_qc_ok"].astype(bool)]
        t = ok[ok["truth_t_cell"].astype(bool)]
        c8 = t[t["truth_lineage"] == "CD8"]
        c4 = t[t["truth_lineage"] == "CD4"]

        def pct(num: int, den: int) -> float:
            return 100.0 * num / den if den else float("nan")

        r: dict[str, float] = {
            "n_live": float(len(ok)),
            "n_cd3": float(len(t)),
            "n_cd4": float(len(c4)),
            "n_cd8": float(len(c8)),
            # lymphocytes as the flow gates define them: QC-passed cells that are not myeloid
            "cd3_pct_lymph": pct(len(t), int((ok["truth_cell_type"] != "myeloid").sum())),
            "cd4_pct_cd3": pct(len(c4), len(t)),
            "cd8_pct_cd3": pct(len(c8), len(t)),
            "cd4_cd8_ratio": len(c4) / len(c8) if len(c8) else float("nan"),
        }
        for lin, sub in (("cd8", c8), ("cd4", c4)):
            for m in ("naive", "CM", "EM", "TEMRA"):
                r[f"{lin}_{m.lower()}_pct_{lin}"] = pct(
                    int((sub["truth_memory"] == m).sum()), len(sub)
                )
        r["cd8_tim3_pct_cd8"] = pct(int(c8["truth_tim3"].sum()), len(c8))
        r["cd8_pd1_pct_cd8"] = pct(int(c8["truth_pd1"].sum()), len(c8))
        r["cd4_treg_pct_cd4"] = pct(int(c4["truth_treg"].sum()), len(c4))
        rows[sid] = r
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = "sample_id"
    return out


def simulate_single_cell_cohort(
    config: SimulationConfig,
    out_dir: str | os.PathLike[str],
    *,
    n_cells_per_sample: int = 2000,
    n_genes: int = 2000,
    with_protein: bool = True,
    seed: int | None = None,
) -> Path:
    """Simulate a single-cell cohort and write it as one ``.h5ad`` plus manifest and truth.

    Parameters
    ----------
    config
        The scenario; its latent fractions are drawn with :func:`~blinaprofile.simulate.cohort.draw_cohort`.
    out_dir
        Folder to write into (created if needed).
    n_cells_per_sample
        Droplets per sample (including empty droplets and dying cells).
    n_genes
        Genes in the matrix (marker genes, 13 mitochondrial genes and background genes).
    with_protein
        Also simulate CITE-seq antibody counts into ``obsm['protein']`` (a DataFrame whose
        columns are the antibody names ``CD3, CD4, CD8a, CD45RA, CD197, CD279, CD366, CD25,
        CD127``).
    seed
        Overrides ``config.seed`` (both the cohort draw and the cell-level noise).

    Returns
    -------
    Path
        The ``.h5ad`` written (raw counts in ``X``, float32 CSR; ``obs['sample_id']``,
        ``obs['patient_id']``, ``obs['timepoint']``, ``obs['response']`` and per-cell truth in
        ``obs['truth_*']``). Beside it: ``manifest.csv`` (``sample_id, patient_id, timepoint,
        file, response`` with ``response`` as ``responder``/``nonresponder``) and
        ``truth.json`` (per sample: the latent fractions 0-1 from the cohort draw and the
        realised feature values in schema units, see :func:`truth_feature_table`).

    Raises
    ------
    ConfigError
        ``n_genes`` is too small to hold the marker and mitochondrial genes, or the
        scenario's composition leaves no lymphocytes.
    """
    n_fixed = len(MARKER_GENES) + len(_MT_GENES)
    if n_genes < n_fixed + 50:
        raise ConfigError(f"n_genes must be at least {n_fixed + 50} (got {n_genes})")
    if n_cells_per_sample < 10:
        raise ConfigError(f"n_cells_per_sample must be at least 10 (got {n_cells_per_sample})")
    seed_eff = config.seed if seed is None else seed
    cohort = draw_cohort(config, seed=seed_eff)
    rng = np.random.default_rng([seed_eff, 20_240_611])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    n_bg = n_genes - n_fixed
    bg_names = [f"BG{i:05d}" for i in range(1, n_bg + 1)]
    genes = list(MARKER_GENES) + list(_MT_GENES) + bg_names
    # heavy-tailed background (a few very high genes, many barely detected)
    bg = rng.lognormal(mean=0.0, sigma=1.6, size=n_bg)
    bg /= bg.sum()
    # mild cell-type-specific modulation of 20% of the background genes
    mod = np.ones((len(_STATES), n_bg))
    sel = rng.random(n_bg) < 0.2
    mod[:, sel] = rng.lognormal(0.0, 0.4, size=(len(_STATES), int(sel.sum())))
    mt_prof = rng.dirichlet(np.full(len(_MT_GENES), 5.0))
    rna_base, rna_flags = _program_matrix(_RNA_PROGRAM, list(MARKER_GENES))
    adt_names = list(ADT_NAMES)
    adt_base, adt_flags = _program_matrix(_ADT_PROGRAM, adt_names)
    adt_amb = np.array([_ADT_AMBIENT[a] for a in adt_names])
    # ambient RNA profile (empty droplets): the average of lymphocytes and monocytes
    amb_idx = [_STATES.index(s) for s in ("CD4_naive", "CD8_EM", "B", "NK", "monocyte")]
    rna_base[_STATES.index("empty")] = rna_base[amb_idx].mean(axis=0)

    blocks: list[sp.csr_matrix] = []
    obs_parts: list[pd.DataFrame] = []
    prot_parts: list[np.ndarray] = []
    truth: dict[str, dict[str, object]] = {}
    for _, row in cohort.iterrows():
        sid = str(row["sample_id"])
        cells = _draw_sample_cells(row, config, n_cells_per_sample, rng)
        s_idx = np.array([_STATES.index(s) for s in cells["truth_state"]])
        flags = np.column_stack(
            [cells["truth_treg"], cells["truth_tim3"], cells["truth_pd1"]]
        ).astype(float)
        n = len(cells)
        lib = _MEDIAN_LIBRARY * rng.lognormal(0.0, _LIBRARY_SD, size=n)
        dead = cells["truth_dead"].to_numpy()
        empty = cells["truth_state"].to_numpy() == "empty"
        lib[dead] *= 0.35
        lib[empty] = _EMPTY_LIBRARY * rng.lognormal(0.0, 0.3, size=int(empty.sum()))
        mt_share = np.where(dead, _MT_SHARE_DEAD, _MT_SHARE_LIVE) * rng.lognormal(0.0, 0.25, n)
        marker_frac = np.clip(rna_base[s_idx] + flags @ rna_flags, 0.0, None) / 1e4
        bg_share = np.clip(1.0 - marker_frac.sum(axis=1) - mt_share, 0.05, None)
        mu_marker = lib[:, None] * marker_frac
        mu_mt = (lib * mt_share)[:, None] * mt_prof[None, :]
        mu_bg = (lib * bg_share)[:, None] * (bg[None, :] * mod[s_idx])
        mu_bg /= (bg[None, :] * mod[s_idx]).sum(axis=1, keepdims=True)
        counts = np.hstack(
            [
                _nb(mu_marker, _THETA_MARKER, rng),
                _nb(mu_mt, _THETA_BACKGROUND, rng),
                _nb(mu_bg, _THETA_BACKGROUND, rng),
            ]
        ).astype(np.float32)
        blocks.append(sp.csr_matrix(counts))
        if with_protein:
            depth = rng.lognormal(0.0, 0.4, size=n)
            depth[empty] *= 0.05
            spec = np.clip(adt_base[s_idx] + flags @ adt_flags, 0.0, None)
            prot_parts.append(_nb(depth[:, None] * (adt_amb[None, :] + spec), _THETA_ADT, rng))
        cells.insert(0, "timepoint", str(row["timepoint"]))
        cells.insert(0, "patient_id", str(row["patient_id"]))
        cells.insert(0, "sample_id", sid)
        cells.insert(3, "response", str(row["response_label"]))
        cells.index = [f"{sid}-{i:05d}" for i in range(n)]
        obs_parts.append(cells)
        latent = {
            k: float(v)
            for k, v in row.items()
            if k not in ("sample_id", "patient_id", "timepoint", "response", "response_label")
        }
        truth[sid] = {
            "patient_id": str(row["patient_id"]),
            "timepoint": str(row["timepoint"]),
            "response": str(row["response_label"]),
            "latent": latent,
        }

    obs = pd.concat(obs_parts)
    for col in ("sample_id", "patient_id", "timepoint", "response"):
        obs[col] = pd.Categorical(obs[col], categories=list(dict.fromkeys(obs[col])))
    for col in ("truth_state", "truth_cell_type", "truth_lineage", "truth_memory"):
        obs[col] = pd.Categorical(obs[col].astype(str))
    adata = ad.AnnData(
        X=sp.vstack(blocks, format="csr"),
        obs=obs,
        var=pd.DataFrame(
            {
                "feature_types": "Gene Expression",
                "simulated_marker": [g in _RNA_PROGRAM for g in genes],
            },
            index=pd.Index(genes),
        ),
    )
    if with_protein:
        adata.obsm["protein"] = pd.DataFrame(
            np.vstack(prot_parts).astype(np.float32), index=adata.obs_names, columns=adt_names
        )
    realised = truth_feature_table(adata.obs)
    for sid, r in realised.iterrows():
        truth[str(sid)]["realised"] = {k: float(v) for k, v in r.items()}
    adata.uns["simulation"] = {
        "scenario": config.name,
        "seed": int(seed_eff),
        "n_cells_per_sample": int(n_cells_per_sample),
        "n_genes": int(n_genes),
        "with_protein": bool(with_protein),
        "generator": "blinaprofile.simulate.singlecell",
    }
    fname = f"{config.name}_single_cell.h5ad"
    path = out / fname
    adata.write_h5ad(path)
    manifest = pd.DataFrame(
        {
            "sample_id": cohort["sample_id"].astype(str),
            "patient_id": cohort["patient_id"].astype(str),
            "timepoint": cohort["timepoint"].astype(str),
            "file": fname,
            "response": cohort["response_label"].astype(str),
        }
    )
    write_csv(manifest, out / "manifest.csv")
    meta = {
        "scenario": config.name,
        "seed": int(seed_eff),
        "file": fname,
        "units": {
            "latent": "fractions 0-1 from blinaprofile.simulate.cohort.draw_cohort (cd3 of live lymphocytes)",
            "realised": "schema units from the per-cell truth (percent of parent; cd3 of QC-passing cells)",
        },
        "samples": truth,
    }
    (out / "truth.json").write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    return path
