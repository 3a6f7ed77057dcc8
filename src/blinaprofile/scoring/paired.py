"""Scoring with a change-feature model: a patient's later sample paired with its baseline.

A model trained with ``train --timepoint D28 --change-from baseline`` records its
:class:`~blinaprofile.features.change.ChangeDesign` and uses ``delta_<feature>`` columns, so
it cannot score one sample alone. :func:`blinaprofile.scoring.score.score_sample` refuses it
without ``baseline`` (:func:`~blinaprofile.features.change.check_pairing`) and, given the
baseline file, calls :func:`baseline_pair` here: the baseline is featurized exactly as the
scored sample (same gating strategy and placement, QC and FCS read options; single-cell:
the model's stored annotator) and the two rows are paired
(:func:`~blinaprofile.features.change.pair_rows`). QC failures of the baseline make the pair
"no call" with reasons prefixed ``baseline <sample_id>:``; a panel that lacks a marker in the
baseline does the same. :func:`check_baseline` refuses a missing baseline, or one with the
scored file's content, before either sample is read.

Many patients at once: :mod:`blinaprofile.scoring.paired_batch`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from blinaprofile.errors import InputError, PanelMismatchError
from blinaprofile.features.change import ChangeDesign, pair_rows
from blinaprofile.io.files import ensure_file, file_checksum, pseudonymous_id

if TYPE_CHECKING:
    from blinaprofile.annotate.config import SampleQCSpec
    from blinaprofile.config import QCConfig

__all__ = ["baseline_pair", "check_baseline", "featurize_baseline"]


def check_baseline(baseline: str | os.PathLike[str], *, scored_sha256: str | None) -> str:
    """The SHA-256 of the baseline file, checked before any sample is featurized.

    Raises
    ------
    InputError
        The file is missing (or not a regular file), or has the same content as the scored
        file (``scored_sha256``).
    """
    p = ensure_file(baseline)
    checksum = file_checksum(p)
    if scored_sha256 is not None and checksum == scored_sha256:
        raise InputError("the baseline has the same content as the scored file", path=p)
    return checksum


def featurize_baseline(
    path: str | os.PathLike[str],
    *,
    modality: str,
    design: ChangeDesign,
    strategy: Any = None,
    adaptive: bool = True,
    qc: QCConfig | None = None,
    sample_id: str | None = None,
    annotator: Any = None,
    single_cell_qc: SampleQCSpec | None = None,
    sha256: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The feature row of a baseline sample and what the result records about it.

    Parameters
    ----------
    path
        The baseline file (FCS, or a single-cell object holding one sample).
    modality
        The scored sample's modality; the baseline must have the same.
    design
        The model's change design (its ``features`` are requested from the gating).
    strategy, adaptive, qc
        As the scored sample was gated and QC'd (``strategy``: a loaded
        :class:`~blinaprofile.gating.tree.GateTree`; flow only).
    sample_id
        The baseline's ID (default: the pseudonym ``S-<sha12>`` of its content).
    annotator, single_cell_qc
        Single-cell: the model's stored annotator and QC minimums.
    sha256
        The file's SHA-256 when already known (:func:`check_baseline`).

    Raises
    ------
    InputError
        The file is missing, of another modality, or a single-cell object of several samples.
    """
    from blinaprofile.io.read import modality_of

    p = ensure_file(path)
    checksum = sha256 or file_checksum(p)
    sid = sample_id or pseudonymous_id(checksum)
    info = {"sample_id": sid, "sha256": checksum, "timepoint": design.baseline}
    if modality_of(p) != modality:
        raise InputError(
            f"the baseline is {modality_of(p)}, the scored sample {modality}: pair samples of "
            "one modality",
            path=p,
        )
    if modality == "flow":
        from blinaprofile.features.flow import featurize_fcs, panel_mismatch_row

        try:
            row = featurize_fcs(
                p,
                strategy=strategy,
                adaptive=adaptive,
                sample_id=sid,
                qc=qc,
                requested=design.features,
            ).row
        except PanelMismatchError as err:  # the pair is a "no call" naming the baseline
            row = panel_mismatch_row(sid, err)
        return row, info
    from blinaprofile.features.singlecell import featurize_cells
    from blinaprofile.io.singlecell import read_single_cell

    adata = read_single_cell(p)
    feats = featurize_cells(adata, annotator=annotator, sample_qc=single_cell_qc)
    if len(feats.table) != 1:
        raise InputError(
            f"the baseline holds {len(feats.table)} samples; give an object of the one "
            "baseline sample",
            path=p,
        )
    row = feats.table.iloc[0].to_dict()
    row["sample_id"] = sid
    return row, info


def baseline_pair(
    row: dict[str, Any],
    baseline: str | os.PathLike[str],
    *,
    design: ChangeDesign,
    modality: str,
    strategy: Any = None,
    adaptive: bool = True,
    qc: QCConfig | None = None,
    baseline_id: str | None = None,
    annotator: Any = None,
    single_cell_qc: SampleQCSpec | None = None,
    scored_sha256: str | None = None,
    baseline_sha256: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The scoring row of a patient: the later sample's ``row`` with its change since baseline.

    Returns the paired row (:func:`~blinaprofile.features.change.pair_rows`: the later
    sample's columns, ``baseline_sample_id``, ``delta_`` columns, combined QC) and the
    baseline's ``sample_id``, ``sha256`` and ``timepoint`` for the result's ``input``.
    ``scored_sha256`` (the later sample's file) refuses a baseline that is the same file
    before it is read (:func:`check_baseline`; ``baseline_sha256``: already checked).
    """
    if baseline_sha256 is None:
        baseline_sha256 = check_baseline(baseline, scored_sha256=scored_sha256)
    brow, info = featurize_baseline(
        baseline,
        modality=modality,
        design=design,
        strategy=strategy,
        adaptive=adaptive,
        qc=qc,
        sample_id=baseline_id,
        annotator=annotator,
        single_cell_qc=single_cell_qc,
        sha256=baseline_sha256,
    )
    return pair_rows(row, brow, design=design), info
