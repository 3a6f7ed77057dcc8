"""Training: metrics, nested patient-grouped CV, thresholds inside CV, MLflow logging,
registration, `promote` and `compare`."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from blinaprofile.config import ModelSpec, ThresholdRule, TrainConfig
from blinaprofile.errors import ConfigError, ModelError
from blinaprofile.features.schema import MODEL_FEATURES, SCHEMA_VERSION
from blinaprofile.models.metrics import (
    bootstrap_weights,
    calibration_table,
    choose_threshold,
    expected_calibration_error,
    permutation_pvalue,
    roc_auc,
    summarize,
    weighted_auc,
)
from blinaprofile.models.train import train
from blinaprofile.models.validation import cross_validate, evaluate, prepare_training_data


def _table(sim_config, n_patients: int = 40, seed: int = 0) -> pd.DataFrame:
    """Feature table from the generative model (true fractions x 100, no counting noise)."""
    from blinaprofile.simulate.cohort import draw_cohort

    truth = draw_cohort(sim_config.model_copy(update={"n_patients": n_patients}), seed=seed)
    t = truth[["sample_id", "patient_id", "response"]].copy()
    for f in MODEL_FEATURES:
        if f in truth.columns:
            t[f] = 100 * truth[f]
    dn = 0.04
    t["cd8_pct_cd3"] = 100 * (1 - dn) * truth["cd8_pct_cd3"]
    t["cd4_pct_cd3"] = 100 * (1 - dn) - t["cd8_pct_cd3"]
    t["cd4_cd8_ratio"] = t["cd4_pct_cd3"] / t["cd8_pct_cd3"]
    t["schema_version"] = SCHEMA_VERSION
    return t


# --------------------------------------------------------------------------- metrics
def test_weighted_auc_equals_auc_of_the_resampled_data():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    p = np.round(rng.random(50), 1)  # ties on purpose
    groups = np.repeat(np.arange(25), 2)
    w = bootstrap_weights(groups, n=20, seed=1)
    assert w.shape == (20, 50)
    # both samples of a patient always share a weight (patients are resampled)
    assert (w[:, ::2] == w[:, 1::2]).all()
    got = weighted_auc(y, p, w)
    for b in range(20):
        idx = np.repeat(np.arange(50), w[b].astype(int))
        assert got[b] == pytest.approx(roc_auc_score(y[idx], p[idx]))
    assert roc_auc(y, p) == pytest.approx(roc_auc_score(y, p))


def test_choose_threshold_rules():
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    t = choose_threshold(y, p, rule="max_balanced_accuracy")
    call = p >= t
    ba = 0.5 * (call[y == 1].mean() + (~call[y == 0]).mean())
    assert ba == pytest.approx(0.875)
    t_sens = choose_threshold(y, p, rule="min_sensitivity", value=1.0)
    assert (p[y == 1] >= t_sens).all()
    assert t_sens == pytest.approx(0.35)  # midway between 0.3 and 0.4: highest cut with sens 1
    assert choose_threshold(y, p, rule="fixed", value=0.42) == 0.42


def test_summarize_gives_intervals_that_shrink_with_cohort_size():
    rng = np.random.default_rng(2)

    def width(n: int) -> tuple[float, dict[str, float]]:
        y = rng.integers(0, 2, n)
        p = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(size=n))))
        m = summarize(y, p, p >= 0.5, np.arange(n), n_bootstrap=400, seed=0)
        return m["roc_auc_ci_high"] - m["roc_auc_ci_low"], m

    w40, m40 = width(40)
    w400, m400 = width(400)
    print(f"\nAUC 95% CI width: n=40 {w40:.3f}, n=400 {w400:.3f}")
    for m in (m40, m400):
        for k in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "brier"):
            assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"], k
    assert w400 < w40 / 2


def test_calibration_error_separates_calibrated_from_overconfident():
    rng = np.random.default_rng(3)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(int)
    good = expected_calibration_error(y, p)
    bad = expected_calibration_error(y, np.where(p > 0.5, 0.99, 0.01))
    print(f"\nECE calibrated {good:.3f}, overconfident {bad:.3f}")
    assert good < 0.02 and bad > 0.2
    tab = calibration_table(y, p)
    assert len(tab) == 5 and np.allclose(tab["mean_predicted"], tab["observed_fraction"], atol=0.03)


def test_permutation_pvalue_counts_the_observed_labelling():
    assert permutation_pvalue(0.9, np.array([0.5, 0.6, 0.95])) == pytest.approx(2 / 4)
    assert permutation_pvalue(0.9, np.full(99, 0.5)) == pytest.approx(0.01)


# --------------------------------------------------------------------------- CV design
def _cfg(**kw) -> TrainConfig:
    base = {
        "models": [ModelSpec(family="logreg_l2", grid={"clf__C": [0.1, 1.0]})],
        "outer_folds": 5,
        "inner_folds": 3,
        "repeats": 1,
        "n_bootstrap": 200,
        "n_permutations": 0,
    }
    base.update(kw)
    return TrainConfig(**base)


def test_cv_keeps_all_samples_of_a_patient_on_one_side():
    """Two near-identical samples per patient and random patient labels: a memorising model
    scores high when a patient's twin sample is in the training split (sample-level CV), and
    at chance with our patient-grouped CV."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(4)
    n_pat = 60
    base = rng.normal(size=(n_pat, 5))
    X = np.repeat(base, 2, axis=0) + rng.normal(scale=0.01, size=(2 * n_pat, 5))
    y = np.repeat(rng.permutation(np.r_[np.zeros(n_pat // 2), np.ones(n_pat // 2)]).astype(int), 2)
    groups = np.repeat([f"P{i}" for i in range(n_pat)], 2)
    rf = {"n_estimators": 50, "min_samples_leaf": 1}
    leaky = cross_val_predict(
        RandomForestClassifier(**rf, random_state=0),
        X,
        y,
        cv=StratifiedKFold(5, shuffle=True, random_state=0),
        method="predict_proba",
    )[:, 1]
    cfg = _cfg(models=[ModelSpec(family="random_forest", params=rf)])
    ours = cross_validate(X, y, groups, cfg.models[0], cfg, importance=False)
    print(f"\nsample-level CV AUC {roc_auc(y, leaky):.3f}; patient-grouped CV AUC {ours.auc:.3f}")
    assert roc_auc(y, leaky) > 0.8
    assert ours.auc < 0.7


def test_threshold_is_chosen_inside_the_folds(sim_config):
    table = _table(sim_config, 40, seed=1)
    X, y, g, _, _ = prepare_training_data(table, list(MODEL_FEATURES))
    fixed = cross_validate(
        X, y, g, _cfg().models[0], _cfg(threshold=ThresholdRule(rule="fixed", value=0.3))
    )
    assert set(fixed.fold_thresholds) == {0.3}
    assert (fixed.calls == (fixed.oof >= 0.3)).all()
    bal = cross_validate(X, y, g, _cfg().models[0], _cfg())
    sens = cross_validate(
        X, y, g, _cfg().models[0], _cfg(threshold=ThresholdRule(rule="min_sensitivity", value=0.95))
    )
    # thresholds differ between folds: each comes from its own training split
    assert len(set(np.round(bal.fold_thresholds, 6))) > 1
    # the oof probabilities do not depend on the rule; the calls do
    np.testing.assert_allclose(bal.oof, sens.oof)
    print(
        f"\nOOF sensitivity: max balanced accuracy rule {bal.metrics['sensitivity']:.2f}, "
        f"min sensitivity 0.95 rule {sens.metrics['sensitivity']:.2f}"
    )
    assert sens.metrics["sensitivity"] > bal.metrics["sensitivity"]
    assert len(bal.importance) == len(MODEL_FEATURES)


def test_config_problems_are_reported(sim_config):
    table = _table(sim_config, 20)
    with pytest.raises(ConfigError, match="select k"):
        evaluate(
            table, config=_cfg(models=[ModelSpec(family="logreg_l2", grid={"select__k": [3, 99]})])
        )
    with pytest.raises(ConfigError, match="more than once"):
        evaluate(
            table,
            config=_cfg(models=[ModelSpec(family="logreg_l2"), ModelSpec(family="logreg_l2")]),
        )
    tiny = table[table["patient_id"].isin(table.groupby("response")["patient_id"].first())]
    with pytest.raises(ModelError, match="at least 2 patients of each class"):
        evaluate(tiny, config=_cfg())


# --------------------------------------------------------------------------- MLflow
@pytest.fixture(scope="module")
def trained(sim_config, tmp_path_factory):
    """One training run (two families, 4 permutations) in a fresh SQLite store, shared."""
    from blinaprofile.settings import settings

    tmp = tmp_path_factory.mktemp("train_mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(settings, "tracking_uri", uri)
        mp.setattr(settings, "n_jobs", 1)
        mp.chdir(tmp)
        table = _table(sim_config, 40, seed=2)
        cfg_path = tmp / "train.yaml"
        cfg_path.write_text(
            "experiment: unit\nregistered_model: unit-model\nrepeats: 1\nn_bootstrap: 200\n"
            "n_permutations: 4\nmodels:\n  - family: logreg_l2\n    grid: {clf__C: [0.1, 1.0]}\n"
            "  - family: random_forest\n    params: {n_estimators: 30}\n"
            # 4 permutations cannot show p < 0.05: this logging test promotes without evidence
            "promotion: {min_auc_ci_low: null, max_perm_pvalue: null}\n"
        )
        res = train(
            table,
            config_path=cfg_path,
            export_dir=tmp / "model",
            trained_on="unit test",
            run_name="unit-run",
            cohort="unit-cohort",
            source=tmp / "features.csv",
        )
        yield res, uri, table


def test_training_run_logs_everything_and_registers(trained):
    import mlflow

    res, uri, table = trained
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(res.run_id)
    m, p, tags = run.data.metrics, run.data.params, run.data.tags
    assert set(res.metrics) == {"logreg_l2", "random_forest"}
    for fam, fm in res.metrics.items():
        for k in ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "brier", "ece"):
            assert fm[f"{k}_ci_low"] <= fm[k] <= fm[f"{k}_ci_high"] or k == "ece"
            assert m[f"{fam}.{k}_ci_low"] == pytest.approx(fm[f"{k}_ci_low"])
        assert 0 < fm["perm_pvalue"] <= 1 and fm["n_permutations"] == 4
    assert m["roc_auc"] == pytest.approx(res.metrics[res.chosen]["roc_auc"])
    assert 0 < m["selection_pvalue"] <= 1
    assert (
        p["n_samples"] == "40"
        and p["n_permutations"] == "4"
        and p["schema_version"] == SCHEMA_VERSION
    )
    assert tags["chosen_family"] == res.chosen and tags["git_commit"]
    assert tags["version.scikit-learn"] and tags["version.mlflow"] == mlflow.__version__
    arts = {a.path for a in client.list_artifacts(res.run_id)}
    assert {"config", "cv", "plots", "importance", "environment"} <= arts
    assert {a.path for a in client.list_artifacts(res.run_id, "plots")} == {
        "plots/roc.png",
        "plots/pr.png",
        "plots/calibration.png",
        "plots/importance.png",
    }
    assert "config/train.yaml" in {a.path for a in client.list_artifacts(res.run_id, "config")}
    # the feature table as a dataset with its schema version
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.name == f"unit-cohort features-v{SCHEMA_VERSION}"
    assert json.loads(ds.dataset.source)["uri"] == str(res.export_dir.parent / "features.csv")
    ds_tags = {t.key: t.value for t in ds.tags}
    assert ds_tags["schema_version"] == SCHEMA_VERSION and ds_tags["cohort"] == "unit-cohort"
    assert tags["blinaprofile.cohort"] == "unit-cohort" and run.info.run_name == "unit-run"
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == (
        "custom_model_development"
    )
    assert json.loads(ds.dataset.profile)["num_rows"] == 40
    # one candidate child run per family
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{res.run_id}'"
    )
    assert {c.data.tags["family"] for c in children} == set(res.metrics)
    assert {c.info.run_name for c in children} == {f"{f} on unit-cohort" for f in res.metrics}
    assert sum(c.data.tags["chosen"] == "true" for c in children) == 1
    # registered, aliased, scorable by alias
    mv = client.get_model_version_by_alias("unit-model", "champion")
    assert str(mv.version) == res.version and mv.tags["family"] == res.chosen
    assert res.promoted and res.model_uri == "models:/unit-model@champion"
    assert mv.tags["blinaprofile.alias_set_by.champion"] == "train"
    from blinaprofile.models.packaging import load_model

    pyfunc, runtime = load_model("models:/unit-model@champion")
    out = pyfunc.predict(table[runtime.features].head(5))
    assert list(out.columns[:4]) == ["probability", "probability_low", "probability_high", "call"]
    assert runtime.meta["family"] == res.chosen
    assert runtime.meta["uncertainty"]["n_models"] >= 2
    assert set(runtime.meta["global_importance"]["mean_abs_contribution"]) == set(MODEL_FEATURES)
    assert (res.export_dir / "artifacts" / "training_features.csv").is_file()
    # the exported folder and the registry give the same probabilities
    pf2, _ = load_model(res.export_dir)
    np.testing.assert_allclose(
        pf2.predict(table[runtime.features].head(5))["probability"], out["probability"]
    )


def test_promote_moves_the_alias_and_compare_writes_a_leaderboard(trained, tmp_path, capsys):
    from blinaprofile.cli import main

    _, uri, table = trained
    cfg = _cfg(
        experiment="unit",
        registered_model="unit-model",
        alias="challenger",
        models=[ModelSpec(family="logreg_l1", grid={"clf__C": [0.3, 1.0]})],
    )
    res2 = train(
        table, config=cfg, tracking_uri=uri, trained_on="unit test 2", cohort="unit-cohort"
    )
    # no permutations, so no evidence: registered as @candidate, not @challenger
    assert res2.version == "2" and not res2.promoted and res2.alias == "candidate"
    assert res2.reasons == ["no permutation p-value (n_permutations: 0)"]
    assert main(["promote", "unit-model", "2", "--alias", "champion"]) == 0
    out = capsys.readouterr().out
    assert "unit-model@champion -> version 2 (was version 1)" in out
    import mlflow

    assert (
        str(
            mlflow.tracking.MlflowClient(uri)
            .get_model_version_by_alias("unit-model", "champion")
            .version
        )
        == "2"
    )
    assert main(["promote", "unit-model", "9"]) == 2
    assert "cannot promote unit-model version 9" in capsys.readouterr().err

    assert main(["compare", "--experiment", "unit", "--out", str(tmp_path / "lb")]) == 0
    printed = capsys.readouterr().out
    print(printed)
    lb = pd.read_csv(tmp_path / "lb" / "leaderboard.csv")
    assert len(lb) == 3 and set(lb["family"]) == {"logreg_l2", "random_forest", "logreg_l1"}
    assert (lb["roc_auc"].diff().dropna() <= 0).all()  # best first (one cohort)
    assert set(lb["cohort"]) == {"unit-cohort"} and "cohort unit-cohort" in printed
    assert lb["perm_pvalue"].notna().sum() == 2  # the first run had permutations, the second not
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert "ROC AUC [95% CI]" in md and "perm. p" in md and "unit-model v1 |" in md
    assert "unit-model v2 @candidate @champion" in md
    assert "<table" in (tmp_path / "lb" / "leaderboard.html").read_text()
    assert main(["compare", "--experiment", "nope", "--out", str(tmp_path / "lb2")]) == 2
    assert "no MLflow experiment named 'nope'" in capsys.readouterr().err
