"""Scoring many samples from scripts: local processes or a Dask cluster, resumable.

:func:`score_samples` runs :func:`blinaprofile.scoring.score.score_sample` on every sample of a
manifest, a folder or a list of files and returns one row per sample with the columns of
:data:`blinaprofile.scoring.score.RESULT_COLUMNS` (the same table ``blinaprofile score-batch``
writes).

Output folder layout (``out_dir``)::

    run.json          the settings the results were made with (model, threshold, QC...)
    parts/<key>.json  one small file per finished sample, written atomically
    results.parquet   all rows, consolidated atomically at the end of a run
    results.csv       the same as CSV

A sample's row is written as soon as it is finished, so killing a run loses no finished
result; rerunning skips finished samples (error rows are retried unless
``retry_errors=False``) and never duplicates a sample. A part is keyed on the sample (or
file path) *and the SHA-256 of the file's bytes*, so a file corrected under the same name
is scored again while an unchanged one is skipped. A sample that cannot be scored becomes
an error row whose message names the sample (its ``sample_id`` or pseudonym; the file only
with ``keep_file_names=True``); the batch goes on.

Nothing waits forever: a file that is not a regular file (a FIFO, a link to a device) is
refused before it is read, a sample still running after ``sample_timeout`` seconds becomes
an error row (its worker process is killed and replaced), and an unreachable Dask scheduler
is an error after :data:`SCHEDULER_CONNECT_TIMEOUT` seconds, before the output folder is
made.

Work is bounded: each worker holds one sample at a time, so memory does not grow with the
number of samples.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Generator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blinaprofile.config import QCConfig
from blinaprofile.errors import BlinaprofileError, InputError, OutputError, one_line
from blinaprofile.features.change import design_from_meta
from blinaprofile.io.atomic import atomic_path, write_text
from blinaprofile.parallel import (
    ItemTimeoutError,
    WorkerDiedError,
    run_parallel,
    start_fork_server,
)
from blinaprofile.progress import Progress
from blinaprofile.scoring.cohort_batch import score_cohort, streamed_annotator
from blinaprofile.scoring.results import error_row, result_frame, write_results

if TYPE_CHECKING:
    import pandas as pd

    from blinaprofile.annotate.config import SampleQCSpec
    from blinaprofile.io.read import FCSReadOptions

__all__ = ["DEFAULT_SAMPLE_TIMEOUT", "SCHEDULER_CONNECT_TIMEOUT", "BatchJob", "score_samples"]

FLOW_SUFFIXES = (".fcs", ".lmd")
SC_SUFFIXES = (".h5ad", ".h5")
_RUN_FILE = "run.json"
#: Seconds one sample may take before it becomes an error row (``score-batch --sample-timeout``).
DEFAULT_SAMPLE_TIMEOUT = 600.0
#: Seconds to wait for a Dask scheduler to answer before giving up.
SCHEDULER_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class BatchJob:
    """One sample to score.

    Attributes
    ----------
    key
        Resume key: the sample ID (or resolved path) and the SHA-256 of the file's bytes.
    sample_id
        The given sample ID, or ``None`` (a pseudonym from the checksum is used).
    path
        The file (resolved), or ``""`` when none was given.
    sha256
        SHA-256 of the file's bytes, ``""`` when it cannot be read (it then fails with a
        message when scored).
    keep_file_names
        Whether the job's error row may name the file (``score_samples(keep_file_names=)``);
        otherwise it names the sample (its ID or pseudonym).
    sample_key
        Single-cell objects: the ``obs`` column naming samples (``None``: the configured
        candidates). An object holding several samples is scored on the cells whose value
        is ``sample_id``.
    stamp
        The file's :func:`~blinaprofile.io.files.file_stamp` when ``sha256`` was taken, if
        it can stand for the content (:func:`~blinaprofile.io.files.stamped_checksum`):
        the worker then trusts ``sha256`` while the file shows this stamp instead of hashing
        it again; ``None``: the worker hashes the file.
    """

    key: str
    sample_id: str | None
    path: str
    sha256: str = ""
    keep_file_names: bool = False
    sample_key: str | None = None
    stamp: tuple[int, ...] | None = None


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


#: Called after each input file is hashed (the progress bar of ``score_samples``).
_ON_HASHED: ContextVar[Callable[[], None] | None] = ContextVar("on_hashed", default=None)


def _content_sha256(path: str) -> tuple[str, tuple[int, ...] | None]:
    """The file's SHA-256 (its type checked first), or ``""`` if it cannot be used, and its
    stamp when that can stand for the content (see :attr:`BatchJob.stamp`)."""
    from blinaprofile.io.files import stamped_checksum

    if not path:
        return "", None
    try:
        return stamped_checksum(path)
    except InputError:  # missing, a FIFO or device...: scoring it gives the error row
        return "", None
    finally:
        tick = _ON_HASHED.get()
        if tick is not None:
            tick()


@contextlib.contextmanager
def _counting_hashes(tick: Callable[[], None]) -> Generator[None]:
    """Call ``tick`` after each input file :func:`collect_jobs` hashes in this block."""
    token = _ON_HASHED.set(tick)
    try:
        yield
    finally:
        _ON_HASHED.reset(token)


def _job(
    label: str,
    sample_id: str | None,
    path: str,
    *,
    sha: tuple[str, tuple[int, ...] | None] | None = None,
    sample_key: str | None = None,
) -> BatchJob:
    """A job keyed on ``label`` and the content of ``path`` (``sha``: already hashed, with
    the stamp :func:`_content_sha256` gave)."""
    digest, stamp = _content_sha256(path) if sha is None else sha
    key = _key(label + "\0sha256:" + digest)
    return BatchJob(key, sample_id, path, digest, sample_key=sample_key, stamp=stamp)


# --------------------------------------------------------------------------- inputs
def _jobs_from_paths(paths: Sequence[str | os.PathLike[str]]) -> list[BatchJob]:
    jobs = []
    for p in paths:
        ap = str(Path(p).resolve())
        jobs.append(_job("path:" + ap, None, ap))
    return jobs


def _folder_inputs(folder: Path) -> list[Path]:
    # anything but a folder: a FIFO or device named *.fcs becomes an error row, not a hang
    return sorted(
        q
        for q in folder.iterdir()
        if not q.is_dir() and q.name.lower().endswith(FLOW_SUFFIXES + SC_SUFFIXES)
    )


def _jobs_from_frame(
    df: pd.DataFrame, *, source: str, sample_key: str | None = None
) -> list[BatchJob]:
    if "sample_id" not in df.columns or not ({"path", "file"} & set(df.columns)):
        raise InputError(
            f"a sample table needs 'sample_id' and 'path' (or 'file') columns; has {list(df.columns)}",
            path=source,
        )
    col = "path" if "path" in df.columns else "file"
    jobs = []
    for sid, f in zip(df["sample_id"].astype(str), df[col].astype(str), strict=True):
        ap = str(Path(f).resolve()) if f.strip() else ""
        # keyed by sample, file and content: a corrected file for the same sample is scored again
        jobs.append(_job("sample:" + sid + "\0" + ap, sid, ap, sample_key=sample_key))
    return jobs


def _single_cell_jobs(path: Path, sample_key: str | None) -> list[BatchJob]:
    """One job per sample of a single-cell object (one job when it has no sample column).

    The samples are ``obs[sample_key]``, or the first configured ``sample_key_candidates``
    column present; each job scores that sample's cells alone.
    """
    from blinaprofile.annotate.config import load_single_cell_config
    from blinaprofile.features.singlecell import sample_column
    from blinaprofile.io.h5ad_stream import read_obs, streamable
    from blinaprofile.io.singlecell import read_single_cell

    if streamable(path):  # the samples are in obs: the matrix is not read
        import anndata as ad

        obs = read_obs(path)
        adata = ad.AnnData(obs=obs, uns={"blinaprofile": {"source": str(path)}})
    else:
        adata = read_single_cell(path, sample_key=sample_key)
    candidates = load_single_cell_config().sample_key_candidates
    key, names = sample_column(adata, sample_key=sample_key, candidates=candidates)
    del adata
    if key is None:
        return _jobs_from_paths([path])
    ap = str(path.resolve())
    sha = _content_sha256(ap)
    return [_job("sample:" + sid + "\0" + ap, sid, ap, sha=sha, sample_key=key) for sid in names]


def collect_jobs(paths_or_manifest: Any, *, sample_key: str | None = None) -> list[BatchJob]:
    """The samples to score from a manifest CSV, a folder, a file, a list of files or a table.

    A manifest keeps its ``sample_id`` values; files given directly (or found in a folder)
    get pseudonymous IDs from their checksums when scored. Every file's type is checked
    and its bytes hashed here (the resume key includes the SHA-256); a file that is
    missing or not a regular file gets an empty checksum and fails when scored.

    A lone single-cell object (``.h5ad``, 10x ``.h5`` or folder) gives one job per sample of
    ``obs[sample_key]`` (default: the first configured candidate column present), named by
    its value. Manifest rows pointing at a single-cell object holding several samples score
    the cells whose ``obs[sample_key]`` (default: the candidate column) is the row's
    ``sample_id``.
    """
    import pandas as pd

    from blinaprofile.io.read import modality_of, read_manifest

    src = paths_or_manifest
    if isinstance(src, pd.DataFrame):
        return _jobs_from_frame(src, source="<table>", sample_key=sample_key)
    if isinstance(src, str | os.PathLike):
        p = Path(src)
        if p.is_dir() and not _looks_like_10x(p):
            files = _folder_inputs(p)
            if not files:
                raise InputError("no FCS or single-cell files in the folder", path=p)
            return _jobs_from_paths(files)
        if p.suffix.lower() in (".csv", ".tsv", ".txt"):
            df = read_manifest(p, check_files=False)
            return _jobs_from_frame(df, source=str(p), sample_key=sample_key)
        if not p.exists():
            raise InputError("file not found", path=p)
        if modality_of(p) == "single_cell":
            return _single_cell_jobs(p, sample_key)
        return _jobs_from_paths([p])
    if isinstance(src, Sequence):
        return _jobs_from_paths(list(src))
    raise InputError(f"cannot score {type(src).__name__}; give a manifest, folder or files")


def _looks_like_10x(p: Path) -> bool:
    names = ("matrix.mtx", "matrix.mtx.gz", "filtered_feature_bc_matrix")
    return any((p / n).exists() for n in names)


# --------------------------------------------------------------------------- worker
def _error_row(job: BatchJob, message: str) -> dict[str, Any]:
    from blinaprofile.io.files import pseudonymous_id
    from blinaprofile.io.privacy import WITHHELD_FILE_NAME, withhold_file_name

    sid = job.sample_id or (pseudonymous_id(job.sha256) if job.sha256 else "")
    if not job.keep_file_names:  # the row names the sample, never its file
        message = withhold_file_name(message, job.path, label=sid or WITHHELD_FILE_NAME)
    return error_row(sid, message)


def score_job(job: BatchJob, options: dict[str, Any]) -> dict[str, Any]:
    """Score one job; never raises for a bad sample (returns an error row instead)."""
    from blinaprofile.io.files import file_stamp
    from blinaprofile.io.read import fcs_read_options
    from blinaprofile.scoring.score import score_sample
    from blinaprofile.settings import settings

    if options.get("tracking_uri"):
        settings.tracking_uri = options["tracking_uri"]
    if not job.path:
        return _error_row(job, f"sample {job.sample_id!r}: no file given")
    # the file hashed when the batch started, unchanged since (its stamp): not hashed again
    known = job.sha256 if job.stamp is not None and file_stamp(job.path) == job.stamp else None
    try:
        with fcs_read_options(options.get("fcs_options")):
            res = score_sample(
                job.path,
                model=options["model"],
                strategy=options["strategy"],
                adaptive=options["adaptive"],
                qc=options["qc"],
                sample_id=job.sample_id,
                threshold=options["threshold"],
                interval=options["interval"],
                allow_other_modality=options["allow_other_modality"],
                sample_key=job.sample_key,
                select_sample=job.sample_id,
                single_cell_qc=options.get("single_cell_qc"),
                sha256=known,
            )
        row = res.to_row()
    except BlinaprofileError as err:
        msg = str(err) if err.path else f"{job.path}: {err}"
        return _error_row(job, msg)
    except Exception as err:
        return _error_row(job, f"{job.path}: internal error: {type(err).__name__}: {err}")
    changed = known is not None and file_stamp(job.path) != job.stamp  # while it was read
    if changed or (job.sha256 and row.get("input_sha256") != job.sha256):
        # the part is keyed on the content read when the batch started
        return _error_row(job, f"{job.path}: the file changed while the batch ran; run it again")
    return row


# --------------------------------------------------------------------------- parts
def _write_part(parts: Path, job: BatchJob, row: dict[str, Any]) -> None:
    from blinaprofile.scoring.score import jsonable

    payload = json.dumps({"key": job.key, "row": jsonable(row)}, allow_nan=False)
    with atomic_path(parts / f"{job.key}.json", fsync=True) as tmp:
        tmp.write_text(payload, encoding="utf-8")


def _read_part(parts: Path, key: str) -> dict[str, Any] | None:
    f = parts / f"{key}.json"
    try:
        d = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("key") != key or not isinstance(d.get("row"), dict):
        return None
    if "call_reason" not in d["row"]:  # made before the four call states: score it again
        return None
    return d["row"]


def _check_run_file(out: Path, settings_record: dict[str, Any]) -> None:
    f = out / _RUN_FILE
    if f.is_file():
        try:
            old = json.loads(f.read_text(encoding="utf-8"))
        except ValueError:
            old = None
        if old != settings_record:
            diff = (
                # keys of either record: a setting only the old run had differs too
                sorted(k for k in {*settings_record, *old} if old.get(k) != settings_record.get(k))
                if isinstance(old, dict)
                else ["run.json unreadable"]
            )
            raise InputError(
                f"the folder holds results made with other settings ({', '.join(diff)}); "
                "use another output folder or delete it",
                path=out,
            )
        return
    write_text(f, json.dumps(settings_record, indent=2))


# --------------------------------------------------------------------------- runners
def _worker_failed(job: BatchJob, err: Exception) -> dict[str, Any]:
    """The error row of a sample whose worker timed out, died or raised."""
    if isinstance(err, ItemTimeoutError | WorkerDiedError):
        return _error_row(job, f"{job.path}: {err.message}")
    return _error_row(job, f"{job.path}: worker failed: {type(err).__name__}: {err}")


#: What scoring a sample imports: loaded once in the fork server, not once per worker.
WORKER_MODULES = (
    "blinaprofile.scoring.score",
    "blinaprofile.features.flow",
    "blinaprofile.gating.strategy",
    "blinaprofile.gating.sample",
    "blinaprofile.io.read",
    "blinaprofile.models.loading",
    "blinaprofile.models.compiled",
)


def _run_local(
    todo: list[BatchJob], options: dict[str, Any], n_jobs: int, timeout: float | None
) -> Generator[tuple[BatchJob, dict[str, Any]]]:
    yield from run_parallel(
        functools.partial(score_job, options=options),
        todo,
        n_jobs=n_jobs,
        on_error=_worker_failed,
        timeout=timeout,
        preload=WORKER_MODULES,
    )


def _connect(scheduler: Any) -> tuple[Any, bool]:
    """A ``distributed.Client`` for ``scheduler`` and whether this module made it.

    Raises
    ------
    InputError
        The address is malformed or no scheduler answered within
        :data:`SCHEDULER_CONNECT_TIMEOUT` seconds.
    """
    from distributed import Client

    if isinstance(scheduler, Client):
        return scheduler, False
    from distributed.comm.addressing import parse_address
    from distributed.comm.registry import backends

    address = str(scheduler)
    try:
        scheme, _ = parse_address(address)
    except ValueError as err:
        raise InputError(f"not a Dask scheduler address {address!r}: {err}") from None
    if scheme not in backends:
        raise InputError(
            f"not a Dask scheduler address {address!r}: unknown scheme {scheme!r} "
            "(use tcp://HOST:PORT)"
        )
    try:
        client = Client(address, timeout=SCHEDULER_CONNECT_TIMEOUT, set_as_default=False)
    except OSError as err:  # TimeoutError included
        raise InputError(
            f"cannot reach the Dask scheduler at {address} within "
            f"{SCHEDULER_CONNECT_TIMEOUT:g} s ({one_line(str(err)) or type(err).__name__})"
        ) from None
    return client, True


def _run_dask(
    todo: list[BatchJob], options: dict[str, Any], client: Any
) -> Generator[tuple[BatchJob, dict[str, Any]]]:
    from distributed import as_completed

    if not todo:
        return
    try:
        n_workers = max(
            1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values())
        )
        window = 2 * n_workers
        futures: dict[Any, BatchJob] = {}
        it = iter(todo)

        def submit(job: BatchJob) -> Any:
            f = client.submit(
                score_job, job, options, pure=False, key=f"blinaprofile-score-{job.key}"
            )
            futures[f] = job
            return f

        first = [submit(j) for _, j in zip(range(window), it, strict=False)]
        ac = as_completed(first, loop=client.loop)
        for fut in ac:
            job = futures.pop(fut)
            try:
                row = fut.result()
            except Exception as err:
                row = _worker_failed(job, err)
            fut.release()
            nxt = next(it, None)
            if nxt is not None:
                ac.add(submit(nxt))
            yield job, row
    finally:
        for fut in futures:  # stopped early (an output error): leave nothing running
            fut.cancel()


# --------------------------------------------------------------------------- API
def score_samples(
    paths_or_manifest: Any,
    *,
    model: str | os.PathLike[str] | None = None,
    n_jobs: int | None = None,
    scheduler: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    strategy: str | os.PathLike[str] | None = None,
    adaptive: bool = True,
    qc: QCConfig | None = None,
    threshold: float | None = None,
    interval: bool = True,
    retry_errors: bool = True,
    progress: bool | None = None,
    fcs_options: FCSReadOptions | None = None,
    sample_timeout: float | None = DEFAULT_SAMPLE_TIMEOUT,
    keep_file_names: bool = False,
    allow_other_modality: bool = False,
    sample_key: str | None = None,
    single_cell_qc: SampleQCSpec | None = None,
) -> pd.DataFrame:
    """Score many samples; one row per sample, in input order.

    Parameters
    ----------
    paths_or_manifest
        A manifest CSV (``sample_id``, ``file``), a folder of FCS/single-cell files, one
        file, a list of files, or a DataFrame with ``sample_id`` and ``path``.
    model
        ``models:/NAME@ALIAS``, ``runs:/...`` or a model folder (default: shipped model).
    n_jobs
        Local worker processes (default :attr:`Settings.n_jobs`, 2). Ignored when
        ``scheduler`` is given.
    scheduler
        A Dask scheduler address (``"tcp://HOST:PORT"``) or a ``distributed.Client``: the
        same per-sample function runs on that cluster. An address that does not answer
        within :data:`SCHEDULER_CONNECT_TIMEOUT` seconds is an :class:`InputError`.
    out_dir
        Folder for per-sample parts and ``results.parquet``/``results.csv``. Rerunning into
        the same folder skips finished samples whose file content is unchanged. ``None``:
        nothing is kept on disk. A folder this call creates is removed again when the run
        fails before any sample finished.
    strategy, adaptive, qc, threshold, interval
        As for :func:`blinaprofile.scoring.score.score_sample`.
    retry_errors
        Rerun samples whose stored row is an error.
    progress
        Show a progress bar on stderr (default: only when stderr is a terminal): the inputs
        being checked (hashed), the model being loaded, then the samples scored.
    fcs_options
        Relaxations of the FCS reader's integrity checks for every sample (default: the
        enclosing :func:`blinaprofile.io.read.fcs_read_options` block's, else strict).
        Non-default options are part of the run's settings (``run.json``).
    sample_timeout
        Seconds one sample may take (default 600); a sample still running then becomes an
        error row and its worker process is killed and replaced. ``None``: no limit, and
        ``n_jobs=1`` then runs in this process. Local workers only: with ``scheduler``, use
        the cluster's own limits.
    keep_file_names
        Let error rows name the input file. By default they name the sample instead (its
        ``sample_id``, else the pseudonym ``S-<12 hex>``): file names often name the patient.
    allow_other_modality
        Score samples of another modality than the model's training data as
        ``"uncertain"``; by default each becomes an error row saying it was refused. Part
        of the run's settings (``run.json``) when set.
    sample_key
        Single-cell: the ``obs`` column naming samples. A lone object is scored sample by
        sample (default key: the first configured candidate column present); manifest rows
        pointing at single-cell objects score the cells of their ``sample_id``
        (:func:`collect_jobs`). Each sample is labelled alone by the model's stored
        annotator. Part of the run's settings when set.
    single_cell_qc
        Single-cell per-sample QC minimums overriding the annotator's ``sample_qc`` (the
        ``single_cell`` section of a ``--qc`` file). Part of the run's settings when set.

    A model trained on change features (``train --change-from``) scores patients, not
    samples: :func:`blinaprofile.scoring.paired_batch.score_paired_batch` pairs each patient's
    samples by the manifest's ``patient_id`` and ``timepoint`` (one row per patient). Its
    ``out_dir`` is made and checked like any other (``run.json`` records ``paired``: a
    folder of another run is refused before any sample is read), ``sample_timeout`` limits
    each sample's featurizing, and a ``scheduler`` is refused (local processes only).

    Returns
    -------
    DataFrame
        Columns :data:`blinaprofile.scoring.score.RESULT_COLUMNS`; ``call`` is ``responder``,
        ``nonresponder``, ``uncertain``, ``no call`` (``call_reason`` says why, from
        :func:`blinaprofile.models.runtime.call_state`) or ``error`` (then ``error`` says why and names the
        sample, or the file with ``keep_file_names``); ``warnings`` lists what the FCS reader tolerated in the sample's file. ``df.attrs['batch']`` counts scored, skipped and failed samples.

    Raises
    ------
    InputError
        The input cannot be read, ``out_dir`` holds results made with other settings, or the
        Dask scheduler cannot be reached.
    OutputError
        A folder or file cannot be written (disk full...); the message names it, and no
        temporary file is left behind.
    ConfigError
        ``sample_timeout`` is not a positive number of seconds.
    """
    from blinaprofile.features.flow import load_qc
    from blinaprofile.io.read import current_fcs_read_options
    from blinaprofile.settings import settings

    if sample_timeout is not None and not 0 < sample_timeout < float("inf"):
        from blinaprofile.errors import ConfigError

        raise ConfigError(
            f"sample_timeout must be a positive number of seconds, got {sample_timeout!r}"
        )
    workers = settings.n_jobs if n_jobs is None else n_jobs
    if scheduler is None and (workers > 1 or sample_timeout is not None):
        start_fork_server(WORKER_MODULES)  # its imports overlap the hashing and model loading
    # on screen from the start: hashing every input (part of the resume key) takes a while
    bar = Progress(desc="checking inputs", unit="file", show=progress)
    with bar.closed_on_error(), _counting_hashes(bar.update):
        jobs = collect_jobs(paths_or_manifest, sample_key=sample_key)
        if keep_file_names:
            jobs = [replace(j, keep_file_names=True) for j in jobs]
        keys = [j.key for j in jobs]
        if len(set(keys)) != len(keys):
            raise InputError("the same sample (or file) is listed more than once")
    qc = qc or load_qc()
    model_key = str(model) if model is not None else str(settings.default_model)
    if not model_key.startswith(("models:/", "runs:/")):
        model_key = str(Path(model_key).resolve())
    options: dict[str, Any] = {
        "model": model_key,
        "strategy": str(Path(strategy).resolve()) if strategy else None,
        "adaptive": bool(adaptive),
        "qc": qc,
        "threshold": threshold,
        "interval": bool(interval),
        "tracking_uri": settings.tracking_uri,
        "fcs_options": fcs_options or current_fcs_read_options(),
        "allow_other_modality": bool(allow_other_modality),
        "single_cell_qc": single_cell_qc,
    }
    from blinaprofile.scoring.score import load_scoring_model

    # what the model reference resolves to now (an alias may have moved, a folder re-exported):
    # resuming with another model would silently mix versions in one result table
    bar.restart(None, desc="loading the model", unit="model")
    with bar.closed_on_error():  # compiled into the user cache on its first use
        resolved = load_scoring_model(model_key).info
    # a change-feature model scores patients, samples paired by manifest (below)
    design = design_from_meta(load_scoring_model(model_key).runtime.meta)
    if design is not None and scheduler is not None:
        raise InputError("a change-feature model's batch runs on local processes: no --scheduler")
    record = {
        "model": model_key,
        "model_version": resolved.get("version"),
        "model_uuid": resolved.get("model_uuid"),
        "strategy": options["strategy"],
        "adaptive": options["adaptive"],
        "qc": qc.model_dump(),
        "threshold": threshold,
        "interval": options["interval"],
    }
    if not options["fcs_options"].is_default:  # default runs keep the record they always had
        record["fcs_options"] = options["fcs_options"].as_dict()
    if allow_other_modality:  # likewise
        record["allow_other_modality"] = True
    if sample_key is not None:
        record["sample_key"] = sample_key
    if single_cell_qc is not None:
        record["single_cell_qc"] = single_cell_qc.model_dump()
    if design is not None:
        record["paired"] = design.description
    # the scheduler must answer before anything is made on disk
    with bar.closed_on_error():
        client, own_client = _connect(scheduler) if scheduler is not None else (None, False)
    tmpdir = None
    out: Path | None = None
    made = False
    try:
        if out_dir is None:
            try:
                tmpdir = tempfile.TemporaryDirectory(prefix="blinaprofile-batch-")
            except OSError as err:
                raise OutputError(
                    f"cannot create a temporary folder: {err.strerror or err}",
                    path=err.filename or tempfile.gettempdir(),
                ) from None
            out = Path(tmpdir.name)
        else:
            out = Path(out_dir)
            made = not out.exists()
        parts = out / "parts"
        try:
            (parts if design is None else out).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(
                f"cannot create the output folder: {err.strerror or err}",
                path=err.filename or parts,
            ) from None
        _check_run_file(out, record)
        if design is not None:  # before any sample is read: the folder is checked above
            from blinaprofile.scoring.paired_batch import score_paired_batch

            bar.close()
            return score_paired_batch(
                paths_or_manifest,
                model=model_key,
                design=design,
                n_jobs=workers,
                out_dir=None if out_dir is None else out,
                strategy=strategy,
                adaptive=adaptive,
                qc=qc,
                threshold=threshold,
                interval=interval,
                fcs_options=options["fcs_options"],
                keep_file_names=keep_file_names,
                allow_other_modality=allow_other_modality,
                progress=progress,
                sample_timeout=sample_timeout,
            )
        todo = []
        for job in jobs:
            row = _read_part(parts, job.key)
            if row is None or (retry_errors and row.get("error")):
                todo.append(job)
        n_skipped = len(jobs) - len(todo)
        bar.restart(len(todo), desc="scoring", unit="sample")
        annotator = streamed_annotator(todo, options) if client is None else None
        runner = (
            _run_dask(todo, options, client)
            if client is not None
            else _run_local(todo, options, workers, sample_timeout)
            if annotator is None
            # samples of one object and the model's annotator: the object is read once
            else score_cohort(
                todo,
                options,
                annotator=annotator,
                n_jobs=workers,
                error=_error_row,
                alone=lambda jobs: _run_local(list(jobs), options, workers, sample_timeout),
            )
        )
        # closing: a failure here (disk full) stops the workers at once
        with contextlib.closing(runner):
            try:
                for job, row in runner:
                    _write_part(parts, job, row)
                    bar.update(1)
            finally:
                bar.close()
        rows = []
        for job in jobs:
            row = _read_part(parts, job.key)
            rows.append(row if row is not None else _error_row(job, f"{job.path}: no result"))
        df = result_frame(rows)
        if out_dir is not None:
            write_results(df, out)
        df.attrs["batch"] = {
            "n_samples": len(jobs),
            "n_scored": len(todo),
            "n_skipped": n_skipped,
            "n_errors": int((df["error"] != "").sum()),
            "out_dir": None if out_dir is None else str(out),
        }
        return df
    except BaseException as err:
        if made and out is not None:
            try:
                _remove_unused_output(out)
            except OSError as cleanup:  # the run's own error is the one to report
                err.add_note(f"{out}: could not be removed: {cleanup.strerror or cleanup}")
        raise
    finally:
        bar.close()
        if own_client and client is not None:
            client.close()
        if tmpdir is not None:
            tmpdir.cleanup()


def _remove_unused_output(out: Path) -> None:
    """Remove ``out`` (made by this run) when the run failed before any sample finished.

    Only what a run writes is removed (``run.json``, an empty ``parts/``), and ``out`` only
    if that leaves it empty; a folder holding finished parts is kept for resuming.
    """
    parts = out / "parts"
    if parts.is_dir() and any(parts.iterdir()):
        return
    run_file = out / _RUN_FILE
    if run_file.is_file():
        run_file.unlink()
    for d in (parts, out):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
