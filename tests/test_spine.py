"""The spine end to end: simulate -> gate -> featurize -> train (MLflow) -> score."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from blinaprofile.features.flow import featurize_manifest
from blinaprofile.features.schema import MODEL_FEATURES, feature_names
from blinaprofile.gating.sample import gate_events
from blinaprofile.gating.strategy import load_strategy
from blinaprofile.io.fcs import read_fcs
from blinaprofile.io.read import read_flow
from blinaprofile.simulate.cohort import bayes_optimal_auc, draw_cohort
from blinaprofile.simulate.flow import gating_accuracy


def test_help_is_light():
    """`blinaprofile --help` imports no heavy module (so it returns at once)."""
    code = (
        "import sys; from blinaprofile.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('flowkit','scanpy','anndata','mlflow','sklearn','pandas','numpy') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "featurize" in out.stdout and "train" in out.stdout and "score" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY=", out.stdout.splitlines()[-1]


def test_flow_path_never_imports_scanpy(small_cohort):
    f = small_cohort.out_dir / "fcs" / "P001_D28.fcs"
    code = (
        "import sys; from blinaprofile.features.flow import featurize_fcs\n"
        f"row = featurize_fcs({str(f)!r}).row\n"
        "assert row['n_cd8'] > 0\n"
        "print('scanpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_simulator_is_deterministic(tmp_path, sim_config, panel):
    from blinaprofile.simulate.flow import simulate_cohort

    a = simulate_cohort(
        sim_config, tmp_path / "a", panel=panel, n_patients=2, events_per_sample=3000
    )
    b = simulate_cohort(
        sim_config, tmp_path / "b", panel=panel, n_patients=2, events_per_sample=3000
    )
    for sid in pd.read_csv(a.manifest)["sample_id"]:
        ea = read_fcs(tmp_path / "a" / "fcs" / f"{sid}.fcs").events
        eb = read_fcs(tmp_path / "b" / "fcs" / f"{sid}.fcs").events
        np.testing.assert_array_equal(ea, eb)
    c = simulate_cohort(
        sim_config, tmp_path / "c", panel=panel, n_patients=2, events_per_sample=3000, seed=99
    )
    ec = read_fcs(tmp_path / "c" / "fcs" / "P001_D28.fcs").events
    assert not np.array_equal(ec, read_fcs(tmp_path / "a" / "fcs" / "P001_D28.fcs").events)
    assert a.n_samples == b.n_samples == c.n_samples == 2


def test_simulated_files_look_like_a_cytometer(small_cohort, panel):
    d = read_fcs(small_cohort.out_dir / "fcs" / "P001_D28.fcs")
    assert d.channels == [c.channel for c in panel.channels]
    assert "CD197 (CCR7)" in d.markers and "TIM-3" in d.markers
    assert d.spillover is not None
    detectors, matrix = d.spillover
    assert len(detectors) == 11 and np.allclose(np.diag(matrix), 1.0)
    assert (matrix > 0.05).sum() > 11  # real off-diagonal spillover
    cd3 = d.events[:, d.channel_index("BUV395-A")]
    assert (cd3 < 0).mean() > 0.05, "negative populations must spread around zero"
    manifest = pd.read_csv(small_cohort.manifest)
    assert list(manifest.columns) == ["sample_id", "patient_id", "timepoint", "file", "response"]
    assert set(manifest["response"]) <= {"responder", "nonresponder"}


def test_bayes_auc_is_computed_and_realistic(sim_config, null_config, small_cohort):
    b = bayes_optimal_auc(sim_config)
    print(f"\nBayes-optimal AUC: analytic {b.analytic:.4f}, Monte Carlo {b.monte_carlo:.4f}")
    assert abs(b.analytic - b.monte_carlo) < 0.01
    assert 0.8 <= b.analytic <= 0.9
    assert bayes_optimal_auc(null_config).analytic == pytest.approx(0.5)
    info = json.loads(small_cohort.cohort_json.read_text())
    assert info["bayes_optimal"]["bayes_auc"] == pytest.approx(b.analytic)
    # the generative model's direction of effects
    big = draw_cohort(sim_config.model_copy(update={"n_patients": 4000}))
    r, nr = big[big.response == 1], big[big.response == 0]
    assert r.cd8_em_pct_cd8.mean() > nr.cd8_em_pct_cd8.mean()
    assert r.cd3_pct_lymph.mean() > nr.cd3_pct_lymph.mean()
    assert r.cd8_tim3_pct_cd8.mean() < nr.cd8_tim3_pct_cd8.mean()


def test_gating_precision_recall_against_truth(small_cohort):
    """Pooled over the cohort, every population is gated with precision and recall >= 0.95."""
    strategy = load_strategy()
    tables = []
    for f in sorted((small_cohort.out_dir / "fcs").glob("*.fcs")):
        data = read_flow(f)
        _, res = gate_events(data, strategy)
        truth = pd.read_parquet(small_cohort.out_dir / "truth" / f"{f.stem}.parquet")
        tables.append(gating_accuracy(res.masks, truth))
    per = pd.concat(tables)
    per["tp"] = per["precision"] * per["gated"]
    pooled = per.groupby("gate", sort=False)[["truth", "gated", "tp"]].sum()
    pooled["precision"] = pooled["tp"] / pooled["gated"]
    pooled["recall"] = pooled["tp"] / pooled["truth"]
    print("\n" + pooled[["truth", "gated", "precision", "recall"]].round(4).to_string())
    assert len(pooled) == 17
    assert (pooled["precision"] >= 0.95).all(), pooled
    assert (pooled["recall"] >= 0.95).all(), pooled


def test_features_match_truth(small_cohort):
    table = featurize_manifest(small_cohort.manifest, n_jobs=2)
    assert (table["error"] == "").all()
    assert table["qc_pass"].all()
    assert list(table.columns[: 4 + len(feature_names())])[4:] == feature_names()
    truth = pd.DataFrame(json.loads(small_cohort.cohort_json.read_text())["samples"]).set_index(
        "sample_id"
    )
    t = table.set_index("sample_id")
    for feat in ("cd8_em_pct_cd8", "cd8_tim3_pct_cd8", "cd3_pct_lymph", "cd4_treg_pct_cd4"):
        err = (t[feat] - 100 * truth.loc[t.index, feat]).abs()
        print(f"{feat}: max |measured - true| = {err.max():.2f} percentage points")
        assert err.max() < 3.0, (feat, err)
    assert (t["modality"] == "flow").all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_cohort):
    import os

    from blinaprofile.config import ModelSpec, PromotionRule, TrainConfig
    from blinaprofile.models.train import train

    tmp = tmp_path_factory.mktemp("spine_train")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    table = featurize_manifest(small_cohort.manifest, n_jobs=2)
    cfg = TrainConfig(
        models=[
            ModelSpec(family="logreg_l2", grid={"clf__C": [0.1, 1.0]}),
            ModelSpec(family="xgboost", params={"n_estimators": 30}),
        ],
        outer_folds=4,
        inner_folds=2,
        repeats=1,
        n_bootstrap=50,
        experiment="spine-test",
        registered_model="spine-model",
        # fixture models are small and unpermuted: these tests exercise scoring by alias,
        # not the promotion rule (tests/test_promotion.py does)
        promotion=PromotionRule(min_auc_ci_low=None, max_perm_pvalue=None),
    )
    res = train(
        table, config=cfg, export_dir=tmp / "model", tracking_uri=uri, trained_on="test cohort"
    )
    yield res, uri, tmp
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_train_logs_registers_and_exports(trained):
    import mlflow

    res, uri, tmp = trained
    assert set(res.metrics) == {"logreg_l2", "xgboost"}
    for m in res.metrics.values():
        assert 0.0 <= m["roc_auc"] <= 1.0
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(res.run_id)
    assert "roc_auc" in run.data.metrics and run.data.tags["chosen_family"] == res.chosen
    mv = client.get_model_version_by_alias("spine-model", "champion")
    assert str(mv.version) == res.version
    assert (tmp / "model" / "MLmodel").is_file()
    assert (tmp / "model" / "artifacts" / "pipeline.skops").is_file() or any(
        p.name == "pipeline.skops" for p in (tmp / "model").rglob("*")
    )


def test_score_cli_json_with_registry_alias(trained, small_cohort):
    import os

    _res, uri, tmp = trained
    f = small_cohort.out_dir / "fcs" / "P002_D28.fcs"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "blinaprofile",
            "score",
            str(f),
            "--model",
            "models:/spine-model@champion",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
    )
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert 0.0 <= d["probability"] <= 1.0
    assert d["call"] in {"responder", "nonresponder", "uncertain", "no call"}
    assert d["qc_pass"] is True
    assert {t["feature"] for t in d["top_features"]} <= set(MODEL_FEATURES)
    # the exported folder gives the same probability as the registry
    out2 = subprocess.run(
        [
            sys.executable,
            "-m",
            "blinaprofile",
            "score",
            str(f),
            "--model",
            str(tmp / "model"),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp,
    )
    assert out2.returncode == 0, out2.stderr
    assert json.loads(out2.stdout)["probability"] == pytest.approx(d["probability"])
