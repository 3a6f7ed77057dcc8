"""Wall time of the label-permutation test of the default training config.

The permutation test re-runs the complete nested procedure (outer and inner grouped CV,
tuning, threshold) for every family on every permuted labelling, so it dominates training
time. This benchmark draws a cohort of ``--patients`` patients from the default simulation
scenario (true subset fractions x 100, one sample per patient), then times
:func:`blinaprofile.models.validation.evaluate` with the default config's families:

- ``0 permutations``: the validation itself (both families, importance, CIs);
- ``N permutations, 1 job``: a few permutations in this process, scaled to seconds per
  permutation (the cost of one null labelling, all families);
- ``N permutations, J jobs``: the full default test in ``J`` worker processes (loky).

Goal: the default 99 permutations for 60 patients in under 2 minutes on 2 cores. The
machine's load average is printed: on shared cores other jobs slow every row.

Usage::

    python benchmarks/permutation.py                  # 60 patients, 99 permutations, 2 jobs
    python benchmarks/permutation.py --permutations 199 --jobs 2
"""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from blinaprofile.config import TrainConfig
    from blinaprofile.models.validation import Evaluation

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

GOAL_SECONDS = 120.0


def cohort_table(n_patients: int, *, seed: int) -> pd.DataFrame:
    """A feature table from the default scenario's generative model (no counting noise)."""
    from blinaprofile.config import SimulationConfig, load_config
    from blinaprofile.features.schema import MODEL_FEATURES
    from blinaprofile.settings import settings
    from blinaprofile.simulate.cohort import draw_cohort

    sim = load_config(SimulationConfig, settings.default_simulation)
    truth = draw_cohort(sim.model_copy(update={"n_patients": n_patients}), seed=seed)
    table = truth[["sample_id", "patient_id", "response"]].copy()
    dn = 0.04
    for f in MODEL_FEATURES:
        if f in truth.columns:
            table[f] = 100 * truth[f]
    table["cd8_pct_cd3"] = 100 * (1 - dn) * truth["cd8_pct_cd3"]
    table["cd4_pct_cd3"] = 100 * (1 - dn) - table["cd8_pct_cd3"]
    table["cd4_cd8_ratio"] = table["cd4_pct_cd3"] / table["cd8_pct_cd3"]
    return table


def _timed(table: pd.DataFrame, config: TrainConfig, n_jobs: int) -> tuple[float, Evaluation]:
    from blinaprofile.models.validation import evaluate

    t0 = time.perf_counter()
    ev = evaluate(table, config=config, n_jobs=n_jobs)
    return time.perf_counter() - t0, ev


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--permutations", type=int, default=None, help="default: the config's")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--probe", type=int, default=4, help="permutations of the 1-job row")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()

    from blinaprofile.models.validation import load_train_config

    default = load_train_config()
    n_perm = a.permutations if a.permutations is not None else default.n_permutations
    table = cohort_table(a.patients, seed=a.seed)
    families = ", ".join(s.family for s in default.models)
    load0 = os.getloadavg()
    rows: list[tuple[str, float, str]] = []

    base, _ = _timed(table, default.model_copy(update={"n_permutations": 0}), 1)
    rows.append(("0 permutations, 1 job", base, "validation alone"))
    probe, _ = _timed(table, default.model_copy(update={"n_permutations": a.probe}), 1)
    per = (probe - base) / a.probe
    rows.append((f"{a.probe} permutations, 1 job", probe, f"{per:.2f} s per permutation"))
    full, ev = _timed(table, default.model_copy(update={"n_permutations": n_perm}), a.jobs)
    serial = base + n_perm * per
    rows.append(
        (
            f"{n_perm} permutations, {a.jobs} jobs",
            full,
            f"{serial / full:.2f}x the 1-job estimate ({serial:.0f} s)",
        )
    )
    load1 = os.getloadavg()

    print(
        f"\npermutation test: {a.patients} patients, default families ({families}), "
        f"{default.outer_folds}x{default.inner_folds} nested CV, {default.repeats} repeats, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f} (1 min)")
    print(f"{'run':<30}{'wall s':>9}  note")
    for name, sec, note in rows:
        print(f"{name:<30}{sec:>9.1f}  {note}")
    verdict = "met" if full < GOAL_SECONDS else "NOT met"
    print(f"goal: {n_perm} permutations under {GOAL_SECONDS:.0f} s -> {verdict} ({full:.1f} s)")
    for fam, fe in ev.families.items():
        m = fe.metrics
        print(f"  {fam:<10} CV AUC {m['roc_auc']:.3f}, permutation p {m['perm_pvalue']:.3f}")
    print(f"  p adjusted for choosing {ev.chosen}: {ev.selection_pvalue:.3f}")


if __name__ == "__main__":
    main()
