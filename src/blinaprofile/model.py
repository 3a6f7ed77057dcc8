"""The packaged responder model: an MLflow pyfunc ("model from code") around a skops file.

A model directory (``models/default`` or an MLflow artifact) contains the MLflow
``MLmodel`` file, the model code (:mod:`blinaprofile._pyfunc_entry`), the fitted
scikit-learn Pipeline saved with skops (``pipeline.skops``) and ``meta.json`` (feature
list, schema version, decision threshold, training-cohort statistics for
out-of-distribution checks). Nothing is unpickled: skops loads only the types listed in
``meta.json`` and allowed by :data:`TRUSTED_PREFIXES`.

``predict`` takes a feature table (one row per sample) and returns ``probability``,
``call`` (``responder``/``nonresponder``) and one ``contrib_<feature>`` column per feature
(log-odds contribution: coefficient x standardised value for linear models, SHAP values
for tree models). ``params={"threshold": t}`` overrides the stored threshold.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import FeatureSchemaError, ModelError

__all__ = [
    "TRUSTED_PREFIXES",
    "ResponderModel",
    "contributions",
    "load_model",
    "log_model",
    "save_model",
]

TRUSTED_PREFIXES = ("sklearn.", "xgboost.", "numpy.", "scipy.", "builtins.", "collections.")


def _check_trusted(types: list[str]) -> list[str]:
    bad = [t for t in types if not t.startswith(TRUSTED_PREFIXES)]
    if bad:
        raise ModelError(f"refusing to load untrusted types from the model file: {bad}")
    return types


def load_pipeline(path: str | os.PathLike[str], trusted: list[str]) -> Any:
    """Load a skops-saved pipeline, trusting only the listed (and allowed) types."""
    import skops.io as sio

    p = Path(path)
    untrusted = sio.get_untrusted_types(file=p)
    _check_trusted(untrusted)
    unknown = sorted(set(untrusted) - set(trusted))
    if unknown:
        raise ModelError(f"model file has types not recorded at save time: {unknown}", path=p)
    return sio.load(p, trusted=untrusted)


def _final_estimator(pipe: Any) -> Any:
    return pipe.steps[-1][1] if hasattr(pipe, "steps") else pipe


def contributions(pipe: Any, X: pd.DataFrame) -> pd.DataFrame:
    """Per-sample, per-feature log-odds contributions of a fitted pipeline.

    Linear models: coefficient x preprocessed value. Tree boosting (XGBoost): exact TreeSHAP
    values from the booster. Other models: occlusion (log-odds change when the feature is
    replaced by its training median after preprocessing).
    """
    cols = list(X.columns)
    if not hasattr(pipe, "steps"):
        raise ModelError("expected a scikit-learn Pipeline")
    pre = pipe[:-1]
    clf = _final_estimator(pipe)
    Z = np.asarray(pre.transform(X), dtype=float)
    if hasattr(clf, "calibrated_classifiers_"):
        clf = clf.calibrated_classifiers_[0].estimator
    if hasattr(clf, "coef_"):
        coef = np.asarray(clf.coef_).ravel()
        return pd.DataFrame(Z * coef[None, :], columns=cols, index=X.index)
    if hasattr(clf, "get_booster"):
        import xgboost as xgb

        contrib = clf.get_booster().predict(xgb.DMatrix(Z), pred_contribs=True)
        return pd.DataFrame(contrib[:, : len(cols)], columns=cols, index=X.index)
    base = _logit(clf.predict_proba(Z)[:, 1])
    out = np.zeros_like(Z)
    for j in range(Z.shape[1]):
        Zj = Z.copy()
        Zj[:, j] = 0.0  # standardised median/mean
        out[:, j] = base - _logit(clf.predict_proba(Zj)[:, 1])
    return pd.DataFrame(out, columns=cols, index=X.index)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


class ResponderModel:
    """Runtime of a packaged model (used by the MLflow pyfunc wrapper and directly).

    Parameters
    ----------
    pipeline
        Fitted scikit-learn Pipeline from the feature table to probabilities.
    meta
        ``features``, ``schema_version``, ``threshold``, ``training_stats`` ...
    """

    def __init__(self, pipeline: Any, meta: dict[str, Any]) -> None:
        self.pipeline = pipeline
        self.meta = meta

    @property
    def features(self) -> list[str]:
        return list(self.meta["features"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    def check_features(self, table: pd.DataFrame) -> pd.DataFrame:
        """Select the model's features, refusing tables that lack them."""
        missing = [f for f in self.features if f not in table.columns]
        if missing:
            raise FeatureSchemaError(
                f"the model needs feature(s) {missing} (schema {self.meta['schema_version']}); "
                f"the table has {sorted(table.columns)}"
            )
        if "schema_version" in table.columns:
            versions = set(table["schema_version"].dropna().astype(str))
            if versions and versions != {str(self.meta["schema_version"])}:
                raise FeatureSchemaError(
                    f"feature table has schema version(s) {sorted(versions)}, the model was "
                    f"trained on {self.meta['schema_version']}"
                )
        return table[self.features].astype(float)

    def predict(self, table: pd.DataFrame, *, threshold: float | None = None) -> pd.DataFrame:
        """Probability, call and per-feature contributions for each row."""
        X = self.check_features(table)
        t = self.threshold if threshold is None else float(threshold)
        prob = self.pipeline.predict_proba(X)[:, 1]
        out = pd.DataFrame(index=table.index)
        out["probability"] = prob
        out["call"] = np.where(prob >= t, "responder", "nonresponder")
        contrib = contributions(self.pipeline, X)
        for c in contrib.columns:
            out[f"contrib_{c}"] = contrib[c].to_numpy()
        return out

    def ood_scores(self, table: pd.DataFrame) -> pd.DataFrame:
        """Robust z of each feature against the training cohort (median / scaled MAD)."""
        stats = self.meta["training_stats"]
        X = table[self.features].astype(float)
        z = {}
        for f in self.features:
            med = stats[f]["median"]
            scale = max(stats[f]["mad"] * 1.4826, stats[f].get("min_scale", 1e-6))
            z[f] = (X[f] - med) / scale
        return pd.DataFrame(z, index=table.index)


def _package(
    staging: Path,
    pipeline: Any,
    meta: dict[str, Any],
    training_table: pd.DataFrame | None,
) -> dict[str, Any]:
    """Write the model's files into ``staging``; return MLflow save/log keyword arguments."""
    import skops.io as sio
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    staging.mkdir(parents=True)
    sk = staging / "pipeline.skops"
    sio.dump(pipeline, sk)
    meta = dict(meta)
    meta["trusted_types"] = _check_trusted(sio.get_untrusted_types(file=sk))
    (staging / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default))
    artifacts = {"pipeline": str(sk), "meta": str(staging / "meta.json")}
    if training_table is not None:
        tt = staging / "training_features.csv"
        training_table.to_csv(tt, index=False)
        artifacts["training_features"] = str(tt)
    features = list(meta["features"])
    out_cols = [ColSpec("double", "probability"), ColSpec("string", "call")] + [
        ColSpec("double", f"contrib_{f}") for f in features
    ]
    signature = ModelSignature(
        inputs=Schema([ColSpec("double", f) for f in features]),  # type: ignore[arg-type]
        outputs=Schema(out_cols),  # type: ignore[arg-type]
        params=ParamSchema([ParamSpec("threshold", "double", float(meta["threshold"]))]),
    )
    return {
        "python_model": str(Path(__file__).with_name("_pyfunc_entry.py")),
        "artifacts": artifacts,
        "signature": signature,
        "pip_requirements": _requirements(),
        "metadata": {
            "schema_version": meta["schema_version"],
            "trained_on": meta.get("trained_on", "unknown"),
        },
    }


def save_model(
    path: str | os.PathLike[str],
    pipeline: Any,
    meta: dict[str, Any],
    *,
    training_table: pd.DataFrame | None = None,
) -> Path:
    """Save a pipeline as an MLflow pyfunc model directory, atomically.

    The directory is written under a temporary name beside ``path`` and renamed, so a crash
    never leaves a half-written model.
    """
    import mlflow

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging"
    tmp = out.parent / f".{out.name}.tmp"
    for p in (staging, tmp):
        if p.exists():
            shutil.rmtree(p)
    kwargs = _package(staging, pipeline, meta, training_table)
    mlflow.pyfunc.save_model(path=str(tmp), **kwargs)
    shutil.rmtree(staging)
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def log_model(
    pipeline: Any,
    meta: dict[str, Any],
    *,
    training_table: pd.DataFrame | None = None,
    registered_model_name: str | None = None,
) -> Any:
    """Log the model to the active MLflow run (and register it); returns ``ModelInfo``."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as d:
        kwargs = _package(Path(d) / "pkg", pipeline, meta, training_table)
        example = pd.DataFrame([meta["training_stats"][f]["median"] for f in meta["features"]], index=meta["features"]).T
        return mlflow.pyfunc.log_model(
            name="model",
            registered_model_name=registered_model_name,
            input_example=example,
            **kwargs,
        )


def _requirements() -> list[str]:
    from importlib.metadata import version

    pkgs = ["scikit-learn", "xgboost-cpu", "skops", "pandas", "numpy", "mlflow"]
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except Exception:  # noqa: BLE001 - metadata lookup may fail for any reason
            out.append(p)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_model(uri: str | os.PathLike[str] | None = None) -> tuple[Any, ResponderModel]:
    """Load a model by MLflow URI (``models:/NAME@ALIAS``, ``runs:/...``) or directory.

    Returns the MLflow pyfunc and the underlying :class:`ResponderModel`.
    """
    import mlflow

    from .settings import settings

    target = str(uri) if uri else str(settings.default_model)
    if not target.startswith(("models:/", "runs:/")) and not Path(target).exists():
        raise ModelError("model not found (train one with 'blinaprofile train')", path=target)
    if target.startswith(("models:/", "runs:/")):
        mlflow.set_tracking_uri(settings.tracking_uri)
        mlflow.set_registry_uri(settings.tracking_uri)
    try:
        pyfunc = mlflow.pyfunc.load_model(target)
    except mlflow.exceptions.MlflowException as err:
        raise ModelError(f"cannot load model: {err.message}", path=target) from None
    inner = pyfunc.unwrap_python_model()
    return pyfunc, inner.runtime
