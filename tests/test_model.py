"""The packaged model: explanations (TreeSHAP and linear contributions), the probability
interval, the save/load round trip (signature, threshold parameter, no-call rows) and the
exact skops allow-list derived from every configured model family."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any, get_args

import numpy as np
import pandas as pd
import pytest

from blinaprofile.config import ModelSpec
from blinaprofile.errors import FeatureSchemaError, ModelError
from blinaprofile.models.loading import (
    SKOPS_ALLOW_LIST,
    check_skops_file,
    skops_nodes,
)
from blinaprofile.models.packaging import load_model, save_model
from blinaprofile.models.runtime import (
    NO_CALL,
    ResponderModel,
    check_threshold,
    contributions,
    probability_interval,
    tree_shap,
)
from blinaprofile.models.validation import build_pipeline


def _data(n: int = 80, d: int = 6, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = pd.DataFrame(rng.normal(size=(n, d)) * 5 + 20, columns=[f"f{j}" for j in range(d)])
    z = (X["f0"] - 20) / 5 - 0.8 * (X["f1"] - 20) / 5 + 0.5 * ((X["f2"] - 20) / 5) ** 2
    y = (z + rng.normal(size=n) > 0.3).astype(int).to_numpy()
    return X, y


def _path_dependent_value(tree, x: np.ndarray, S: set[int]) -> float:
    """f_S(x) of path-dependent TreeSHAP, by recursion (the definition)."""
    t = tree.tree_

    def rec(node: int) -> float:
        if t.children_left[node] == -1:
            v = t.value[node, 0]
            return float(v[1] / v.sum())
        f, left, right = t.feature[node], t.children_left[node], t.children_right[node]
        if f in S:
            return rec(left if np.float32(x[f]) <= t.threshold[node] else right)
        w = t.weighted_n_node_samples
        return float((w[left] * rec(left) + w[right] * rec(right)) / w[node])

    return rec(0)


def _brute_force_shap(trees, x: np.ndarray, d: int) -> np.ndarray:
    phi = np.zeros(d)
    for i in range(d):
        others = [j for j in range(d) if j != i]
        for s in range(d):
            w = math.factorial(s) * math.factorial(d - s - 1) / math.factorial(d)
            for S in itertools.combinations(others, s):
                gain = [
                    _path_dependent_value(t, x, {*S, i}) - _path_dependent_value(t, x, set(S))
                    for t in trees
                ]
                phi[i] += w * float(np.mean(gain))
    return phi


def test_tree_shap_equals_brute_force_shapley_values():
    from sklearn.ensemble import RandomForestClassifier

    X, y = _data(n=60, d=5, seed=1)
    rf = RandomForestClassifier(n_estimators=8, min_samples_leaf=2, random_state=0).fit(
        X.to_numpy(), y
    )
    Z = X.to_numpy()[:4]
    phi, base = tree_shap(list(rf.estimators_), Z)
    brute = np.array([_brute_force_shap(rf.estimators_, z, 5) for z in Z])
    err = np.abs(phi - brute).max()
    print(f"\nTreeSHAP vs brute-force Shapley (5 features, 8 trees): max |diff| = {err:.2e}")
    assert err < 1e-10
    # local accuracy: expected value + contributions = forest probability
    np.testing.assert_allclose(base + phi.sum(axis=1), rf.predict_proba(Z)[:, 1], atol=1e-12)


def test_tree_shap_local_accuracy_on_a_deep_forest():
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(3)
    X = rng.normal(size=(120, 15))
    y = rng.integers(0, 2, 120)
    rf = RandomForestClassifier(n_estimators=60, min_samples_leaf=1, random_state=0).fit(X, y)
    Z = rng.normal(size=(50, 15))
    phi, base = tree_shap(list(rf.estimators_), Z)
    np.testing.assert_allclose(base + phi.sum(axis=1), rf.predict_proba(Z)[:, 1], atol=1e-9)


@pytest.mark.parametrize(
    "family",
    ["logreg_l2", "logreg_l1", "logreg_elasticnet", "xgboost", "random_forest", "linear_svm"],
)
def test_contributions_add_up_to_the_log_odds(family):
    X, y = _data()
    spec = ModelSpec(
        family=family, params={"n_estimators": 40} if family in ("xgboost", "random_forest") else {}
    )
    pipe = build_pipeline(spec, seed=0).fit(X, y)
    c = contributions(pipe, X)
    assert list(c.columns) == list(X.columns)
    p = pipe.predict_proba(X)[:, 1]
    if family == "random_forest":  # forest probabilities can be exactly 0 or 1
        p = np.clip(p, 0.01, 0.99)
    logit = np.log(p / (1 - p))
    total = c.sum(axis=1).to_numpy()
    if family == "linear_svm":
        # exact per calibration fold; the average of fold probabilities is close to additive
        assert np.corrcoef(total, logit)[0, 1] > 0.95
        return
    # a constant offset (the baseline log-odds) separates contributions from the log-odds
    offset = logit - total
    tol = 1e-4 if family == "xgboost" else 1e-8  # xgboost computes in float32
    assert np.ptp(offset) < tol, (family, np.ptp(offset))
    # the informative features dominate
    top = c.abs().mean().sort_values(ascending=False).index[:3]
    assert "f0" in top and "f1" in top


def test_selected_out_features_get_zero_contribution():
    X, y = _data(d=8)
    spec = ModelSpec(family="logreg_l2", params={"select_k": 2})
    pipe = build_pipeline(spec).fit(X, y)
    c = contributions(pipe, X)
    kept = set(X.columns[pipe.named_steps["select"].get_support()])
    assert len(kept) == 2
    assert (c.drop(columns=sorted(kept)).abs().to_numpy() == 0).all()
    assert (c[sorted(kept)].abs().sum() > 0).all()


def test_probability_interval_brackets_the_probability():
    p = np.array([0.1, 0.5, 0.9])
    refits = np.array([[0.05, 0.4, 0.85], [0.15, 0.6, 0.95], [0.1, 0.5, 0.9]])
    lo, hi = probability_interval(p, refits)
    assert (lo < p).all() and (p < hi).all()
    assert np.isnan(probability_interval(p, refits[:1])[0]).all()


def _meta(features: list[str], X: pd.DataFrame) -> dict:
    stats = {
        f: {
            "median": float(X[f].median()),
            "mad": float((X[f] - X[f].median()).abs().median()),
            "min": float(X[f].min()),
            "max": float(X[f].max()),
            "min_scale": 0.1,
        }
        for f in features
    }
    return {
        "features": features,
        "schema_version": "1.0",
        "threshold": 0.4,
        "threshold_rule": "max_balanced_accuracy",
        "family": "logreg_l2",
        "training_stats": stats,
        "trained_on": "unit test",
    }


def test_saved_model_round_trip_with_interval_and_threshold_param(tmp_path):
    from mlflow.models import Model

    X, y = _data()
    spec = ModelSpec(family="logreg_l2")
    pipe = build_pipeline(spec).fit(X, y)
    rng = np.random.default_rng(0)
    refits = []
    for _ in range(10):
        idx = rng.integers(0, len(y), len(y))
        refits.append(build_pipeline(spec).fit(X.iloc[idx], y[idx]))
    features = list(X.columns)
    out = save_model(
        tmp_path / "m",
        pipe,
        _meta(features, X),
        training_table=X.assign(response=y),
        uncertainty=refits,
    )
    assert (out / "artifacts" / "training_features.csv").is_file()
    assert (out / "artifacts" / "uncertainty.skops").is_file()
    sig = Model.load(out / "MLmodel").signature
    outs = sig.outputs.input_names()
    assert outs[:4] == ["probability", "probability_low", "probability_high", "call"]
    assert outs[4:] == [f"contrib_{f}" for f in features]
    assert sig.params.to_dict()[0]["name"] == "threshold"
    assert sig.params.to_dict()[0]["default"] == pytest.approx(0.4)

    pyfunc, runtime = load_model(out)
    assert isinstance(runtime, ResponderModel) and len(runtime.uncertainty) == 10
    got = pyfunc.predict(X.head(20))
    direct = runtime.predict(X.head(20))
    pd.testing.assert_frame_equal(got.reset_index(drop=True), direct.reset_index(drop=True))
    np.testing.assert_allclose(got["probability"], pipe.predict_proba(X.head(20))[:, 1])
    assert (got["probability_low"] <= got["probability"]).all()
    assert (got["probability"] <= got["probability_high"]).all()
    assert ((got["probability_high"] - got["probability_low"]) > 0).all()
    assert set(got["call"]) <= {"responder", "nonresponder", "uncertain"}
    # the threshold parameter moves calls: nothing is a responder at 0.999; a sample whose
    # interval ends below it is a definite nonresponder
    hi = pyfunc.predict(X.head(20), params={"threshold": 0.999})
    assert not (hi["call"] == "responder").any()
    below = hi["probability_high"] < 0.999
    assert below.any() and (hi.loc[below, "call"] == "nonresponder").all()
    # a table missing a feature is refused with a schema error
    with pytest.raises(FeatureSchemaError, match="f3"):
        runtime.predict(X.drop(columns=["f3"]).head(2))
    # ood scores: the training median is at z = 0
    med = pd.DataFrame([{f: runtime.meta["training_stats"][f]["median"] for f in features}])
    assert np.allclose(runtime.ood_scores(med).to_numpy(), 0.0)
    meta = json.loads((out / "artifacts" / "meta.json").read_text())
    assert meta["uncertainty"]["n_models"] == 10


def test_threshold_must_be_a_probability(tmp_path):
    X, y = _data()
    pipe = build_pipeline(ModelSpec(family="logreg_l2")).fit(X, y)
    runtime = ResponderModel(pipe, _meta(list(X.columns), X))
    bads: list[Any] = [7, -1, float("nan"), float("inf"), "0.5", True, [0.5]]
    for bad in bads:
        with pytest.raises(ModelError, match=r"threshold must be a probability in \[0, 1\]"):
            runtime.predict(X.head(3), threshold=bad)
    assert check_threshold(None) is None
    assert check_threshold(0) == 0.0 and check_threshold(1) == 1.0
    # the bounds are usable: 0 makes every row a responder, 1 (almost) none
    assert (runtime.predict(X.head(5), threshold=0.0)["call"] == "responder").all()


def test_rows_with_missing_features_get_no_call():
    X, y = _data()
    pipe = build_pipeline(ModelSpec(family="logreg_l2")).fit(X, y)
    runtime = ResponderModel(pipe, _meta(list(X.columns), X))
    table = X.head(4).copy()
    table.iloc[1, 2] = np.nan  # one missing feature
    table.iloc[2, :] = np.nan  # an all-NaN row (the imputer would make it the median sample)
    table.iloc[3, 0] = np.inf
    out = runtime.predict(table, threshold=0.0)  # threshold 0 would call every scored row
    assert out["call"].tolist() == ["responder", NO_CALL, NO_CALL, NO_CALL]
    assert np.isfinite(out["probability"].iloc[0])
    for col in ("probability", "probability_low", "probability_high"):
        assert out[col].iloc[1:].isna().all(), col
    contrib = out[[c for c in out.columns if c.startswith("contrib_")]]
    assert contrib.iloc[1:].isna().all().all() and contrib.iloc[0].notna().all()
    # the complete row is scored exactly as on its own
    alone = runtime.predict(X.head(1), threshold=0.0)
    assert out["probability"].iloc[0] == pytest.approx(alone["probability"].iloc[0], abs=1e-15)
    all_nan = runtime.predict(table.iloc[[2]])
    assert all_nan["call"].tolist() == [NO_CALL]


def test_skops_check_refuses_sklearn_functions_and_unlisted_estimators(tmp_path):
    import skops.io as sio
    from sklearn.datasets import dump_svmlight_file
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    marker = tmp_path / "written.svmlight"
    ft = FunctionTransformer(func=dump_svmlight_file, kw_args={"f": str(marker)})
    pipe = Pipeline([("f", ft), ("clf", build_pipeline(ModelSpec(family="logreg_l2")))])
    path = tmp_path / "evil.skops"
    sio.dump(pipe, path)
    with pytest.raises(ModelError) as info:
        check_skops_file(path, source="models:/evil@x")
    msg = str(info.value)
    assert msg.startswith("models:/evil@x: refusing ") and "evil.skops" in msg
    assert "sklearn.datasets._svmlight_format_io.dump_svmlight_file (FunctionNode)" in msg
    assert "sklearn.preprocessing._function_transformer.FunctionTransformer (ObjectNode)" in msg
    assert not marker.exists()


def _families() -> set[str]:
    """Every model family the training configuration accepts."""
    return set(get_args(ModelSpec.model_fields["family"].annotation))


def _family_pipelines(X: pd.DataFrame, y: np.ndarray) -> list[tuple[str, Any]]:
    """A fitted pipeline for every family and grid point in configs/train/*.yaml."""
    from sklearn.model_selection import ParameterGrid

    from blinaprofile.models.validation import load_train_config
    from blinaprofile.settings import settings

    out = []
    configs = sorted((settings.config_dir / "train").glob("*.yaml"))
    assert configs, settings.config_dir
    specs = [spec for cfg in configs for spec in load_train_config(cfg).models]
    # the optional SelectKBest step for every family (params.select_k is allowed for all)
    specs += [
        ModelSpec.model_validate({"family": f, "params": {"select_k": 3}})
        for f in sorted(_families())
    ]
    for spec in specs:
        for cand in ParameterGrid(spec.grid) if spec.grid else [{}]:
            pipe = build_pipeline(spec, seed=1).set_params(**cand).fit(X, y)
            out.append((f"{spec.family} {spec.params} {cand}", pipe))
    return out


def test_skops_allow_list_is_what_training_produces(tmp_path):
    """Every configured family saves (our save path) and loads (our allow-list), and the
    allow-list is exactly the union of what they contain: nothing unused is trusted."""
    X, y = _data(n=60)
    X.iloc[3, 2] = np.nan  # training tables may have gaps (the imputer's statistics)
    seen: set[tuple[str, str]] = set()
    families = set()
    for i, (name, pipe) in enumerate(_family_pipelines(X, y)):
        families.add(name.split()[0])
        meta = _meta(list(X.columns), X) | {"family": name.split()[0]}
        out = save_model(tmp_path / f"m{i}", pipe, meta, uncertainty=[pipe, pipe])
        model, runtime = load_model(out)
        got = model.predict(X.head(3))
        np.testing.assert_allclose(got["probability"], pipe.predict_proba(X.head(3))[:, 1])
        assert len(runtime.uncertainty) == 2, name
        for f in ("pipeline.skops", "uncertainty.skops"):
            seen |= skops_nodes(out / "artifacts" / f)
    assert families == _families()
    allowed = {(loader, t) for loader, types in SKOPS_ALLOW_LIST.items() for t in types}
    assert seen == allowed, (
        f"only in the files: {sorted(seen - allowed)}; never produced: {sorted(allowed - seen)}"
    )
