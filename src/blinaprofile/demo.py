"""The end-to-end demo on the embedded defaults (``blinaprofile demo``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blinaprofile.models.train import TrainResult

__all__ = ["run_demo"]


def run_demo(
    out: str | os.PathLike[str] = "demo-output",
    *,
    n_patients: int | None = None,
    events: int | None = None,
) -> dict[str, object]:
    """Simulate a cohort, gate and featurize it, train and register a model, score a new sample.

    Everything is written below ``out``; MLflow tracking goes to ``MLFLOW_TRACKING_URI`` or
    the local SQLite store ``sqlite:///mlflow.db``. Returns a summary dict.
    """
    from blinaprofile.config import PanelConfig, SimulationConfig, load_config
    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.io.atomic import write_csv
    from blinaprofile.models.train import train
    from blinaprofile.scoring.score import score_sample
    from blinaprofile.settings import settings
    from blinaprofile.simulate.flow import simulate_cohort

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scen = load_config(SimulationConfig, settings.default_simulation)
    panel = load_config(PanelConfig, settings.default_panel)

    def step(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", flush=True)

    step(f"simulating cohort '{scen.name}' ({n_patients or scen.n_patients} patients)")
    cohort = simulate_cohort(
        scen, out / "cohort", panel=panel, n_patients=n_patients, events_per_sample=events
    )
    step(
        f"  {cohort.n_samples} FCS files in {cohort.out_dir / 'fcs'}; Bayes-optimal AUC {cohort.bayes_auc:.3f}"
    )
    step("gating and featurizing")
    table = featurize_manifest(cohort.manifest)
    feats = out / "features.csv"
    write_csv(table, feats)
    n_err = int((table["error"] != "").sum())
    n_qc = int((~table["qc_pass"].fillna(False).astype(bool)).sum())
    step(f"  feature table {feats} ({len(table)} samples, {n_err} errors, {n_qc} failing QC)")
    step(f"training (MLflow tracking: {settings.tracking_uri})")
    res = train(
        table,
        export_dir=out / "model",
        trained_on=f"simulated cohort '{scen.name}' (seed {scen.seed}); NOT patient data",
        cohort="demo",
        simulated=True,
        source=feats,
    )
    for fam, m in res.metrics.items():
        mark = "  <- chosen" if fam == res.chosen else ""
        step(
            f"  {fam:<10} out-of-fold AUC {m['roc_auc']:.3f} "
            f"[{m['roc_auc_ci_low']:.2f}, {m['roc_auc_ci_high']:.2f}]{mark}"
        )
    step(
        f"  registered {res.registered_model} v{res.version} @{res.alias}; exported {res.export_dir}"
    )
    step(f"  {_promotion_note(res)}")
    step("simulating and scoring a new patient sample")
    new = simulate_cohort(
        scen,
        out / "new_sample",
        panel=panel,
        n_patients=2,
        events_per_sample=events,
        seed=scen.seed + 1,
    )
    import pandas as pd

    first = pd.read_csv(new.manifest).iloc[0]
    sample = new.out_dir / first["file"]
    scored = score_sample(sample, model=str(out / "model"), sample_id=str(first["sample_id"]))
    print()
    print(scored.summary())
    print(f"  (simulated truth: {first['response']})")
    print()
    step("done")
    print(f"outputs        {out.resolve()}")
    print(f"MLflow UI      mlflow ui --backend-store-uri {settings.tracking_uri} --host 127.0.0.1")
    print(f"               then open {_runs_page(res.experiment, settings.tracking_uri)}")
    return {
        "cohort": cohort.as_dict(),
        "features": str(feats),
        "train": res.as_dict(),
        "score": scored.as_dict(),
    }


def _promotion_note(res: TrainResult) -> str:
    """One line: why the model was (not) promoted, and what that means for this demo.

    The reasons are :attr:`TrainResult.reasons` (from
    :func:`~blinaprofile.models.train.promotion_failures` and the alias checks), not a second
    statement of the rule.
    """
    if res.promoted:
        return f"promoted: {res.promotion_line()}"
    return (
        f"not promoted to @{res.serving_alias}: {'; '.join(res.reasons)}. The demo exports "
        f"and scores this @{res.alias} model anyway; from a real cohort you would not serve it."
    )


def _runs_page(experiment: str, tracking_uri: str) -> str:
    """The MLflow UI address of the experiment's runs with the headline columns.

    The view is the ``Headline metrics`` saved view
    (:func:`~blinaprofile.models.tracking.headline_view`); ``workflowType`` selects the UI's
    classic ML layout (docs/models.md).
    """
    import mlflow

    from blinaprofile.models.tracking import HEADLINE_VIEW

    exp = mlflow.tracking.MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    where = f"#/experiments/{exp.experiment_id}/runs" if exp is not None else "#/experiments"
    return (
        f"http://127.0.0.1:5000/{where}?viewStateShareKey={HEADLINE_VIEW[0]}"
        "&workflowType=machine_learning"
    )
