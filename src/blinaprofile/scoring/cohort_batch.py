"""``score-batch COHORT.h5ad --sample-key KEY``: the object read once, every sample scored.

Scoring a multi-sample object sample by sample (:func:`~blinaprofile.scoring.score.
score_sample` with ``select_sample``) reads the whole object for each sample. When the model
stores its single-cell annotator, a sample's features depend on that sample's cells and the
annotator alone, so the object is featurized once instead, a group of whole samples at a time
(:func:`~blinaprofile.features.singlecell_chunked.featurize_cohort`; an ``.h5ad`` with a CSR
matrix is streamed in blocks of rows, never held whole), and each sample's row is scored with
:func:`~blinaprofile.scoring.score.score_features`: the same rows as sample by sample
(``tests/test_singlecell_cli.py``).

What stays as in the per-sample batch: one part per finished sample (resuming skips finished
samples and featurizes the object only when some are left), a sample that cannot be scored
becomes an error row and the batch goes on (when the object cannot be featurized as a whole,
every sample left is scored alone, as without streaming, so each gets its own row or error),
and a file that changes while the batch runs makes every sample an error row. What differs:
``sample_timeout`` does not apply (the object is read in one pass, not sample by sample).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from blinaprofile.errors import BlinaprofileError, SingleCellInputError

__all__ = ["score_cohort", "streamed_annotator"]

Row = dict[str, Any]


def streamed_annotator(jobs: Sequence[Any], options: dict[str, Any]) -> Any:
    """The model's annotator when ``jobs`` can be scored from one pass over their object.

    That is: every job names a sample (``sample_id``, ``sample_key``) of the same single-cell
    object and the model is a single-cell model that stores its annotator. ``None``
    otherwise (score sample by sample).
    """
    if not jobs:
        return None
    paths = {j.path for j in jobs}
    if len(paths) != 1 or any(j.sample_id is None or j.sample_key is None for j in jobs):
        return None
    from blinaprofile.io.read import modality_of

    path = next(iter(paths))
    if not path or not Path(path).exists() or modality_of(path) != "single_cell":
        return None
    from blinaprofile.scoring.score import load_scoring_model

    sm = load_scoring_model(options["model"])
    if sm.runtime.modality != "single_cell":
        return None
    return getattr(sm.pyfunc, "annotator", None)


def _content(job: Any) -> str:
    """The file's SHA-256 now (trusted from the job while the file shows its stamp)."""
    from blinaprofile.io.files import file_checksum, file_stamp

    if job.stamp is not None and file_stamp(job.path) == job.stamp:
        return str(job.sha256)
    return file_checksum(job.path)


def score_cohort(
    jobs: Sequence[Any],
    options: dict[str, Any],
    *,
    annotator: Any,
    n_jobs: int,
    error: Callable[[Any, str], Row],
    alone: Callable[[Sequence[Any]], Generator[tuple[Any, Row]]],
) -> Generator[tuple[Any, Row]]:
    """Featurize the jobs' object once and yield ``(job, row)`` for each job, in order.

    Parameters
    ----------
    jobs
        Batch jobs naming samples of one object (:func:`streamed_annotator` says so).
    options
        The batch's scoring options (model, QC, threshold...).
    annotator
        The model's annotator.
    n_jobs
        Processes labelling groups of samples.
    error
        Makes a job's error row from a message.
    alone
        Scores jobs sample by sample (used when the object cannot be featurized as a whole).
    """
    from blinaprofile.features.singlecell_chunked import featurize_cohort
    from blinaprofile.io.files import file_stamp
    from blinaprofile.io.read import join_warnings, split_warnings
    from blinaprofile.scoring.score import score_features

    first = jobs[0]
    path, key = first.path, first.sample_key
    try:
        before = _content(first)
        feats = featurize_cohort(
            path,
            annotator=annotator,
            sample_key=key,
            sample_qc=options.get("single_cell_qc"),
            n_jobs=n_jobs,
        )
    except Exception:
        # a file error gives each sample its error row, one sample's problem that sample's
        # row only: scored alone, as without streaming
        yield from alone(jobs)
        return
    changed = (first.stamp is not None and file_stamp(path) != first.stamp) or (
        bool(first.sha256) and before != first.sha256
    )
    table = feats.table.set_index(feats.table["sample_id"].astype(str), drop=False)
    fit = feats.annotator.state_
    info = {
        "sha256": before,
        "modality": "single_cell",
        "sample_id_source": "given",
        "sample_key": key or "",
        "annotator": (
            f"stored with the model (fitted on {fit.n_samples} samples, {fit.n_cells} cells)"
        ),
        "x_kind": feats.table.attrs["blinaprofile"]["x_kind"],
    }
    for job in jobs:
        if changed:
            yield job, error(job, f"{path}: the file changed while the batch ran; run it again")
            continue
        sid = str(job.sample_id)
        if sid not in table.index:
            names = table.index.tolist()[:10]
            msg = str(
                SingleCellInputError(
                    f"no cells of sample {sid!r} (obs {key!r} holds {names})", path=path
                )
            )
            yield job, error(job, msg)
            continue
        row = table.loc[sid].to_dict()
        row["warnings"] = join_warnings(split_warnings(row.get("warnings")))
        row["sample_id"] = row["patient_id"] = sid
        try:
            res = score_features(
                row,
                model=options["model"],
                qc=options["qc"],
                threshold=options["threshold"],
                interval=options["interval"],
                allow_other_modality=options["allow_other_modality"],
            )
        except BlinaprofileError as err:
            yield job, error(job, str(err) if err.path else f"{path}: {err}")
            continue
        except Exception as err:
            yield job, error(job, f"{path}: internal error: {type(err).__name__}: {err}")
            continue
        res.input = dict(info)
        yield job, res.to_row()
