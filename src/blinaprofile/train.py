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

from .config import ModelSpec, TrainConfig, load_config
from .errors import ConfigError, ManifestError, ModelError
from .metrics import choose_threshold, permutation_pvalue, roc_auc, summarize
from .schema import MODEL_FEATURES, SCHEMA_VERSION

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEFAULT_UNCERTAINTY_MODELS",
    "Evaluation",
    "FamilyEvaluation",
    "TrainResult",
    "build_pipeline",
    "choose_threshold",
    "cross_validate",
    "evaluate",
    "load_train_config",
    "prepare_training_data",
    "train",
]

#: Bootstrap refits stored with a model for its probability interval (when the
#: training config has no ``uncertainty_models`` field).
DEFAULT_UNCERTAINTY_MODELS = 25
#: Shuffles per feature for out-of-fold permutation importance.
IMPORTANCE_SHUFFLES = 5
#: Keys of ``ModelSpec.params`` consumed by the pipeline rather than the classifier.
RESERVED_PARAMS = ("select_k",)


def load_train_config(path: str | os.PathLike[str] | None = None) -> TrainConfig:
    """The training configuration at ``path`` (default ``configs/train/default.yaml``)."""
    from .settings import settings

    return load_config(TrainConfig, path or settings.default_train)


# --------------------------------------------------------------------------- pipelines
def _classifier(spec: ModelSpec, params: dict[str, Any], seed: int) -> Any:
    fam = spec.family
    if fam.startswith("logreg"):
        from sklearn.linear_model import LogisticRegression

        base: dict[str, Any] = {"C": 0.3, "max_iter": 5000}
        if fam == "logreg_l2":
            base.update(l1_ratio=0.0, solver="lbfgs")
        elif fam == "logreg_l1":
            base.update(l1_ratio=1.0, solver="liblinear")
        else:
            base.update(l1_ratio=0.5, solver="saga", random_state=seed)
        base.update(params)
        return LogisticRegression(**base)
    if fam == "random_forest":
        from sklearn.ensemble import RandomForestClassifier

        base = {"n_estimators": 200, "min_samples_leaf": 3, "random_state": seed, "n_jobs": 1}
        base.update(params)
        return RandomForestClassifier(**base)
    if fam == "xgboost":
        from xgboost import XGBClassifier

        base = {
            "n_estimators": 100,
            "max_depth": 2,
            "learning_rate": 0.1,
            "subsample": 0.8,
            "colsample_bytree": 0.8,
            "random_state": seed,
            "n_jobs": 1,
            "eval_metric": "logloss",
            "verbosity": 0,
        }
        base.update(params)
        return XGBClassifier(**base)
    if fam == "linear_svm":
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import LinearSVC

        base = {"C": 0.1, "max_iter": 20000}
        base.update(params)
        return CalibratedClassifierCV(LinearSVC(**base), method="sigmoid", cv=3)
    raise ModelError(f"unknown model family {fam!r}")  # pragma: no cover - config forbids it


def build_pipeline(spec: ModelSpec, *, seed: int = 0) -> Any:
    """The Pipeline of a model family: impute (median) -> scale -> [select] -> classifier.

    ``spec.params`` go to the classifier, except ``select_k`` (int or ``"all"``), which adds
    a univariate ANOVA-F :class:`~sklearn.feature_selection.SelectKBest` step. A grid key
    ``select__k`` adds the step too (tuned inside CV like any hyper-parameter). Linear SVM
    hyper-parameters sit under ``clf__estimator__`` (the SVM is wrapped in a sigmoid
    :class:`~sklearn.calibration.CalibratedClassifierCV`).
    """
    from sklearn.feature_selection import SelectKBest, f_classif
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    params = {k: v for k, v in spec.params.items() if k not in RESERVED_PARAMS}
    select_k = spec.params.get("select_k")
    wants_select = select_k is not None or any(k.startswith("select__") for k in spec.grid)
    select: Any = (
        SelectKBest(f_classif, k=select_k if select_k is not None else "all")
        if wants_select
        else "passthrough"
    )
    return Pipeline(
        [
            ("impute", SimpleImputer(strategy="median")),
            ("scale", StandardScaler()),
            ("select", select),
            ("clf", _classifier(spec, params, seed)),
        ]
    )


def _check_spec(spec: ModelSpec, n_features: int) -> None:
    ks = list(spec.grid.get("select__k", []))
    if "select_k" in spec.params:
        ks.append(spec.params["select_k"])
    for k in ks:
        if k != "all" and not (isinstance(k, int) and 1 <= k <= n_features):
            raise ConfigError(
                f"models.{spec.family}: select k must be 'all' or an integer in 1..{n_features} "
                f"(the number of features), got {k!r}"
            )
    try:
        pipe = build_pipeline(spec)
        from sklearn.model_selection import ParameterGrid

        for cand in ParameterGrid(spec.grid) if spec.grid else [{}]:
            pipe.set_params(**cand)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"models.{spec.family}: {err}") from None


# --------------------------------------------------------------------------- nested CV
def _n_splits(y: np.ndarray, groups: np.ndarray, wanted: int) -> int:
    """Folds for stratified grouped CV: at most the patients of the rarer class."""
    pat_label: dict[Any, int] = {}
    for g, lab in zip(groups, y, strict=True):
        pat_label.setdefault(g, int(lab))
    counts = Counter(pat_label.values())
    return min(wanted, counts.get(0, 0), counts.get(1, 0))


def _fit(pipe: Any, params: dict[str, Any], X: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.base import clone

    return clone(pipe).set_params(**params).fit(X, y)


def _tune(
    spec: ModelSpec,
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    inner_folds: int,
    seed: int,
    need_oof: bool,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Pick hyper-parameters by inner grouped CV (pooled OOF AUC); return them and their OOF."""
    from sklearn.model_selection import ParameterGrid, StratifiedGroupKFold

    candidates: list[dict[str, Any]] = list(ParameterGrid(spec.grid)) if spec.grid else [{}]
    k = _n_splits(y, groups, inner_folds)
    if k < 2 or (len(candidates) == 1 and not need_oof):
        return candidates[0], None
    pipe = build_pipeline(spec, seed=seed)
    splits = list(
        StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y, groups)
    )
    best: tuple[float, dict[str, Any], np.ndarray | None] = (-np.inf, candidates[0], None)
    for cand in candidates:
        oof = np.full(len(y), np.nan)
        for tr, te in splits:
            oof[te] = _fit(pipe, cand, X[tr], y[tr]).predict_proba(X[te])[:, 1]
        score = roc_auc(y, oof)
        if np.isfinite(score) and score > best[0] + 1e-12:
            best = (score, cand, oof)
    return best[1], best[2]


@dataclass
class _CVRun:
    oof: np.ndarray  # repeats x samples
    calls: np.ndarray  # repeats x samples (bool)
    thresholds: list[float]
    params: list[dict[str, Any]]
    perm_oof: np.ndarray | None  # repeats x features x shuffles x samples


def _run_cv(
    spec: ModelSpec,
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    config: TrainConfig,
    *,
    importance: bool,
) -> _CVRun:
    from sklearn.model_selection import StratifiedGroupKFold
    from threadpoolctl import threadpool_limits

    n, d = X.shape
    k = _n_splits(y, groups, config.outer_folds)
    if k < 2:
        raise ModelError(
            "cross-validation needs at least 2 patients of each class; "
            f"got {_n_splits(y, groups, 10**6)} in the rarer class"
        )
    need_oof = config.threshold.rule != "fixed"
    R = config.repeats
    oof = np.full((R, n), np.nan)
    calls = np.zeros((R, n), dtype=bool)
    thresholds: list[float] = []
    params: list[dict[str, Any]] = []
    perm_oof = np.full((R, d, IMPORTANCE_SHUFFLES, n), np.nan) if importance else None
    rng = np.random.default_rng(config.seed + 7919)
    with threadpool_limits(limits=1):
        for r in range(R):
            outer = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=config.seed + r)
            for tr, te in outer.split(X, y, groups):
                cand, inner_oof = _tune(
                    spec,
                    X[tr],
                    y[tr],
                    groups[tr],
                    inner_folds=config.inner_folds,
                    seed=config.seed + r,
                    need_oof=need_oof,
                )
                model = _fit(build_pipeline(spec, seed=config.seed + r), cand, X[tr], y[tr])
                oof[r, te] = model.predict_proba(X[te])[:, 1]
                if inner_oof is not None:
                    t = choose_threshold(
                        y[tr], inner_oof, rule=config.threshold.rule, value=config.threshold.value
                    )
                else:
                    t = config.threshold.value if not need_oof else 0.5
                calls[r, te] = oof[r, te] >= t
                thresholds.append(float(t))
                params.append(cand)
                if perm_oof is not None:
                    Xte = X[te]
                    stack = np.repeat(Xte[None, None], d * IMPORTANCE_SHUFFLES, axis=0).reshape(
                        d, IMPORTANCE_SHUFFLES, len(te), d
                    )
                    for j in range(d):
                        for s in range(IMPORTANCE_SHUFFLES):
                            stack[j, s, :, j] = Xte[rng.permutation(len(te)), j]
                    p = model.predict_proba(stack.reshape(-1, d))[:, 1]
                    perm_oof[r][:, :, te] = p.reshape(d, IMPORTANCE_SHUFFLES, len(te))
    return _CVRun(oof, calls, thresholds, params, perm_oof)


def _permuted_labels(y: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute labels between *patients* (all samples of a patient keep one label)."""
    uniq, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    lab = y[first]
    return lab[rng.permutation(len(uniq))][inv]


def _null_auc(
    spec: ModelSpec,
    X: np.ndarray,
    y_perm: np.ndarray,
    groups: np.ndarray,
    config: TrainConfig,
) -> float:
    run = _run_cv(spec, X, y_perm, groups, config, importance=False)
    return float(np.nanmean([roc_auc(y_perm, o) for o in run.oof]))


# --------------------------------------------------------------------------- results
@dataclass
class FamilyEvaluation:
    """Validation of one model family.

    Attributes
    ----------
    oof, calls
        Out-of-fold probabilities and calls (``repeats x samples``).
    fold_thresholds, fold_params
        Threshold and hyper-parameters chosen inside each outer training split.
    metrics
        :data:`~blinaprofile.metrics.METRIC_NAMES` with ``_ci_low``/``_ci_high``, plus
        ``threshold`` (median of the fold thresholds), ``auc_sd_repeats``, ``perm_pvalue``
        and ``n_permutations``.
    importance
        Out-of-fold permutation importance: per feature, mean AUC drop and its SD over repeats.
    null_auc
        AUCs of the procedure on permuted labels.
    """

    family: str
    spec: ModelSpec
    oof: np.ndarray
    calls: np.ndarray
    fold_thresholds: list[float]
    fold_params: list[dict[str, Any]]
    metrics: dict[str, float]
    importance: pd.DataFrame
    null_auc: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def oof_mean(self) -> np.ndarray:
        """Out-of-fold probability per sample, averaged over repeats."""
        return np.nanmean(self.oof, axis=0)

    @property
    def auc(self) -> float:
        return self.metrics["roc_auc"]

    def common_params(self) -> dict[str, Any]:
        """The hyper-parameter values chosen most often across outer folds."""
        out: dict[str, Any] = {}
        keys = {k for p in self.fold_params for k in p}
        for k in sorted(keys):
            vals = Counter(json.dumps(p.get(k), default=str) for p in self.fold_params)
            out[k] = json.loads(vals.most_common(1)[0][0])
        return out


@dataclass
class Evaluation:
    """Nested-CV validation of every configured family on one feature table."""

    features: list[str]
    X: pd.DataFrame
    y: np.ndarray
    groups: np.ndarray
    sample_ids: np.ndarray
    families: dict[str, FamilyEvaluation]
    chosen: str
    selection_pvalue: float
    config: TrainConfig
    n_dropped: int = 0

    @property
    def metrics(self) -> dict[str, dict[str, float]]:
        return {f: e.metrics for f, e in self.families.items()}

    def leaderboard(self) -> pd.DataFrame:
        """One row per family, best first: metrics, CIs, permutation p-value."""
        import pandas as pd

        rows = []
        for fam, ev in self.families.items():
            row: dict[str, Any] = {"family": fam, "chosen": fam == self.chosen}
            row.update(ev.metrics)
            rows.append(row)
        df = pd.DataFrame(rows)
        asc = self.config.select_by == "brier"
        return df.sort_values(self.config.select_by, ascending=asc).reset_index(drop=True)


def prepare_training_data(
    table: pd.DataFrame, features: list[str]
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, pd.DataFrame, int]:
    """Usable rows of a feature table: ``X, y, groups, usable_rows, n_dropped``.

    Rows with an ``error``, failing ``qc_pass`` or without a ``response`` are dropped.
    """
    missing = [f for f in [*features, "response", "patient_id"] if f not in table.columns]
    if missing:
        raise ManifestError(f"feature table lacks column(s) {missing}")
    usable = table.copy()
    n_in = len(usable)
    if "error" in usable.columns:
        usable = usable[usable["error"].fillna("").astype(str) == ""]
    if "qc_pass" in usable.columns:
        usable = usable[usable["qc_pass"].fillna(False).astype(bool)]
    usable = usable[usable["response"].notna()].reset_index(drop=True)
    if usable["response"].nunique() < 2:
        raise ModelError("training needs both responders and nonresponders among usable samples")
    X = usable[features].astype(float)
    if X.isna().all().any():
        empty = [c for c in features if X[c].isna().all()]
        raise ModelError(f"feature(s) {empty} are missing in every usable sample")
    y = usable["response"].astype(int).to_numpy()
    groups = usable["patient_id"].astype(str).to_numpy()
    return X, y, groups, usable, n_in - len(usable)


def cross_validate(
    X: pd.DataFrame | np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    spec: ModelSpec,
    config: TrainConfig,
    *,
    importance: bool = True,
    features: list[str] | None = None,
) -> FamilyEvaluation:
    """Nested, repeated, patient-grouped, stratified CV of one family (no permutation test).

    Returns out-of-fold probabilities and calls, fold thresholds and parameters, metrics
    with bootstrap CIs and out-of-fold permutation importance.
    """
    import pandas as pd

    names = list(X.columns) if isinstance(X, pd.DataFrame) else list(features or [])
    Xa = np.asarray(X, dtype=float)
    if not names:
        names = [f"x{j}" for j in range(Xa.shape[1])]
    y = np.asarray(y).astype(int)
    groups = np.asarray(groups).astype(str)
    run = _run_cv(spec, Xa, y, groups, config, importance=importance)
    return _family_result(spec, run, y, groups, config, names)


def _family_result(
    spec: ModelSpec,
    run: _CVRun,
    y: np.ndarray,
    groups: np.ndarray,
    config: TrainConfig,
    names: list[str],
) -> FamilyEvaluation:
    import pandas as pd

    metrics = summarize(
        y, run.oof, run.calls, groups, n_bootstrap=config.n_bootstrap, seed=config.seed
    )
    aucs = [roc_auc(y, o) for o in run.oof]
    metrics["auc_sd_repeats"] = float(np.std(aucs))
    metrics["threshold"] = float(np.median(run.thresholds))
    if run.perm_oof is not None:
        drops = np.array(
            [
                [
                    aucs[r]
                    - np.mean(
                        [roc_auc(y, run.perm_oof[r, j, s]) for s in range(run.perm_oof.shape[2])]
                    )
                    for j in range(len(names))
                ]
                for r in range(run.oof.shape[0])
            ]
        )
        imp = pd.DataFrame(
            {"feature": names, "auc_drop": drops.mean(axis=0), "auc_drop_sd": drops.std(axis=0)}
        ).sort_values("auc_drop", ascending=False, ignore_index=True)
    else:
        imp = pd.DataFrame(columns=["feature", "auc_drop", "auc_drop_sd"])
    return FamilyEvaluation(
        family=spec.family,
        spec=spec,
        oof=run.oof,
        calls=run.calls,
        fold_thresholds=run.thresholds,
        fold_params=run.params,
        metrics=metrics,
        importance=imp,
    )


def _n_jobs() -> int:
    from .settings import settings

    return max(1, int(settings.n_jobs))


def evaluate(
    table: pd.DataFrame,
    *,
    config: TrainConfig | None = None,
    config_path: str | os.PathLike[str] | None = None,
    n_jobs: int | None = None,
) -> Evaluation:
    """Validate every configured family by nested CV, with CIs and permutation p-values.

    Parameters
    ----------
    table
        Feature table with ``response`` (1/0), ``patient_id`` and the feature columns.
    config, config_path
        Training configuration (default ``configs/train/default.yaml``).
    n_jobs
        Worker processes for families and permutations (default ``settings.n_jobs``).

    Notes
    -----
    The permutation test permutes labels between patients ``config.n_permutations`` times
    and re-runs the complete nested procedure (tuning, threshold) for every family on each
    permutation; the same permutations serve all families, so the p-value of the chosen
    family can be adjusted for the choice (``selection_pvalue``: the null distribution is
    the best family's AUC on each permutation).
    """
    from joblib import Parallel, delayed

    if config is None:
        config = load_train_config(config_path)
    features = list(config.features or MODEL_FEATURES)
    fams = [s.family for s in config.models]
    dup = sorted({f for f in fams if fams.count(f) > 1})
    if dup:
        raise ConfigError(f"models: family listed more than once: {dup}")
    for spec in config.models:
        _check_spec(spec, len(features))
    X, y, groups, usable, n_dropped = prepare_training_data(table, features)
    Xa = X.to_numpy(dtype=float)
    rng = np.random.default_rng(config.seed + 104729)
    perms = [_permuted_labels(y, groups, rng) for _ in range(config.n_permutations)]
    jobs = n_jobs or _n_jobs()
    tasks = [delayed(_run_cv)(s, Xa, y, groups, config, importance=True) for s in config.models]
    tasks += [delayed(_null_auc)(s, Xa, yp, groups, config) for yp in perms for s in config.models]
    # worker processes pay off only for permutation tests (each worker re-imports the stack)
    if jobs > 1 and perms:
        out = Parallel(n_jobs=min(jobs, len(tasks)))(tasks)
    else:
        out = [fn(*args, **kwargs) for fn, args, kwargs in tasks]
    runs: list[_CVRun] = out[: len(config.models)]
    null = np.array(out[len(config.models) :], dtype=float).reshape(len(perms), len(fams))
    families: dict[str, FamilyEvaluation] = {}
    for i, (spec, run) in enumerate(zip(config.models, runs, strict=True)):
        ev = _family_result(spec, run, y, groups, config, features)
        ev.null_auc = null[:, i]
        ev.metrics["n_permutations"] = float(len(perms))
        ev.metrics["perm_pvalue"] = (
            permutation_pvalue(ev.metrics["roc_auc"], null[:, i]) if perms else float("nan")
        )
        families[spec.family] = ev
    if config.select_by == "roc_auc":
        chosen = max(families, key=lambda f: families[f].metrics["roc_auc"])
    else:
        chosen = min(families, key=lambda f: families[f].metrics["brier"])
    sel_p = (
        permutation_pvalue(families[chosen].metrics["roc_auc"], np.nanmax(null, axis=1))
        if perms
        else float("nan")
    )
    sample_ids = (
        usable["sample_id"].astype(str).to_numpy()
        if "sample_id" in usable.columns
        else np.array([f"row{i}" for i in range(len(y))])
    )
    return Evaluation(
        features=features,
        X=X,
        y=y,
        groups=groups,
        sample_ids=sample_ids,
        families=families,
        chosen=chosen,
        selection_pvalue=sel_p,
        config=config,
        n_dropped=n_dropped,
    )


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
            models.append(_fit(pipe, params, X.iloc[idx], y[idx]))
    return models


def _training_stats(X: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per-feature cohort statistics for out-of-distribution checks (on :func:`ood_scale`)."""
    from .schema import ood_scale, to_ood_scale

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


def _git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
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


def _final_model(
    ev: Evaluation, spec: ModelSpec, config: TrainConfig
) -> tuple[Any, dict[str, Any], float, list[Any]]:
    from threadpoolctl import threadpool_limits

    Xa = ev.X.to_numpy(dtype=float)
    with threadpool_limits(limits=1):
        params, inner_oof = _tune(
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
        final = _fit(build_pipeline(spec, seed=config.seed), params, ev.X, ev.y)
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
    from .model import global_contributions, save_model
    from .settings import settings

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
    run_id, version = _log_run(
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


# --------------------------------------------------------------------------- MLflow
def _metric_batch(values: dict[str, float], ts: int) -> list[Any]:
    from mlflow.entities import Metric

    return [Metric(k, float(v), ts, 0) for k, v in values.items() if np.isfinite(v)]


def _log_batch(client: Any, run_id: str, metrics: list[Any]) -> None:
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _log_run(
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

    from .model import log_model

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

    from .metrics import calibration_table

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
