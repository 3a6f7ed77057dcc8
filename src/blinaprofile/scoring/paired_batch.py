"""Batch scoring with a change-feature model: one row per patient, samples paired by manifest.

:func:`blinaprofile.scoring.batch.score_samples` hands a change-feature model
(``train --change-from``) to :func:`score_paired_batch`: the manifest's ``patient_id`` and
``timepoint`` columns pair each patient's sample at the model's timepoint with the baseline
sample, both are featurized in parallel processes
(:func:`blinaprofile.features.flow.featurize_manifest`), paired
(:func:`blinaprofile.features.change.add_change_features`) and scored
(:func:`blinaprofile.scoring.score.score_features`).

One row per patient who has a sample at either of the two timepoints, in manifest order,
named by the later sample's ``sample_id`` (the baseline's when it has none). A patient that
cannot be paired (no baseline sample, no sample at the timepoint, two samples at one
timepoint) or whose sample could not be read becomes an ``error`` row saying so; the batch
goes on. A sample failing QC, or whose panel lacks a marker the model's features need (the
later sample's or the baseline's: ``"panel mismatch: ..."``, as ``score --baseline``
says), makes its patient's row a ``"no call"``. Samples at other timepoints are not scored
(``attrs['batch']['n_ignored']``). Patient IDs are compared as text
(:func:`~blinaprofile.features.change.id_text`); a sample at either timepoint without one
refuses the batch (:class:`~blinaprofile.errors.ManifestError` naming the samples).

Columns: :data:`~blinaprofile.scoring.score.RESULT_COLUMNS`, then :data:`PAIRED_COLUMNS`
(``patient_id``, ``timepoint``, ``baseline_sample_id``, ``baseline_sha256``) and the model's
``delta_`` columns (:func:`~blinaprofile.scoring.results.result_frame`). Flow manifests
only; paired scoring is not resumable (a rerun scores every patient again) and runs on
local processes. The output folder is made and checked by
:func:`~blinaprofile.scoring.batch.score_samples` before any sample is read (``run.json``:
a folder of another run is refused).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blinaprofile.errors import BlinaprofileError, InputError, ManifestError
from blinaprofile.features.change import (
    ChangeDesign,
    add_change_features,
    base_features,
    id_texts,
    pairing_problems,
)
from blinaprofile.scoring.results import error_row, result_frame, write_results

if TYPE_CHECKING:
    import pandas as pd

    from blinaprofile.config import QCConfig
    from blinaprofile.io.read import FCSReadOptions

__all__ = ["PAIRED_COLUMNS", "score_paired_batch"]

#: Columns a paired result adds after the result columns (then the ``delta_`` columns).
PAIRED_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "timepoint",
    "baseline_sample_id",
    "baseline_sha256",
)


def _manifest(source: Any, design: ChangeDesign, model: str) -> tuple[pd.DataFrame, str | None]:
    """The manifest as a table with ``path``, checked for the columns pairing needs."""
    import pandas as pd

    from blinaprofile.io.read import read_manifest

    need = (
        f"model {model} uses change features ({design.description}): score-batch pairs each "
        f"patient's {design.timepoint} sample with its {design.baseline} sample by a "
        "manifest's patient_id and timepoint columns"
    )
    if isinstance(source, pd.DataFrame):
        df, where = source.copy(), None
        if "path" not in df.columns and "file" in df.columns:
            df["path"] = [str(Path(f).resolve()) if str(f).strip() else "" for f in df["file"]]
    elif isinstance(source, str | os.PathLike) and Path(source).suffix.lower() in (
        ".csv",
        ".tsv",
        ".txt",
    ):
        df, where = read_manifest(source, check_files=False), str(source)
    else:
        raise InputError(f"{need}; give --manifest MANIFEST.csv")
    lacking = [c for c in ("sample_id", "path", "patient_id", "timepoint") if c not in df.columns]
    if not lacking and id_texts(df["timepoint"]).isna().all():
        lacking = ["timepoint"]
    if not lacking and (id_texts(df["patient_id"]) == id_texts(df["sample_id"])).all():
        lacking = ["patient_id"]
    if lacking:
        raise ManifestError(f"{need}; the manifest has no {lacking} column(s)", path=where)
    return df, where


def score_paired_batch(
    source: Any,
    *,
    model: str,
    design: ChangeDesign,
    n_jobs: int | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    strategy: str | os.PathLike[str] | None = None,
    adaptive: bool = True,
    qc: QCConfig | None = None,
    threshold: float | None = None,
    interval: bool = True,
    fcs_options: FCSReadOptions | None = None,
    keep_file_names: bool = False,
    allow_other_modality: bool = False,
    progress: bool | None = None,
    sample_timeout: float | None = None,
) -> pd.DataFrame:
    """Score every patient of a manifest with a change-feature model (one row per patient).

    Parameters
    ----------
    source
        A manifest CSV or a table with ``sample_id``, ``file``/``path``, ``patient_id`` and
        ``timepoint``.
    model
        The model's URI or folder (loaded by
        :func:`~blinaprofile.scoring.score.load_scoring_model`, cached).
    design
        The model's :class:`~blinaprofile.features.change.ChangeDesign`.
    n_jobs, strategy, adaptive, qc, threshold, interval, fcs_options, keep_file_names,
    allow_other_modality, progress
        As for :func:`blinaprofile.scoring.batch.score_samples`.
    out_dir
        An existing folder, made and checked by ``score_samples``: it receives
        ``results.parquet`` and ``results.csv`` (no parts: not resumable). ``None``: none.
    sample_timeout
        Seconds one sample's featurizing may take before it becomes an error row (its
        patient's row says so); ``None``: no limit.

    Returns
    -------
    pandas.DataFrame
        The module docstring's columns; ``attrs['batch']`` counts patients and errors and
        names the design (``paired``).

    Raises
    ------
    InputError, ManifestError
        The input is not a manifest, lacks ``patient_id``/``timepoint``, or a sample at
        either timepoint has no ``patient_id``.
    """
    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.io.files import file_checksum
    from blinaprofile.scoring.score import load_scoring_model, score_features

    sm = load_scoring_model(model)
    name = str(sm.info.get("name") or model)
    df, where = _manifest(source, design, name)
    tp = id_texts(df["timepoint"])
    used = tp.isin([design.timepoint, design.baseline])
    problems = pairing_problems(
        df[used], timepoint=design.timepoint, baseline=design.baseline, source=where
    )
    pid = id_texts(df["patient_id"])  # the IDs pairing compares (7 and 7.0 are one patient)
    df["patient_id"] = pid
    pairable = used & ~pid.isin(list(problems))
    feats = featurize_manifest(
        df[pairable].reset_index(drop=True),
        strategy_path=strategy,
        adaptive=adaptive,
        qc=qc,
        n_jobs=n_jobs,
        fcs_options=fcs_options,
        keep_file_names=keep_file_names,
        progress=progress,
        # the model's features (of a change, its base) as `score --baseline` requests them
        requested=base_features(sm.runtime.features),
        timeout=sample_timeout,
    )
    paired = add_change_features(
        feats,
        timepoint=design.timepoint,
        baseline=design.baseline,
        features=list(design.features),
        on_unpaired="ignore",
        source=where,
    )
    paths = dict(zip(df["sample_id"].astype(str), df["path"].astype(str), strict=True))
    tree_name = None
    if not paired.empty:
        from blinaprofile.gating.strategy import load_strategy

        tree_name = load_strategy(str(strategy) if strategy else None).name
    by_patient: dict[str, dict[str, Any]] = {}
    for rec in paired.to_dict("records"):
        p, sid, bid = str(rec["patient_id"]), str(rec["sample_id"]), str(rec["baseline_sample_id"])
        extra = {
            "patient_id": p,
            "timepoint": design.timepoint,
            "baseline_sample_id": bid,
            **{c: rec.get(c) for c in design.delta_columns},
        }
        if rec.get("error"):
            by_patient[p] = error_row(sid, f"patient {p}: {rec['error']}", **extra)
            continue
        try:
            res = score_features(
                rec,
                model=model,
                qc=qc,
                threshold=threshold,
                interval=interval,
                allow_other_modality=allow_other_modality,
            )
            res.input = {
                "sha256": file_checksum(paths[sid]),
                "modality": "flow",
                "gating_strategy": tree_name,
            }
            extra["baseline_sha256"] = file_checksum(paths[bid])
            by_patient[p] = {**res.to_row(), **extra}
        except BlinaprofileError as err:
            by_patient[p] = error_row(sid, f"patient {p}: {err}", **extra)
    for p, reason in problems.items():
        mine = df[used & (pid == p)]
        later = mine[tp[mine.index] == design.timepoint]
        sid = str((later if not later.empty else mine)["sample_id"].iloc[0])
        msg = (
            f"patient {p}: {reason}; the change-feature model ({design.description}) scores a "
            f"patient's {design.timepoint} sample with its {design.baseline} sample"
        )
        by_patient[p] = error_row(sid, msg, patient_id=p, timepoint=design.timepoint)
    order = list(dict.fromkeys(pid[used]))
    out = result_frame(
        [by_patient[p] for p in order if p in by_patient],
        extra_columns=[*PAIRED_COLUMNS, *design.delta_columns],
        extra_text_columns=PAIRED_COLUMNS,
    )
    if out_dir is not None:
        write_results(out, Path(out_dir))
    out.attrs["batch"] = {
        "n_samples": len(out),
        "n_scored": len(out),
        "n_skipped": 0,
        "n_errors": int((out["error"] != "").sum()),
        "n_ignored": int((~used).sum()),
        "out_dir": None if out_dir is None else str(out_dir),
        "paired": design.description,
    }
    return out
