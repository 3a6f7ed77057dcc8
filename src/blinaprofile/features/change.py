"""Per-patient change features between two timepoints (paired and longitudinal designs).

The trial's correlative studies compared each patient's post-treatment sample with the same
patient's baseline. :func:`add_change_features` turns a feature table holding several
timepoints per patient into one row per patient at the later ``timepoint``: every column of
that sample plus ``delta_<feature>`` = value(timepoint) - value(baseline) for each schema
feature (:func:`blinaprofile.features.schema.feature_columns`). A percentage's change is in
percentage points of the same parent, a ratio's and an intensity's a difference in the
feature's unit (:data:`blinaprofile.features.schema.CHANGE_FEATURES` labels them).

Pairing rules
-------------
- Rows are matched on ``patient_id``; IDs and ``timepoint`` values are compared as stripped
  text, a whole number read as a float as the integer (``7.0`` is ``"7"``, ``28.0`` is
  ``"28"``: :func:`id_text`). A sample at either timepoint without a ``patient_id`` (blank,
  NaN) is an error (:class:`~blinaprofile.errors.ManifestError` naming the samples): it
  cannot be paired, and must not be paired with another such sample.
- A table that already has change columns (``delta_...``) or ``baseline_sample_id`` is
  refused (a ``ManifestError`` naming them): it was paired already, and pairing it again
  would give two columns of one name.
- A patient with **more than one sample at either timepoint** is an error
  (:class:`~blinaprofile.errors.ManifestError` naming the patients and samples): which
  sample is meant is ambiguous, so the table must be fixed.
- A patient **without a baseline sample, or without a sample at ``timepoint``**, cannot be
  paired. By default (``on_unpaired="warn"``) such patients are dropped with one
  :class:`UnpairedPatientsWarning` listing them; ``"error"`` raises a ``ManifestError``
  naming them instead; ``"ignore"`` drops them silently. Either way
  ``table.attrs["change_features"]["unpaired"]`` maps each dropped patient to the reason.
- Samples at any other timepoint are ignored.
- Missing values propagate: a delta is NaN when either value is.
- QC: a pair is only as sound as its worse sample. The patient row passes QC
  (``qc_pass``) only when both samples do; ``qc_reasons`` lists the failures, the
  baseline's after ``baseline <sample_id>:`` (written once before all of them; a reason
  that already starts with the sample's ID is not given it twice); an ``error`` of either
  sample becomes the row's ``error`` (the baseline's prefixed likewise) and ``warnings``
  are joined the same way. Training
  therefore drops such a patient like any failing sample (counted as dropped), and scoring
  gives it ``"no call"`` saying which sample failed.
- The QC counts (``n_events`` ...) and every other column are the later sample's;
  ``baseline_sample_id`` names the baseline sample.

A model trained on change features records its :class:`ChangeDesign` in ``meta.json``
(``change_features``: the two timepoints and the features differenced) and cannot score a
sample alone: scoring needs the patient's baseline sample as well
(:func:`check_pairing`, ``blinaprofile score POST.fcs --baseline BASE.fcs``).
"""

from __future__ import annotations

import numbers
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from blinaprofile.errors import ManifestError, ModelError
from blinaprofile.features.schema import CHANGE_PREFIX, feature_names

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "CHANGE_PREFIX",
    "ChangeDesign",
    "UnpairedPatientsWarning",
    "add_change_features",
    "base_feature",
    "base_features",
    "change_training_table",
    "check_pairing",
    "delta_name",
    "design_from_meta",
    "id_text",
    "id_texts",
    "is_change_feature",
    "pair_rows",
    "pairing_problems",
    "unpaired_message",
]

#: Meta key (``meta.json``) of a change-feature model's design.
META_KEY = "change_features"
#: Patients listed by name in a message before "... and N more".
_LIST_AT_MOST = 20
#: Longest timepoint name a model's ``meta.json`` may record.
_MAX_TIMEPOINT = 64


class UnpairedPatientsWarning(UserWarning):
    """Patients dropped because they lack a sample at one of the two timepoints."""


def delta_name(feature: str) -> str:
    """The change column of a feature: ``delta_<feature>``."""
    return CHANGE_PREFIX + feature


def is_change_feature(name: str) -> bool:
    """Whether ``name`` is a change column (``delta_<schema feature>``)."""
    return name.startswith(CHANGE_PREFIX) and name[len(CHANGE_PREFIX) :] in feature_names()


def base_feature(name: str) -> str:
    """The schema feature a change column is the change of (``name`` itself otherwise)."""
    return name[len(CHANGE_PREFIX) :] if is_change_feature(name) else name


def base_features(names: Iterable[str]) -> list[str]:
    """The features a sample must provide for a model using ``names`` (changes: their bases).

    What scoring requests from each sample's gating, the later one's and the baseline's
    alike, so that a marker missing from either is a panel mismatch.
    """
    return list(dict.fromkeys(base_feature(n) for n in names))


# --------------------------------------------------------------------------- design
@dataclass(frozen=True)
class ChangeDesign:
    """What a change-feature model needs: two timepoints and the features differenced.

    Attributes
    ----------
    timepoint
        The later timepoint whose samples are scored (``"D28"``).
    baseline
        The timepoint each patient's change is measured from (``"baseline"``).
    features
        The schema features whose change (``delta_<feature>``) is computed.
    """

    timepoint: str
    baseline: str
    features: tuple[str, ...]

    @property
    def delta_columns(self) -> list[str]:
        """``delta_<feature>`` for each of :attr:`features`."""
        return [delta_name(f) for f in self.features]

    @property
    def description(self) -> str:
        """``"D28 - baseline"``: which timepoint is subtracted from which."""
        return f"{self.timepoint} - {self.baseline}"

    def as_meta(self) -> dict[str, Any]:
        """The ``meta.json`` entry (read back by :func:`design_from_meta`)."""
        return {
            "timepoint": self.timepoint,
            "baseline": self.baseline,
            "features": list(self.features),
            "description": self.description,
        }


def design_from_meta(meta: Mapping[str, Any], *, source: str | None = None) -> ChangeDesign | None:
    """The :class:`ChangeDesign` a model's ``meta.json`` records (``None``: a one-sample model).

    A model folder is untrusted input, so the entry is checked strictly: exactly
    ``{timepoint, baseline, features, description}``; two distinct timepoints, each
    printable text of 1 to 64 characters without surrounding spaces (no control characters
    or terminal escapes: they are printed and written to result files); ``features`` a list
    of distinct schema features; ``description`` ``"<timepoint> - <baseline>"``. Every
    ``delta_`` feature the model uses must be the change of one of them (a model using
    change features must record the design).

    Raises
    ------
    ModelError
        One line naming the problem (and ``source``, the model).
    """
    entry = meta.get(META_KEY)
    model_feats = [str(f) for f in meta.get("features") or []]
    deltas = [f for f in model_feats if f.startswith(CHANGE_PREFIX)]
    if entry is None:
        if deltas:
            raise ModelError(
                f"meta.json features {deltas[:3]} are change features but meta.json records "
                f"no {META_KEY!r} (the timepoints they compare)",
                path=source,
            )
        return None
    where = f"meta.json {META_KEY}"
    if not isinstance(entry, Mapping):
        raise ModelError(f"{where} must be a mapping, got {type(entry).__name__}", path=source)
    keys = {"timepoint", "baseline", "features", "description"}
    unknown = sorted(_shown(k) for k in set(entry) - keys)
    lacking = sorted(keys - set(entry))
    if unknown or lacking:
        what = f"unknown key(s) {', '.join(unknown)}" if unknown else f"lacks {lacking}"
        raise ModelError(f"{where}: {what}", path=source)
    tp, base, feats = entry["timepoint"], entry["baseline"], entry["features"]
    for key, value in (("timepoint", tp), ("baseline", base)):
        if not _plain_text(value):
            raise ModelError(
                f"{where}: {key} must be printable text of 1 to {_MAX_TIMEPOINT} characters "
                f"without surrounding spaces, got {_shown(value)}",
                path=source,
            )
    if tp == base:
        raise ModelError(f"{where}: timepoint and baseline are both {tp!r}", path=source)
    known = feature_names()
    if not isinstance(feats, list) or not feats or not all(f in known for f in feats):
        raise ModelError(f"{where}: features must be a list of schema features", path=source)
    repeated = sorted({f for f in feats if feats.count(f) > 1})
    if repeated:
        raise ModelError(f"{where}: features {repeated} are listed more than once", path=source)
    design = ChangeDesign(tp, base, tuple(feats))
    if entry["description"] != design.description:
        raise ModelError(
            f"{where}: description must be {design.description!r}, got "
            f"{_shown(entry['description'])}",
            path=source,
        )
    stray = [f for f in deltas if f not in design.delta_columns]
    if stray or not deltas:
        why = f"{stray[:3]} are not changes of its features" if stray else "none is a change"
        raise ModelError(f"{where}: of the model's features, {why}", path=source)
    return design


def _plain_text(value: Any) -> bool:
    """A timepoint a model may record: printable, 1-64 characters, no surrounding spaces."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= _MAX_TIMEPOINT
        and value.isprintable()
        and value == value.strip()
    )


def _shown(value: Any, limit: int = 60) -> str:
    """``value`` for a message: its ``repr`` (control characters escaped), cut short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_pairing(
    meta: Mapping[str, Any], *, baseline_given: bool, model_name: str | None = None
) -> ChangeDesign | None:
    """Refuse to score a change-feature model without a baseline (and the reverse).

    Returns the model's :class:`ChangeDesign` (``None`` for a one-sample model).

    Raises
    ------
    ModelError
        One line naming the way out: the model uses change features and no baseline sample
        was given (``--baseline``), or a baseline was given to a one-sample model.
    """
    design = design_from_meta(meta)
    name = f"model {model_name}" if model_name else "the model"
    if design is not None and not baseline_given:
        raise ModelError(
            f"{name} uses change features ({design.description}): score the patient's "
            f"{design.timepoint} sample with its {design.baseline} sample, "
            "`blinaprofile score POST.fcs --baseline BASE.fcs` (score-batch: a manifest with "
            "patient_id and timepoint columns)"
        )
    if design is None and baseline_given:
        raise ModelError(f"{name} does not use change features: score without --baseline")
    return design


# --------------------------------------------------------------------------- pairing
def id_text(value: Any) -> str | None:
    """A patient ID, sample ID or timepoint as pairing compares it (``None``: missing).

    Text is stripped (blank is missing); a number is its integer when whole, as a numeric
    CSV column reads it (``7.0`` -> ``"7"``, ``28.0`` -> ``"28"``); NaN, ``None`` and
    ``pd.NA`` are missing.
    """
    import pandas as pd

    if isinstance(value, str):
        return value.strip() or None
    if value is None or (pd.api.types.is_scalar(value) and pd.isna(value)):
        return None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if number.is_integer():
            return str(int(number))
    return str(value).strip() or None


def id_texts(values: pd.Series) -> pd.Series:
    """:func:`id_text` of every value (an object series, ``None`` where missing)."""
    import pandas as pd

    return pd.Series([id_text(v) for v in values], index=values.index, dtype=object)


def _pairing_keys(
    table: pd.DataFrame, later: str, base: str, *, source: Any
) -> tuple[pd.Series, pd.Series, pd.Series]:
    """Timepoint, patient and sample of every row of ``table`` as text (:func:`id_text`).

    Raises
    ------
    ManifestError
        No ``patient_id``/``timepoint`` column, the two timepoints are the same, or a
        sample at either of them has no ``patient_id`` (the samples named).
    """
    missing = [c for c in ("patient_id", "timepoint") if c not in table.columns]
    if missing:
        raise ManifestError(
            f"the table has no {' or '.join(repr(c) for c in missing)} column; change "
            f"features ({later} - {base}) pair each patient's samples by patient_id "
            "and timepoint",
            path=source,
        )
    if later == base:
        raise ManifestError(
            f"the change timepoint and the baseline are both {later!r}", path=source
        )
    tp = id_texts(table["timepoint"])
    pid = id_texts(table["patient_id"])
    sid = id_texts(table["sample_id"]) if "sample_id" in table.columns else pid.copy()
    blank = tp.isin([later, base]) & pid.isna()
    if blank.any():
        named = [s if s is not None else f"row {i}" for i, s in sid[blank].items()]
        raise ManifestError(
            f"{len(named)} sample(s) at {later!r} or {base!r} have no patient_id: "
            f"{_listed(named)}; change features pair each patient's samples by patient_id, "
            "so give every sample its patient",
            path=source,
        )
    return tp, pid, sid.where(sid.notna(), pid)


def _timepoint_pair(timepoint: Any, baseline: Any, *, source: Any) -> tuple[str, str]:
    later, base = id_text(timepoint), id_text(baseline)
    if later is None or base is None:
        raise ManifestError(
            f"change features need two timepoints, got {timepoint!r} and {baseline!r}",
            path=source,
        )
    return later, base


def _listed(ids: Iterable[str]) -> str:
    ids = list(ids)
    shown = ", ".join(ids[:_LIST_AT_MOST])
    return shown + (f" ... and {len(ids) - _LIST_AT_MOST} more" if len(ids) > _LIST_AT_MOST else "")


def _problems(
    tp: pd.Series, pid: pd.Series, sid: pd.Series, later: str, base: str
) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in dict.fromkeys(pid[tp.isin([later, base])]):
        mine = tp[pid == p]
        for t in (later, base):
            n = int((mine == t).sum())
            if n > 1:
                ids = sid[(pid == p) & (tp == t)].tolist()
                out[p] = f"{n} samples at {t!r} ({', '.join(ids)})"
        if p not in out:
            lacking = [t for t in (base, later) if not (mine == t).any()]
            if lacking:
                out[p] = f"no {lacking[0]!r} sample"
    return out


def pairing_problems(
    table: pd.DataFrame,
    *,
    timepoint: str,
    baseline: str,
    source: str | os.PathLike[str] | None = None,
) -> dict[str, str]:
    """Why each patient of ``table`` cannot be paired (patients absent from the result can).

    A patient with several samples at one of the two timepoints, or without a sample at one
    of them, is listed with the reason (keyed by its ID as text, :func:`id_text`); patients
    with samples at other timepoints only are not listed (they are not part of the design).

    Raises
    ------
    ManifestError
        No ``patient_id``/``timepoint`` column, equal timepoints, or a sample at either
        timepoint without a ``patient_id`` (named).
    """
    later, base = _timepoint_pair(timepoint, baseline, source=source)
    tp, pid, sid = _pairing_keys(table, later, base, source=source)
    return _problems(tp, pid, sid, later, base)


def unpaired_message(problems: Mapping[str, str], *, timepoint: str, baseline: str) -> str:
    """One line naming the patients that cannot be paired and why (:func:`pairing_problems`)."""
    return (
        f"{len(problems)} patient(s) cannot be paired for change features ({timepoint} - "
        f"{baseline}): {_listed(f'{p} ({r})' for p, r in problems.items())}"
    )


def _joined(later: pd.Series, base: pd.Series, base_ids: pd.Series, sep: str) -> list[str]:
    """Each row's text of both samples: the later's, then ``baseline <id>: `` and the baseline's.

    The baseline's text is prefixed once, whole (it may contain ``sep`` itself); a text that
    already starts with the sample's ID (``"<id>: file not found"``) does not get it twice.
    """
    out = []
    for a, b, who in zip(later, base, base_ids, strict=True):
        a = "" if a is None or a != a else str(a)
        b = "" if b is None or b != b else str(b)
        b = b[len(who) + 2 :] if b.startswith(f"{who}: ") else b
        parts = [a] if a else []
        if b:
            parts.append(f"baseline {who}: {b}")
        out.append(sep.join(parts))
    return out


def _passed(qc_pass: pd.Series) -> pd.Series:
    """``qc_pass`` as plain booleans, a missing value (an error row's) failing."""
    return qc_pass.astype("boolean").fillna(False).astype(bool)


def add_change_features(
    table: pd.DataFrame,
    *,
    timepoint: str,
    baseline: str,
    features: Sequence[str] | None = None,
    on_unpaired: Literal["warn", "error", "ignore"] = "warn",
    source: str | os.PathLike[str] | None = None,
) -> pd.DataFrame:
    """One row per patient at ``timepoint``, with ``delta_<feature>`` = value - baseline value.

    Parameters
    ----------
    table
        A feature table (:func:`blinaprofile.features.schema.feature_columns`) with
        ``patient_id`` and ``timepoint`` columns, several samples per patient.
    timepoint
        The later timepoint (``"D28"``): its samples give the rows and the original features.
    baseline
        The timepoint each patient's change is measured from (``"baseline"``).
    features
        The schema features to difference (default: every schema feature in the table).
    on_unpaired
        A patient without a sample at one of the two timepoints: ``"warn"`` drops it with
        one :class:`UnpairedPatientsWarning` listing all of them, ``"error"`` raises,
        ``"ignore"`` drops it silently (the module docstring has every pairing rule).
    source
        The table's file, named in errors.

    Returns
    -------
    pandas.DataFrame
        The ``timepoint`` rows of the paired patients (input order) with every column, then
        ``baseline_sample_id`` and the ``delta_`` columns; ``patient_id`` is the ID as
        text (:func:`id_text`); ``qc_pass``, ``qc_reasons``, ``error`` and ``warnings``
        (when present) combine both samples'. ``attrs["change_features"]``: ``timepoint``,
        ``baseline``, ``features`` and ``unpaired`` (patient -> reason).

    Raises
    ------
    ManifestError
        No ``patient_id``/``timepoint`` column, change columns already in the table, a
        feature that is not a schema feature of the table, a sample at either timepoint
        without a ``patient_id`` (named), a patient with several samples at one timepoint
        (named), or, with ``on_unpaired="error"``, patients that cannot be paired (named).
    """
    import pandas as pd

    later, base = _timepoint_pair(timepoint, baseline, source=source)
    paired_already = [
        str(c)
        for c in table.columns
        if str(c).startswith(CHANGE_PREFIX) or c == "baseline_sample_id"
    ]
    if paired_already:
        raise ManifestError(
            f"the table already has change column(s) {paired_already[:_LIST_AT_MOST]}: it "
            "was paired already; pair a table of per-sample features",
            path=source,
        )
    t = table.reset_index(drop=True)
    tp, pid, sid = _pairing_keys(t, later, base, source=source)
    known = feature_names()
    feats = [f for f in known if f in t.columns] if features is None else list(features)
    bad = [f for f in feats if f not in known]
    absent = [f for f in feats if f in known and f not in t.columns]
    if bad or absent or not feats:
        what = (
            f"{bad} are not schema features"
            if bad
            else f"the table lacks {absent}"
            if absent
            else "the table has no schema feature"
        )
        raise ManifestError(f"change features: {what}", path=source)
    problems = _problems(tp, pid, sid, later, base)
    dup = {p: r for p, r in problems.items() if not r.startswith("no ")}
    if dup:
        raise ManifestError(
            f"change features need one sample per patient and timepoint; "
            f"{'; '.join(f'patient {p}: {r}' for p, r in list(dup.items())[:_LIST_AT_MOST])}",
            path=source,
        )
    if problems and on_unpaired != "ignore":
        msg = unpaired_message(problems, timepoint=later, baseline=base)
        if on_unpaired == "error":
            raise ManifestError(msg, path=source)
        warnings.warn(UnpairedPatientsWarning(msg + "; dropped"), stacklevel=2)
    keep = ~pid.isin(list(problems))
    at_later, at_base = keep & (tp == later), keep & (tp == base)
    base_row = pd.Series(t.index[at_base], index=pid[at_base].to_numpy())
    later_rows = t.index[at_later]
    base_rows = base_row.loc[pid[later_rows].to_numpy()].to_numpy()
    out = t.loc[later_rows].reset_index(drop=True)
    b = t.loc[base_rows].reset_index(drop=True)
    out["patient_id"] = pid[later_rows].to_numpy()
    b_ids = pd.Series(sid[base_rows].to_numpy(), dtype=object)
    if "qc_pass" in out.columns:
        out["qc_pass"] = (_passed(out["qc_pass"]) & _passed(b["qc_pass"])).to_numpy()
    for col, sep in (("qc_reasons", "; "), ("error", "; "), ("warnings", " | ")):
        if col in out.columns:
            out[col] = _joined(out[col], b[col], b_ids, sep)
    out["baseline_sample_id"] = b_ids.to_numpy()
    deltas = {
        delta_name(f): pd.to_numeric(out[f], errors="coerce").to_numpy(dtype=float)
        - pd.to_numeric(b[f], errors="coerce").to_numpy(dtype=float)
        for f in feats
    }
    out = pd.concat([out, pd.DataFrame(deltas, index=out.index)], axis=1)
    out.attrs["change_features"] = {
        "timepoint": later,
        "baseline": base,
        "features": feats,
        "unpaired": problems,
    }
    return out


def change_training_table(
    table: pd.DataFrame,
    *,
    timepoint: str,
    baseline: str,
    features: Sequence[str] | None = None,
    on_unpaired: Literal["warn", "error", "ignore"] = "warn",
    source: str | os.PathLike[str] | None = None,
) -> tuple[pd.DataFrame, ChangeDesign, list[str]]:
    """The paired training table, its design and the model's feature list.

    ``features`` is the training configuration's list (``None``: the model features both
    modalities provide, :data:`blinaprofile.features.schema.MODEL_FEATURES`). Without any
    ``delta_`` name in it the model uses the features and the change of each; with some, it
    uses exactly the list and the changes named in it are computed. Unpaired patients are
    dropped with an :class:`UnpairedPatientsWarning` (``on_unpaired="warn"``; ``"ignore"``:
    silently, the caller says it; ``"error"``: a ``ManifestError`` naming them).
    """
    from blinaprofile.features.schema import MODEL_FEATURES

    wanted = list(features or MODEL_FEATURES)
    named = [base_feature(f) for f in wanted if is_change_feature(f)]
    odd = [f for f in wanted if f.startswith(CHANGE_PREFIX) and not is_change_feature(f)]
    if odd:
        raise ManifestError(f"{odd} are not changes of schema features", path=source)
    differenced = named or [f for f in wanted if f in feature_names()]
    paired = add_change_features(
        table,
        timepoint=timepoint,
        baseline=baseline,
        features=differenced,
        on_unpaired="ignore" if on_unpaired == "warn" else on_unpaired,
        source=source,
    )
    info = paired.attrs["change_features"]
    if info["unpaired"] and on_unpaired == "warn":  # warned here: the caller's stack level
        msg = unpaired_message(
            info["unpaired"], timepoint=info["timepoint"], baseline=info["baseline"]
        )
        warnings.warn(UnpairedPatientsWarning(msg + "; dropped"), stacklevel=2)
    if paired.empty:
        raise ManifestError(
            f"no patient has samples at both {info['timepoint']!r} and {info['baseline']!r}",
            path=source,
        )
    design = ChangeDesign(info["timepoint"], info["baseline"], tuple(differenced))
    model_features = wanted if named else [*wanted, *design.delta_columns]
    return paired, design, model_features


def pair_rows(
    later: Mapping[str, Any], base: Mapping[str, Any], *, design: ChangeDesign
) -> dict[str, Any]:
    """One patient's scoring row from its two feature rows (:func:`add_change_features`).

    ``later`` and ``base`` are feature rows of the ``design.timepoint`` and
    ``design.baseline`` samples; they are paired whatever their own ``patient_id`` and
    ``timepoint`` (the caller says they belong together).
    """
    import pandas as pd

    rows = [
        {**later, "patient_id": "patient", "timepoint": design.timepoint},
        {**base, "patient_id": "patient", "timepoint": design.baseline},
    ]
    paired = add_change_features(
        pd.DataFrame(rows),
        timepoint=design.timepoint,
        baseline=design.baseline,
        features=list(design.features),
        on_unpaired="error",
    )
    row = paired.iloc[0].to_dict()
    row["patient_id"] = later.get("patient_id", row.get("sample_id"))
    return row
