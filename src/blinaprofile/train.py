"""Training with small-cohort-honest validation, tracked in MLflow.

Every candidate is one scikit-learn Pipeline from the feature table to probabilities.
Validation is repeated, stratified, patient-grouped K-fold; hyper-parameters are tuned
inside each outer training split (nested CV), so out-of-fold (OOF) probabilities never
saw their own patient. The best family (by OOF AUC) is refit on all samples, packaged
as an MLflow pyfunc (:mod:`blinaprofile.model`), registered, given an alias and exported.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import ModelSpec, TrainConfig, load_config
from .errors import ManifestError, ModelError
from .schema import MODEL_FEATURES, SCHEMA_VERSION

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CVResult",
    "TrainResult",
    "build_pipeline",
    "choose_threshold",
    "cross_validate",
    "load_train_config",
    "train",
]


def load_train_config(path: str | os.PathLike[str] | None = None) -> TrainConfig:
    from .settings import settings

    return load_config(TrainConfig, path or settings.default_train)


def build_pipeline(spec: ModelSpec, *, seed: int = 0) -> Any:
    """The Pipeline for a model family: impute (median) -> scale -> classifier."""
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    params = dict(spec.params)
    clf: Any
    if spec.family.startswith("logreg"):
        from sklearn.linear_model import LogisticRegression

        penalty = {"logreg_l2": "l2", "logreg_l1": "l1", "logreg_elasticnet": "elasticnet"}[
            spec.family
        ]
        base: dict[str, Any] = {"C": 0.3, "max_iter": 5000, "solver": "saga" if penalty != "l2" else "lbfgs"}
        if penalty == "l1":
            base["l1_ratio"] = 1.0
        elif penalty == "elasticnet":
            base["l1_ratio"] = 0.5
        base.update(params)
        clf = LogisticRegression(**base)
    elif spec.family == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        base = {"n_estimators": 300, "min_samples_leaf": 3, "random_state": seed, "n_jobs": 1}
        base.update(params)
        clf = RandomForestClassifier(**base)
    elif spec.family == "xgboost":
        from xgboost import XGBClassifier

        base = {
            "n_estimators": 150,
            "max_depth": 2,
            "learning_rate": 0.05,
            "random_state": seed,
            "n_jobs": 1,
            "eval_metric": "logloss",
            "verbosity": 0,
        }
        base.update(params)
        clf = XGBClassifier(**base)
    elif spec.family == "linear_svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import LinearSVC

        base = {"C": 0.1, "max_iter": 20000}
        base.update(params)
        clf = CalibratedClassifierCV(LinearSVC(**base), method="sigmoid", cv=3)
    else:  # pragma: no cover - config validation forbids it
        raise ModelError(f"unknown model family {spec.family!r}")
    return Pipeline(
        [("impute", SimpleImputer(strategy="median")), ("scale", StandardScaler()), ("clf", clf)]
    )


def _roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, p))


def choose_threshold(y: np.ndarray, prob: np.ndarray, *, rule: str = "max_balanced_accuracy", value: float = 0.5) -> float:
    """Decision threshold from (out-of-fold) probabilities by a rule.

    ``max_balanced_accuracy``: the cut maximising (sensitivity + specificity)/2;
    ``min_sensitivity``: the highest cut whose sensitivity is at least ``value``;
    ``fixed``: ``value``.
    """
    if rule == "fixed":
        return float(value)
    cuts = np.unique(prob)
    best_t, best = 0.5, -1.0
    pos = y == 1
    neg = ~pos
    for t in cuts:
        call = prob >= t
        sens = call[pos].mean() if pos.any() else 0.0
        spec = (~call[neg]).mean() if neg.any() else 0.0
        if rule == "min_sensitivity":
            if sens >= value and t > best_t - 1e-12:
                best_t, best = float(t), sens
        else:
            ba = 0.5 * (sens + spec)
            if ba > best + 1e-12:
                best_t, best = float(t), ba
    return best_t


@dataclass
class CVResult:
    """Out-of-fold predictions and metrics of one model family."""

    family: str
    oof: np.ndarray  # repeats x samples
    auc_per_repeat: list[float]
    best_params: list[dict[str, Any]] = field(default_factory=list)

    @property
    def oof_mean(self) -> np.ndarray:
        return np.nanmean(self.oof, axis=0)

    @property
    def auc(self) -> float:
        return float(np.nanmean(self.auc_per_repeat))


def cross_validate(
    X: pd.DataFrame,
    y: np.ndarray,
    groups: np.ndarray,
    spec: ModelSpec,
    config: TrainConfig,
) -> CVResult:
    """Repeated, stratified, patient-grouped outer CV with tuning in inner grouped CV."""
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold

    n_groups = len(np.unique(groups))
    outer_k = min(config.outer_folds, n_groups)
    if outer_k < 2:
        raise ModelError(f"need at least 2 patients for cross-validation, got {n_groups}")
    oof = np.full((config.repeats, len(y)), np.nan)
    aucs: list[float] = []
    best: list[dict[str, Any]] = []
    for r in range(config.repeats):
        outer = StratifiedGroupKFold(n_splits=outer_k, shuffle=True, random_state=config.seed + r)
        for tr, te in outer.split(X, y, groups):
            pipe = build_pipeline(spec, seed=config.seed + r)
            if spec.grid:
                inner_k = min(config.inner_folds, len(np.unique(groups[tr])))
                search = GridSearchCV(
                    pipe,
                    spec.grid,
                    scoring="roc_auc",
                    cv=StratifiedGroupKFold(n_splits=inner_k, shuffle=True, random_state=config.seed),
                    n_jobs=1,
                    error_score="raise",
                )
                search.fit(X.iloc[tr], y[tr], groups=groups[tr])
                model = search.best_estimator_
                best.append(dict(search.best_params_))
            else:
                model = clone(pipe).fit(X.iloc[tr], y[tr])
            oof[r, te] = model.predict_proba(X.iloc[te])[:, 1]
        aucs.append(_roc_auc(y, oof[r]))
    return CVResult(spec.family, oof, aucs, best)


def bootstrap_ci(
    y: np.ndarray,
    prob: np.ndarray,
    groups: np.ndarray,
    metric: Any,
    *,
    n: int,
    seed: int = 0,
) -> tuple[float, float]:
    """95% percentile CI of ``metric(y, prob)`` resampling patients with replacement."""
    if n <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    uniq = np.unique(groups)
    idx_by = {g: np.flatnonzero(groups == g) for g in uniq}
    vals = []
    for _ in range(n):
        pick = rng.choice(uniq, size=len(uniq), replace=True)
        idx = np.concatenate([idx_by[g] for g in pick])
        if len(np.unique(y[idx])) < 2:
            continue
        vals.append(metric(y[idx], prob[idx]))
    if not vals:
        return (float("nan"), float("nan"))
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def _metrics(y: np.ndarray, prob: np.ndarray, groups: np.ndarray, threshold: float, config: TrainConfig) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score, brier_score_loss

    call = (prob >= threshold).astype(int)
    sens = float(call[y == 1].mean())
    spec = float((1 - call[y == 0]).mean())
    out = {
        "roc_auc": _roc_auc(y, prob),
        "balanced_accuracy": float(balanced_accuracy_score(y, call)),
        "sensitivity": sens,
        "specificity": spec,
        "brier": float(brier_score_loss(y, prob)),
        "threshold": threshold,
    }
    lo, hi = bootstrap_ci(y, prob, groups, _roc_auc, n=config.n_bootstrap, seed=config.seed)
    out["roc_auc_ci_low"], out["roc_auc_ci_high"] = lo, hi
    return out


@dataclass
class TrainResult:
    """What a training run produced."""

    run_id: str
    experiment: str
    chosen: str
    metrics: dict[str, dict[str, float]]
    model_uri: str
    registered_model: str
    version: str
    alias: str
    export_dir: Path | None
    feature_table: Path | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "experiment": self.experiment,
            "chosen": self.chosen,
            "metrics": self.metrics,
            "model_uri": self.model_uri,
            "registered_model": self.registered_model,
            "version": self.version,
            "alias": self.alias,
            "export_dir": str(self.export_dir) if self.export_dir else None,
        }


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _training_stats(X: pd.DataFrame) -> dict[str, dict[str, float]]:
    stats = {}
    for c in X.columns:
        v = X[c].dropna().to_numpy(dtype=float)
        med = float(np.median(v)) if v.size else 0.0
        mad = float(np.median(np.abs(v - med))) if v.size else 1.0
        sd = float(np.std(v)) if v.size else 1.0
        stats[c] = {
            "median": med,
            "mad": mad,
            "min": float(v.min()) if v.size else 0.0,
            "max": float(v.max()) if v.size else 0.0,
            "min_scale": max(0.1 * sd, 1e-6),
        }
    return stats


def _roc_figure(y: np.ndarray, results: dict[str, CVResult]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for fam, res in results.items():
        fpr, tpr, _ = roc_curve(y, res.oof_mean)
        ax.plot(fpr, tpr, label=f"{fam} (OOF AUC {res.auc:.2f})")
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title("Out-of-fold ROC (patient-grouped CV)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def train(
    table: pd.DataFrame,
    *,
    config: TrainConfig | None = None,
    config_path: str | os.PathLike[str] | None = None,
    export_dir: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    trained_on: str = "unknown",
    run_name: str | None = None,
) -> TrainResult:
    """Cross-validate every configured family, refit the best, log and register it.

    Parameters
    ----------
    table
        Feature table with ``response`` (1/0), ``patient_id`` and the feature columns.
        Rows with an ``error`` or failing QC are dropped (and counted in the run).
    config, config_path
        Training configuration (default ``configs/train/default.yaml``).
    export_dir
        Also save the final model here (an MLflow model directory), atomically.
    tracking_uri
        MLflow tracking URI (default :attr:`Settings.tracking_uri`).
    trained_on
        Free text stored with the model (e.g. ``"simulated cohort 'default', seed 20221"``).
    """
    import mlflow
    import pandas as pd

    from .model import log_model, save_model
    from .settings import settings

    if config is None:
        config = load_train_config(config_path)
    features = list(config.features or MODEL_FEATURES)
    missing = [f for f in [*features, "response", "patient_id"] if f not in table.columns]
    if missing:
        raise ManifestError(f"feature table lacks column(s) {missing}")
    usable = table.copy()
    n_in = len(usable)
    if "error" in usable.columns:
        usable = usable[usable["error"].fillna("") == ""]
    if "qc_pass" in usable.columns:
        usable = usable[usable["qc_pass"].fillna(False).astype(bool)]
    usable = usable[usable["response"].notna()]
    if usable["response"].nunique() < 2:
        raise ModelError("training needs both responders and nonresponders among usable samples")
    X = usable[features].astype(float).reset_index(drop=True)
    y = usable["response"].astype(int).to_numpy()
    groups = usable["patient_id"].astype(str).to_numpy()

    results = {spec.family: cross_validate(X, y, groups, spec, config) for spec in config.models}
    metrics: dict[str, dict[str, float]] = {}
    for fam, res in results.items():
        t = choose_threshold(y, res.oof_mean, rule=config.threshold.rule, value=config.threshold.value)
        metrics[fam] = _metrics(y, res.oof_mean, groups, t, config)
        metrics[fam]["cv_auc_mean_of_repeats"] = res.auc
    key = config.select_by
    chosen = (
        max(metrics, key=lambda f: metrics[f]["roc_auc"])
        if key == "roc_auc"
        else min(metrics, key=lambda f: metrics[f]["brier"])
    )
    spec = next(s for s in config.models if s.family == chosen)
    final = build_pipeline(spec, seed=config.seed)
    if spec.grid:
        from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold

        search = GridSearchCV(
            final,
            spec.grid,
            scoring="roc_auc",
            cv=StratifiedGroupKFold(n_splits=min(config.inner_folds, len(np.unique(groups))), shuffle=True, random_state=config.seed),
            n_jobs=1,
        )
        search.fit(X, y, groups=groups)
        final = search.best_estimator_
        final_params = dict(search.best_params_)
    else:
        final.fit(X, y)
        final_params = {}
    meta = {
        "features": features,
        "schema_version": SCHEMA_VERSION,
        "threshold": metrics[chosen]["threshold"],
        "threshold_rule": config.threshold.rule,
        "family": chosen,
        "params": final_params,
        "cv_metrics": metrics[chosen],
        "training_stats": _training_stats(X),
        "n_samples": len(y),
        "n_patients": len(np.unique(groups)),
        "trained_on": trained_on,
    }
    training_table = pd.DataFrame(X, columns=features).assign(response=y)

    uri = tracking_uri or settings.tracking_uri
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(config.experiment)
    with mlflow.start_run(run_name=run_name or f"train-{chosen}") as run:
        mlflow.set_tags(
            {
                "git_commit": _git_commit(),
                "schema_version": SCHEMA_VERSION,
                "chosen_family": chosen,
                "trained_on": trained_on,
            }
        )
        mlflow.log_params(
            {
                "families": ",".join(results),
                "outer_folds": config.outer_folds,
                "inner_folds": config.inner_folds,
                "repeats": config.repeats,
                "threshold_rule": config.threshold.rule,
                "n_samples": len(y),
                "n_patients": len(np.unique(groups)),
                "n_dropped_qc_or_error": n_in - len(usable),
                "features": ",".join(features),
                **{f"final_{k}": v for k, v in final_params.items()},
            }
        )
        from mlflow.entities import Metric

        ts = int(pd.Timestamp.now().timestamp() * 1000)
        batch = [
            Metric(f"{fam}.{k}", float(v), ts, 0)
            for fam, m in metrics.items()
            for k, v in m.items()
            if np.isfinite(v)
        ] + [Metric(k, float(v), ts, 0) for k, v in metrics[chosen].items() if np.isfinite(v)]
        mlflow.tracking.MlflowClient().log_batch(run.info.run_id, metrics=batch)
        mlflow.log_figure(_roc_figure(y, results), "plots/roc.png")
        cfg_dump = json.dumps(config.model_dump(), indent=2)
        mlflow.log_text(cfg_dump, "config/train_config.json")
        ds_cols = [c for c in ("sample_id", "patient_id") if c in usable.columns]
        ds_table = usable[[*ds_cols, *features]].reset_index(drop=True).astype(
            {f: float for f in features}
        )
        ds_table["response"] = y.astype(float)
        dataset = mlflow.data.from_pandas(
            ds_table,
            name=f"features-v{SCHEMA_VERSION}",
            targets="response",
        )
        mlflow.log_input(dataset, context="training")
        oof = pd.DataFrame({"patient_id": groups, "response": y})
        for fam, res in results.items():
            oof[f"oof_{fam}"] = res.oof_mean
        mlflow.log_text(oof.to_csv(index=False), "cv/oof_predictions.csv")
        info = log_model(
            final, meta, training_table=training_table, registered_model_name=config.registered_model
        )
        version = str(info.registered_model_version)
        client = mlflow.tracking.MlflowClient()
        client.set_registered_model_alias(config.registered_model, config.alias, version)
        run_id = run.info.run_id
    out = None
    if export_dir is not None:
        out = save_model(export_dir, final, meta, training_table=training_table)
    return TrainResult(
        run_id=run_id,
        experiment=config.experiment,
        chosen=chosen,
        metrics=metrics,
        model_uri=f"models:/{config.registered_model}@{config.alias}",
        registered_model=config.registered_model,
        version=version,
        alias=config.alias,
        export_dir=out,
    )
