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
``retry_errors=False``) and never duplicates a sample. A sample that cannot be scored
becomes an error row whose message names the file; the batch goes on.

Work is bounded: at most ``2 x workers`` samples are in flight, and each worker holds one
sample at a time, so memory does not grow with the number of samples.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blinaprofile.config import QCConfig
from blinaprofile.errors import BlinaprofileError, InputError
from blinaprofile.io.atomic import atomic_path, write_csv, write_text
from blinaprofile.parallel import run_parallel

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["BatchJob", "score_samples"]

FLOW_SUFFIXES = (".fcs", ".lmd")
SC_SUFFIXES = (".h5ad", ".h5")
_RUN_FILE = "run.json"


@dataclass(frozen=True)
class BatchJob:
    """One sample to score: its resume key, given sample ID (or ``None``) and file."""

    key: str
    sample_id: str | None
    path: str


def _key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


# --------------------------------------------------------------------------- inputs
def _jobs_from_paths(paths: Sequence[str | os.PathLike[str]]) -> list[BatchJob]:
    jobs = []
    for p in paths:
        ap = str(Path(p).resolve())
        jobs.append(BatchJob(_key("path:" + ap), None, ap))
    return jobs


def _folder_inputs(folder: Path) -> list[Path]:
    return sorted(
        q
        for q in folder.iterdir()
        if q.is_file() and q.name.lower().endswith(FLOW_SUFFIXES + SC_SUFFIXES)
    )


def _jobs_from_frame(df: pd.DataFrame, *, source: str) -> list[BatchJob]:
    if "sample_id" not in df.columns or not ({"path", "file"} & set(df.columns)):
        raise InputError(
            f"a sample table needs 'sample_id' and 'path' (or 'file') columns; has {list(df.columns)}",
            path=source,
        )
    col = "path" if "path" in df.columns else "file"
    jobs = []
    for sid, f in zip(df["sample_id"].astype(str), df[col].astype(str), strict=True):
        ap = str(Path(f).resolve()) if f.strip() else ""
        # keyed by sample and file: a corrected file for the same sample is scored again
        jobs.append(BatchJob(_key("sample:" + sid + "\0" + ap), sid, ap))
    return jobs


def collect_jobs(paths_or_manifest: Any) -> list[BatchJob]:
    """The samples to score from a manifest CSV, a folder, a file, a list of files or a table.

    A manifest keeps its ``sample_id`` values; files given directly (or found in a folder)
    get pseudonymous IDs from their checksums when scored.
    """
    import pandas as pd

    from blinaprofile.io.read import read_manifest

    src = paths_or_manifest
    if isinstance(src, pd.DataFrame):
        return _jobs_from_frame(src, source="<table>")
    if isinstance(src, str | os.PathLike):
        p = Path(src)
        if p.is_dir() and not _looks_like_10x(p):
            files = _folder_inputs(p)
            if not files:
                raise InputError("no FCS or single-cell files in the folder", path=p)
            return _jobs_from_paths(files)
        if p.suffix.lower() in (".csv", ".tsv", ".txt"):
            df = read_manifest(p, check_files=False)
            return _jobs_from_frame(df, source=str(p))
        if not p.exists():
            raise InputError("file not found", path=p)
        return _jobs_from_paths([p])
    if isinstance(src, Sequence):
        return _jobs_from_paths(list(src))
    raise InputError(f"cannot score {type(src).__name__}; give a manifest, folder or files")


def _looks_like_10x(p: Path) -> bool:
    return any((p / n).exists() for n in ("matrix.mtx", "matrix.mtx.gz"))


# --------------------------------------------------------------------------- worker
def _error_row(job: BatchJob, message: str) -> dict[str, Any]:
    from blinaprofile.scoring.score import RESULT_COLUMNS

    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update(
        sample_id=job.sample_id or _pseudonym_or_blank(job.path),
        call="error",
        qc_pass=None,
        reasons="",
        error=message,
    )
    return row


def _pseudonym_or_blank(path: str) -> str:
    from blinaprofile.scoring.score import file_checksum, pseudonymous_id

    try:
        return pseudonymous_id(file_checksum(path)) if path and Path(path).is_file() else ""
    except OSError:
        return ""


def score_job(job: BatchJob, options: dict[str, Any]) -> dict[str, Any]:
    """Score one job; never raises for a bad sample (returns an error row instead)."""
    from blinaprofile.scoring.score import score_sample
    from blinaprofile.settings import settings

    if options.get("tracking_uri"):
        settings.tracking_uri = options["tracking_uri"]
    if not job.path:
        return _error_row(job, f"sample {job.sample_id!r}: no file given")
    try:
        res = score_sample(
            job.path,
            model=options["model"],
            strategy=options["strategy"],
            adaptive=options["adaptive"],
            qc=options["qc"],
            sample_id=job.sample_id,
            threshold=options["threshold"],
            interval=options["interval"],
        )
        return res.to_row()
    except BlinaprofileError as err:
        msg = str(err) if err.path else f"{job.path}: {err}"
        return _error_row(job, msg)
    except Exception as err:
        return _error_row(job, f"{job.path}: internal error: {type(err).__name__}: {err}")


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
                sorted(k for k in settings_record if not old or old.get(k) != settings_record[k])
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


def _frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    import pandas as pd

    from blinaprofile.scoring.score import RESULT_COLUMNS, TEXT_RESULT_COLUMNS

    df = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    for c in df.columns:
        if c == "qc_pass":
            df[c] = df[c].astype("boolean")
        elif c in TEXT_RESULT_COLUMNS:
            df[c] = df[c].astype("string")
        else:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    df["error"] = df["error"].fillna("")
    return df


def _write_results(df: pd.DataFrame, out: Path) -> None:
    with atomic_path(out / "results.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    write_csv(df, out / "results.csv")


# --------------------------------------------------------------------------- runners
def _run_local(
    todo: list[BatchJob], options: dict[str, Any], n_jobs: int
) -> Iterator[tuple[BatchJob, dict[str, Any]]]:
    def failed(job: BatchJob, err: Exception) -> dict[str, Any]:
        return _error_row(job, f"{job.path}: worker failed: {type(err).__name__}: {err}")

    yield from run_parallel(
        functools.partial(score_job, options=options), todo, n_jobs=n_jobs, on_error=failed
    )


def _run_dask(
    todo: list[BatchJob], options: dict[str, Any], scheduler: Any
) -> Iterator[tuple[BatchJob, dict[str, Any]]]:
    from distributed import Client, as_completed

    own = not isinstance(scheduler, Client)
    client = Client(scheduler, set_as_default=False) if own else scheduler
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
                row = _error_row(job, f"{job.path}: worker failed: {type(err).__name__}: {err}")
            fut.release()
            nxt = next(it, None)
            if nxt is not None:
                ac.add(submit(nxt))
            yield job, row
    finally:
        if own:
            client.close()


# --------------------------------------------------------------------------- API
def score_samples(
    paths_or_manifest: Any,
    *,
    model: str | os.PathLike[str] | None = None,
    n_jobs: int | None = None,
    scheduler: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    strategy: str | os.PathLike[str] | None = None,
    adaptive: bool = False,
    qc: QCConfig | None = None,
    threshold: float | None = None,
    interval: bool = True,
    retry_errors: bool = True,
    progress: bool | None = None,
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
        Local worker processes (default :attr:`Settings.n_jobs`, 2); ``1`` runs in this
        process. Ignored when ``scheduler`` is given.
    scheduler
        A Dask scheduler address (``"tcp://HOST:PORT"``) or a ``distributed.Client``: the
        same per-sample function runs on that cluster.
    out_dir
        Folder for per-sample parts and ``results.parquet``/``results.csv``. Rerunning into
        the same folder skips finished samples. ``None``: nothing is kept on disk.
    strategy, adaptive, qc, threshold, interval
        As for :func:`blinaprofile.scoring.score.score_sample`.
    retry_errors
        Rerun samples whose stored row is an error.
    progress
        Show a progress bar (default: only when stderr is a terminal).

    Returns
    -------
    DataFrame
        Columns :data:`blinaprofile.scoring.score.RESULT_COLUMNS`; ``call`` is ``responder``,
        ``nonresponder``, ``no call`` or ``error`` (then ``error`` says why and names the
        file). ``df.attrs['batch']`` counts scored, skipped and failed samples.

    Raises
    ------
    InputError
        The input cannot be read, or ``out_dir`` holds results made with other settings.
    """
    from blinaprofile.features.flow import load_qc
    from blinaprofile.settings import settings

    jobs = collect_jobs(paths_or_manifest)
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
    }
    from blinaprofile.scoring.score import load_scoring_model

    # what the model reference resolves to now (an alias may have moved, a folder re-exported):
    # resuming with another model would silently mix versions in one result table
    resolved = load_scoring_model(model_key).info
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
    tmpdir = None
    if out_dir is None:
        tmpdir = tempfile.TemporaryDirectory(prefix="blinaprofile-batch-")
        out = Path(tmpdir.name)
    else:
        out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        parts = out / "parts"
        parts.mkdir(exist_ok=True)
        _check_run_file(out, record)
        todo = []
        for job in jobs:
            row = _read_part(parts, job.key)
            if row is None or (retry_errors and row.get("error")):
                todo.append(job)
        n_skipped = len(jobs) - len(todo)
        show = (sys.stderr.isatty() if progress is None else bool(progress)) and bool(todo)
        bar = None
        try:
            if scheduler is not None:
                runner = _run_dask(todo, options, scheduler)
            else:
                runner = _run_local(todo, options, settings.n_jobs if n_jobs is None else n_jobs)
            for job, row in runner:
                _write_part(parts, job, row)
                if show and bar is None:
                    # created after the workers started, so that they are forked before
                    # tqdm's monitor thread exists
                    from tqdm import tqdm

                    bar = tqdm(total=len(todo), desc="scoring", unit="sample", file=sys.stderr)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        rows = []
        for job in jobs:
            row = _read_part(parts, job.key)
            rows.append(row if row is not None else _error_row(job, f"{job.path}: no result"))
        df = _frame(rows)
        if out_dir is not None:
            _write_results(df, out)
        df.attrs["batch"] = {
            "n_samples": len(jobs),
            "n_scored": len(todo),
            "n_skipped": n_skipped,
            "n_errors": int((df["error"] != "").sum()),
            "out_dir": None if out_dir is None else str(out),
        }
        return df
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
