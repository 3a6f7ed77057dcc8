"""The end-to-end demo on the embedded defaults (``blinaprofile demo``)."""

from __future__ import annotations

import os
import time
from pathlib import Path

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
        run_name="demo",
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
    return {
        "cohort": cohort.as_dict(),
        "features": str(feats),
        "train": res.as_dict(),
        "score": scored.as_dict(),
    }
