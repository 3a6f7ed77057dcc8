"""notebooks/compare_models.ipynb runs top to bottom against a fresh tracking store holding a
run of the DEFAULT training config (configs/train/default.yaml, permutation test included)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def test_compare_notebook_executes(sim_config, mlflow_uri, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    from blinaprofile.features.schema import MODEL_FEATURES
    from blinaprofile.models.train import train
    from blinaprofile.models.validation import load_train_config
    from blinaprofile.simulate.cohort import draw_cohort

    truth = draw_cohort(sim_config.model_copy(update={"n_patients": 40}), seed=5)
    rng = np.random.default_rng([5, 1])
    table = truth[["sample_id", "patient_id", "response"]].copy()
    for f in MODEL_FEATURES:
        base = 100 * truth[f] if f in truth.columns else pd.Series(rng.normal(50, 5, len(truth)))
        table[f] = base + rng.normal(0, 0.5, len(truth))
    default = load_train_config()
    assert default.n_permutations >= 99  # the default config runs the permutation test
    res = train(table, tracking_uri=mlflow_uri, trained_on="notebook test", cohort="nb-sim40")
    assert res.metrics[res.chosen]["n_permutations"] == default.n_permutations
    monkeypatch.setenv("BLINAPROFILE_EXPERIMENT", default.experiment)
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
    print(out[:3000])
    assert {s.family for s in default.models} <= set(res.metrics)
    for fam in res.metrics:
        assert fam in out
    assert "nb-sim40" in out  # grouped by cohort
    assert f"{default.registered_model} v{res.version}: aliases ['{res.alias}']" in out
    assert f"set by {{'{res.alias}': 'train'}}" in out
    assert images >= 3  # AUC-with-CI plot, ROC and calibration from the best run
