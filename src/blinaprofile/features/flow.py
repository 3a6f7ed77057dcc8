"""Per-sample features (the versioned schema in :mod:`blinaprofile.features.schema`) from gated events.

:func:`features_from_gating` turns one sample's gate counts into a feature row;
:func:`featurize_fcs` reads, gates and featurizes one file; :func:`featurize_manifest`
does a cohort (in parallel processes, :func:`blinaprofile.parallel.run_parallel`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blinaprofile.config import QCConfig, load_config
from blinaprofile.errors import BlinaprofileError, PanelMismatchError, one_line
from blinaprofile.features.schema import SCHEMA_VERSION, feature_columns
from blinaprofile.parallel import run_parallel
from blinaprofile.progress import Progress

if TYPE_CHECKING:
    import pandas as pd

    from blinaprofile.gating.gates import GatingResult
    from blinaprofile.gating.tree import GateTree
    from blinaprofile.io.read import FCSReadOptions

__all__ = [
    "REQUIRED_GATES",
    "feature_columns",
    "feature_gaps",
    "features_from_gating",
    "featurize_fcs",
    "featurize_manifest",
    "load_qc",
    "panel_mismatch_row",
    "qc_labels",
    "qc_verdict",
]

_PCT = {
    # feature: (numerator gate, denominator gate)
    "cd3_pct_lymph": ("cd3", "live"),
    "cd4_pct_cd3": ("cd4", "cd3"),
    "cd8_pct_cd3": ("cd8", "cd3"),
    "cd8_naive_pct_cd8": ("cd8_naive", "cd8"),
    "cd8_cm_pct_cd8": ("cd8_cm", "cd8"),
    "cd8_em_pct_cd8": ("cd8_em", "cd8"),
    "cd8_temra_pct_cd8": ("cd8_temra", "cd8"),
    "cd4_naive_pct_cd4": ("cd4_naive", "cd4"),
    "cd4_cm_pct_cd4": ("cd4_cm", "cd4"),
    "cd4_em_pct_cd4": ("cd4_em", "cd4"),
    "cd4_temra_pct_cd4": ("cd4_temra", "cd4"),
    "cd8_tim3_pct_cd8": ("cd8_tim3", "cd8"),
    "cd8_pd1_pct_cd8": ("cd8_pd1", "cd8"),
    "cd4_treg_pct_cd4": ("cd4_treg", "cd4"),
}
_MEDIANS = {"cd8_tim3_median": ("TIM3", "cd8"), "cd8_pd1_median": ("PD1", "cd8")}
#: Gates every flow feature row needs. ``live`` and ``cd3`` may be absent (a pre-gated
#: export skips them): ``n_live``/``n_cd3`` then count the events their children start from.
REQUIRED_GATES = ("cd4", "cd8")


def load_qc(path: str | os.PathLike[str] | None = None) -> QCConfig:
    """QC thresholds from YAML (default ``configs/qc.yaml``; built-in defaults if absent)."""
    from blinaprofile.settings import settings

    p = Path(path) if path else settings.default_qc
    if path is None and not p.exists():
        return QCConfig()
    return load_config(QCConfig, p)


def qc_verdict(
    row: dict[str, Any],
    qc: QCConfig,
    flags: Sequence[str] = (),
    *,
    labels: Mapping[str, str] | None = None,
    exempt: Iterable[str] = (),
) -> tuple[bool, str]:
    """Apply count thresholds to a feature row; returns ``(passed, reasons)``.

    ``labels`` name what a count counts (``n_live`` -> ``'events in gate live (cells >
    singlets > live)'``, see :func:`qc_labels`); default ``live cells`` and the T-cell names.
    Counts in ``exempt`` are not checked (``n_events`` of a pre-gated export, whose events
    are the live cells ``min_live`` already checks).
    """
    reasons = list(flags)
    skip = set(exempt)
    what_of = {"n_live": "live cells", **(labels or {})}
    checks = (
        ("n_events", qc.min_events, "events"),
        ("n_live", qc.min_live, what_of["n_live"]),
        ("n_cd3", qc.min_cd3, what_of.get("n_cd3", "CD3+ T cells")),
        ("n_cd4", qc.min_cd4, "CD4+ T cells"),
        ("n_cd8", qc.min_cd8, "CD8+ T cells"),
    )
    for key, minimum, what in checks:
        v = row.get(key)
        if key not in skip and v is not None and v < minimum:
            why = f"only {int(v)} {what} (< {minimum})"
            if key == "n_events":  # the other counts follow: say what it means
                why += ": too few for the QC minimums (a subsampled or gated export?)"
            reasons.append(why)
    return (not reasons, "; ".join(reasons))


def _count(tree: GateTree, result: GatingResult, gate_id: str) -> float:
    """A gate's count; for a skipped gate the events its children start from (else NaN)."""
    if gate_id in result.counts:
        return result.counts[gate_id]
    gone = tree.skipped.get(gate_id)
    if gone is None or gone.policy != "skip":
        return float("nan")
    return result.counts[gone.start] if gone.start else result.n_events


def qc_labels(tree: GateTree) -> dict[str, str]:
    """What ``n_live`` and ``n_cd3`` count in this (bound) strategy, for QC texts.

    ``'events in gate live (cells > singlets > live)'`` names the gates actually used (no
    scatter assumed); a skipped gate says what its count is instead
    (``'events in the file (no cd3 gate: no CD3 channel)'``).
    """
    out: dict[str, str] = {}
    ids = set(tree.gate_ids)
    for key, gid in (("n_live", "live"), ("n_cd3", "cd3")):
        gone = tree.skipped.get(gid)
        if gone is not None:
            start = f"events in gate {gone.start}" if gone.start else "events in the file"
            out[key] = f"{start} (no {gid} gate: {gone.lacking})"
        elif gid == "live" and gid in ids:
            out[key] = f"events in gate live ({' > '.join([*tree.path(gid)[1:], gid])})"
    return out


def feature_gaps(tree: GateTree) -> dict[str, str]:
    """Why features are NaN: the sample lacks a marker, or the strategy has no such gate.

    Returns
    -------
    dict of str to str
        feature -> reason (``'cd3_pct_lymph'`` -> ``'no CD3 channel (pre-gated export?)'``,
        ``'cd8_tim3_pct_cd8'`` -> ``"not measured by gating strategy 'cytof-tcell'"``);
        empty when every feature's gates were evaluated.
    """
    gone = tree.skipped
    ids = set(tree.gate_ids)
    names = set(tree.channel_map())
    unmeasured = f"not measured by gating strategy {tree.name!r}"
    out: dict[str, str] = {}
    for name, (num, den) in _PCT.items():
        why = next((gone[g].reason for g in (num, den) if g in gone), None)
        if why is None and any(g not in ids and g not in gone for g in (num, den)):
            why = unmeasured
        if why is not None:
            out[name] = why
    for name, (marker, _gate) in _MEDIANS.items():
        why = next((a.reason for a in gone.values() if marker in a.missing), None)
        if why is None and marker not in names:
            why = unmeasured
        if why is not None:
            out[name] = why
    return out


def _lacking(tree: GateTree, feature: str) -> list[str]:
    """The markers a feature needs that the sample lacks (its gates were left out for them)."""
    gone = tree.skipped
    if feature in _MEDIANS:
        marker = _MEDIANS[feature][0]
        return [marker] if any(marker in a.missing for a in gone.values()) else []
    out: list[str] = []
    for gid in _PCT.get(feature, ()):
        seen: set[str] = set()
        while gid in gone and gid not in seen:  # an omitted gate: the one that took it along
            seen.add(gid)
            out += gone[gid].missing
            gid = gone[gid].cause or ""
    return list(dict.fromkeys(out))


def _require(tree: GateTree, data: Any, requested: Iterable[str]) -> None:
    """Refuse a sample that lacks a marker a requested feature needs (scoring's features)."""
    wanted = list(requested)
    need: dict[str, list[str]] = {}
    for name in wanted:
        for marker in _lacking(tree, name):
            need.setdefault(marker, []).append(name)
    if need:
        from blinaprofile.errors import PanelMismatchError
        from blinaprofile.gating.panel import describe_channels

        feats = sorted({f for fs in need.values() for f in fs}, key=wanted.index)
        has = describe_channels(data.channels, data.markers, declared=tree.needed_names())
        raise PanelMismatchError(
            f"missing marker(s) {', '.join(need)} needed by feature(s) {', '.join(feats)}; "
            f"the file has: {has}",
            path=data.path,
        )


def _lineage_flags(tree: GateTree) -> list[str]:
    """A CD3 gate skipped in a file that is no T-cell export (a gate above it was evaluated)."""
    gone = tree.skipped.get("cd3")
    if gone is None or gone.policy != "skip" or gone.start is None:
        return []
    return [
        f"gate cd3 skipped ({gone.lacking}) although gate {gone.start} was evaluated: the "
        f"CD4/CD8 gates see every {gone.start} event, not T cells (an unlabelled CD3 channel? "
        "--marker CHANNEL=CD3)"
    ]


def _gap_notes(gaps: Mapping[str, str]) -> list[str]:
    by_reason: dict[str, list[str]] = {}
    for name, why in gaps.items():
        by_reason.setdefault(why, []).append(name)
    return [f"{', '.join(names)} NaN: {why}" for why, names in by_reason.items()]


def features_from_gating(
    tree: GateTree,
    result: GatingResult,
    *,
    medians: dict[str, float] | None = None,
) -> dict[str, float]:
    """Feature values and QC counts from one sample's gate counts.

    A feature whose gates are absent is NaN (see :func:`feature_gaps` for why); ``n_live``
    and ``n_cd3`` of a skipped ``live``/``cd3`` gate count the events its children start
    from.
    """
    missing = [g for g in REQUIRED_GATES if g not in result.counts]
    if missing:
        from blinaprofile.errors import GatingError

        raise GatingError(
            f"gating strategy {tree.name!r} lacks gate(s) {missing} needed for features"
        )
    c = result.counts
    out: dict[str, float] = {}
    for name, (num, den) in _PCT.items():
        if num in c and den in c and c[den] > 0:
            out[name] = 100.0 * c[num] / c[den]
        else:
            out[name] = float("nan")
    out["cd4_cd8_ratio"] = c["cd4"] / c["cd8"] if c["cd8"] > 0 else float("nan")
    for name in _MEDIANS:
        out[name] = (medians or {}).get(name, float("nan"))
    out["n_events"] = result.n_events
    out["n_live"] = _count(tree, result, "live")
    out["n_cd3"] = _count(tree, result, "cd3")
    out["n_cd4"] = c["cd4"]
    out["n_cd8"] = c["cd8"]
    return out


def _medians(tree: GateTree, result: GatingResult, data: Any) -> dict[str, float]:
    from blinaprofile.gating.events import EventCache, fcs_scaling

    out: dict[str, float] = {}
    cmap = tree.channel_map()
    ev = None
    for name, (marker, gate_id) in _MEDIANS.items():
        mask = result.masks.get(gate_id)
        dim = next((d for g in tree.gates for d in g.dims if d.name == marker), None)
        if mask is None or dim is None or marker not in cmap or not mask.any():
            out[name] = float("nan")
            continue
        if ev is None:
            ev = EventCache(
                tree,
                data.events,
                data.channels,
                data.spillover,
                data.path,
                scaling=fcs_scaling(data),
            )
        out[name] = float(np.median(ev.transformed(dim, np.flatnonzero(mask))))
    return out


@dataclass
class SampleFeatures:
    """One featurized sample: its feature row and, optionally, the gating behind it."""

    row: dict[str, Any]
    tree: GateTree | None = None
    result: GatingResult | None = None


def featurize_fcs(
    path: str | os.PathLike[str],
    *,
    strategy: GateTree | None = None,
    adaptive: bool = True,
    sample_id: str | None = None,
    patient_id: str | None = None,
    qc: QCConfig | None = None,
    keep_gating: bool = False,
    fcs_options: FCSReadOptions | None = None,
    requested: Iterable[str] | None = None,
) -> SampleFeatures:
    """Read, gate and featurize one FCS file.

    ``fcs_options`` relaxes the reader's integrity checks and labels or rescales channels
    (default: the options of the enclosing :func:`blinaprofile.io.read.fcs_read_options`
    block, else strict). Without ``sample_id`` the sample is named by the pseudonym
    ``S-<first 12 hex of the file's SHA-256>``, never by the file's name.

    The strategy is bound partially (pre-gated exports): gates whose markers the file lacks
    are skipped or omitted as their ``if_absent`` policy says, features that need them are
    NaN, and ``warnings`` says which and why. Values not on the scale the strategy's
    transforms expect (:func:`blinaprofile.gating.strategy.scale_problems`), and a CD3 gate
    skipped below gates that were evaluated, are a warning and a QC flag. ``requested``
    (scoring: the model's features) must not need a marker the file lacks.

    Raises
    ------
    PanelMismatchError
        A required gate, or a ``requested`` feature, needs a marker the file lacks.

    Returns
    -------
    SampleFeatures
        ``row`` has every column of :func:`feature_columns` and ``warnings``: the
        reader's warnings about the file and the gating notes
        (:func:`blinaprofile.io.read.join_warnings`).
    """
    from blinaprofile.gating.panel import absent_notes
    from blinaprofile.gating.sample import gate_events
    from blinaprofile.gating.strategy import as_exported, load_strategy, scale_problems
    from blinaprofile.io.privacy import file_pseudonym
    from blinaprofile.io.read import join_warnings, read_flow

    strategy = replace(strategy or load_strategy(), partial=True)
    # the strategy's own marker names are declared: $PnS labels it reads stay verbatim
    data = read_flow(path, fcs_options=fcs_options, declared_markers=strategy.needed_names())
    tree, res = gate_events(data, as_exported(strategy, data), adaptive=adaptive)
    if requested is not None:
        _require(tree, data, requested)
    problems = [*scale_problems(tree, data), *_lineage_flags(tree)]
    res.flags.extend(problems)
    notes = [*problems, *absent_notes(tree.skipped), *_gap_notes(feature_gaps(tree))]
    feats = features_from_gating(tree, res, medians=_medians(tree, res, data))
    sid = sample_id or file_pseudonym(path)
    row: dict[str, Any] = {
        "sample_id": sid,
        "patient_id": patient_id or sid,
        "modality": "flow",
        "schema_version": SCHEMA_VERSION,
        **feats,
    }
    # a pre-gated export (no live gate) holds the live cells: min_live, not min_events
    live = tree.skipped.get("live")
    exempt = ("n_events",) if live is not None and live.policy == "skip" else ()
    passed, reasons = qc_verdict(
        row, qc or load_qc(), res.flags, labels=qc_labels(tree), exempt=exempt
    )
    row["qc_pass"] = passed
    row["qc_reasons"] = reasons
    row["warnings"] = join_warnings([*data.warnings, *notes])
    return SampleFeatures(row, tree if keep_gating else None, res if keep_gating else None)


#: What featurizing a sample imports: loaded once in the fork server, not once per worker.
WORKER_MODULES = (
    "blinaprofile.features.flow",
    "blinaprofile.gating.strategy",
    "blinaprofile.gating.sample",
    "blinaprofile.io.read",
)


def panel_mismatch_row(sample_id: str, err: BlinaprofileError) -> dict[str, Any]:
    """The feature row of a sample whose panel lacks a marker a requested feature needs.

    It fails QC (``qc_reasons`` ``"panel mismatch: ..."``), as scoring's ``"no call"`` for
    such a sample does, and has no feature value.
    """
    return {
        "sample_id": sample_id,
        "modality": "flow",
        "qc_pass": False,
        "qc_reasons": f"panel mismatch: {err.message}",
        "warnings": "",
    }


def _featurize_one(
    args: tuple[str, str, str, str | None, bool, QCConfig, FCSReadOptions, tuple[str, ...] | None],
) -> dict[str, Any]:
    path, sid, pid, strategy_path, adaptive, qc, fcs_options, requested = args
    from blinaprofile.cache import memo_file
    from blinaprofile.gating.strategy import load_strategy
    from blinaprofile.settings import settings

    try:
        # parsed once per worker and file version, not once per sample
        strategy = memo_file("strategy", strategy_path or settings.default_gating, load_strategy)
        return featurize_fcs(
            path,
            strategy=strategy,
            adaptive=adaptive,
            sample_id=sid,
            patient_id=pid,
            qc=qc,
            fcs_options=fcs_options,
            requested=requested,
        ).row
    except BlinaprofileError as err:
        if isinstance(err, PanelMismatchError) and requested is not None:  # as scoring does
            return {**panel_mismatch_row(sid, err), "patient_id": pid}
        msg = str(err) if err.path else f"{path}: {err}"
        return {"sample_id": sid, "patient_id": pid, "error": msg}
    except Exception as err:
        return {
            "sample_id": sid,
            "patient_id": pid,
            "error": one_line(f"{path}: internal error: {type(err).__name__}: {err}"),
        }


def _worker_failed(args: tuple[Any, ...], err: Exception) -> dict[str, Any]:
    from blinaprofile.parallel import ItemTimeoutError, WorkerDiedError

    path, sid, pid = args[0], args[1], args[2]
    if isinstance(err, ItemTimeoutError | WorkerDiedError):
        msg = one_line(f"{path}: {err.message}")
    else:
        msg = one_line(f"{path}: worker failed: {type(err).__name__}: {err}")
    return {"sample_id": sid, "patient_id": pid, "error": msg}


def featurize_manifest(
    manifest: str | os.PathLike[str] | pd.DataFrame,
    *,
    strategy_path: str | os.PathLike[str] | None = None,
    adaptive: bool = True,
    qc: QCConfig | None = None,
    n_jobs: int | None = None,
    fcs_options: FCSReadOptions | None = None,
    keep_columns: Iterable[str] = (),
    keep_file_names: bool = False,
    progress: bool | None = None,
    requested: Iterable[str] | None = None,
    timeout: float | None = None,
) -> pd.DataFrame:
    """Featurize every sample of a manifest (flow files) in parallel processes.

    Samples that fail (bad file, panel mismatch...) get an ``error`` message instead of
    features; the cohort goes on; the message names the sample (its ``sample_id``), not
    the file, unless ``keep_file_names``. Only declared manifest columns are kept
    (:data:`blinaprofile.io.privacy.DECLARED_MANIFEST_COLUMNS`: ``sample_id``,
    ``patient_id``, ``response``, ``timepoint``, ``batch``; those named in
    ``keep_columns``; ``file`` with ``keep_file_names``): any other column (an ``mrn``, a
    ``patient_name``) is dropped and listed in ``table.attrs["dropped_columns"]``.
    The ``warnings`` column holds the reader's warnings about each file (``""`` if none).
    ``fcs_options`` relaxes the reader's integrity checks for every file (default: the
    enclosing :func:`blinaprofile.io.read.fcs_read_options` block's, else strict).
    ``progress`` shows a bar of the samples done on stderr (default: when it is a terminal).
    ``requested`` (scoring: the model's features): a sample whose panel lacks a marker one
    of them needs fails QC with ``qc_reasons`` ``"panel mismatch: ..."`` and has no features
    (:func:`panel_mismatch_row`), as a scored sample's "no call". ``timeout``: seconds one
    sample may take before it becomes an error row (its worker is killed; ``None``: no
    limit).
    """
    import pandas as pd

    from blinaprofile.gating.strategy import load_strategy
    from blinaprofile.io.privacy import manifest_columns, withhold_file_name
    from blinaprofile.io.read import current_fcs_read_options, read_manifest
    from blinaprofile.settings import settings

    df = manifest if isinstance(manifest, pd.DataFrame) else read_manifest(manifest)
    missing = [c for c in ("sample_id", "path") if c not in df.columns]
    if missing:
        from blinaprofile.errors import ManifestError

        raise ManifestError(f"the sample table lacks column(s) {missing}")
    if "patient_id" not in df.columns:
        df = df.assign(patient_id=df["sample_id"])
    qc = qc or load_qc()
    sp = str(strategy_path) if strategy_path else None
    load_strategy(sp)  # a bad strategy is one error for the run, not one per sample
    kept, dropped = manifest_columns(
        list(df.columns),
        keep=keep_columns,
        keep_file_names=keep_file_names,
        path=None if isinstance(manifest, pd.DataFrame) else manifest,
    )
    computed = {*feature_columns(), "error", "warnings"}
    clash = [c for c in kept if c in computed and c not in ("sample_id", "patient_id")]
    if clash:
        from blinaprofile.errors import ManifestError

        raise ManifestError(f"column(s) {clash} to keep would replace computed columns")
    fcs_options = fcs_options or current_fcs_read_options()  # workers get it explicitly
    wanted = None if requested is None else tuple(requested)
    jobs = [
        (str(r.path), str(r.sample_id), str(r.patient_id), sp, adaptive, qc, fcs_options, wanted)
        for r in df.itertuples(index=False)
    ]
    n_jobs = settings.n_jobs if n_jobs is None else n_jobs
    done = {}
    with Progress(len(jobs), desc="featurizing", unit="sample", show=progress) as bar:
        for job, row in run_parallel(
            _featurize_one,
            jobs,
            n_jobs=n_jobs,
            on_error=_worker_failed,
            timeout=timeout,
            preload=WORKER_MODULES,
        ):
            done[job] = row
            bar.update(1)
    rows = [done[j] for j in jobs]
    if not keep_file_names:  # error rows name the sample, never its file
        for j, row in zip(jobs, rows, strict=True):
            if row.get("error"):
                row["error"] = withhold_file_name(row["error"], j[0], label=j[1])
    # every column is present even when every sample failed
    feats = pd.DataFrame(rows).reindex(columns=[*feature_columns(), "error", "warnings"])
    feats["error"] = feats["error"].fillna("").astype(str)
    feats["warnings"] = feats["warnings"].fillna("").astype(str)
    extra = [c for c in kept if c not in ("sample_id", "patient_id")]
    out = df[["sample_id", *extra]].merge(feats, on="sample_id", how="left")
    cols = [c for c in feature_columns() if c in out.columns]
    rest = [c for c in out.columns if c not in cols]
    table = out[cols + rest]
    table.attrs["dropped_columns"] = dropped
    return table
