"""notebooks/compare_models.ipynb runs top to bottom against a fresh tracking store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_compare_notebook_executes(sim_config, mlflow_uri, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from blinaprofile.config import ModelSpec, TrainConfig
    from blinaprofile.features.schema import MODEL_FEATURES
    from blinaprofile.models.train import train
    from blinaprofile.settings import settings
    from blinaprofile.simulate.cohort import draw_cohort

    monkeypatch.setattr(settings, "n_jobs", 1)
    truth = draw_cohort(sim_config.model_copy(update={"n_patients": 30}), seed=5)
    rng = np.random.default_rng([5, 1])
    table = truth[["sample_id", "patient_id", "response"]].copy()
    for f in MODEL_FEATURES:
        base = 100 * truth[f] if f in truth.columns else pd.Series(rng.normal(50, 5, len(truth)))
        table[f] = base + rng.normal(0, 0.5, len(truth))
    cfg = TrainConfig(
        experiment="nb",
        registered_model="nb-model",
        models=[ModelSpec(family="logreg_l2"), ModelSpec(family="logreg_l1")],
        repeats=1,
        n_bootstrap=100,
        n_permutations=3,
    )
    res = train(table, config=cfg, tracking_uri=mlflow_uri, trained_on="notebook test")
    monkeypatch.setenv("BLINAPROFILE_EXPERIMENT", "nb")
    nb = nbformat.read(ROOT / "notebooks" / "compare_models.ipynb", as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    texts, images = [], 0
    for c in nb.cells:
        for o in c.get("outputs", []) if c.cell_type == "code" else []:
            texts.append(o.get("text", ""))
            data = o.get("data", {})
            texts.append(data.get("text/plain", ""))
            images += "image/png" in data
    out = "\n".join(texts)
    print(out[:2000])
    assert "logreg_l2" in out and "logreg_l1" in out
    assert f"nb-model v{res.version}: aliases ['champion']" in out
    assert images >= 3  # AUC-with-CI plot, ROC and calibration from the best run
