"""Training with small-cohort-honest validation, tracked in MLflow.

Design (see ``docs/models.md``)
-------------------------------
- Every candidate is one scikit-learn Pipeline from the feature table to probabilities:
  median imputation -> standardisation -> optional univariate feature selection
  (``params: {select_k: K}`` or ``grid: {select__k: [...]}``) -> classifier.
- Validation is **nested, repeated, patient-grouped, stratified** K-fold
  (:func:`cross_validate`). Inside each outer training split an inner grouped CV picks the
  hyper-parameters (and with them the selected features) and gives inner out-of-fold
  probabilities, from which the **decision threshold** is chosen by the configured rule.
  The outer test patients are predicted by a model that never saw them, and their call
  uses that fold's threshold; sensitivity, specificity and balanced accuracy are therefore
  honest too.
- Metrics (:func:`blinaprofile.metrics.summarize`) come with patient-bootstrap 95% CIs; a
  label-permutation test re-runs the *whole* procedure on permuted patient labels and
  gives a p-value per family plus one adjusted for picking the best family (max-statistic).
- Global importance is permutation importance on the outer test folds (AUC drop).
- The chosen family is tuned on all samples the same way, refit, given bootstrap refits for
  a probability interval, packaged as an MLflow pyfunc (:mod:`blinaprofile.model`),
  registered under a name, given an alias, and optionally exported.

:func:`evaluate` is the validation alone (no MLflow); :func:`train` is everything.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blinaprofile.config import ModelSpec, TrainConfig, load_config
from blinaprofile.errors import ConfigError, ManifestError, ModelError
from blinaprofile.models.metrics import choose_threshold, permutation_pvalue, roc_auc, summarize
from blinaprofile.features.schema import MODEL_FEATURES, SCHEMA_VERSION

if TYPE_CHECKING:
    import pandas as pd

from blinaprofile.models.validation import DEFAULT_UNCERTAINTY_MODELS, Evaluation, build_pipeline, evaluate, fit_with_params, load_train_config, tune
from blinaprofile.models.tracking import log_run


# --------------------------------------------------------------------------- final model
def _bootstrap_refits(
    spec: ModelSpec,
    params: dict[str, Any],
    X: pd.DataFrame,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    n: int,
    seed: int,
) -> list[Any]:
    """Refit the final pipeline (fixed hyper-parameters) on ``n`` patient bootstrap resamples."""
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed + 15485863)
    uniq = np.unique(groups)
    idx_by = {g: np.flatnonzero(groups == g) for g in uniq}
    models: list[Any] = []
    with threadpool_limits(limits=1):
        while len(models) < n:
            pick = rng.choice(uniq, size=len(uniq), replace=True)
            idx = np.concatenate([idx_by[g] for g in pick])
            if len(np.unique(y[idx])) < 2:
                continue
            pipe = build_pipeline(spec, seed=seed + len(models))
            models.append(fit_with_params(pipe, params, X.iloc[idx], y[idx]))
    return models


def _training_stats(X: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per-feature cohort statistics for out-of-distribution checks (on :func:`ood_scale`)."""
    from blinaprofile.features.schema import ood_scale, to_ood_scale

    stats: dict[str, dict[str, Any]] = {}
    for c in X.columns:
        raw = X[c].dropna().to_numpy(dtype=float)
        v = to_ood_scale(c, raw)
        med = float(np.median(v)) if v.size else 0.0
        mad = float(np.median(np.abs(v - med))) if v.size else 1.0
        sd = float(np.std(v)) if v.size else 1.0
        stats[c] = {
            "median": med,
            "mad": mad,
            "min": float(raw.min()) if raw.size else 0.0,
            "max": float(raw.max()) if raw.size else 0.0,
            "min_scale": max(0.1 * sd, 1e-6),
            "scale": ood_scale(c),
        }
    return stats


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
    selection_pvalue: float = float("nan")
    leaderboard: pd.DataFrame | None = None

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
            "selection_pvalue": self.selection_pvalue,
        }

def _final_model(
    ev: Evaluation, spec: ModelSpec, config: TrainConfig
) -> tuple[Any, dict[str, Any], float, list[Any]]:
    from threadpoolctl import threadpool_limits

    Xa = ev.X.to_numpy(dtype=float)
    with threadpool_limits(limits=1):
        params, inner_oof = tune(
            spec,
            Xa,
            ev.y,
            ev.groups,
            inner_folds=config.inner_folds,
            seed=config.seed,
            need_oof=config.threshold.rule != "fixed",
        )
        if inner_oof is not None:
            threshold = choose_threshold(
                ev.y, inner_oof, rule=config.threshold.rule, value=config.threshold.value
            )
        else:
            threshold = (
                config.threshold.value
                if config.threshold.rule == "fixed"
                else ev.families[spec.family].metrics["threshold"]
            )
        final = fit_with_params(build_pipeline(spec, seed=config.seed), params, ev.X, ev.y)
    n_unc = int(getattr(config, "uncertainty_models", DEFAULT_UNCERTAINTY_MODELS))
    refits = (
        _bootstrap_refits(spec, params, ev.X, ev.y, ev.groups, n=n_unc, seed=config.seed)
        if n_unc > 0
        else []
    )
    return final, params, float(threshold), refits


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
    """Validate every configured family, refit the best, log it to MLflow and register it.

    Parameters
    ----------
    table
        Feature table with ``response`` (1/0), ``patient_id`` and the feature columns.
        Rows with an ``error`` or failing QC are dropped (and counted in the run).
    config, config_path
        Training configuration (default ``configs/train/default.yaml``). The YAML file, when
        given, is logged to the run as-is.
    export_dir
        Also save the final model here (an MLflow model directory), atomically.
    tracking_uri
        MLflow tracking URI (default :attr:`Settings.tracking_uri`).
    trained_on
        Free text stored with the model (e.g. ``"simulated cohort 'default', seed 20221"``).
    run_name
        MLflow run name (default ``train-<chosen family>``).

    Returns
    -------
    TrainResult
        ``metrics[family][metric]`` for every family, the run, the registered version and
        alias, and ``leaderboard`` (one row per family).
    """
    from blinaprofile.models.packaging import global_contributions, save_model
    from blinaprofile.settings import settings

    cfg_file: Path | None
    if config is None:
        cfg_file = Path(config_path) if config_path else settings.default_train
        config = load_train_config(cfg_file)
    else:
        cfg_file = Path(config_path) if config_path else None
    ev = evaluate(table, config=config)
    chosen = ev.chosen
    spec = next(s for s in config.models if s.family == chosen)
    final, final_params, threshold, refits = _final_model(ev, spec, config)
    features = ev.features
    metrics = {f: dict(m) for f, m in ev.metrics.items()}
    for m in metrics.values():
        m["cv_auc_mean_of_repeats"] = m["roc_auc"]
    shap_global = global_contributions(final, ev.X)
    perm_imp = ev.families[chosen].importance
    meta = {
        "features": features,
        "schema_version": SCHEMA_VERSION,
        "threshold": threshold,
        "threshold_rule": config.threshold.rule,
        "threshold_value": config.threshold.value,
        "family": chosen,
        "params": final_params,
        "cv_metrics": metrics[chosen],
        "selection_pvalue": ev.selection_pvalue,
        "training_stats": _training_stats(ev.X),
        "global_importance": {
            "oof_permutation_auc_drop": dict(
                zip(perm_imp["feature"], perm_imp["auc_drop"].astype(float), strict=True)
            ),
            "mean_abs_contribution": {k: float(v) for k, v in shap_global.items()},
        },
        "n_samples": len(ev.y),
        "n_patients": len(np.unique(ev.groups)),
        "trained_on": trained_on,
    }
    import pandas as pd

    training_table = pd.DataFrame(ev.X, columns=features).assign(response=ev.y)
    uri = tracking_uri or settings.tracking_uri
    run_id, version = log_run(
        ev,
        config,
        cfg_file=cfg_file,
        final=final,
        refits=refits,
        meta=meta,
        training_table=training_table,
        table=table,
        uri=uri,
        run_name=run_name or f"train-{chosen}",
        trained_on=trained_on,
    )
    out = None
    if export_dir is not None:
        # the exported copy remembers where it is registered, for reports and scoring
        exported_meta = {
            **meta,
            "registered_model": config.registered_model,
            "version": str(version),
            "alias": config.alias,
            "run_id": run_id,
        }
        out = save_model(
            export_dir, final, exported_meta, training_table=training_table, uncertainty=refits
        )
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
        selection_pvalue=ev.selection_pvalue,
        leaderboard=ev.leaderboard(),
    )
