"""Small-cohort-honest validation: pipelines per model family, patient-grouped nested cross-validation, permutation null, per-family evaluation."""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from blinaprofile.config import ModelSpec, TrainConfig, load_config
from blinaprofile.errors import ConfigError, ManifestError, ModelError, one_line
from blinaprofile.features.schema import MODEL_FEATURES
from blinaprofile.models.metrics import choose_threshold, permutation_pvalue, roc_auc, summarize

if TYPE_CHECKING:
    import pandas as pd


#: Bootstrap refits stored with a model for its probability interval (when the
#: training config has no ``uncertainty_models`` field).
DEFAULT_UNCERTAINTY_MODELS = 25
#: Shuffles per feature for out-of-fold permutation importance.
IMPORTANCE_SHUFFLES = 5
#: Keys of ``ModelSpec.params`` consumed by the pipeline rather than the classifier.
RESERVED_PARAMS = ("select_k",)


def load_train_config(path: str | os.PathLike[str] | None = None) -> TrainConfig:
    """The training configuration at ``path`` (default ``configs/train/default.yaml``).

    Raises
    ------
    ConfigError
        The file is invalid, including a hyper-parameter value the estimator refuses
        (``FILE: models.0.grid.clf__C: -1 is not valid: ...``), found before any fitting.
    """
    from blinaprofile.settings import settings

    source = path or settings.default_train
    config = load_config(TrainConfig, source)
    check_hyperparameters(config, source=source)
    return config


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
            # a feature with no observed value in a training set (e.g. a fold's annotator
            # has no TIM3 route) becomes a constant 0 column, which no model can use,
            # instead of being dropped with a warning per fit
            ("impute", SimpleImputer(strategy="median", keep_empty_features=True)),
            ("scale", StandardScaler()),
            ("select", select),
            ("clf", _classifier(spec, params, seed)),
        ]
    )


def check_hyperparameters(
    config: TrainConfig, *, source: str | os.PathLike[str] | None = None
) -> None:
    """Refuse, before any fitting, a hyper-parameter value an estimator would refuse.

    Every ``params`` value and every ``grid`` value is set, one at a time, on an unfitted
    pipeline of its family and checked by the estimators' own parameter validation
    (scikit-learn's constraints; XGBoost's by a one-round fit on four synthetic rows).

    Parameters
    ----------
    config
        The training configuration.
    source
        The YAML file it came from (named in the error).

    Raises
    ------
    ConfigError
        Naming the key: ``models.0.grid.clf__C: -1 is not valid: ...``.
    """
    n_features = len(config.features or MODEL_FEATURES)
    for i, spec in enumerate(config.models):
        _check_spec(spec, n_features, where=f"models.{i}", source=source)


def _check_spec(
    spec: ModelSpec,
    n_features: int,
    *,
    where: str,
    source: str | os.PathLike[str] | None = None,
) -> None:
    ks = list(spec.grid.get("select__k", []))
    if "select_k" in spec.params:
        ks.append(spec.params["select_k"])
    for k in ks:
        if k != "all" and not (isinstance(k, int) and 1 <= k <= n_features):
            raise ConfigError(
                f"{where} ({spec.family}): select k must be 'all' or an integer in "
                f"1..{n_features} (the number of features), got {k!r}",
                path=source,
            )
    values = {("params", k): [v] for k, v in spec.params.items() if k not in RESERVED_PARAMS}
    values.update({("grid", k): list(v) for k, v in spec.grid.items() if k != "select__k"})
    for (kind, key), candidates in values.items():
        for value in candidates:
            try:
                if kind == "params":
                    pipe = build_pipeline(spec.model_copy(update={"params": {key: value}}))
                else:
                    pipe = build_pipeline(spec).set_params(**{key: value})
                _validate_estimator(pipe)
            except (TypeError, ValueError) as err:  # sklearn's InvalidParameterError is both
                raise ConfigError(
                    f"{where}.{kind}.{key}: {value!r} is not valid for {spec.family}: "
                    f"{one_line(str(err))}",
                    path=source,
                ) from None


def _validate_estimator(est: Any) -> None:
    """Run an unfitted estimator's own parameter checks, and those of the ones it holds."""
    if est is None or isinstance(est, str):  # "passthrough"
        return
    steps = getattr(est, "steps", None)
    if isinstance(steps, list):
        for _, step in steps:
            _validate_estimator(step)
        return
    if type(est).__module__.startswith("xgboost"):
        from sklearn.base import clone

        X = np.array([[0.0, 1.0], [1.0, 0.0], [0.2, 0.9], [0.8, 0.1]])
        clone(est).set_params(n_estimators=1, n_jobs=1).fit(X, np.array([0, 1, 0, 1]))
        return
    if hasattr(est, "_parameter_constraints"):
        # scikit-learn's check run at the start of fit(), here without any data
        est._validate_params()
    for value in est.get_params(deep=False).values():
        if hasattr(value, "get_params") and hasattr(value, "fit"):
            _validate_estimator(value)


# --------------------------------------------------------------------------- nested CV
def _n_splits(y: np.ndarray, groups: np.ndarray, wanted: int) -> int:
    """Folds for stratified grouped CV: at most the patients with samples of the rarer class.

    A patient counts for every class among its samples, so designs whose label varies within
    a patient (each patient sampled in two states) are counted correctly.
    """
    counts = Counter(lab for _, lab in {(g, int(lab)) for g, lab in zip(groups, y, strict=True)})
    return min(wanted, counts.get(0, 0), counts.get(1, 0))


def label_design(y: np.ndarray, groups: np.ndarray) -> str:
    """Name the labelling design: ``one label per patient`` or ``labels vary within patients``."""
    per_patient = {(g, int(lab)) for g, lab in zip(groups, y, strict=True)}
    varying = len(per_patient) > len({g for g, _ in per_patient})
    return "labels vary within patients" if varying else "one label per patient"


#: Fold splits per (folds, seed, labels, patients). Splits are stratified on the labels, so
#: every labelling (each permutation) has its own; within one, all families share them.
_SPLITS: dict[tuple[int, int, bytes, bytes], list[tuple[np.ndarray, np.ndarray]]] = {}


def grouped_splits(
    y: np.ndarray, groups: np.ndarray, *, n_splits: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``StratifiedGroupKFold(n_splits, shuffle, seed)`` splits of ``(y, groups)``, memoised."""
    from sklearn.model_selection import StratifiedGroupKFold

    key = (n_splits, seed, np.ascontiguousarray(y).tobytes(), np.asarray(groups).tobytes())
    splits = _SPLITS.get(key)
    if splits is None:
        if len(_SPLITS) >= 256:
            _SPLITS.clear()
        cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        splits = list(cv.split(np.zeros(len(y)), y, groups))
        _SPLITS[key] = splits
    return splits


# --------------------------------------------------------------------------- fold features
@runtime_checkable
class FoldFeaturizer(Protocol):
    """Features with a learned, label-free state that must be learned inside each CV split.

    Flow features have no such state (each sample is gated on its own); single-cell features
    do (the annotator's thresholds, mixtures and rates are learned from a cohort's cells:
    :class:`blinaprofile.features.singlecell.FoldAnnotatorFeatures`).
    """

    def fold_features(self, train_ids: Sequence[str], sample_ids: Sequence[str]) -> pd.DataFrame:
        """Learn the state from the samples ``train_ids`` alone; the features of ``sample_ids``.

        Parameters
        ----------
        train_ids
            The samples of one outer training split: nothing else may inform the state.
        sample_ids
            The samples to featurize with that state (training and test samples).

        Returns
        -------
        DataFrame
            Indexed by sample id, with (at least) the model's feature columns.
        """
        ...


def split_key(train_rows: np.ndarray) -> bytes:
    """The key of a split in the per-split feature matrices: its sorted training rows."""
    return np.sort(np.asarray(train_rows, dtype=np.int64)).tobytes()


def outer_training_sets(
    labellings: Sequence[np.ndarray], groups: np.ndarray, config: TrainConfig
) -> list[np.ndarray]:
    """The distinct outer training rows the nested CV uses over ``labellings``, in order.

    Outer splits are stratified on the labels, so a permuted labelling generally has splits
    of its own; a training set shared by several labellings or repeats is listed once.
    """
    out: dict[bytes, np.ndarray] = {}
    for y in labellings:
        k = _n_splits(y, groups, config.outer_folds)
        if k < 2:
            continue  # the CV itself refuses it, with the reason
        for r in range(config.repeats):
            for tr, _ in grouped_splits(y, groups, n_splits=k, seed=config.seed + r):
                out.setdefault(split_key(tr), np.sort(tr))
    return list(out.values())


def _fold_matrices_chunk(
    featurizer: FoldFeaturizer,
    sample_ids: np.ndarray,
    features: list[str],
    train_sets: list[np.ndarray],
) -> list[np.ndarray]:
    """Per training set: the ``samples x features`` matrix from a state learned on it."""
    out = []
    ids = [str(s) for s in sample_ids]
    for tr in train_sets:
        table = featurizer.fold_features([ids[i] for i in tr], ids)
        missing = [f for f in features if f not in table.columns]
        absent = [s for s in ids if s not in table.index]
        if missing or absent:
            raise ModelError(
                f"the fold featurizer returned no column(s) {missing} / no row(s) {absent[:5]}"
            )
        out.append(table.loc[ids, features].to_numpy(dtype=float))
    return out


def fold_feature_matrices(
    featurizer: FoldFeaturizer,
    sample_ids: np.ndarray,
    features: list[str],
    train_sets: Sequence[np.ndarray],
    *,
    n_jobs: int = 1,
    on_fit: Callable[[str], None] | None = None,
) -> dict[bytes, np.ndarray]:
    """Every training set's feature matrix, keyed by :func:`split_key`.

    Each matrix holds all samples (rows as ``sample_ids``): the training rows featurized with
    the state learned on them, the others (the split's test samples) transformed with it.
    ``n_jobs > 1`` spreads the fits over worker processes (one featurizer copy per worker),
    through the same joblib pool as the permutation runs of :func:`evaluate`: these are
    CPU-bound model fits over whole cohorts, not the per-sample file work that
    :func:`blinaprofile.parallel.run_parallel` schedules with its timeouts.
    """
    if len(set(map(str, sample_ids))) != len(sample_ids):
        raise ModelError("per-fold featurization needs unique sample ids")
    sets = list(train_sets)
    jobs = max(1, min(n_jobs, len(sets)))
    if jobs == 1:
        mats = []
        for i, tr in enumerate(sets, start=1):
            mats += _fold_matrices_chunk(featurizer, sample_ids, features, [tr])
            if on_fit is not None:
                on_fit(f"fold features {i}/{len(sets)}")
    else:
        from joblib import Parallel, delayed

        chunks = [sets[j::jobs] for j in range(jobs)]
        runner = Parallel(n_jobs=jobs, return_as="generator")(
            delayed(_fold_matrices_chunk)(featurizer, sample_ids, features, c) for c in chunks
        )
        done: list[list[np.ndarray]] = []
        for res in runner:
            done.append(res)
            for _ in res:
                if on_fit is not None:
                    on_fit(f"fold features {sum(map(len, done))}/{len(sets)}")
        by_chunk = [iter(d) for d in done]
        mats = [next(by_chunk[i % jobs]) for i in range(len(sets))]
    return {split_key(tr): m for tr, m in zip(sets, mats, strict=True)}


def fit_with_params(pipe: Any, params: dict[str, Any], X: np.ndarray, y: np.ndarray) -> Any:
    from sklearn.base import clone

    return clone(pipe).set_params(**params).fit(X, y)


def tune(
    spec: ModelSpec,
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    inner_folds: int,
    seed: int,
    need_oof: bool,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Pick hyper-parameters by inner grouped CV (pooled OOF AUC); return them and their OOF.

    The leading pipeline steps no grid key touches (imputer, scaler...) are fitted once per
    inner split and shared by all grid points: the same fits the full pipeline would repeat.
    """
    from sklearn.base import clone
    from sklearn.model_selection import ParameterGrid
    from sklearn.pipeline import Pipeline

    candidates: list[dict[str, Any]] = list(ParameterGrid(spec.grid)) if spec.grid else [{}]
    k = _n_splits(y, groups, inner_folds)
    if k < 2 or (len(candidates) == 1 and not need_oof):
        return candidates[0], None
    pipe = build_pipeline(spec, seed=seed)
    splits = grouped_splits(y, groups, n_splits=k, seed=seed)
    tuned = {key.split("__", 1)[0] for cand in candidates for key in cand}
    last = len(pipe.steps) - 1
    n_fixed = next(i for i, (name, _) in enumerate(pipe.steps) if name in tuned or i == last)
    tail = Pipeline(pipe.steps[n_fixed:])
    folds: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for tr, te in splits:
        if n_fixed:
            head = clone(Pipeline(pipe.steps[:n_fixed]))
            folds.append((tr, te, head.fit_transform(X[tr], y[tr]), head.transform(X[te])))
        else:
            folds.append((tr, te, X[tr], X[te]))
    best: tuple[float, dict[str, Any], np.ndarray | None] = (-np.inf, candidates[0], None)
    for cand in candidates:
        oof = np.full(len(y), np.nan)
        for tr, te, Xtr_t, Xte_t in folds:
            oof[te] = fit_with_params(tail, cand, Xtr_t, y[tr]).predict_proba(Xte_t)[:, 1]
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
    on_fold: Callable[[str], None] | None = None,
    fold_X: Mapping[bytes, np.ndarray] | None = None,
) -> _CVRun:
    """One family's nested CV; ``fold_X`` (:func:`fold_feature_matrices`) replaces ``X``
    in each outer split by the features whose state was learned on its training rows."""
    from threadpoolctl import threadpool_limits

    n, d = X.shape
    k = _n_splits(y, groups, config.outer_folds)
    if k < 2:
        raise ModelError(
            "cross-validation needs at least 2 patients of each class (patients with samples "
            "of that class); "
            f"got {_n_splits(y, groups, 10**6)} in the rarer class "
            f"({len(y)} samples, {int(np.sum(y == 1))} labelled 1, {int(np.sum(y == 0))} "
            f"labelled 0; design: {label_design(y, groups)})"
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
            splits = grouped_splits(y, groups, n_splits=k, seed=config.seed + r)
            for fold, (tr, te) in enumerate(splits, start=1):
                Xf = X if fold_X is None else fold_X[split_key(tr)]
                cand, inner_oof = tune(
                    spec,
                    Xf[tr],
                    y[tr],
                    groups[tr],
                    inner_folds=config.inner_folds,
                    seed=config.seed + r,
                    need_oof=need_oof,
                )
                model = fit_with_params(
                    build_pipeline(spec, seed=config.seed + r), cand, Xf[tr], y[tr]
                )
                oof[r, te] = model.predict_proba(Xf[te])[:, 1]
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
                    Xte = Xf[te]
                    stack = np.repeat(Xte[None, None], d * IMPORTANCE_SHUFFLES, axis=0).reshape(
                        d, IMPORTANCE_SHUFFLES, len(te), d
                    )
                    for j in range(d):
                        for s in range(IMPORTANCE_SHUFFLES):
                            stack[j, s, :, j] = Xte[rng.permutation(len(te)), j]
                    p = model.predict_proba(stack.reshape(-1, d))[:, 1]
                    perm_oof[r][:, :, te] = p.reshape(d, IMPORTANCE_SHUFFLES, len(te))
                if on_fold is not None:
                    on_fold(f"{spec.family} repeat {r + 1}/{R} fold {fold}/{k}")
    return _CVRun(oof, calls, thresholds, params, perm_oof)


def permuted_labels(y: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Permute labels as the design allows.

    One label per patient: labels are permuted between *patients* (all samples of a patient
    keep one label). Labels varying within patients (each patient sampled in several
    states): each such patient's labels are shuffled among its own samples, and the labels of
    single-label patients are permuted between those patients.
    """
    uniq, first, inv = np.unique(groups, return_index=True, return_inverse=True)
    lo = np.full(len(uniq), 1, dtype=int)
    hi = np.zeros(len(uniq), dtype=int)
    np.minimum.at(lo, inv, y)
    np.maximum.at(hi, inv, y)
    varying = lo != hi
    if not varying.any():
        lab = y[first]
        return lab[rng.permutation(len(uniq))][inv]
    out = y.copy()
    fixed = np.flatnonzero(~varying)
    pat_lab = lo.copy()
    pat_lab[fixed] = pat_lab[fixed][rng.permutation(len(fixed))]
    single = ~varying[inv]
    out[single] = pat_lab[inv[single]]
    for p in np.flatnonzero(varying):
        idx = np.flatnonzero(inv == p)
        out[idx] = y[idx][rng.permutation(len(idx))]
    return out


def _null_aucs(
    specs: list[ModelSpec],
    X: np.ndarray,
    y_perm: np.ndarray,
    groups: np.ndarray,
    config: TrainConfig,
    fold_X: Mapping[bytes, np.ndarray] | None = None,
) -> list[float]:
    """The AUC of the whole procedure of every family on one permuted labelling.

    The families share the fold splits of the labelling (:func:`grouped_splits`) and, with
    ``fold_X``, the features of each split's training set (learned on it alone). Estimator
    parameters were validated by the run on the real labels, so scikit-learn's per-fit
    parameter validation is skipped here; everything else is the identical procedure.
    """
    import sklearn

    with sklearn.config_context(skip_parameter_validation=True):
        runs = [
            _run_cv(s, X, y_perm, groups, config, importance=False, fold_X=fold_X) for s in specs
        ]
    return [float(np.nanmean([roc_auc(y_perm, o) for o in run.oof])) for run in runs]


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
        :data:`~blinaprofile.models.metrics.METRIC_NAMES` with ``_ci_low``/``_ci_high``, plus
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
    """Nested-CV validation of every configured family on one feature table.

    ``X`` is the feature table given (what the final model is fitted on). With a
    :class:`FoldFeaturizer` each outer split used its own features instead:
    ``fold_fits_cv`` states were learned for the real labels' outer training splits and
    ``fold_fits_permutations`` more for training splits met only in permuted runs
    (both 0 without a featurizer).
    """

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
    fold_fits_cv: int = 0
    fold_fits_permutations: int = 0

    @property
    def per_fold_features(self) -> bool:
        """Whether the CV learned the feature state inside each outer training split."""
        return self.fold_fits_cv > 0

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
    from blinaprofile.settings import settings

    return max(1, int(settings.n_jobs))


def evaluate(
    table: pd.DataFrame,
    *,
    config: TrainConfig | None = None,
    config_path: str | os.PathLike[str] | None = None,
    n_jobs: int | None = None,
    on_step: Callable[[int, str], None] | None = None,
    featurizer: FoldFeaturizer | None = None,
) -> Evaluation:
    """Validate every configured family by nested CV, with CIs and permutation p-values.

    Parameters
    ----------
    table
        Feature table with ``response`` (1/0), ``patient_id`` and the feature columns.
        Its usable rows (see :func:`prepare_training_data`) are the samples validated.
    config, config_path
        Training configuration (default ``configs/train/default.yaml``).
    n_jobs
        Worker processes for families and permutations (default ``settings.n_jobs``).
    on_step
        Progress: called as ``on_step(total, what)`` after each outer fold of each family
        and each permutation when they run in this process, after each family and each
        permutation when they run in worker processes (``total``: the steps of the run).
    featurizer
        Features whose state is learned from samples (the single-cell annotator): the
        state is learned again inside each outer training split, from its samples alone,
        and that split's training and test samples are featurized with it; the inner
        model selection and the outer test scoring use those features. ``table`` needs a
        unique ``sample_id`` per row. ``None``: every split uses ``table`` (flow features,
        which have no learned state).

    Notes
    -----
    The permutation test permutes labels between patients ``config.n_permutations`` times
    and re-runs the complete nested procedure (tuning, threshold) for every family on each
    permutation; the same permutations serve all families, so the p-value of the chosen
    family can be adjusted for the choice (``selection_pvalue``: the null distribution is
    the best family's AUC on each permutation).

    With a ``featurizer``, a permuted run learns the feature state inside each of *its*
    outer training splits, exactly as the run on the real labels does, so the null
    distribution is that of the identical procedure. The state uses no labels: the
    features of a training set depend only on which samples it holds, so they are
    computed once per distinct outer training set and reused by every family, repeat and
    permuted labelling whose split has that training set (a recomputation would give the
    same numbers). Inside an outer split, the inner CV that tunes hyper-parameters and
    the threshold uses the outer split's features (its inner validation samples informed
    that state, as they do in every permuted run too); the outer test samples never
    inform it.
    """
    from joblib import Parallel, delayed

    if config is None:
        config = load_train_config(config_path)
    features = list(config.features or MODEL_FEATURES)
    fams = [s.family for s in config.models]
    dup = sorted({f for f in fams if fams.count(f) > 1})
    if dup:
        raise ConfigError(f"models: family listed more than once: {dup}")
    check_hyperparameters(config, source=config_path)
    X, y, groups, usable, n_dropped = prepare_training_data(table, features)
    Xa = X.to_numpy(dtype=float)
    rng = np.random.default_rng(config.seed + 104729)
    perms = [permuted_labels(y, groups, rng) for _ in range(config.n_permutations)]
    jobs = n_jobs or _n_jobs()
    specs = list(config.models)
    sample_ids = (
        usable["sample_id"].astype(str).to_numpy()
        if "sample_id" in usable.columns
        else np.array([f"row{i}" for i in range(len(y))])
    )
    fold_X: dict[bytes, np.ndarray] | None = None
    n_fits_cv = n_fits_perm = 0
    k = _n_splits(y, groups, config.outer_folds)
    workers = jobs > 1 and bool(perms)
    # progress steps: fold fits, then folds (or, in workers, families) and permutations
    steps = len(specs) + len(perms) if workers else len(specs) * config.repeats * k + len(perms)
    if featurizer is not None:
        if "sample_id" not in usable.columns:
            raise ModelError("per-fold featurization needs a sample_id column")
        real = outer_training_sets([y], groups, config)
        every = outer_training_sets([y, *perms], groups, config)
        n_fits_cv, n_fits_perm = len(real), len(every) - len(real)
        steps += len(every)
        fits_done = None if on_step is None else functools.partial(on_step, steps)
        # like the permutations: worker processes only when a permutation test runs
        fold_X = fold_feature_matrices(
            featurizer, sample_ids, features, every, n_jobs=jobs if workers else 1, on_fit=fits_done
        )
    tasks = [
        delayed(_run_cv)(s, Xa, y, groups, config, importance=True, fold_X=fold_X) for s in specs
    ]
    tasks += [delayed(_null_aucs)(specs, Xa, yp, groups, config, fold_X) for yp in perms]
    # worker processes pay off only for permutation tests (each worker re-imports the stack)
    out: list[Any] = []
    if workers:
        names = [f"{s.family} cross-validated" for s in specs]
        names += [f"permutation {i + 1}/{len(perms)}" for i in range(len(perms))]
        runner = Parallel(n_jobs=min(jobs, len(tasks)), return_as="generator")(tasks)
        for name, res in zip(names, runner, strict=True):
            out.append(res)
            if on_step is not None:
                on_step(steps, name)
    else:
        total = steps
        fold_done = None if on_step is None else functools.partial(on_step, total)
        for i, (fn, args, kwargs) in enumerate(tasks):
            if i < len(specs):
                out.append(fn(*args, **kwargs, on_fold=fold_done))
                continue
            out.append(fn(*args, **kwargs))
            if on_step is not None:
                on_step(total, f"permutation {i - len(specs) + 1}/{len(perms)}")
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
        fold_fits_cv=n_fits_cv,
        fold_fits_permutations=n_fits_perm,
    )
