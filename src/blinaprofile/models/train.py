"""Training with small-cohort-honest validation, tracked in MLflow, promoted only on evidence.

Design (see ``docs/models.md``)
-------------------------------
- Every candidate is one scikit-learn Pipeline from the feature table to probabilities:
  median imputation -> standardisation -> optional univariate feature selection
  (``params: {select_k: K}`` or ``grid: {select__k: [...]}``) -> classifier.
- Validation is **nested, repeated, patient-grouped, stratified** K-fold
  (:func:`blinaprofile.models.validation.evaluate`): all samples of a patient stay on one
  side of every split, whatever their labels. Inside each outer training split an inner
  grouped CV picks the hyper-parameters and the decision threshold.
- Metrics come with patient-bootstrap 95% CIs; a label-permutation test re-runs the *whole*
  procedure on permuted labels and gives a p-value per family plus one adjusted for picking
  the best family.
- The chosen family is tuned on all samples the same way, refit, given bootstrap refits for
  a probability interval, packaged as an MLflow pyfunc, logged with a model card, and
  registered. It takes the serving alias (``config.alias``, e.g. ``champion``) only when
  the evidence meets ``config.promotion`` (default: CV AUC 95% CI lower bound above 0.5 and
  permutation p below 0.05) and the alias was not set by hand; otherwise it is registered
  under ``config.promotion.candidate_alias``.

:func:`blinaprofile.models.validation.evaluate` is the validation alone (no MLflow);
:func:`train` is everything.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from blinaprofile.config import ModelSpec, PromotionRule, TrainConfig
from blinaprofile.errors import ManifestError
from blinaprofile.features.schema import SCHEMA_VERSION
from blinaprofile.models.metrics import choose_threshold
from blinaprofile.models.tracking import (
    AliasOutcome,
    CohortInfo,
    assign_alias,
    describe_registered_model,
    git_commit,
    headline_table,
    log_run,
    model_card,
)
from blinaprofile.models.validation import (
    DEFAULT_UNCERTAINTY_MODELS,
    Evaluation,
    FoldFeaturizer,
    build_pipeline,
    evaluate,
    fit_with_params,
    load_train_config,
    tune,
)

if TYPE_CHECKING:
    import pandas as pd

    from blinaprofile.annotate.estimator import TCellAnnotator

__all__ = ["TrainResult", "cv_annotator_notes", "promotion_failures", "select_timepoint", "train"]


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
    on_fit: Callable[[int, str], None] | None = None,
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
            if on_fit is not None:
                on_fit(1 + n, f"bootstrap refit {len(models)}/{n}")
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


def _final_model(
    ev: Evaluation,
    spec: ModelSpec,
    config: TrainConfig,
    *,
    on_fit: Callable[[int, str], None] | None = None,
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
    if on_fit is not None:
        on_fit(1 + n_unc, "tuned and fitted")
    refits = (
        _bootstrap_refits(
            spec, params, ev.X, ev.y, ev.groups, n=n_unc, seed=config.seed, on_fit=on_fit
        )
        if n_unc > 0
        else []
    )
    return final, params, float(threshold), refits


def cv_annotator_notes(ev: Evaluation) -> dict[str, Any]:
    """How the CV of ``ev`` fitted the single-cell annotator, for ``meta.json``.

    Returns
    -------
    dict
        ``cv_annotator`` (a sentence), ``cv_annotator_per_fold`` (bool) and
        ``cv_annotator_fits`` (``{"cv": ..., "permutations": ...}``: annotators fitted on
        the real labels' outer training splits, and on further splits met only in permuted
        runs).
    """
    if not ev.per_fold_features:
        sentence = (
            "the CV features came from the table given, labelled by one annotator fitted "
            "on the whole training cohort: each fold's test patients informed its "
            "thresholds (no labels)"
        )
    else:
        sentence = (
            "fitted inside each outer CV training split on its samples' cells only; each "
            "split's test samples were labelled with it, so no test patient informed a "
            "threshold, mixture or rate (the permutation test refits it the same way); the "
            "stored annotator, fitted on every training sample, serves the final model"
        )
    return {
        "cv_annotator": sentence,
        "cv_annotator_per_fold": ev.per_fold_features,
        "cv_annotator_fits": {"cv": ev.fold_fits_cv, "permutations": ev.fold_fits_permutations},
    }


# --------------------------------------------------------------------------- promotion
def promotion_failures(
    metrics: dict[str, float],
    *,
    selection_pvalue: float,
    rule: PromotionRule,
    n_permutations: int,
) -> list[str]:
    """Why a chosen model does not meet the promotion rule (empty list: it does).

    Parameters
    ----------
    metrics
        The chosen family's CV metrics (``roc_auc`` and its CI).
    selection_pvalue
        The permutation p-value of the chosen family adjusted for choosing it among the
        families (equal to its own p-value with one family); this is the p-value tested.
    rule
        The configured rule; a criterion that is ``None`` is not required.
    n_permutations
        Permutations run (to say why a p-value is missing or cannot be small enough).
    """
    out: list[str] = []
    lim = rule.min_auc_ci_low
    if lim is not None:
        auc, lo, hi = metrics["roc_auc"], metrics["roc_auc_ci_low"], metrics["roc_auc_ci_high"]
        if not np.isfinite(lo):
            out.append(f"CV AUC {auc:.3f} has no 95% CI (n_bootstrap: 0)")
        elif lo <= lim:
            out.append(f"CV AUC {auc:.3f} [{lo:.3f}, {hi:.3f}]: CI lower bound not above {lim:g}")
    pmax = rule.max_perm_pvalue
    if pmax is not None:
        if n_permutations == 0 or not np.isfinite(selection_pvalue):
            out.append(f"no permutation p-value (n_permutations: {n_permutations})")
        elif 1.0 / (1 + n_permutations) >= pmax:
            out.append(
                f"{n_permutations} permutations cannot give p < {pmax:g} "
                f"(p = {selection_pvalue:.3f}; use n_permutations >= {int(np.floor(1 / pmax))})"
            )
        elif selection_pvalue >= pmax:
            out.append(f"permutation p {selection_pvalue:.3f} not below {pmax:g}")
    return out


def select_timepoint(
    table: pd.DataFrame, timepoint: str, *, source: str | os.PathLike[str] | None = None
) -> pd.DataFrame:
    """The rows of a manifest or feature table at one ``timepoint``.

    Timepoints are compared as text, a whole number read as a float as the integer
    (:func:`blinaprofile.features.change.id_text`: ``28.0`` is ``"28"``). ``source`` (the
    table's file) is named in errors.

    Raises
    ------
    ManifestError
        The table has no ``timepoint`` column, or no row at that timepoint (the message
        lists the timepoints it has).
    """
    if "timepoint" not in table.columns:
        raise ManifestError(
            f"the table has no 'timepoint' column; --timepoint {timepoint} needs one "
            "(a manifest column 'timepoint', kept in the feature table)",
            path=source,
        )
    from blinaprofile.features.change import id_text, id_texts

    tp = id_texts(table["timepoint"])
    rows = table[(tp == id_text(timepoint)).to_numpy()]
    if rows.empty:
        have = sorted({t for t in tp if t is not None})
        raise ManifestError(
            f"no samples at timepoint {timepoint!r}; the table has {have}", path=source
        )
    return rows.reset_index(drop=True)


# --------------------------------------------------------------------------- result
@dataclass
class TrainResult:
    """What a training run produced.

    ``version`` is ``None`` and ``alias`` empty when the run was not registered; ``alias`` is
    the alias the version holds (the serving alias when ``promoted``, else the candidate
    alias). ``previous_version`` / ``serving_version`` say where the serving alias pointed
    before and after; ``reasons`` why the version was not promoted.
    """

    run_id: str
    experiment: str
    chosen: str
    metrics: dict[str, dict[str, float]]
    model_uri: str
    registered_model: str
    version: str | None
    alias: str
    export_dir: Path | None
    serving_alias: str = "champion"
    promoted: bool = False
    previous_version: str | None = None
    serving_version: str | None = None
    reasons: list[str] = field(default_factory=list)
    cohort: str = ""
    model_card: str = ""
    feature_table: Path | None = None
    selection_pvalue: float = float("nan")
    leaderboard: pd.DataFrame | None = None

    @property
    def registered(self) -> bool:
        return self.version is not None

    def promotion_line(self) -> str:
        """One line: whether the serving alias moved (old -> new) and, if not, why."""
        name, a = self.registered_model, self.serving_alias
        before = f"v{self.previous_version}" if self.previous_version else "(none)"
        if not self.registered:
            verdict = "meets" if not self.reasons else "does not meet"
            why = f": {'; '.join(self.reasons)}" if self.reasons else ""
            return f"not registered (--no-register); the evidence {verdict} the promotion rule{why}"
        if self.promoted:
            return f"@{a} moved: {name} {before} -> v{self.version}"
        return (
            f"not promoted: {'; '.join(self.reasons)}; {name} v{self.version} is @{self.alias}, "
            f"@{a} stays at {before}"
        )

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
            "promoted": self.promoted,
            "previous_version": self.previous_version,
            "serving_version": self.serving_version,
            "reasons": list(self.reasons),
            "cohort": self.cohort,
            "export_dir": str(self.export_dir) if self.export_dir else None,
            "selection_pvalue": self.selection_pvalue,
        }


# --------------------------------------------------------------------------- train
def train(
    table: pd.DataFrame,
    *,
    config: TrainConfig | None = None,
    config_path: str | os.PathLike[str] | None = None,
    export_dir: str | os.PathLike[str] | None = None,
    tracking_uri: str | None = None,
    trained_on: str = "unknown",
    run_name: str | None = None,
    cohort: str | None = None,
    simulated: bool | None = None,
    source: str | os.PathLike[str] | None = None,
    timepoint: str | None = None,
    change_from: str | None = None,
    on_unpaired: Literal["warn", "error", "ignore"] = "warn",
    register: bool = True,
    force: bool = False,
    annotator: TCellAnnotator | None = None,
    annotator_notes: dict[str, Any] | None = None,
    fold_featurizer: FoldFeaturizer | None = None,
    progress: bool | None = None,
) -> TrainResult:
    """Validate every configured family, refit the best, log it to MLflow, register it and
    move the serving alias only on evidence.

    Parameters
    ----------
    table
        Feature table with ``response`` (1/0), ``patient_id`` and the feature columns.
        Rows with an ``error`` or failing QC are dropped (and counted in the run).
    config, config_path
        Training configuration (default ``configs/train/default.yaml``). The YAML file, when
        given, is logged to the run as-is.
    export_dir
        Also save the final model here (an MLflow model directory), atomically. Its
        ``meta.json`` names the registered model and version, never an alias.
    tracking_uri
        MLflow tracking URI (default :attr:`Settings.tracking_uri`).
    trained_on
        Free text about the data's origin (e.g. ``"simulated cohort 'default', seed 20221"``).
    run_name
        MLflow run name (default ``<chosen family> on <cohort>``).
    cohort
        Cohort name for run names, tags and ``compare --cohort`` (default ``unnamed``).
    simulated
        Whether the data are simulated (``None``: not stated); shown in the model card.
    source
        The features file or manifest the table came from (the MLflow dataset's source).
    timepoint
        Train on the samples of this ``timepoint`` only.
    change_from
        Also give the model each patient's change since this baseline timepoint
        (``delta_<feature>`` = value at ``timepoint`` minus value at ``change_from``; needs
        ``timepoint``): one row per patient, pairing rules in
        :mod:`blinaprofile.features.change` (unpaired patients are dropped with an
        :class:`~blinaprofile.features.change.UnpairedPatientsWarning`). The model records
        the design in ``meta.json`` (``change_features``) and scores a patient's
        ``timepoint`` sample only with its baseline sample.
    on_unpaired
        With ``change_from``, patients lacking a sample at one of the timepoints:
        ``"warn"`` drops them with one ``UnpairedPatientsWarning``, ``"ignore"`` drops them
        silently (a caller that says so itself, like the CLI), ``"error"`` refuses them.
    register
        Register the model (``False``: only log it to the run).
    force
        Let a model that meets the promotion rule replace a serving alias set by hand.
    annotator
        Single-cell training: the fitted :class:`~blinaprofile.annotate.estimator.TCellAnnotator`
        behind ``table``. It is stored with the model (logged, registered and exported:
        ``artifacts/single_cell_annotator.json``, SHA-256 in ``meta.json``) so that a sample
        scored later is labelled exactly as in training.
    annotator_notes
        Provenance recorded beside it in ``meta.json`` (keys, what it was fitted on).
    fold_featurizer
        Features whose state is learned (single-cell:
        :class:`~blinaprofile.features.singlecell.FoldAnnotatorFeatures` over the object
        ``table`` came from): the CV learns the state again inside each outer training
        split, so no test patient informs it (see
        :func:`~blinaprofile.models.validation.evaluate`); ``table`` (the whole-cohort
        features) still trains the final model. With an ``annotator``, ``meta.json``
        records how the CV fitted it (``cv_annotator``, ``cv_annotator_per_fold``,
        ``cv_annotator_fits``).
    progress
        A progress bar on stderr (default: when stderr is a terminal): each family's outer
        folds (or, with permutation workers, each family and permutation), the final model's
        fits, the MLflow logging.

    Returns
    -------
    TrainResult
        ``metrics[family][metric]`` for every family, the run, the registered version, the
        alias it holds and whether it was promoted (with reasons), the model card and
        ``leaderboard`` (one row per family).
    """
    from blinaprofile.progress import Progress

    bar = Progress(desc="loading MLflow", unit="step", show=progress)  # before its slow import
    with bar.closed_on_error():
        import mlflow

    from blinaprofile.models.packaging import save_model, training_modality
    from blinaprofile.models.runtime import global_contributions
    from blinaprofile.settings import settings

    cfg_file: Path | None
    if config is None:
        cfg_file = Path(config_path) if config_path else settings.default_train
        config = load_train_config(cfg_file)
    else:
        cfg_file = Path(config_path) if config_path else None
    change = None
    if change_from is not None:
        from blinaprofile.features.change import change_training_table

        if timepoint is None:
            raise ManifestError(
                f"change features need the later timepoint too: pass timepoint (--timepoint "
                f"D28) with change_from={change_from!r}",
                path=source,
            )
        table, change, feats = change_training_table(
            table,
            timepoint=timepoint,
            baseline=change_from,
            features=config.features,
            on_unpaired=on_unpaired,
            source=source,
        )
        config = config.model_copy(update={"features": feats})
    elif timepoint is not None:
        table = select_timepoint(table, timepoint, source=source)
    info = CohortInfo(
        name=cohort or "unnamed",
        trained_on=trained_on,
        simulated=simulated,
        source=str(Path(source).resolve()) if source is not None else None,
        timepoint=timepoint,
        change=change.description if change is not None else None,
    )
    bar.restart(None, desc="cross-validating", unit="fold")
    with bar.closed_on_error():
        ev = evaluate(table, config=config, on_step=bar.tick, featurizer=fold_featurizer)
    chosen = ev.chosen
    spec = next(s for s in config.models if s.family == chosen)
    bar.restart(None, desc=f"final {chosen} model", unit="fit")
    with bar.closed_on_error():
        final, final_params, threshold, refits = _final_model(ev, spec, config, on_fit=bar.tick)
    metrics = {f: dict(m) for f, m in ev.metrics.items()}
    for m in metrics.values():
        m["cv_auc_mean_of_repeats"] = m["roc_auc"]
    shap_global = global_contributions(final, ev.X)
    perm_imp = ev.families[chosen].importance
    commit = git_commit()
    meta = {
        "features": ev.features,
        "schema_version": SCHEMA_VERSION,
        "modality": training_modality(table),
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
        "simulated": simulated,
        "cohort": info.name,
        "timepoint": timepoint,
        "git_commit": commit,
    }
    if change is not None:  # scoring needs the baseline sample too (features.change)
        meta["change_features"] = change.as_meta()
    if annotator is not None:  # packaging writes it as an artifact (models.packaging)
        meta["single_cell_annotator"] = {
            "state": annotator.to_dict(),
            **(annotator_notes or {}),
            **cv_annotator_notes(ev),
        }
    failures = promotion_failures(
        ev.families[chosen].metrics,
        selection_pvalue=ev.selection_pvalue,
        rule=config.promotion,
        n_permutations=config.n_permutations,
    )
    import pandas as pd

    training_table = pd.DataFrame(ev.X, columns=ev.features).assign(response=ev.y)
    uri = tracking_uri or settings.tracking_uri
    name = run_name or f"{chosen} on {info.name}"
    bar.restart(None, desc="logging to MLflow", unit="step")
    with bar.closed_on_error():
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
            run_name=name,
            cohort=info,
            register=register,
        )
    bar.close()
    client = mlflow.tracking.MlflowClient(uri)
    outcome = (
        assign_alias(
            client,
            name=config.registered_model,
            version=version,
            serving_alias=config.alias,
            candidate_alias=config.promotion.candidate_alias,
            evidence_failures=failures,
            force=force,
        )
        if version is not None
        else AliasOutcome("", False, None, None, failures)
    )
    res = TrainResult(
        run_id=run_id,
        experiment=config.experiment,
        chosen=chosen,
        metrics=metrics,
        model_uri=(
            f"models:/{config.registered_model}@{config.alias}"
            if outcome.promoted
            else f"models:/{config.registered_model}/{version}"
            if version is not None
            else f"runs:/{run_id}/model"
        ),
        registered_model=config.registered_model,
        version=version,
        alias=outcome.alias,
        export_dir=None,
        serving_alias=config.alias,
        promoted=outcome.promoted,
        previous_version=outcome.previous,
        serving_version=outcome.serving,
        reasons=outcome.reasons,
        cohort=info.name,
        selection_pvalue=ev.selection_pvalue,
        leaderboard=ev.leaderboard(),
    )
    title = (
        f"{config.registered_model} v{version}"
        if version is not None
        else f"{config.registered_model} (unregistered, run {run_id})"
    )
    res.model_card = model_card(
        ev,
        cohort=info,
        meta=meta,
        title=title,
        status=res.promotion_line(),
        run_id=run_id,
        commit=commit,
    )
    _record_outcome(client, res, ev, info)
    if export_dir is not None:
        # the exported copy names the version it holds; aliases move, so none is stored
        exported_meta = {
            **meta,
            "registered_model": config.registered_model if version is not None else None,
            "version": version,
            "run_id": run_id,
            "model_card": res.model_card,
        }
        res.export_dir = save_model(
            export_dir, final, exported_meta, training_table=training_table, uncertainty=refits
        )
    return res


def _record_outcome(client: Any, res: TrainResult, ev: Evaluation, info: CohortInfo) -> None:
    """Write the decision into the run (tags, description) and the registry (cards)."""
    status = "promoted" if res.promoted else ("candidate" if res.registered else "unregistered")
    client.set_tag(res.run_id, "blinaprofile.promotion", status)
    client.set_tag(res.run_id, "blinaprofile.promotion_reason", "; ".join(res.reasons)[:5000])
    # one short line, then the table: the run page shows a description's first lines only
    # until "Show more"; the full promotion line comes after the table
    verdict = "promoted" if res.promoted else "not promoted"
    held = f"v{res.version} @{res.alias} ({verdict})" if res.registered else "not registered"
    description = (
        f"**{res.chosen} on {res.cohort}**: {held}\n\n{headline_table(ev)}\n"
        f"{res.promotion_line()}\n"
    )
    client.set_tag(res.run_id, "mlflow.note.content", description)
    if res.version is None:
        return
    name, v = res.registered_model, res.version
    client.update_model_version(name, v, description=res.model_card)
    m = ev.families[res.chosen].metrics
    for key, value in {
        "family": res.chosen,
        "cv_roc_auc": f"{m['roc_auc']:.3f} [{m['roc_auc_ci_low']:.3f}, {m['roc_auc_ci_high']:.3f}]",
        "perm_pvalue": f"{ev.selection_pvalue:.3f}",
        "trained_on": info.trained_on,
        "simulated": info.simulated_tag,
        "blinaprofile.cohort": res.cohort,
        "blinaprofile.promotion": status,
    }.items():
        client.set_model_version_tag(name, v, key, value)
    client.set_tag(res.run_id, "registered_version", v)
    describe_registered_model(client, name)
