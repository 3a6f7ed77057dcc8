"""Per-sample features of a large single-cell cohort, a group of whole samples at a time.

With a fitted :class:`~blinaprofile.annotate.estimator.TCellAnnotator` a sample's labels and
features depend on that sample's cells alone, so a cohort can be featurized a group of whole
samples at a time and give exactly the table :func:`~blinaprofile.features.singlecell.
featurize_cells` gives on the whole object (``tests/test_singlecell.py`` checks it). An
``.h5ad`` file is read in blocks of rows (:mod:`blinaprofile.io.h5ad_stream`): only the
annotator's genes and every cell's sums over all genes are kept, and a group of samples is
labelled as soon as all its cells have been read, so memory stays bounded by the group size
when the file stores each sample's cells together (as concatenated cohorts do).

Why not scanpy/anndata for this: they hold the whole matrix (or read every gene of a block of
rows); the annotator needs a few hundred columns of each row plus its totals.
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from blinaprofile.annotate.config import PathLike, SampleQCSpec, SingleCellConfig, resolve_config
from blinaprofile.annotate.estimator import TCellAnnotator, stratified_subsample
from blinaprofile.annotate.inputs import sample_codes
from blinaprofile.errors import ConfigError
from blinaprofile.features.singlecell import SingleCellFeatures, featurize_cells, file_sample_name
from blinaprofile.io.h5ad_stream import (
    DEFAULT_BLOCK_VALUES,
    H5adStream,
    PanelBlock,
    read_obs,
    streamable,
)
from blinaprofile.io.singlecell import XKind, read_single_cell
from blinaprofile.parallel import start_fork_server

__all__ = ["DEFAULT_CHUNK_CELLS", "featurize_cohort", "featurize_object"]

#: cells labelled together (whole samples; a group closes once it holds this many cells)
DEFAULT_CHUNK_CELLS = 20_000


class _Collector:
    """Concatenates the tables and evidence of the sample groups, in the cohort's order."""

    def __init__(self, names: list[str], default: str, key: str | None, fitted_here: bool):
        self.names = names
        self.default = default
        self.key = key
        self.fitted_here = fitted_here
        self.tables: list[pd.DataFrame] = []
        self.evidence: dict[str, dict[str, Any]] = {}
        self.attrs: dict[str, Any] = {}

    def add(self, part: tuple[pd.DataFrame, dict[str, dict[str, Any]], dict[str, Any]]) -> None:
        table, evidence, attrs = part
        if self.key is None and self.default != "sample":  # one sample named after the file
            table = table.copy()
            table.loc[table["patient_id"] == "sample", "patient_id"] = self.default
            table["sample_id"] = self.default
            evidence = {self.default: evidence["sample"]}
        for ev in evidence.values():
            if self.fitted_here and "annotator" in ev:
                ev["annotator"].update(fitted_on_input=True, fitted_on="this object")
        if not self.attrs:
            self.attrs = dict(attrs)
        self.tables.append(table)
        self.evidence.update(evidence)

    def result(self, annotator: TCellAnnotator) -> SingleCellFeatures:
        df = pd.concat(self.tables, ignore_index=True)
        order = {n: i for i, n in enumerate(self.names)}
        if self.key is None:
            order = {self.default: 0}
        df = df.iloc[np.argsort(df["sample_id"].map(order).to_numpy(), kind="stable")]
        df = df.reset_index(drop=True)
        evidence = {s: self.evidence[s] for s in df["sample_id"]}
        attrs = dict(self.attrs)
        attrs["evidence"] = evidence
        attrs["annotator_fitted_on_input"] = self.fitted_here
        if self.fitted_here and isinstance(attrs.get("annotator"), dict):
            attrs["annotator"] = {**attrs["annotator"], "fitted_on_input": True}
        df.attrs["blinaprofile"] = attrs
        return SingleCellFeatures(df, annotator, self.fitted_here, evidence)


#: per worker process: the annotators rebuilt from their state, by token
_WORKER_ANNOTATORS: dict[str, TCellAnnotator] = {}

Part = tuple[pd.DataFrame, dict[str, dict[str, Any]], dict[str, Any]]


def label_part(
    item: tuple[str, dict[str, Any], ad.AnnData, dict[str, Any]],
) -> tuple[Part, float, float]:
    """Featurize one group of samples in a worker process (the annotator is rebuilt from its
    state once per process: it labels exactly as the fitted one). Also returns the CPU
    seconds it took and the worker's peak resident memory (MB)."""
    c = time.process_time()
    token, state, part, kw = item
    ann = _WORKER_ANNOTATORS.get(token)
    if ann is None:
        _WORKER_ANNOTATORS.clear()
        ann = _WORKER_ANNOTATORS[token] = TCellAnnotator.from_dict(state)
    res = featurize_cells(part, annotator=ann, **kw)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    attrs = dict(res.table.attrs.get("blinaprofile", {}))
    return (res.table, res.evidence, attrs), time.process_time() - c, peak_mb


class _Labeller:
    """Featurizes groups of samples here (``n_jobs=1``) or in worker processes, keeping at
    most ``n_jobs + 1`` groups in flight (memory stays bounded)."""

    def __init__(
        self,
        annotator: TCellAnnotator,
        kw: dict[str, Any],
        n_jobs: int,
        out: _Collector,
        timings: dict[str, float] | None,
    ):
        self.annotator = annotator
        self.timings = timings
        self.kw = kw
        self.n_jobs = n_jobs
        self.out = out
        self.pool: ProcessPoolExecutor | None = None
        self.inflight: deque[Future[tuple[Part, float, float]]] = deque()
        self.token = uuid.uuid4().hex
        self.state: dict[str, Any] = annotator.to_dict() if n_jobs > 1 else {}

    def submit(self, part: ad.AnnData) -> None:
        if self.n_jobs <= 1:
            res = featurize_cells(part, annotator=self.annotator, **self.kw)
            self.out.add((res.table, res.evidence, dict(res.table.attrs["blinaprofile"])))
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.n_jobs, mp_context=mp.get_context("forkserver"))
        self.inflight.append(self.pool.submit(label_part, (self.token, self.state, part, self.kw)))
        while len(self.inflight) > self.n_jobs:
            self._collect()

    def _collect(self) -> None:
        part, cpu, peak_mb = self.inflight.popleft().result()
        self.out.add(part)
        if self.timings is not None:
            t = self.timings
            t["label_workers_cpu_s"] = t.get("label_workers_cpu_s", 0.0) + cpu
            t["workers_peak_rss_mb"] = max(t.get("workers_peak_rss_mb", 0.0), peak_mb)

    def finish(self) -> None:
        try:
            while self.inflight:
                self._collect()
        finally:
            if self.pool is not None:
                self.pool.shutdown(cancel_futures=True)


@contextmanager
def _phase(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    t, c = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        if timings is not None:
            timings[f"{name}_s"] = timings.get(f"{name}_s", 0.0) + time.perf_counter() - t
            timings[f"{name}_cpu_s"] = timings.get(f"{name}_cpu_s", 0.0) + time.process_time() - c


def _groups(codes: np.ndarray, n_samples: int, chunk_cells: int) -> list[np.ndarray]:
    """Sample codes in groups of about ``chunk_cells`` cells (order of first appearance)."""
    counts = np.bincount(codes, minlength=n_samples)
    out: list[np.ndarray] = []
    cur: list[int] = []
    n = 0
    for s in range(n_samples):
        cur.append(s)
        n += int(counts[s])
        if n >= chunk_cells:
            out.append(np.asarray(cur))
            cur, n = [], 0
    if cur:
        out.append(np.asarray(cur))
    return out


def featurize_cohort(
    data: ad.AnnData | PathLike,
    *,
    annotator: TCellAnnotator | None = None,
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None = None,
    sample_key: str | None = None,
    patient_key: str | None = None,
    x_kind: XKind = "auto",
    sample_qc: SampleQCSpec | None = None,
    chunk_cells: int = DEFAULT_CHUNK_CELLS,
    max_cells_per_sample: int | None = None,
    subsample_seed: int = 0,
    block_values: int = DEFAULT_BLOCK_VALUES,
    n_jobs: int = 1,
    timings: dict[str, float] | None = None,
    default_sample: str | None = None,
) -> SingleCellFeatures:
    """Per-sample features of a cohort of any size, labelled a group of samples at a time.

    Parameters
    ----------
    data
        A path (anything :func:`~blinaprofile.io.singlecell.read_single_cell` reads; an
        ``.h5ad`` whose matrix is CSR with only Gene Expression features is read in blocks of
        rows, never whole) or an AnnData.
    annotator
        A fitted annotator; ``None`` fits one on ``data`` first (on every cell, or on the
        subsample ``max_cells_per_sample`` gives), then labels every cell with it.
    config
        Configuration of that fit (not allowed with ``annotator``).
    sample_key, patient_key, x_kind, sample_qc
        As :func:`~blinaprofile.features.singlecell.featurize_single_cell`.
    chunk_cells
        Cells labelled together: whole samples, a group closing once it holds this many.
    max_cells_per_sample, subsample_seed
        Passed to :meth:`TCellAnnotator.fit` when ``annotator`` is ``None``.
    block_values
        Stored matrix values read per block from an ``.h5ad`` file.
    n_jobs
        Processes labelling groups of samples (``1``: this process). With more, the groups
        go to ``forkserver`` worker processes, at most ``n_jobs + 1`` in flight, each given
        the annotator's state (it labels exactly as the fitted annotator); the fit itself
        runs here.
    timings
        A dict filled with the wall (``<phase>_s``) and this process's CPU
        (``<phase>_cpu_s``) seconds of the phases ``open`` (obs, matrix kind), ``fit_read``,
        ``fit`` and ``label`` (reading the panel and labelling); with ``n_jobs > 1`` also
        ``label_workers_cpu_s`` (the workers' CPU seconds) and ``workers_peak_rss_mb`` (the
        largest worker's peak resident memory).
    default_sample
        The sample's name when the object has no sample column (default: the file's name
        without its extension, ``"sample"`` for an AnnData).

    Returns
    -------
    SingleCellFeatures
        The table :func:`~blinaprofile.features.singlecell.featurize_cells` would give with
        the same annotator on the whole object (same rows, order, values and evidence).

    Raises
    ------
    SingleCellInputError
        As :func:`~blinaprofile.features.singlecell.featurize_cells`.
    ConfigError
        Both ``annotator`` and ``config`` given.
    """
    if annotator is not None and config is not None:
        raise ConfigError(
            "pass either a fitted annotator (its config is used) or a config, not both"
        )
    chunk_cells = max(int(chunk_cells), 1)
    if n_jobs > 1:  # the workers' imports happen while this process reads
        start_fork_server(preload=[__name__])
    fitted_here = annotator is None
    kw: dict[str, Any] = {
        "sample_key": sample_key,
        "patient_key": patient_key,
        "x_kind": x_kind,
        "sample_qc": sample_qc,
    }
    if not isinstance(data, ad.AnnData) and streamable(data):
        with _phase(timings, "open"):
            st = H5adStream(data, sample_key=sample_key, x_kind=x_kind, block_values=block_values)
        with st:
            return _from_stream(
                st,
                annotator,
                config,
                kw,
                default_sample=default_sample,
                chunk_cells=chunk_cells,
                max_cells_per_sample=max_cells_per_sample,
                subsample_seed=subsample_seed,
                n_jobs=n_jobs,
                timings=timings,
            )
    default = default_sample or "sample"
    with _phase(timings, "open"):
        if isinstance(data, ad.AnnData):
            adata = data
        else:
            adata = read_single_cell(data, sample_key=sample_key, x_kind=x_kind)
            default = default_sample or file_sample_name(data)
    if annotator is None:
        with _phase(timings, "fit"):
            annotator = TCellAnnotator(config=config).fit(
                adata,
                sample_key=sample_key,
                x_kind=x_kind,
                max_cells_per_sample=max_cells_per_sample,
                subsample_seed=subsample_seed,
            )
    codes, names, key = sample_codes(
        adata, annotator.config_, sample_key=sample_key, default_sample=default
    )
    out = _Collector(names, default, key, fitted_here)
    labeller = _Labeller(annotator, kw, n_jobs, out, timings)
    with _phase(timings, "label"):
        try:
            for group in _groups(codes, len(names), chunk_cells):
                rows = np.flatnonzero(np.isin(codes, group))
                labeller.submit(adata if rows.size == adata.n_obs else adata[rows].copy())
        finally:
            labeller.finish()
    return out.result(annotator)


def _from_stream(
    st: H5adStream,
    annotator: TCellAnnotator | None,
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None,
    kw: dict[str, Any],
    *,
    default_sample: str | None,
    chunk_cells: int,
    max_cells_per_sample: int | None,
    subsample_seed: int,
    n_jobs: int,
    timings: dict[str, float] | None,
) -> SingleCellFeatures:
    default = default_sample or file_sample_name(st.path)
    light = ad.AnnData(obs=st.obs, uns={"blinaprofile": dict(st.meta)})
    cfg = annotator.config_ if annotator is not None else resolve_config(config)
    codes, names, key = sample_codes(
        light, cfg, sample_key=kw["sample_key"], default_sample=default
    )
    fitted_here = annotator is None
    if annotator is None:
        rows = (
            np.arange(st.n_obs)
            if max_cells_per_sample is None
            else stratified_subsample(
                codes, names, max_cells_per_sample=max_cells_per_sample, seed=subsample_seed
            )
        )
        with _phase(timings, "fit_read"):
            sub = st.read_rows(rows)
        with _phase(timings, "fit"):
            annotator = TCellAnnotator(config=config).fit(
                sub, sample_key=kw["sample_key"], x_kind=kw["x_kind"]
            )
        del sub
        if max_cells_per_sample is not None:
            annotator.subsample_ = {
                "max_cells_per_sample": int(max_cells_per_sample),
                "seed": int(subsample_seed),
                "n_cells": int(rows.size),
                "n_cells_offered": int(st.n_obs),
            }
    st.set_panel(annotator.panel_genes(), annotator.config_.cell_qc.mito_prefix)
    if st.n_obs <= chunk_cells:  # one group: a worker process would only add its start-up
        n_jobs = 1
    n_samples = len(names)
    idx = np.arange(st.n_obs)
    last = np.full(n_samples, -1, dtype=np.int64)
    np.maximum.at(last, codes, idx)
    first = np.full(n_samples, st.n_obs, dtype=np.int64)
    np.minimum.at(first, codes, idx)
    counts = np.bincount(codes, minlength=n_samples)
    done = np.zeros(n_samples, dtype=bool)
    out = _Collector(names, default, key, fitted_here)
    labeller = _Labeller(annotator, kw, n_jobs, out, timings)
    pending: list[PanelBlock] = []
    with _phase(timings, "label"):
        try:
            for blk in st.panel_blocks():
                pending.append(blk)
                final = blk.stop >= st.n_obs
                ready = np.flatnonzero(~done & (last < blk.stop))
                if ready.size == 0 or (int(counts[ready].sum()) < chunk_cells and not final):
                    continue
                rows = np.flatnonzero(np.isin(codes, ready))
                labeller.submit(
                    st.panel([b for b in pending if b.stop > rows[0] and b.start <= rows[-1]], rows)
                )
                done[ready] = True
                open_first = int(first[~done].min()) if (~done).any() else st.n_obs
                pending = [b for b in pending if b.stop > open_first]
        finally:
            labeller.finish()
    return out.result(annotator)


def featurize_object(
    path: PathLike,
    *,
    annotator: TCellAnnotator | None = None,
    sample_key: str | None = None,
    patient_key: str | None = None,
    x_kind: XKind = "auto",
    sample_qc: SampleQCSpec | None = None,
    max_cells_per_sample: int | None = None,
    n_jobs: int = 1,
) -> tuple[SingleCellFeatures, ad.AnnData]:
    """``blinaprofile featurize OBJECT``: the features of a single-cell object, and its cells.

    With ``annotator`` or ``max_cells_per_sample``, an ``.h5ad`` that
    :func:`~blinaprofile.io.h5ad_stream.streamable` accepts is streamed (:func:`featurize_cohort`:
    the matrix is never held whole) and any other object is read whole, then labelled in
    groups; the table is the one :func:`~blinaprofile.features.singlecell.featurize_cells`
    gives on the object read whole with that annotator. Without either, the annotator is
    fitted on every cell as :func:`featurize_cells` fits it (the fit holds every cell anyway,
    and a fit then a streamed transform can differ from it in the last digits, ~1e-4 points
    on log-normalised data). An object without a sample column is the sample ``"sample"``.

    Returns
    -------
    features, cells
        The features, and the object: read whole, or (streamed) its ``obs`` alone.
    """
    kw: dict[str, Any] = {
        "annotator": annotator,
        "sample_key": sample_key,
        "patient_key": patient_key,
        "x_kind": x_kind,
        "sample_qc": sample_qc,
        "max_cells_per_sample": max_cells_per_sample,
        "n_jobs": n_jobs,
        "default_sample": "sample",
    }
    if annotator is None and max_cells_per_sample is None:
        adata = read_single_cell(path, sample_key=sample_key, x_kind=x_kind)
        feats = featurize_cells(
            adata,
            sample_key=sample_key,
            patient_key=patient_key,
            x_kind=x_kind,
            sample_qc=sample_qc,
        )
        return feats, adata
    if streamable(path):
        feats = featurize_cohort(path, **kw)
        meta = {"source": str(path)}
        return feats, ad.AnnData(obs=read_obs(path), uns={"blinaprofile": meta})
    adata = read_single_cell(path, sample_key=sample_key, x_kind=x_kind)
    return featurize_cohort(adata, **kw), adata
