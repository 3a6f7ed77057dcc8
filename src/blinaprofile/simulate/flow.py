"""Simulated flow-cytometry cohorts with known truth.

A cohort is drawn from the generative model in :mod:`blinaprofile.simulate.cohort`; each sample
becomes an FCS 3.1 file for the default post-transplant T-cell panel with the artefacts a
real acquisition has: a ``$SPILLOVER`` matrix applied to the dyes, debris, doublets, dead
cells, B and NK cells, monocytes, negative populations spread around zero, and a
run-to-run brightness shift per channel. Every event carries a truth label.

Outputs of :func:`simulate_cohort` (in ``out_dir``)::

    fcs/<sample_id>.fcs        the acquisitions
    truth/<sample_id>.parquet  per-event truth (population, tim3, pd1, treg)
    manifest.csv               sample_id, patient_id, timepoint, file, response
    cohort.json                scenario, latent fractions per sample, Bayes-optimal AUC
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blinaprofile.config import PanelConfig, SimulationConfig, validate_config
from blinaprofile.io.atomic import atomic_path, write_csv, write_text
from blinaprofile.simulate.cohort import bayes_optimal_auc, draw_cohort

__all__ = [
    "POPULATIONS",
    "SPILLOVER",
    "SimulatedCohort",
    "simulate_cohort",
    "simulate_events",
]

MAX_VALUE = 262143.0

#: Truth populations, in code order (``truth.population`` is categorical over these).
POPULATIONS: tuple[str, ...] = (
    "debris",
    "doublet",
    "monocyte",
    "dead",
    "B",
    "NK",
    "DN_T",
    "CD4_naive",
    "CD4_CM",
    "CD4_EM",
    "CD4_TEMRA",
    "CD8_naive",
    "CD8_CM",
    "CD8_EM",
    "CD8_TEMRA",
)

#: Spillover of each dye (row, by marker) into each detector (column), $SPILLOVER convention.
#: Values are typical of a 5-laser instrument: FITC->PE, PE->PE-Cy7, APC->APC-H7, BUV395->BUV496.
_DYES = ("Viability", "CD3", "CD4", "CD8", "CD45RA", "CCR7", "TIM3", "PD1", "CD25", "CD127", "CD19")
_SPILL_PAIRS = {
    ("CD45RA", "TIM3"): 0.18,  # FITC -> PE
    ("TIM3", "CD45RA"): 0.012,  # PE -> FITC
    ("TIM3", "CD25"): 0.035,  # PE -> PE-Cy7
    ("CD25", "TIM3"): 0.004,
    ("PD1", "CD19"): 0.09,  # APC -> APC-H7
    ("CD19", "PD1"): 0.015,
    ("CD3", "CD4"): 0.06,  # BUV395 -> BUV496
    ("CD4", "CD3"): 0.01,
    ("CCR7", "Viability"): 0.11,  # BV421 -> BV510
    ("Viability", "CCR7"): 0.025,
    ("Viability", "CD127"): 0.02,  # BV510 -> BV650
    ("CD127", "CD8"): 0.07,  # BV650 -> BV786
    ("CD8", "CD127"): 0.01,
    ("CD25", "CD8"): 0.02,  # PE-Cy7 -> BV786 (cross-laser excitation)
}


def _spill_matrix() -> np.ndarray:
    s = np.eye(len(_DYES))
    for (a, b), v in _SPILL_PAIRS.items():
        s[_DYES.index(a), _DYES.index(b)] = v
    return s


SPILLOVER = _spill_matrix()

# positive-population medians (linear, uncompensated units, before brightness shift)
_BRIGHT = {
    "Viability": 25000.0,
    "CD3": 9000.0,
    "CD4": 7000.0,
    "CD8": 16000.0,
    "CD45RA": 9000.0,
    "CCR7": 3500.0,
    "TIM3": 3000.0,
    "PD1": 3500.0,
    "CD25": 4000.0,
    "CD127": 3000.0,
    "CD19": 8000.0,
}


@dataclass(frozen=True)
class SimulatedCohort:
    """Where a simulated cohort was written and what its generative model allows."""

    out_dir: Path
    manifest: Path
    cohort_json: Path
    bayes_auc: float
    n_samples: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "manifest": str(self.manifest),
            "cohort_json": str(self.cohort_json),
            "bayes_auc": self.bayes_auc,
            "n_samples": self.n_samples,
        }


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int) -> np.ndarray:
    return median * np.exp(rng.normal(0.0, sigma, n))


def simulate_events(
    fractions: dict[str, float],
    *,
    n_events: int,
    rng: np.random.Generator,
    config: SimulationConfig,
    brightness: dict[str, float] | None = None,
) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
    """Simulate one acquisition's events from a sample's true fractions.

    Parameters
    ----------
    fractions
        One row of :func:`~blinaprofile.simulate.cohort.draw_cohort` (0-1 shares).
    n_events
        Events to generate.
    rng
        Random generator (determinism is the caller's seed).
    config
        The scenario (composition of non-lymphocyte events).
    brightness
        Multiplicative brightness factor per dye (run-to-run shift); 1.0 if absent.

    Returns
    -------
    channels, truth
        ``channels`` maps each parameter (``FSC-A``, ``FSC-H``, ``SSC-A``, ``Time`` and every
        dye by canonical marker) to a float32 vector of observed (spilled) values; ``truth``
        has one row per event: ``population`` (categorical over :data:`POPULATIONS`) and
        the booleans ``tim3``, ``pd1``, ``treg``.
    """
    comp = config.composition
    p_debris = comp.get("debris", 0.05)
    p_doublet = comp.get("doublets", 0.04)
    p_mono = comp.get("monocytes", 0.1)
    p_dead = comp.get("dead_lymphocytes", 0.05)
    b_of_non_t = comp.get("b_of_non_t", 0.35)
    dn_of_t = comp.get("dn_of_t", 0.04)
    p_live = max(0.0, 1.0 - p_debris - p_doublet - p_mono - p_dead)
    t = fractions["cd3_pct_lymph"]
    cd8 = (1.0 - dn_of_t) * fractions["cd8_pct_cd3"]
    cd4 = (1.0 - dn_of_t) - cd8
    em8 = fractions["cd8_em_pct_cd8"]
    probs = {
        "debris": p_debris,
        "doublet": p_doublet,
        "monocyte": p_mono,
        "dead": p_dead,
        "B": p_live * (1 - t) * b_of_non_t,
        "NK": p_live * (1 - t) * (1 - b_of_non_t),
        "DN_T": p_live * t * dn_of_t,
        "CD4_naive": p_live * t * cd4 * fractions["cd4_naive_pct_cd4"],
        "CD4_CM": p_live * t * cd4 * fractions["cd4_cm_pct_cd4"],
        "CD4_EM": p_live * t * cd4 * fractions["cd4_em_pct_cd4"],
        "CD4_TEMRA": p_live * t * cd4 * fractions["cd4_temra_pct_cd4"],
        "CD8_naive": p_live * t * cd8 * fractions["cd8_naive_pct_cd8"],
        "CD8_CM": p_live * t * cd8 * fractions["cd8_cm_pct_cd8"],
        "CD8_EM": p_live * t * cd8 * em8,
        "CD8_TEMRA": p_live * t * cd8 * fractions["cd8_temra_pct_cd8"],
    }
    pvec = np.array([probs[p] for p in POPULATIONS])
    pvec = pvec / pvec.sum()
    pop = rng.choice(len(POPULATIONS), size=n_events, p=pvec).astype(np.int8)
    code = {name: i for i, name in enumerate(POPULATIONS)}

    n = n_events
    true = {d: np.zeros(n) for d in _DYES}
    fsc = np.empty(n)
    ssc = np.empty(n)
    ratio = rng.normal(0.88, 0.02, n)  # FSC-H / FSC-A of singlets

    def idx(*names: str) -> np.ndarray:
        return np.flatnonzero(np.isin(pop, [code[x] for x in names]))

    def pos(dye: str, where: np.ndarray, *, scale: float = 1.0, sigma: float = 0.45) -> None:
        true[dye][where] = _lognormal(rng, _BRIGHT[dye] * scale, sigma, where.size)

    lymph_like = idx(*POPULATIONS[4:])  # B, NK, T subsets
    fsc[lymph_like] = rng.normal(70000, 7000, lymph_like.size)
    ssc[lymph_like] = _lognormal(rng, 18000, 0.22, lymph_like.size)
    w = idx("monocyte")
    fsc[w] = rng.normal(115000, 12000, w.size)
    ssc[w] = _lognormal(rng, 62000, 0.22, w.size)
    pos("CD4", w, scale=0.2)
    pos("CD45RA", w, scale=0.1)
    w = idx("debris")
    fsc[w] = _lognormal(rng, 14000, 0.45, w.size)
    ssc[w] = _lognormal(rng, 7000, 0.6, w.size)
    dead_debris = w[rng.random(w.size) < 0.5]
    pos("Viability", dead_debris, scale=0.5, sigma=0.6)
    w = idx("dead")
    fsc[w] = rng.normal(52000, 9000, w.size)
    ssc[w] = _lognormal(rng, 24000, 0.3, w.size)
    pos("Viability", w)
    # dead cells keep some of their surface phenotype (dimmer)
    dead_t = w[rng.random(w.size) < t]
    pos("CD3", dead_t, scale=0.5)
    w = idx("B")
    pos("CD19", w)
    pos("CD45RA", w, scale=0.8)
    pos("CCR7", w, scale=0.6)
    w = idx("NK")
    pos("CD45RA", w, scale=0.7)
    pos("CD8", w[rng.random(w.size) < 0.3], scale=0.12)
    t_idx = idx(*POPULATIONS[6:])
    pos("CD3", t_idx)
    cd4_idx = idx("CD4_naive", "CD4_CM", "CD4_EM", "CD4_TEMRA")
    cd8_idx = idx("CD8_naive", "CD8_CM", "CD8_EM", "CD8_TEMRA")
    pos("CD4", cd4_idx)
    pos("CD8", cd8_idx)
    for lineage in ("CD4", "CD8"):
        pos("CCR7", idx(f"{lineage}_naive", f"{lineage}_CM"), sigma=0.55)
        pos("CD45RA", idx(f"{lineage}_naive", f"{lineage}_TEMRA"))
    # checkpoints and Treg
    tim3 = np.zeros(n, dtype=bool)
    pd1 = np.zeros(n, dtype=bool)
    treg = np.zeros(n, dtype=bool)
    tim3[cd8_idx] = rng.random(cd8_idx.size) < fractions["cd8_tim3_pct_cd8"]
    pd1[cd8_idx] = rng.random(cd8_idx.size) < fractions["cd8_pd1_pct_cd8"]
    pd1[cd4_idx] = rng.random(cd4_idx.size) < 0.10
    treg[cd4_idx] = rng.random(cd4_idx.size) < fractions["cd4_treg_pct_cd4"]
    pos("TIM3", np.flatnonzero(tim3), sigma=0.55)
    pos("PD1", np.flatnonzero(pd1))
    w = np.flatnonzero(treg)
    pos("CD25", w)
    true["CD127"][w] = _lognormal(rng, 150.0, 0.5, w.size)
    conv = np.setdiff1d(t_idx, w, assume_unique=True)
    pos("CD127", conv)

    # doublets: two random live lymphocytes stuck together
    w = idx("doublet")
    if w.size and lymph_like.size:
        a = rng.choice(lymph_like, w.size)
        b = rng.choice(lymph_like, w.size)
        for d in _DYES:
            true[d][w] = true[d][a] + true[d][b]
        fsc[w] = fsc[a] + fsc[b]
        ssc[w] = ssc[a] + ssc[b]
        ratio[w] = rng.normal(0.52, 0.04, w.size)
    elif w.size:
        fsc[w] = rng.normal(140000, 10000, w.size)
        ssc[w] = _lognormal(rng, 36000, 0.2, w.size)
        ratio[w] = 0.52

    # instrument: brightness shift, spillover, photon + electronic noise
    brightness = brightness or {}
    signal = np.stack([true[d] * brightness.get(d, 1.0) for d in _DYES], axis=1)
    observed = signal @ SPILLOVER
    noise_sd = np.sqrt(60.0**2 + 40.0 * np.maximum(observed, 0.0))
    observed += rng.normal(size=observed.shape) * noise_sd
    out: dict[str, np.ndarray] = {}
    fsc = np.clip(fsc, 0.0, MAX_VALUE)
    out["FSC-A"] = fsc
    out["FSC-H"] = np.clip(fsc * ratio, 0.0, MAX_VALUE)
    out["SSC-A"] = np.clip(ssc, 0.0, MAX_VALUE)
    out["Time"] = np.sort(rng.uniform(0.0, 60_000.0, n))
    for j, d in enumerate(_DYES):
        out[d] = np.minimum(observed[:, j], MAX_VALUE)
    # shuffle acquisition order (Time stays sorted)
    order = rng.permutation(n)
    out = {k: (v if k == "Time" else v[order]).astype(np.float32) for k, v in out.items()}
    truth = pd.DataFrame(
        {
            "population": pd.Categorical.from_codes(pop[order], categories=list(POPULATIONS)),
            "tim3": tim3[order],
            "pd1": pd1[order],
            "treg": treg[order],
        }
    )
    return out, truth


def _panel_columns(panel: PanelConfig) -> tuple[list[str], list[str], list[str]]:
    """Channel names, $PnS markers and the simulator key (canonical marker) per column."""
    from blinaprofile.gating.panel import canonical_marker

    channels, markers, keys = [], [], []
    for ch in panel.channels:
        channels.append(ch.channel)
        markers.append(ch.marker or "")
        if ch.kind in ("scatter", "time"):
            keys.append(ch.channel)
        else:
            key = canonical_marker(ch.marker or "")
            if key not in _DYES:
                from blinaprofile.errors import ConfigError

                raise ConfigError(
                    f"panel channel {ch.channel}: the simulator has no dye for marker {ch.marker!r}"
                )
            keys.append(key)
    return channels, markers, keys


def simulate_cohort(
    config: SimulationConfig,
    out_dir: str | os.PathLike[str],
    *,
    panel: PanelConfig,
    n_patients: int | None = None,
    events_per_sample: int | None = None,
    seed: int | None = None,
    brightness_shift: float | None = None,
) -> SimulatedCohort:
    """Simulate a cohort and write FCS files, truth, manifest and ``cohort.json``.

    Parameters
    ----------
    config
        Scenario (``configs/simulation/*.yaml``).
    out_dir
        Output folder (created; existing files of the same names are replaced atomically).
    panel
        The panel whose channel and marker names the files carry.
    n_patients, events_per_sample, seed, brightness_shift
        Override the scenario's values.

    Returns
    -------
    SimulatedCohort

    Raises
    ------
    ConfigError
        An override is out of range (``n_patients`` below 2...); the message names the key.
    """
    from blinaprofile.io.fcs_write import write_fcs

    updates: dict[str, Any] = {}
    if n_patients is not None:
        updates["n_patients"] = n_patients
    if events_per_sample is not None:
        updates["events_per_sample"] = events_per_sample
    if seed is not None:
        updates["seed"] = seed
    if brightness_shift is not None:
        updates["brightness_shift"] = brightness_shift
    if updates:
        # a bad override is a ConfigError naming the key, before anything is written
        config = validate_config(
            SimulationConfig,
            {**config.model_dump(), **updates},
            source=f"scenario {config.name!r} with {', '.join(sorted(updates))} overridden",
        )
    out = Path(out_dir)
    (out / "fcs").mkdir(parents=True, exist_ok=True)
    (out / "truth").mkdir(parents=True, exist_ok=True)
    cohort = draw_cohort(config)
    channels, markers, keys = _panel_columns(panel)
    spill_channels = [channels[keys.index(d)] for d in _DYES if d in keys]
    spill_idx = [_DYES.index(d) for d in _DYES if d in keys]
    spill = SPILLOVER[np.ix_(spill_idx, spill_idx)]
    ss = np.random.SeedSequence(config.seed)
    manifest_rows = []
    per_sample: list[dict[str, Any]] = []
    for row, child in zip(cohort.to_dict("records"), ss.spawn(len(cohort)), strict=True):
        rng = np.random.default_rng(child)
        s = config.brightness_shift
        brightness = {d: float(rng.uniform(1.0 - s, 1.0 + s)) for d in _DYES}
        data, truth = simulate_events(
            row, n_events=config.events_per_sample, rng=rng, config=config, brightness=brightness
        )
        events = np.column_stack([data[k] for k in keys]).astype(np.float32)
        sid = str(row["sample_id"])
        fcs_path = out / "fcs" / f"{sid}.fcs"
        write_fcs(
            fcs_path,
            events,
            channels=channels,
            markers=markers,
            spillover=(spill_channels, spill),
            keywords={
                "$CYT": panel.instrument or "simulated cytometer",
                "$SRC": str(row["patient_id"]),
                "$FIL": fcs_path.name,
                "$DATE": "21-NOV-2026",
                "BLINAPROFILE_SIMULATED": "1",
            },
        )
        truth_path = out / "truth" / f"{sid}.parquet"
        with atomic_path(truth_path) as tmp:
            truth.to_parquet(tmp, index=False)
        manifest_rows.append(
            {
                "sample_id": sid,
                "patient_id": row["patient_id"],
                "timepoint": row["timepoint"],
                "file": f"fcs/{sid}.fcs",
                "response": row["response_label"],
            }
        )
        per_sample.append(
            {
                **{k: v for k, v in row.items() if k != "response_label"},
                "brightness": brightness,
            }
        )
    manifest = out / "manifest.csv"
    write_csv(pd.DataFrame(manifest_rows), manifest)
    bayes = bayes_optimal_auc(config)
    info = {
        "scenario": config.model_dump(),
        "bayes_optimal": bayes.as_dict(),
        "samples": per_sample,
        "spillover": {"channels": spill_channels, "matrix": spill.tolist()},
    }
    cj = out / "cohort.json"
    write_text(cj, json.dumps(info, indent=2, default=float))
    return SimulatedCohort(
        out_dir=out,
        manifest=manifest,
        cohort_json=cj,
        bayes_auc=bayes.analytic,
        n_samples=len(manifest_rows),
    )


_T_POPS = tuple(p for p in POPULATIONS if p.startswith(("CD4_", "CD8_", "DN_T")))
_LIVE_POPS = ("B", "NK", *_T_POPS)


def truth_masks(truth: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-event truth for each gate of the default strategy (same ids as the gates)."""
    pop = truth["population"].astype(str).to_numpy()

    def isin(*names: str) -> np.ndarray:
        return np.isin(pop, names)

    out = {
        "lymphocytes": isin("dead", *_LIVE_POPS),
        "singlets": isin("dead", *_LIVE_POPS),
        "live": isin(*_LIVE_POPS),
        "cd3": isin(*_T_POPS),
        "cd4": isin("CD4_naive", "CD4_CM", "CD4_EM", "CD4_TEMRA"),
        "cd8": isin("CD8_naive", "CD8_CM", "CD8_EM", "CD8_TEMRA"),
    }
    for lin in ("cd4", "cd8"):
        for sub, name in (("naive", "naive"), ("cm", "CM"), ("em", "EM"), ("temra", "TEMRA")):
            out[f"{lin}_{sub}"] = pop == f"{lin.upper()}_{name}"
    out["cd8_tim3"] = out["cd8"] & truth["tim3"].to_numpy()
    out["cd8_pd1"] = out["cd8"] & truth["pd1"].to_numpy()
    out["cd4_treg"] = out["cd4"] & truth["treg"].to_numpy()
    return out


def gating_accuracy(masks: dict[str, np.ndarray], truth: pd.DataFrame) -> pd.DataFrame:
    """Precision, recall and F1 of each gate against the simulated truth."""
    rows = []
    for gid, t in truth_masks(truth).items():
        if gid not in masks:
            continue
        g = masks[gid]
        tp = int(np.count_nonzero(g & t))
        prec = tp / max(1, int(g.sum()))
        rec = tp / max(1, int(t.sum()))
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        rows.append(
            {
                "gate": gid,
                "truth": int(t.sum()),
                "gated": int(g.sum()),
                "precision": prec,
                "recall": rec,
                "f1": f1,
            }
        )
    return pd.DataFrame(rows)
