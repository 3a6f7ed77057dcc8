"""MLflow logging of a training run and the registry side of promotion.

A training run logs parameters, headline metrics with CIs (also as the run description),
the feature table as a dataset whose source is the features file or manifest, out-of-fold
predictions, figures, the git commit and package versions, and one nested candidate run per
family. The registry side: model cards as version and registered-model descriptions, and
:func:`assign_alias`, which moves the serving alias only with evidence and never over a
hand-set alias without ``force``.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blinaprofile.config import TrainConfig
from blinaprofile.features.schema import SCHEMA_VERSION
from blinaprofile.models.validation import Evaluation, label_design

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ALIAS_SET_BY",
    "EXPERIMENT_KIND",
    "HEADLINE_TAGS",
    "HEADLINE_VIEW",
    "AliasOutcome",
    "CohortInfo",
    "alias_versions",
    "assign_alias",
    "describe_registered_model",
    "git_commit",
    "headline_table",
    "headline_view",
    "log_run",
    "model_card",
    "package_versions",
    "promote",
    "record_alias",
]

#: Model-version tag prefix recording who set an alias: ``blinaprofile.alias_set_by.<alias>``
#: is ``train`` or ``promote``. ``train`` only replaces a serving alias that ``train`` set.
ALIAS_SET_BY = "blinaprofile.alias_set_by"
#: Experiment tag of the experiment's kind (classic ML, not GenAI). The MLflow 3.17 UI does
#: not read it (its layout follows the ``workflowType`` URL parameter or the browser's
#: remembered switch: docs/models.md); other MLflow versions and servers may.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: Run tags holding the headline numbers as text, e.g. ``0.744 [0.601, 0.871]`` (MLflow
#: metrics are bare numbers). Named to sort in this order, the runs page's default column order.
HEADLINE_TAGS = ("AUC 95 CI", "Balanced accuracy 95 CI", "Brier 95 CI", "Permutation p")
#: The runs page's saved view (id, name) showing them as columns: :func:`headline_view`.
HEADLINE_VIEW = ("blinaprofile-headline", "Headline metrics")
#: Registered-model tag naming the alias that serves (its card is the model's description).
SERVING_ALIAS_TAG = "blinaprofile.serving_alias"


def git_commit() -> str:
    """The checkout's commit (``-dirty`` with uncommitted changes), else ``unknown``."""
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


# --------------------------------------------------------------------------- text
@dataclass(frozen=True)
class CohortInfo:
    """What a model was trained on, for run names, tags and the model card.

    Attributes
    ----------
    name
        Cohort name (run names, the ``blinaprofile.cohort`` tag, ``compare --cohort``).
    trained_on
        Free text about the data's origin.
    simulated
        ``True`` for simulated data, ``False`` for patient data, ``None`` when not stated.
    source
        The features file or manifest the table came from (the dataset's source).
    timepoint
        The one timepoint trained on, or ``None`` for all samples.
    change
        Change features, ``"D28 - baseline"`` (later minus baseline timepoint), or ``None``.
    """

    name: str
    trained_on: str = "unknown"
    simulated: bool | None = None
    source: str | None = None
    timepoint: str | None = None
    change: str | None = None

    @property
    def simulated_tag(self) -> str:
        """``true``, ``false`` or ``unknown`` (tag value)."""
        return "unknown" if self.simulated is None else str(self.simulated).lower()

    @property
    def origin(self) -> str:
        kind = {True: "simulated", False: "patient data", None: "origin not stated"}
        return f"{self.trained_on} ({kind[self.simulated]})"


def _ci(m: dict[str, float], k: str, digits: int = 3) -> str:
    v, lo, hi = m.get(k, np.nan), m.get(f"{k}_ci_low", np.nan), m.get(f"{k}_ci_high", np.nan)
    if not np.isfinite(v):
        return "n/a"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{v:.{digits}f} [no CI]"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _p(p: float, n: float) -> str:
    if not np.isfinite(p):
        return "n/a (no permutations)"
    return f"{p:.3f} ({int(n)} permutations)"


def headline_table(ev: Evaluation) -> str:
    """Markdown: per family, ROC AUC, balanced accuracy and Brier with 95% CIs, permutation p."""
    lines = [
        "| family | ROC AUC [95% CI] | balanced accuracy [95% CI] | Brier [95% CI] | permutation p |",
        "|---|---|---|---|---|",
    ]
    for fam, fe in ev.families.items():
        m = fe.metrics
        mark = " (chosen)" if fam == ev.chosen else ""
        lines.append(
            f"| {fam}{mark} | {_ci(m, 'roc_auc')} | {_ci(m, 'balanced_accuracy')} | "
            f"{_ci(m, 'brier')} | {_p(m['perm_pvalue'], m['n_permutations'])} |"
        )
    return "\n".join(lines) + "\n"


def _cohort_counts(ev: Evaluation) -> str:
    n_pat = len(np.unique(ev.groups))
    if label_design(ev.y, ev.groups) == "one label per patient":
        resp = len(np.unique(ev.groups[ev.y == 1]))
        return (
            f"{len(ev.y)} samples, {n_pat} patients: {resp} responders, "
            f"{n_pat - resp} nonresponders"
        )
    return (
        f"{len(ev.y)} samples, {n_pat} patients; labels vary within patients: "
        f"{int(ev.y.sum())} samples labelled 1, {int((ev.y == 0).sum())} labelled 0"
    )


def _change_text(change: str | None) -> str:
    """The model card's line on change features (``"change features: D28 - baseline"``)."""
    if not change:
        return "none (one sample per prediction)"
    return (
        f"{change}: one row per patient; delta_<feature> = the {change.split(' - ')[0]} value "
        "minus the baseline value (percentage points for % features); scoring needs both samples"
    )


def model_card(
    ev: Evaluation,
    *,
    cohort: CohortInfo,
    meta: dict[str, Any],
    title: str,
    status: str,
    run_id: str,
    commit: str,
) -> str:
    """The model card (Markdown) of a trained model: cohort, evidence, threshold, provenance.

    Parameters
    ----------
    ev
        The validation the model was chosen by.
    cohort
        What it was trained on.
    meta
        The model's metadata (threshold, rule, parameters).
    title
        Heading, e.g. ``blinaprofile-responder v3``.
    status
        One line on the promotion decision when it was trained (promoted, candidate, why);
        aliases may move later (the registered model's description lists them as they are).
    run_id, commit
        The MLflow run and the git commit of the code that trained it.
    """
    config = ev.config
    m = ev.families[ev.chosen].metrics
    n_fam = len(ev.families)
    sel = (
        f"; {ev.selection_pvalue:.3f} adjusted for choosing among {n_fam} families"
        if n_fam > 1 and np.isfinite(ev.selection_pvalue)
        else ""
    )
    params = ", ".join(f"{k}={v}" for k, v in meta["params"].items()) or "defaults"
    rows = [
        ("decision at training", status),
        ("cohort", f"{cohort.name}: {_cohort_counts(ev)}"),
        ("timepoint", cohort.timepoint or "all samples"),
        ("change features", _change_text(cohort.change)),
        ("design", label_design(ev.y, ev.groups)),
        ("trained on", cohort.origin),
        ("data source", cohort.source or "in-memory table"),
        ("feature schema", f"version {SCHEMA_VERSION} ({len(ev.features)} features)"),
        ("family", f"{ev.chosen} ({params})"),
        ("CV ROC AUC [95% CI]", _ci(m, "roc_auc")),
        ("balanced accuracy [95% CI]", _ci(m, "balanced_accuracy")),
        ("Brier score [95% CI]", _ci(m, "brier")),
        ("permutation p", _p(m["perm_pvalue"], m["n_permutations"]) + sel),
        ("threshold", f"{meta['threshold']:.3f} (rule {config.threshold.rule})"),
        (
            "validation",
            f"nested patient-grouped CV: {config.outer_folds} outer x {config.inner_folds} "
            f"inner folds, {config.repeats} repeats; {config.n_bootstrap} patient-bootstrap "
            "resamples for the CIs",
        ),
        ("MLflow run", run_id),
        ("git commit", commit),
    ]
    body = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows)
    return f"# {title}\n\n| | |\n|---|---|\n{body}\n"


# --------------------------------------------------------------------------- MLflow run
def _metric_batch(values: dict[str, float], ts: int) -> list[Any]:
    from mlflow.entities import Metric

    return [Metric(k, float(v), ts, 0) for k, v in values.items() if np.isfinite(v)]


def _log_batch(client: Any, run_id: str, metrics: list[Any]) -> None:
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i : i + 1000])


def _experiment(client: Any, name: str) -> str:
    """Create or get the experiment: kind tag, headline saved view, a description if none."""
    import mlflow

    exp = mlflow.set_experiment(name)
    key, value = EXPERIMENT_KIND
    if exp.tags.get(key) != value:
        client.set_experiment_tag(exp.experiment_id, key, value)
    view_key, view = headline_view()
    try:
        same = json.loads(exp.tags[view_key])["state"] == json.loads(view)["state"]
    except (KeyError, TypeError, ValueError):  # absent or not a saved view
        same = False
    if not same:
        client.set_experiment_tag(exp.experiment_id, view_key, view)
    if not exp.tags.get("mlflow.note.content"):
        client.set_experiment_tag(
            exp.experiment_id, "mlflow.note.content", _experiment_note(str(exp.experiment_id))
        )
    return str(exp.experiment_id)


def headline_view() -> tuple[str, str]:
    """The experiment tag of the MLflow UI saved view :data:`HEADLINE_VIEW` (key, value).

    MLflow 3.17 keeps an experiment's saved views (the runs page's *Views* menu; opened
    directly by ``#/experiments/<id>/runs?viewStateShareKey=<id>``) in experiment tags
    ``mlflow.sharedViewState.<id>`` whose value is ``{name, createdAt, [updatedAt,] state}``,
    ``state`` being the runs page's search and column state as a JSON string (read by the
    UI as is, or gzip-compressed when MLflow writes it itself).
    """
    col = [f"tags.`{t}`" for t in (*HEADLINE_TAGS, "blinaprofile.promotion")]
    widths = dict(zip(col, (150, 185, 150, 195, 120), strict=True))
    col.append("attributes.`Models`")
    state = {
        "searchFilter": "",
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
        "startTime": "ALL",
        "lifecycleFilter": "Active",
        "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": col,
        "columnOrder": col,
        "columnWidths": widths,
        "runsHiddenMode": "FIRST_10_RUNS",
        "viewMaximized": False,
        "runListHidden": False,
        "isAccordionReordered": False,
        "useGroupedValuesInCharts": True,
        "hideEmptyCharts": True,
        "groupBy": None,
        "groupsExpanded": {},
    }
    view_id, name = HEADLINE_VIEW
    envelope = {
        "name": name,
        "createdAt": int(time.time() * 1000),
        "state": json.dumps(state, sort_keys=True),
    }
    return f"mlflow.sharedViewState.{view_id}", json.dumps(envelope)


def _experiment_note(experiment_id: str) -> str:
    view_id, name = HEADLINE_VIEW
    link = f"#/experiments/{experiment_id}/runs?viewStateShareKey={view_id}&workflowType=machine_learning"
    return (
        f"**Headline metrics as columns: [saved view '{name}']({link})** (or the *Views* "
        "menu). One run per `blinaprofile train`, named `<chosen family> on <cohort>`, with "
        "one child run per family; a run's description is its headline table.\n"
    )


def _headline_tags(m: dict[str, float]) -> dict[str, str]:
    """:data:`HEADLINE_TAGS` of one family's metrics."""
    values = (
        _ci(m, "roc_auc"),
        _ci(m, "balanced_accuracy"),
        _ci(m, "brier"),
        _p(m["perm_pvalue"], m["n_permutations"]),
    )
    return dict(zip(HEADLINE_TAGS, values, strict=True))


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
    cohort: CohortInfo,
    register: bool,
) -> tuple[str, str | None]:
    """Log a training run and its model; register it when ``register``.

    Returns
    -------
    tuple
        The run ID and the registered version (``None`` when not registered). Aliases are
        set afterwards by :func:`assign_alias`.
    """
    import mlflow

    from blinaprofile.models.packaging import log_model

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.tracking.MlflowClient(uri)
    _experiment(client, config.experiment)
    chosen = ev.chosen
    versions = package_versions()
    ts = int(time.time() * 1000)
    cohort_tags = {
        "blinaprofile.cohort": cohort.name,
        "trained_on": cohort.trained_on,
        "simulated": cohort.simulated_tag,
        "timepoint": cohort.timepoint or "all",
        "design": label_design(ev.y, ev.groups),
        "change_features": cohort.change or "none",
    }
    with mlflow.start_run(run_name=run_name) as run:
        run_id = run.info.run_id
        mlflow.set_tags(
            {
                "blinaprofile.run_kind": "training",
                "git_commit": meta["git_commit"],
                "schema_version": SCHEMA_VERSION,
                "chosen_family": chosen,
                "registered_model": config.registered_model,
                **cohort_tags,
                **_headline_tags(ev.families[chosen].metrics),
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
                "promotion_min_auc_ci_low": config.promotion.min_auc_ci_low,
                "promotion_max_perm_pvalue": config.promotion.max_perm_pvalue,
                "select_by": config.select_by,
                "seed": config.seed,
                "n_samples": len(ev.y),
                "n_patients": len(np.unique(ev.groups)),
                "n_responders": int(ev.y.sum()),
                "n_dropped": ev.n_dropped,
                "n_features": len(ev.features),
                "change_features": cohort.change or "none",
                "features": ",".join(ev.features),
                "schema_version": SCHEMA_VERSION,
                "uncertainty_models": len(refits),
                **{f"final_{k}": v for k, v in meta["params"].items()},
            }
        )
        # the chosen family's unprefixed metrics first: the UI lists metrics in logging order
        parent: dict[str, float] = dict(ev.families[chosen].metrics)
        parent["selection_pvalue"] = ev.selection_pvalue
        for fam, fe in ev.families.items():
            parent.update({f"{fam}.{k}": v for k, v in fe.metrics.items()})
        parent["final_threshold"] = meta["threshold"]
        _log_batch(client, run_id, _metric_batch(parent, ts))
        # the configuration: the YAML as written and the validated result
        if cfg_file is not None and cfg_file.is_file():
            mlflow.log_artifact(str(cfg_file), artifact_path="config")
        mlflow.log_dict(config.model_dump(), "config/train_config.validated.json")
        mlflow.log_dict(versions, "environment/versions.json")
        _log_dataset(ev, table, cohort)
        _log_csv(_oof_table(ev), "cv/oof_predictions.csv")
        _log_csv(ev.leaderboard(), "cv/leaderboard.csv")
        for fam, fe in ev.families.items():
            _log_csv(fe.importance, f"importance/oof_permutation_{fam}.csv")
        contrib = meta["global_importance"]["mean_abs_contribution"]
        mlflow.log_dict(contrib, f"importance/mean_abs_contribution_{chosen}.json")
        for name, fig in _figures(ev, contrib).items():
            mlflow.log_figure(fig, f"plots/{name}.png")
            _close(fig)
        # one child run per family: comparable across trainings in the UI and `compare`
        for fam, fe in ev.families.items():
            with mlflow.start_run(run_name=f"{fam} on {cohort.name}", nested=True) as child:
                m = fe.metrics
                mlflow.set_tags(
                    {
                        "blinaprofile.run_kind": "candidate",
                        "blinaprofile.parent_run_name": run_name,
                        "family": fam,
                        "chosen": str(fam == chosen).lower(),
                        "schema_version": SCHEMA_VERSION,
                        **cohort_tags,
                        **_headline_tags(m),
                        "mlflow.note.content": (
                            f"{fam} on {cohort.name}: ROC AUC {_ci(m, 'roc_auc')}, balanced "
                            f"accuracy {_ci(m, 'balanced_accuracy')}, Brier {_ci(m, 'brier')}, "
                            f"permutation p {_p(m['perm_pvalue'], m['n_permutations'])}"
                        ),
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
                _log_csv(fe.importance, "importance_oof_permutation.csv")
        info = log_model(
            final,
            meta,
            training_table=training_table,
            uncertainty=refits,
            registered_model_name=config.registered_model if register else None,
        )
    version = str(info.registered_model_version) if register else None
    return run_id, version


def _log_dataset(ev: Evaluation, table: pd.DataFrame, cohort: CohortInfo) -> None:
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
    with warnings.catch_warnings():
        # a local path matches two equivalent local sources ("" and "file" schemes); MLflow
        # warns and picks the first, which is the one we want
        warnings.filterwarnings(
            "ignore", message="The specified dataset source can be interpreted in multiple ways"
        )
        where = {"source": cohort.source} if cohort.source else {}
        dataset = from_pandas(
            ds, name=f"{cohort.name} features-v{SCHEMA_VERSION}", targets="response", **where
        )
    mlflow.log_input(
        dataset,
        context="training",
        tags={
            "schema_version": ",".join(versions),
            "n_samples": str(len(ds)),
            "cohort": cohort.name,
            "timepoint": cohort.timepoint or "all",
        },
    )


def _oof_table(ev: Evaluation) -> pd.DataFrame:
    import pandas as pd

    out = pd.DataFrame({"sample_id": ev.sample_ids, "patient_id": ev.groups, "response": ev.y})
    for fam, fe in ev.families.items():
        out[f"oof_{fam}"] = fe.oof_mean
        out[f"call_{fam}"] = fe.calls.mean(axis=0) >= 0.5
    return out


# --------------------------------------------------------------------------- registry
@dataclass
class AliasOutcome:
    """Where the aliases stand after a training run registered a version.

    Attributes
    ----------
    alias
        The alias the new version holds (the serving alias or the candidate alias).
    promoted
        Whether the new version took the serving alias.
    previous
        Version that held the serving alias before (``None``: no version did).
    serving
        Version that holds the serving alias now.
    reasons
        Why the version was not promoted (empty when it was).
    """

    alias: str
    promoted: bool
    previous: str | None
    serving: str | None
    reasons: list[str] = field(default_factory=list)


def alias_versions(client: Any, name: str) -> dict[str, str]:
    """``{alias: version}`` of a registered model."""
    rm = client.get_registered_model(name)
    return {str(a): str(v) for a, v in (rm.aliases or {}).items()}


def record_alias(client: Any, name: str, alias: str, version: str, *, by: str) -> None:
    """Point ``name@alias`` at ``version`` and tag the version with who set it."""
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, f"{ALIAS_SET_BY}.{alias}", by)


def assign_alias(
    client: Any,
    *,
    name: str,
    version: str,
    serving_alias: str,
    candidate_alias: str,
    evidence_failures: list[str],
    force: bool,
) -> AliasOutcome:
    """Give a freshly registered version the serving alias, or the candidate alias.

    The serving alias moves only when the evidence meets the promotion rule
    (``evidence_failures`` empty) and the version holding it now was put there by ``train``
    (a hand-set alias, by ``promote`` or outside blinaprofile, moves only with ``force``).
    """
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(name, serving_alias)
    except MlflowException:
        current = None
    previous = str(current.version) if current is not None else None
    reasons = list(evidence_failures)
    if not reasons and current is not None and not force:
        set_by = current.tags.get(f"{ALIAS_SET_BY}.{serving_alias}")
        if set_by != "train":
            who = f"by {set_by}" if set_by else "outside 'train'"
            reasons.append(
                f"@{serving_alias} (version {previous}) was set {who}; train replaces a "
                "hand-set alias only with --force"
            )
    client.set_registered_model_tag(name, SERVING_ALIAS_TAG, serving_alias)
    if reasons:
        record_alias(client, name, candidate_alias, version, by="train")
        return AliasOutcome(candidate_alias, False, previous, previous, reasons)
    record_alias(client, name, serving_alias, version, by="train")
    return AliasOutcome(serving_alias, True, previous, version)


def _registry_listing(client: Any, name: str) -> str:
    versions = sorted(
        (str(mv.version) for mv in client.search_model_versions(f"name = '{name}'")), key=int
    )
    aliases = alias_versions(client, name)
    listing = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
    return f"versions: {', '.join(versions) or 'none'}; aliases: {listing}"


def promote(client: Any, name: str, ref: str, *, alias: str) -> tuple[str, str | None]:
    """Point ``name@alias`` at a version by hand (recorded as set by ``promote``).

    Parameters
    ----------
    client
        An MLflow client.
    name
        Registered model name.
    ref
        A version number, or ``@other_alias`` for the version that alias points at.
    alias
        The alias to set.

    Returns
    -------
    tuple
        The version now holding ``alias`` and the one that held it before (``None``: none).

    Raises
    ------
    ModelError
        Unknown model, version or alias, or an alias name MLflow refuses; the message lists
        the model's versions and aliases.
    """
    from mlflow.exceptions import MlflowException
    from pydantic import TypeAdapter, ValidationError

    from blinaprofile.config import AliasName
    from blinaprofile.errors import ModelError

    what = f"cannot promote {name} version {ref}"
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(rm.name for rm in client.search_registered_models())
        raise ModelError(f"{what}: no registered model {name!r} (known: {known})") from None
    try:
        TypeAdapter(AliasName).validate_python(alias)
    except ValidationError as err:
        msg = err.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        raise ModelError(
            f"{what}: alias {alias!r} is not valid ({msg}); {_registry_listing(client, name)}"
        ) from None
    aliases = alias_versions(client, name)
    if ref.startswith("@"):
        if ref[1:] not in aliases:
            raise ModelError(f"{what}: no alias {ref}; {_registry_listing(client, name)}")
        version = aliases[ref[1:]]
    else:
        version = ref
        try:
            client.get_model_version(name, version)
        except MlflowException:
            raise ModelError(
                f"{what}: no such version; {_registry_listing(client, name)}"
            ) from None
    before = aliases.get(alias)
    record_alias(client, name, alias, version, by="promote")
    describe_registered_model(client, name)
    return version, before


def describe_registered_model(client: Any, name: str) -> None:
    """Set the registered model's description: its aliases, then the serving version's card."""
    from mlflow.exceptions import MlflowException

    rm = client.get_registered_model(name)
    serving = (rm.tags or {}).get(SERVING_ALIAS_TAG, "champion")
    aliases = alias_versions(client, name)
    listing = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
    head = f"Aliases: {listing}. Serving alias: @{serving}.\n\n"
    if serving in aliases:
        try:
            card = client.get_model_version(name, aliases[serving]).description or ""
        except MlflowException:
            card = ""
    else:
        card = f"No version holds @{serving}: none has met the promotion rule or been promoted.\n"
    client.update_registered_model(name, description=head + card)


def _log_csv(df: pd.DataFrame, artifact_file: str) -> None:
    """Log a table as a CSV artifact of the active run, written by the one CSV writer.

    :func:`blinaprofile.io.atomic.write_csv` neutralises spreadsheet formulas (a sample ID
    such as ``=HYPERLINK(...)``) in text cells.
    """
    import tempfile

    import mlflow

    from blinaprofile.io.atomic import write_csv

    where = Path(artifact_file)
    with tempfile.TemporaryDirectory(prefix="blinaprofile-csv-") as tmp:
        local = write_csv(df, Path(tmp) / where.name)
        folder = where.parent.as_posix()
        mlflow.log_artifact(str(local), artifact_path=None if folder == "." else folder)


# --------------------------------------------------------------------------- figures
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
