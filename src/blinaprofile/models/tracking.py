"""MLflow logging of a training run: parameters, headline metrics with CIs, the dataset, out-of-fold predictions, figures, git commit and package versions."""

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

from blinaprofile.models.validation import Evaluation


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    if not sha:
        return "unknown"
    return sha + ("-dirty" if dirty.stdout.strip() else "")


def package_versions() -> dict[str, str]:
    """Versions of Python and the packages a model depends on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in (
        "blinaprofile",
        "scikit-learn",
        "xgboost-cpu",
        "xgboost",
        "mlflow",
        "numpy",
        "pandas",
        "skops",
        "scipy",
    ):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            continue
    return out



# --------------------------------------------------------------------------- MLflow
def _metric_batch(values: dict[str, float], ts: int) -> list[Any]:
    from mlflow.entities import Metric

    return [Metric(k, float(v), ts, 0) for k, v in values.items() if np.isfinite(v)]


def _log_batch(client: Any, run_id: str, metrics: list[Any]) -> None:
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def log_run(
    ev: Evaluation,
    config: TrainConfig,
    *,
    cfg_file: Path | None,
    final: Any,
    refits: list[Any],
    meta: dict[str, Any],
    training_table: pd.DataFrame,
    table: pd.DataFrame,
    uri: str,
    run_name: str,
    trained_on: str,
) -> tuple[str, str]:
    import time

    import mlflow

    from blinaprofile.models.packaging import log_model

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment(config.experiment)
    client = mlflow.tracking.MlflowClient(uri)
    chosen = ev.chosen
    versions = package_versions()
    ts = int(time.time() * 1000)
    with mlflow.start_run(run_name=run_name) as run:
        run_id = run.info.run_id
        mlflow.set_tags(
            {
                "blinaprofile.run_kind": "training",
                "git_commit": _git_commit(),
                "schema_version": SCHEMA_VERSION,
                "chosen_family": chosen,
                "trained_on": trained_on,
                "registered_model": config.registered_model,
                **{f"version.{k}": v for k, v in versions.items()},
            }
        )
        mlflow.log_params(
            {
                "families": ",".join(ev.families),
                "outer_folds": config.outer_folds,
                "inner_folds": config.inner_folds,
                "repeats": config.repeats,
                "n_bootstrap": config.n_bootstrap,
                "n_permutations": config.n_permutations,
                "threshold_rule": config.threshold.rule,
                "threshold_value": config.threshold.value,
                "select_by": config.select_by,
                "seed": config.seed,
                "n_samples": len(ev.y),
                "n_patients": len(np.unique(ev.groups)),
                "n_responders": int(ev.y.sum()),
                "n_dropped": ev.n_dropped,
                "n_features": len(ev.features),
                "features": ",".join(ev.features),
                "schema_version": SCHEMA_VERSION,
                "uncertainty_models": len(refits),
                **{f"final_{k}": v for k, v in meta["params"].items()},
            }
        )
        parent: dict[str, float] = {}
        for fam, fe in ev.families.items():
            parent.update({f"{fam}.{k}": v for k, v in fe.metrics.items()})
        parent.update(ev.families[chosen].metrics)
        parent["selection_pvalue"] = ev.selection_pvalue
        parent["final_threshold"] = meta["threshold"]
        _log_batch(client, run_id, _metric_batch(parent, ts))
        # the configuration: the YAML as written and the validated result
        if cfg_file is not None and cfg_file.is_file():
            mlflow.log_artifact(str(cfg_file), artifact_path="config")
        mlflow.log_dict(config.model_dump(), "config/train_config.validated.json")
        mlflow.log_dict(versions, "environment/versions.json")
        # the feature table as a dataset: which samples, which schema version
        _log_dataset(ev, table)
        # out-of-fold predictions, leaderboard, importance, calibration
        oof = _oof_table(ev)
        mlflow.log_text(oof.to_csv(index=False), "cv/oof_predictions.csv")
        mlflow.log_text(ev.leaderboard().to_csv(index=False), "cv/leaderboard.csv")
        for fam, fe in ev.families.items():
            mlflow.log_text(
                fe.importance.to_csv(index=False), f"importance/oof_permutation_{fam}.csv"
            )
        contrib = meta["global_importance"]["mean_abs_contribution"]
        mlflow.log_dict(contrib, f"importance/mean_abs_contribution_{chosen}.json")
        for name, fig in _figures(ev, contrib).items():
            mlflow.log_figure(fig, f"plots/{name}.png")
            _close(fig)
        # one child run per family: comparable across trainings in the UI and `compare`
        for fam, fe in ev.families.items():
            with mlflow.start_run(run_name=fam, nested=True) as child:
                mlflow.set_tags(
                    {
                        "blinaprofile.run_kind": "candidate",
                        "blinaprofile.parent_run_name": run_name,
                        "family": fam,
                        "chosen": str(fam == chosen).lower(),
                        "schema_version": SCHEMA_VERSION,
                        "trained_on": trained_on,
                    }
                )
                mlflow.log_params(
                    {
                        "family": fam,
                        "n_samples": len(ev.y),
                        "n_patients": len(np.unique(ev.groups)),
                        "fixed_params": json.dumps(fe.spec.params, default=str)[:500],
                        "grid": json.dumps(fe.spec.grid, default=str)[:500],
                        **{f"cv_{k}": v for k, v in fe.common_params().items()},
                    }
                )
                _log_batch(client, child.info.run_id, _metric_batch(fe.metrics, ts))
                mlflow.log_text(fe.importance.to_csv(index=False), "importance_oof_permutation.csv")
        info = log_model(
            final,
            meta,
            training_table=training_table,
            uncertainty=refits,
            registered_model_name=config.registered_model,
        )
        version = str(info.registered_model_version)
        client.set_registered_model_alias(config.registered_model, config.alias, version)
        m = ev.families[chosen].metrics
        client.set_model_version_tag(config.registered_model, version, "family", chosen)
        client.set_model_version_tag(
            config.registered_model,
            version,
            "cv_roc_auc",
            f"{m['roc_auc']:.3f} [{m['roc_auc_ci_low']:.3f}, {m['roc_auc_ci_high']:.3f}]",
        )
        client.set_model_version_tag(config.registered_model, version, "trained_on", trained_on)
        mlflow.set_tag("registered_version", version)
    return run_id, version


def _log_dataset(ev: Evaluation, table: pd.DataFrame) -> None:
    import mlflow
    from mlflow.data.pandas_dataset import from_pandas

    ds = ev.X.copy()
    ds.insert(0, "patient_id", ev.groups)
    ds.insert(0, "sample_id", ev.sample_ids)
    ds["response"] = ev.y.astype(float)
    if "schema_version" in table.columns:
        versions = sorted(set(table["schema_version"].dropna().astype(str)))
    else:
        versions = [SCHEMA_VERSION]
    dataset = from_pandas(ds, name=f"features-v{SCHEMA_VERSION}", targets="response")
    mlflow.log_input(
        dataset,
        context="training",
        tags={"schema_version": ",".join(versions), "n_samples": str(len(ds))},
    )


def _oof_table(ev: Evaluation) -> pd.DataFrame:
    import pandas as pd

    out = pd.DataFrame({"sample_id": ev.sample_ids, "patient_id": ev.groups, "response": ev.y})
    for fam, fe in ev.families.items():
        out[f"oof_{fam}"] = fe.oof_mean
        out[f"call_{fam}"] = fe.calls.mean(axis=0) >= 0.5
    return out


def _close(fig: Any) -> None:
    import matplotlib.pyplot as plt

    plt.close(fig)


def _figures(ev: Evaluation, contrib: dict[str, float]) -> dict[str, Any]:
    """ROC, precision-recall, calibration and importance plots of an evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    from blinaprofile.models.metrics import calibration_table

    figs: dict[str, Any] = {}
    y = ev.y
    fig, ax = plt.subplots(figsize=(5, 5))
    for fam, fe in ev.families.items():
        m = fe.metrics
        fpr, tpr, _ = roc_curve(y, fe.oof_mean)
        ax.plot(
            fpr,
            tpr,
            label=f"{fam} {m['roc_auc']:.2f} [{m['roc_auc_ci_low']:.2f}, {m['roc_auc_ci_high']:.2f}]",
        )
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(
        xlabel="1 - specificity",
        ylabel="sensitivity",
        title="Out-of-fold ROC (nested, patient-grouped CV)",
    )
    ax.legend(loc="lower right", fontsize=7, title="AUC [95% CI]", title_fontsize=7)
    fig.tight_layout()
    figs["roc"] = fig

    fig, ax = plt.subplots(figsize=(5, 5))
    for fam, fe in ev.families.items():
        prec, rec, _ = precision_recall_curve(y, fe.oof_mean)
        ax.step(rec, prec, where="post", label=fam)
    ax.axhline(y.mean(), ls=":", c="grey", label="prevalence")
    ax.set(
        xlabel="recall (sensitivity)",
        ylabel="precision",
        ylim=(0, 1.02),
        title="Out-of-fold precision-recall",
    )
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    figs["pr"] = fig

    fig, ax = plt.subplots(figsize=(5, 5))
    for fam, fe in ev.families.items():
        cal = calibration_table(y, fe.oof_mean)
        ax.plot(
            cal["mean_predicted"],
            cal["observed_fraction"],
            marker="o",
            label=f"{fam} (ECE {fe.metrics['ece']:.2f})",
        )
    ax.plot([0, 1], [0, 1], ls=":", c="grey")
    ax.set(
        xlabel="mean predicted probability",
        ylabel="observed responder fraction",
        xlim=(0, 1),
        ylim=(0, 1),
        title="Calibration (out-of-fold, 5 bins)",
    )
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    figs["calibration"] = fig

    imp = ev.families[ev.chosen].importance
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.3 * len(ev.features) + 1.5))
    axes[0].barh(
        imp["feature"][::-1], imp["auc_drop"][::-1], xerr=imp["auc_drop_sd"][::-1], color="tab:blue"
    )
    axes[0].set(
        xlabel="AUC drop when permuted (out-of-fold)", title=f"{ev.chosen}: permutation importance"
    )
    order = sorted(contrib, key=lambda k: contrib[k])
    axes[1].barh(order, [contrib[k] for k in order], color="tab:orange")
    kind = (
        "mean |SHAP| (log-odds)"
        if ev.chosen in ("xgboost", "random_forest")
        else "mean |contribution| (log-odds)"
    )
    axes[1].set(xlabel=kind, title="final model, training samples")
    fig.tight_layout()
    figs["importance"] = fig
    return figs
