"""Scoring one sample: features, QC, out-of-distribution check, probability and call.

The call has four states, decided by :func:`blinaprofile.models.runtime.call_state` (the one
decision behind every label the CLI, JSON, batch tables, REST and the report show), with a
one-line ``call_reason``:

- ``"no call"`` when the sample fails QC (too few events or cells, an adaptive gate that
  could not be placed, a panel that lacks a marker the gating needs) or lacks a model
  feature;
- ``"uncertain"`` when the probability's 95% interval straddles the threshold, when any
  model feature lies outside the training cohort (robust z beyond ``qc.ood_max_z``), or
  when the sample is of another modality than the model's training data (refused unless
  ``allow_other_modality=True``);
- ``"responder"`` / ``"nonresponder"`` otherwise.

The responder probability comes with a 95% uncertainty interval. If the model's
``predict`` returns ``probability_low``/``probability_high`` those are used; otherwise the
interval is the 2.5-97.5 percentile range of the probabilities given by refits of the
model's own pipeline (same family and hyper-parameters) on stratified bootstrap resamples
of the training cohort stored with the model (``training_features.csv``). The refits are
made once per model and process and cached.

Privacy: nothing from the FCS TEXT segment (``$SRC``, ``$FIL``, ``$DATE``, ``$OP`` ...) and
not the input file's name is put into a result. A lone file scored without a sample ID
gets a pseudonymous one derived from its checksum (``S-<first 12 hex of sha256>``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blinaprofile.config import QCConfig
from blinaprofile.errors import ModelError, PanelMismatchError
from blinaprofile.features.change import base_features, check_pairing
from blinaprofile.io.files import ensure_file, file_checksum, pseudonymous_id
from blinaprofile.io.read import join_warnings, split_warnings
from blinaprofile.models.runtime import CALL_STATES, NO_CALL, UNCERTAIN, call_state

if TYPE_CHECKING:
    import pandas as pd

    from blinaprofile.annotate.config import SampleQCSpec
    from blinaprofile.gating.gates import GatingResult
    from blinaprofile.gating.tree import GateTree

__all__ = [
    "CALL_STATES",
    "NO_CALL",
    "RESULT_COLUMNS",
    "UNCERTAIN",
    "ScoreContext",
    "ScoreResult",
    "ScoringModel",
    "load_scoring_model",
    "score_features",
    "score_sample",
]

#: bootstrap refits behind the probability interval (when the model gives none itself)
INTERVAL_LEVEL = 0.95


# --------------------------------------------------------------------------- results
@dataclass
class ScoreContext:
    """What a report needs beyond the result (not serialised): the gating behind it."""

    path: Path
    tree: GateTree | None = None
    gating: GatingResult | None = None


@dataclass
class ScoreResult:
    """The outcome of scoring one sample.

    Attributes
    ----------
    sample_id
        The manifest's / user's sample ID, or a pseudonym from the file's checksum.
    probability, probability_low, probability_high
        Responder probability and its 95% interval (``None`` when not computable).
    call
        ``"responder"``, ``"nonresponder"``, ``"uncertain"`` or ``"no call"``
        (:func:`blinaprofile.models.runtime.call_state`).
    call_reason
        Why, in one line (``"95% interval 0.105-0.938 straddles the threshold 0.787"``).
    reasons
        What is wrong with the sample: QC failures, missing features, features outside the
        training cohort, another modality (empty for a sound sample).
    qc
        Counts against the QC thresholds, the OOD limit and the verdict.
    interval
        How the probability interval was obtained.
    gating
        Strategy, counts, percent of parent, thresholds and flags (flow only).
    model, input
        Model name, version, alias, URI, family...; the input's checksum, modality, panel
        and gating strategy (never its file name or TEXT keywords).
    warnings
        What the FCS reader tolerated in the input (a DATA remainder smaller than one
        event, Latin-1 TEXT, an accepted ``$TOT`` mismatch...); never TEXT keyword values.
    """

    sample_id: str
    modality: str
    probability: float | None
    call: str
    threshold: float | None
    qc_pass: bool
    reasons: list[str]
    features: dict[str, float]
    call_reason: str = ""
    top_features: list[dict[str, float | str]] = field(default_factory=list)
    ood_z: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)
    probability_low: float | None = None
    probability_high: float | None = None
    interval: dict[str, Any] = field(default_factory=dict)
    qc: dict[str, Any] = field(default_factory=dict)
    gating: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    context: ScoreContext | None = field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field but :attr:`context` (non-finite numbers -> None)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "context"}
        return jsonable(d)

    def to_row(self) -> dict[str, Any]:
        """One flat row with the columns of :data:`RESULT_COLUMNS` (batch outputs)."""
        z = {k: abs(v) for k, v in self.ood_z.items() if np.isfinite(v)}
        worst = max(z, key=lambda k: z[k]) if z else ""
        row: dict[str, Any] = {
            "sample_id": self.sample_id,
            "modality": self.modality,
            "call": self.call,
            "call_reason": self.call_reason,
            "probability": self.probability,
            "probability_low": self.probability_low,
            "probability_high": self.probability_high,
            "threshold": self.threshold,
            "qc_pass": self.qc_pass,
            "reasons": "; ".join(self.reasons),
            "ood_max_abs_z": z[worst] if worst else None,
            "ood_feature": worst,
            "top_features": "; ".join(
                f"{t['feature']}:{float(t['contribution']):+.3f}" for t in self.top_features
            ),
            "model_name": self.model.get("name"),
            "model_version": self.model.get("version"),
            "model_alias": self.model.get("alias"),
            "model_uri": self.model.get("uri"),
            "model_family": self.model.get("family"),
            "schema_version": self.model.get("schema_version"),
            "gating_strategy": self.input.get("gating_strategy"),
            "input_sha256": self.input.get("sha256"),
            "interval_method": self.interval.get("method"),
            "error": "",
            "warnings": join_warnings(self.warnings),
        }
        for k in _feature_and_qc_columns():
            v = self.features.get(k)
            row[k] = float(v) if v is not None else None
        return row

    def summary(self) -> str:
        """A few lines for a terminal: the call and why first."""
        why = f" ({self.call_reason})" if self.call_reason else ""
        lines = [f"call          {self.call}{why}"]
        lines.extend(f"  reason: {r}" for r in self.reasons if r not in self.call_reason)
        lines.append(f"sample        {self.sample_id} ({self.modality})")
        if self.input.get("sha256"):
            lines.append(f"input sha256  {self.input['sha256']}")
        if self.input.get("baseline"):  # a change-feature model's baseline sample
            b = self.input["baseline"]
            lines.append(f"baseline      {b['sample_id']} ({b['timepoint']}; sha256 {b['sha256']})")
        lines.append(f"QC            {'PASS' if self.qc_pass else 'FAIL'}")
        if self.probability is not None:
            iv = ""
            if self.probability_low is not None and self.probability_high is not None:
                iv = f" [95% interval {self.probability_low:.3f}-{self.probability_high:.3f}]"
            lines.append(
                f"probability   {self.probability:.3f}{iv} (threshold {self.threshold:.3f})"
            )
        for w in self.warnings:
            lines.append(f"  warning: {w}")
        if self.top_features:
            lines.append("key features  (value, contribution to log-odds)")
            for t in self.top_features:
                lines.append(
                    f"  {t['feature']:<20} {float(t['value']):8.2f}  {float(t['contribution']):+.3f}"
                )
        if self.model:
            m = self.model
            v = str(m.get("version") or "")
            ver = f" v{v}" if v.isdigit() else (f" ({v})" if v else "")
            alias = f" @{m['alias']}" if m.get("alias") else ""
            lines.append(
                f"model         {m.get('name')}{ver}{alias} ({m.get('family')}; {m.get('uri')})"
            )
        return "\n".join(lines)


def _feature_and_qc_columns() -> list[str]:
    from blinaprofile.features.schema import QC_COLUMNS, feature_names

    return [*feature_names(), *QC_COLUMNS]


#: Leading columns of a result table and their kind; the schema's features and QC counts
#: (numeric) follow.
_BASE_RESULT_COLUMNS: tuple[tuple[str, str], ...] = (
    ("sample_id", "text"),
    ("modality", "text"),
    ("call", "text"),
    ("call_reason", "text"),
    ("probability", "number"),
    ("probability_low", "number"),
    ("probability_high", "number"),
    ("threshold", "number"),
    ("qc_pass", "bool"),
    ("reasons", "text"),
    ("ood_max_abs_z", "number"),
    ("ood_feature", "text"),
    ("top_features", "text"),
    ("model_name", "text"),
    ("model_version", "text"),
    ("model_alias", "text"),
    ("model_uri", "text"),
    ("model_family", "text"),
    ("schema_version", "text"),
    ("gating_strategy", "text"),
    ("input_sha256", "text"),
    ("interval_method", "text"),
    ("error", "text"),
    ("warnings", "text"),
)

#: Text columns of a result table; every other column but ``qc_pass`` is numeric.
TEXT_RESULT_COLUMNS: frozenset[str] = frozenset(
    name for name, kind in _BASE_RESULT_COLUMNS if kind == "text"
)


def _result_columns() -> list[str]:
    return [*(name for name, _ in _BASE_RESULT_COLUMNS), *_feature_and_qc_columns()]


#: Columns of every batch result table (CLI ``score-batch`` and :func:`score_samples`).
RESULT_COLUMNS: tuple[str, ...] = tuple(_result_columns())


def jsonable(o: Any) -> Any:
    """``o`` with numpy scalars, arrays and NaN turned into plain JSON values."""
    if isinstance(o, dict):
        return {str(k): jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [jsonable(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


# --------------------------------------------------------------------------- models
@dataclass
class ScoringModel:
    """A loaded model with what scoring needs around it (cached per URI and process).

    Attributes
    ----------
    uri
        What it was loaded from (``models:/NAME@ALIAS``, ``runs:/...`` or a folder).
    pyfunc, runtime
        The checked model (:class:`blinaprofile.models.loading.PackagedModel`, whose
        ``predict(table, params=...)`` answers like the served MLflow pyfunc; MLflow's own
        loader is never used) and its :class:`blinaprofile.models.runtime.ResponderModel`.
    info
        ``name``, ``version``, ``alias``, ``uri``, ``family``, ``schema_version``,
        ``trained_on``, ``threshold_rule``, ``model_uuid``, ``run_id``; ``modality`` (what
        the model was trained on) with ``modality_note`` saying when it was assumed (older
        models record none: flow); ``simulated`` (trained on simulated data); the CV
        ``cv_roc_auc`` with ``cv_roc_auc_ci_low``/``_high`` and ``perm_pvalue`` with
        ``n_permutations`` (``None`` when not computed).
    training
        The training cohort's features and ``response`` (``training_features.csv``), or
        ``None`` when the model has none.
    """

    uri: str
    pyfunc: Any
    runtime: Any
    info: dict[str, Any]
    training: pd.DataFrame | None = None


_MODEL_CACHE: dict[str, ScoringModel] = {}
_CACHE_LOCK = threading.Lock()


def load_scoring_model(uri: str | os.PathLike[str] | None = None) -> ScoringModel:
    """Load (once per process) a model by MLflow URI or folder, with its provenance.

    ``None`` means the shipped default (:attr:`Settings.default_model`).
    """
    from blinaprofile.settings import settings

    key = str(uri or settings.default_model)
    with _CACHE_LOCK:
        if key not in _MODEL_CACHE:
            _MODEL_CACHE[key] = _load(key)
        return _MODEL_CACHE[key]


def _load(key: str) -> ScoringModel:
    import pandas as pd

    from blinaprofile.models.loading import load_packaged_model

    # checked folder, none of its code run; compiled pipelines: no sklearn import
    model = load_packaged_model(key, compiled=True)
    training = None
    tpath = model.training_features_path
    if tpath is not None:
        training = pd.read_csv(tpath)
    runtime = model.runtime
    return ScoringModel(key, model, runtime, _model_info(key, model, runtime), training)


def _model_info(key: str, pyfunc: Any, runtime: Any) -> dict[str, Any]:
    meta = runtime.meta
    md = getattr(pyfunc, "metadata", None)
    info: dict[str, Any] = {
        "uri": key,
        "name": meta.get("registered_model"),
        "version": None if meta.get("version") is None else str(meta.get("version")),
        "alias": meta.get("alias"),
        "family": meta.get("family"),
        "schema_version": meta.get("schema_version"),
        "trained_on": meta.get("trained_on"),
        "threshold_rule": meta.get("threshold_rule"),
        "model_uuid": getattr(md, "model_uuid", None),
        "run_id": getattr(md, "run_id", None),
        "created": getattr(md, "utc_time_created", None),
        "modality": runtime.modality,
        "modality_note": (
            None if runtime.modality_recorded else "the model records no modality: assumed flow"
        ),
        "simulated": _simulated(meta),
        **_cv_evidence(meta),
    }
    if key.startswith("models:/"):
        rest = key[len("models:/") :]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            info.update(name=name, alias=alias, version=_alias_version(name, alias))
        else:
            name, _, ver = rest.partition("/")
            info.update(name=name, version=ver or None)
    elif key.startswith("runs:/"):
        info["name"] = info["name"] or key
    else:
        info["name"] = info["name"] or Path(key).name
        if info["version"] is None:
            uuid = info.get("model_uuid")
            info["version"] = f"unregistered ({uuid[:8]})" if uuid else "unregistered"
    return info


def _simulated(meta: dict[str, Any]) -> bool:
    """Whether the model says it was trained on simulated data (flag or ``trained_on`` text)."""
    return meta.get("simulated") is True or "simulated" in str(meta.get("trained_on") or "").lower()


def _cv_evidence(meta: dict[str, Any]) -> dict[str, Any]:
    """The model's cross-validated ROC AUC with its CI and permutation p (``None``: absent)."""
    cv = meta.get("cv_metrics") or {}

    def num(key: str) -> float | None:
        v = cv.get(key)
        return float(v) if isinstance(v, int | float) and np.isfinite(v) else None

    n_perm = num("n_permutations")
    computed = n_perm is not None and n_perm > 0
    return {
        "cv_roc_auc": num("roc_auc"),
        "cv_roc_auc_ci_low": num("roc_auc_ci_low"),
        "cv_roc_auc_ci_high": num("roc_auc_ci_high"),
        "perm_pvalue": num("perm_pvalue") if computed else None,
        "n_permutations": int(n_perm) if computed and n_perm is not None else None,
    }


#: how a modality is named in messages
_MODALITY_NAMES = {"flow": "flow cytometry", "single_cell": "single-cell"}


def _other_modality(sm: ScoringModel, modality: str, *, allow: bool) -> str | None:
    """Why a sample of ``modality`` is outside the model's training data (``None``: it isn't).

    Raises
    ------
    ModelError
        The modalities differ and ``allow`` is false (one line, naming the way out).
    """
    trained = sm.runtime.modality
    if modality == trained:
        return None
    what = (
        f"model {sm.info.get('name')} was trained on {_MODALITY_NAMES[trained]}; "
        f"this sample is {_MODALITY_NAMES.get(modality, modality)}"
    )
    if not allow:
        raise ModelError(f"{what}: refusing (use --allow-other-modality to score it as uncertain)")
    return f"{what} (scored with --allow-other-modality)"


def _alias_version(name: str, alias: str) -> str | None:
    import mlflow

    from blinaprofile.settings import settings

    try:
        client = mlflow.tracking.MlflowClient(settings.tracking_uri, settings.tracking_uri)
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException as err:
        raise ModelError(f"cannot resolve models:/{name}@{alias}: {err.message}") from None


# --------------------------------------------------------------------------- scoring
def _qc_table(row: dict[str, Any], qc: QCConfig) -> list[dict[str, Any]]:
    """Counts against the flow QC thresholds (single-cell counts are listed without them:
    the single-cell featurizer applies its own QC, reported through ``qc_reasons``)."""
    flow = str(row.get("modality", "flow")) == "flow"
    checks = (
        ("n_events", qc.min_events, "events read"),
        ("n_live", qc.min_live, "live single lymphocytes"),
        ("n_cd3", qc.min_cd3, "CD3+ T cells"),
        ("n_cd4", qc.min_cd4, "CD4+ T cells"),
        ("n_cd8", qc.min_cd8, "CD8+ T cells"),
    )
    out = []
    for key, minimum, what in checks:
        v = row.get(key)
        val = None if v is None or (isinstance(v, float) and not np.isfinite(v)) else int(v)
        if not flow:
            out.append({"metric": key, "what": what, "value": val, "minimum": None, "pass": None})
            continue
        out.append(
            {
                "metric": key,
                "what": what,
                "value": val,
                "minimum": minimum,
                "pass": val is None or val >= minimum,
            }
        )
    return out


def score_features(
    row: dict[str, Any],
    *,
    model: str | None = None,
    qc: QCConfig | None = None,
    threshold: float | None = None,
    n_top: int = 5,
    interval: bool = True,
    allow_other_modality: bool = False,
) -> ScoreResult:
    """Score one feature row (from either modality).

    Parameters
    ----------
    row
        A feature-table row (:func:`blinaprofile.features.schema.feature_columns`).
    model
        ``models:/NAME@ALIAS``, ``runs:/...`` or a model folder (default: the shipped model).
    qc
        QC and abstention thresholds (default ``configs/qc.yaml``).
    threshold
        Decision threshold overriding the model's.
    n_top
        How many top contributing features to report.
    interval
        Report the model's probability interval (from the bootstrap refits stored with it).
        The call uses the interval either way.
    allow_other_modality
        Score a row of another modality (``row['modality']``, default flow) than the model
        was trained on, as ``"uncertain"``; by default such a row is refused.

    Raises
    ------
    ModelError
        The row's modality is not the model's and ``allow_other_modality`` is false.
    """
    import pandas as pd

    from blinaprofile.features.flow import load_qc

    if threshold is not None and not 0.0 <= float(threshold) <= 1.0:  # also rejects nan
        from blinaprofile.errors import ConfigError

        raise ConfigError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    qc = qc or load_qc()
    sm = load_scoring_model(model)
    runtime = sm.runtime
    reasons: list[str] = [r for r in str(row.get("qc_reasons") or "").split("; ") if r]
    qc_pass = bool(row.get("qc_pass", True)) and not reasons
    qc_failures = list(reasons) or ([] if qc_pass else ["the featurizer marked it as failing"])
    other = _other_modality(sm, str(row.get("modality", "flow")), allow=allow_other_modality)
    doubts = [other] if other else []
    reasons.extend(doubts)
    table = pd.DataFrame([row])
    feats = runtime.features
    missing = [f for f in feats if f not in table.columns or pd.isna(table[f].iloc[0])]
    t = runtime.threshold if threshold is None else float(threshold)
    prob: float | None = None
    low: float | None = None
    high: float | None = None
    model_low: float | None = None
    model_high: float | None = None
    iv: dict[str, Any] = {}
    contrib: dict[str, float] = {}
    ood: dict[str, float] = {}
    if missing:
        reasons.append(
            f"feature(s) {missing} unavailable for this {row.get('modality', 'sample')} sample"
        )
    else:
        X = table[feats].astype(float)
        out = sm.pyfunc.predict(X, params={"threshold": t})
        prob = float(out["probability"].iloc[0])
        contrib = {f: float(out[f"contrib_{f}"].iloc[0]) for f in feats}
        model_low, model_high, model_iv = _interval(out)
        if interval:
            low, high, iv = model_low, model_high, model_iv
        z = runtime.ood_scores(table).iloc[0]
        ood = {f: float(z[f]) for f in feats}
        far = {f: v for f, v in ood.items() if abs(v) > qc.ood_max_z}
        if far:
            desc = ", ".join(
                f"{f} (z={v:+.1f})" for f, v in sorted(far.items(), key=lambda kv: -abs(kv[1]))
            )
            doubts.append(f"outside the training cohort (|robust z| > {qc.ood_max_z:g}): {desc}")
            reasons.append(doubts[-1])
    decision = call_state(
        prob, model_low, model_high, t, qc_failures=qc_failures, missing=missing, ood=doubts
    )
    top = sorted(contrib.items(), key=lambda kv: -abs(kv[1]))[:n_top]
    features = {
        k: float(v)
        for k, v in row.items()
        if isinstance(v, int | float | np.number) and not isinstance(v, bool | np.bool_)
    }
    qc_info = {
        "verdict": "PASS" if qc_pass else "FAIL",
        "counts": _qc_table(row, qc),
        "thresholds": qc.model_dump(),
        "ood_max_z": qc.ood_max_z,
        "ood_pass": not any(abs(v) > qc.ood_max_z for v in ood.values()),
    }
    return ScoreResult(
        sample_id=str(row.get("sample_id", "")),
        modality=str(row.get("modality", "flow")),
        probability=prob,
        call=decision.state,
        call_reason=decision.reason,
        threshold=t,
        qc_pass=qc_pass,
        reasons=reasons,
        features=features,
        top_features=[{"feature": f, "value": float(row[f]), "contribution": c} for f, c in top],
        ood_z=ood,
        model=dict(sm.info),
        probability_low=low,
        probability_high=high,
        interval=iv,
        qc=qc_info,
        warnings=split_warnings(row.get("warnings")),
    )


def _interval(out: pd.DataFrame) -> tuple[float | None, float | None, dict[str, Any]]:
    """The model's own probability interval (from its stored patient-bootstrap refits)."""
    lo, hi = float(out["probability_low"].iloc[0]), float(out["probability_high"].iloc[0])
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return None, None, {"method": "none", "note": "the model stores no bootstrap refits"}
    return (
        lo,
        hi,
        {
            "method": "model",
            "level": INTERVAL_LEVEL,
            "description": (
                f"{INTERVAL_LEVEL:.0%} interval computed by the model from its bootstrap refits "
                "(patients resampled at training time; stored with the model)"
            ),
        },
    )


def score_sample(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    strategy: str | os.PathLike[str] | None = None,
    adaptive: bool = True,
    qc: QCConfig | None = None,
    sample_id: str | None = None,
    threshold: float | None = None,
    keep_gating: bool = False,
    interval: bool = True,
    sample_key: str | None = None,
    select_sample: str | None = None,
    single_cell_qc: SampleQCSpec | None = None,
    allow_other_modality: bool = False,
    baseline: str | os.PathLike[str] | None = None,
    baseline_id: str | None = None,
    sha256: str | None = None,
) -> ScoreResult:
    """Read, gate/annotate, featurize and score one sample (FCS or single-cell).

    Parameters
    ----------
    path
        An FCS file, ``.h5ad``, 10x ``.h5`` or 10x folder.
    sample_key
        Single-cell only: the ``obs`` column naming samples (default: the first of the
        annotator's ``sample_key_candidates`` present). An object holding several samples
        needs ``select_sample`` (``score-batch OBJECT --sample-key KEY`` scores each).
    select_sample
        Single-cell only: score the cells whose ``obs[sample_key]`` is this value (an object
        holding one sample is scored whole).
    single_cell_qc
        Single-cell only: per-sample QC minimums overriding the annotator's ``sample_qc``.
    model
        ``models:/NAME@ALIAS``, ``runs:/...`` or a model folder (default: shipped model).
    strategy, adaptive
        Gating YAML (default: the shipped T-cell strategy) and per-sample gate placement
        (default; ``False`` keeps the configured thresholds, see :mod:`blinaprofile.gating.placement`).
    qc
        QC and abstention thresholds (default ``configs/qc.yaml``).
    sample_id
        The sample's ID; default ``S-<first 12 hex of the file's sha256>``.
    threshold
        Decision threshold overriding the model's.
    keep_gating
        Keep the gating behind the result in :attr:`ScoreResult.context` (for reports).
    interval, allow_other_modality
        See :func:`score_features`.
    baseline, baseline_id
        A change-feature model (``train --change-from``) scores ``path`` with its change
        since this baseline sample of the same patient, featurized the same way
        (:mod:`blinaprofile.scoring.paired`); ``baseline_id`` names it (default: its
        pseudonym). Required by such models, refused by others (:class:`ModelError`).
    sha256
        The file's SHA-256 when the caller has just taken it and made sure the file is
        unchanged since (``score-batch``: :func:`~blinaprofile.io.files.stamped_checksum`);
        default: the file is hashed here.

    Raises
    ------
    BlinaprofileError
        For unreadable input, bad config or model problems. QC failures, including a
        panel that lacks a needed marker, do not raise: they give ``call == "no call"``
        with reasons.
    ModelError
        The sample is of another modality than the model's and ``allow_other_modality`` is
        false (checked before the sample is read).
    """
    from blinaprofile.cache import memo_file
    from blinaprofile.features.flow import featurize_fcs, load_qc
    from blinaprofile.gating.strategy import load_strategy
    from blinaprofile.io.read import current_fcs_read_options, modality_of
    from blinaprofile.settings import settings

    p = ensure_file(path)
    qc = qc or load_qc()
    checksum = sha256 or file_checksum(p)
    sid = sample_id or pseudonymous_id(checksum)
    modality = modality_of(p)
    _other_modality(load_scoring_model(model), modality, allow=allow_other_modality)
    design = check_pairing(  # a change-feature model needs the baseline sample too
        load_scoring_model(model).runtime.meta,
        baseline_given=baseline is not None,
        model_name=load_scoring_model(model).info.get("name"),
    )
    baseline_sha256 = None
    if design is not None and baseline is not None:  # missing or the same file: before gating
        from blinaprofile.scoring.paired import check_baseline

        baseline_sha256 = check_baseline(baseline, scored_sha256=checksum)
    info: dict[str, Any] = {
        "sha256": checksum,
        "modality": modality,
        "sample_id_source": "given" if sample_id else "checksum",
    }
    gating: dict[str, Any] = {}
    ctx = ScoreContext(path=p)
    if modality == "flow":
        # parsed once per process and file version (a batch scores many samples)
        tree = memo_file("strategy", strategy or settings.default_gating, load_strategy)
        info["gating_strategy"] = tree.name
        info["gating_strategy_version"] = tree.version
        info["adaptive"] = adaptive
        info["panel"] = _panel_name(current_fcs_read_options().panel)  # --panel, else the default
        try:
            sf = featurize_fcs(
                p,
                strategy=tree,
                adaptive=adaptive,
                sample_id=sid,
                qc=qc,
                keep_gating=True,
                # a change-feature model's delta_x needs x (and the baseline's too)
                requested=base_features(load_scoring_model(model).runtime.features),
            )
        except PanelMismatchError as err:
            return _panel_no_call(sid, err, model=model, qc=qc, threshold=threshold, info=info)
        row = sf.row
        if sf.tree is not None and sf.result is not None:
            info["channel_map"] = sf.tree.channel_map()
            gating = {
                "strategy": sf.tree.name,
                "version": sf.tree.version,
                "adaptive": adaptive,
                "counts": dict(sf.result.counts),
                "percent_of_parent": sf.result.parent_percent(sf.tree),
                "parents": {g.id: g.parent or "all events" for g in sf.tree.gates},
                "thresholds": dict(sf.result.thresholds),
                "confidence": dict(sf.result.confidence),
                "flags": list(sf.result.flags),
            }
            if keep_gating:
                ctx.tree, ctx.gating = sf.tree.placed(sf.result), sf.result
    else:
        row, sc_info = _single_cell_row(
            p,
            model=model,
            sample_key=sample_key,
            select_sample=select_sample,
            sample_qc=single_cell_qc,
        )
        info.update(sc_info)
        row["sample_id"] = sid
        row["patient_id"] = sid
    if design is not None and baseline is not None:
        from blinaprofile.scoring.paired import baseline_pair

        row, info["baseline"] = baseline_pair(
            row,
            baseline,
            design=design,
            modality=modality,
            strategy=tree if modality == "flow" else None,
            adaptive=adaptive,
            qc=qc,
            baseline_id=baseline_id,
            annotator=getattr(load_scoring_model(model).pyfunc, "annotator", None),
            single_cell_qc=single_cell_qc,
            scored_sha256=checksum,
            baseline_sha256=baseline_sha256,
        )
    res = score_features(
        row,
        model=model,
        qc=qc,
        threshold=threshold,
        interval=interval,
        allow_other_modality=allow_other_modality,
    )
    res.input = info
    res.gating = gating
    res.context = ctx if keep_gating else None
    return res


def _single_cell_row(
    p: Path,
    *,
    model: str | None,
    sample_key: str | None,
    select_sample: str | None,
    sample_qc: SampleQCSpec | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The feature row of one single-cell sample, labelled by the model's stored annotator.

    A model without one (flow-trained, or older) gets an annotator fitted on the sample's own
    cells, and the row's ``warnings`` say that its features are not comparable.
    """
    import shlex

    from blinaprofile.annotate.config import load_single_cell_config
    from blinaprofile.errors import SingleCellInputError
    from blinaprofile.features.singlecell import featurize_cells, sample_column
    from blinaprofile.io.singlecell import read_single_cell

    annotator = getattr(load_scoring_model(model).pyfunc, "annotator", None)
    cfg = annotator.config_ if annotator is not None else load_single_cell_config()
    adata = read_single_cell(p, sample_key=sample_key)
    key, names = sample_column(adata, sample_key=sample_key, candidates=cfg.sample_key_candidates)
    if len(names) > 1 and select_sample is not None:
        if select_sample not in names:
            raise SingleCellInputError(
                f"no cells of sample {select_sample!r} (obs {key!r} holds {names[:10]})", path=p
            )
        adata = adata[adata.obs[key].astype(str).to_numpy() == select_sample].copy()
    elif len(names) > 1:
        cmd = ["blinaprofile", "score-batch", str(p), "--sample-key", str(key)]
        cmd += ["--model", str(model)] if model is not None else []
        raise SingleCellInputError(
            f"holds {len(names)} samples (obs {key!r}): use `{shlex.join(cmd)}`", path=p
        )
    feats = featurize_cells(adata, annotator=annotator, sample_key=key, sample_qc=sample_qc)
    row = feats.table.iloc[0].to_dict()
    warnings = split_warnings(row.get("warnings"))
    if annotator is None:
        warnings.append(
            "the model stores no single-cell annotator (flow-trained, or trained before "
            "annotators were stored): this sample's cells were labelled by an annotator fitted "
            "on the sample alone, so its features are not comparable with the model's training "
            "features"
        )
    row["warnings"] = join_warnings(warnings)
    fit = feats.annotator.state_
    info = {
        "sample_key": key or "",
        "annotator": (
            "fitted on this sample alone (the model stores none)"
            if annotator is None
            else f"stored with the model (fitted on {fit.n_samples} samples, {fit.n_cells} cells)"
        ),
        "x_kind": feats.table.attrs["blinaprofile"]["x_kind"],
    }
    return row, info


def _panel_name(path: str | None = None) -> str | None:
    from blinaprofile.cache import memo_file
    from blinaprofile.config import PanelConfig, load_config
    from blinaprofile.errors import ConfigError
    from blinaprofile.settings import settings

    where = Path(path) if path else settings.default_panel
    try:
        panel = memo_file("panel", where, lambda p: load_config(PanelConfig, p))
    except ConfigError:
        return None
    return panel.name


def _panel_no_call(
    sid: str,
    err: PanelMismatchError,
    *,
    model: str | None,
    qc: QCConfig,
    threshold: float | None,
    info: dict[str, Any],
) -> ScoreResult:
    """A "no call" result for a sample whose panel lacks a marker the gating needs."""
    sm = load_scoring_model(model)
    t = sm.runtime.threshold if threshold is None else float(threshold)
    reasons = [f"panel mismatch: {err.message}"]
    decision = call_state(None, None, None, t, qc_failures=reasons)
    return ScoreResult(
        sample_id=sid,
        modality="flow",
        probability=None,
        call=decision.state,
        call_reason=decision.reason,
        threshold=t,
        qc_pass=False,
        reasons=reasons,
        features={},
        model=dict(sm.info),
        input=info,
        qc={
            "verdict": "FAIL",
            "counts": [],
            "thresholds": qc.model_dump(),
            "ood_max_z": qc.ood_max_z,
            "ood_pass": None,
        },
    )
