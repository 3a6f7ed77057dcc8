"""The annotator as a scikit-learn style estimator: fit once on a training cohort, then label
any sample alone or in a batch exactly the same way.

>>> ann = TCellAnnotator(config=None).fit(cohort, sample_key="sample_id")   # doctest: +SKIP
>>> labels = ann.transform(one_sample)                                      # doctest: +SKIP
>>> state = ann.to_dict()            # plain JSON: store it next to the model  # doctest: +SKIP
>>> same = TCellAnnotator.from_dict(state)                                  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Self

import anndata as ad
import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from blinaprofile.annotate.cascade import Labels, run_cascade
from blinaprofile.annotate.config import PathLike, SingleCellConfig, resolve_config
from blinaprofile.annotate.inputs import CellInput, CellQC, cell_qc, prepare, sample_codes
from blinaprofile.annotate.output import obs_frame, sample_evidence, uns_params
from blinaprofile.annotate.state import (
    AnnotatorState,
    Fitted,
    fitted_from_state,
    plain,
    state_from_fitted,
)
from blinaprofile.config import validate_config
from blinaprofile.errors import ConfigError
from blinaprofile.features.schema import SCHEMA_VERSION

__all__ = ["Annotation", "TCellAnnotator", "stratified_subsample"]

ConfigLike = SingleCellConfig | Mapping[str, Any] | PathLike | None


def _package_version() -> str:
    try:
        return version("blinaprofile")
    except PackageNotFoundError:  # running from a source tree without installed metadata
        return "unknown"


@dataclass
class Annotation:
    """The labels of one object and everything behind them.

    Attributes
    ----------
    inp
        What was read from the object (samples, matrix kind, gene symbols, protein).
    qc
        Per-cell QC (passed cells, rules, cells failing each rule).
    labels
        Per-cell results over the QC-passed cells.
    fitted
        The fitted annotator state that produced them.
    fitted_on_input
        ``True`` when the annotator was fitted on this very object (no pre-fitted annotator).
    """

    inp: CellInput
    qc: CellQC
    labels: Labels
    fitted: Fitted
    fitted_on_input: bool

    def annotator_info(self) -> dict[str, Any]:
        f = self.fitted
        return {
            "fitted_on_input": bool(self.fitted_on_input),
            "n_cells_fit": int(f.n_cells),
            "n_qc_cells_fit": int(f.n_qc_cells),
            "n_samples_fit": int(f.n_samples),
            "sample_key_fit": f.sample_key,
            "x_kind_fit": f.x_kind,
        }

    def evidence(self) -> dict[str, dict[str, Any]]:
        """Per-sample evidence (see :func:`blinaprofile.annotate.output.sample_evidence`)."""
        return sample_evidence(
            self.inp, self.qc, self.labels, self.fitted, fitted_on_input=self.fitted_on_input
        )

    def obs(self, index: pd.Index) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """The ``obs['bp_*']`` columns and the CLR protein (``obsm['bp_protein_clr']``)."""
        return obs_frame(self.inp, self.qc.passed, self.labels, index)

    def uns(self) -> dict[str, Any]:
        """``uns['blinaprofile']`` content."""
        return uns_params(
            self.inp,
            self.qc,
            self.labels,
            self.fitted.config,
            self.evidence(),
            self.annotator_info(),
        )


def stratified_subsample(
    codes: np.ndarray, names: list[str], *, max_cells_per_sample: int, seed: int = 0
) -> np.ndarray:
    """Up to ``max_cells_per_sample`` cells of every sample, drawn without replacement.

    Each sample's draw uses its own generator, seeded with ``seed`` and the CRC-32 of the
    sample's name, so a sample contributes the same cells whatever else is in the object
    (and whatever the order of the cells of the other samples).

    Parameters
    ----------
    codes
        Each cell's sample code (index into ``names``).
    names
        Sample names.
    max_cells_per_sample
        Cells kept per sample (all of a smaller sample).
    seed
        Fixed seed of the draw.

    Returns
    -------
    ndarray
        The rows kept, sorted.
    """
    if max_cells_per_sample < 1:
        raise ValueError(f"max_cells_per_sample must be >= 1, got {max_cells_per_sample}")
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))
    keep: list[np.ndarray] = []
    for i, name in enumerate(names):
        rows = order[bounds[i] : bounds[i + 1]]
        if rows.size > max_cells_per_sample:
            rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
            rows = rng.choice(rows, size=max_cells_per_sample, replace=False)
        keep.append(rows)
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, dtype=np.int64)


class TCellAnnotator(BaseEstimator):
    """Per-cell T-cell, CD4/CD8, memory and state calls, learned once and applied anywhere.

    ``fit`` runs the label cascade on a training cohort: it decides, for every label, whether
    it comes from a protein gate or an RNA gene set, and learns the protein gates' cohort
    fallbacks (pooled mixtures, rare-positive rules), the RNA mixtures (negative-binomial rates
    and dispersions on raw counts; Gaussian mixtures on log-normalised scores for normalised
    data), the pooled state priors, the CCR7 protein+RNA fusion and the expression-matched
    control genes. ``transform`` applies all of it. The only quantities estimated from the
    data being labelled are each sample's own protein gate (when its own mixture is bimodal)
    and each sample's state priors; both depend on that sample's cells alone, so a sample
    gets the same labels alone or inside any batch.

    Parameters
    ----------
    config
        A :class:`~blinaprofile.annotate.config.SingleCellConfig`, a mapping, a YAML path, or
        ``None`` for ``configs/single_cell.yaml``.
    use_protein
        Read CITE-seq protein (``obsm['protein']`` of an object from
        :func:`~blinaprofile.io.singlecell.read_single_cell`). ``False``: an RNA-only fit and
        labelling even when the object holds protein (an annotator fitted without protein
        also ignores protein when labelling).

    Attributes
    ----------
    config_ : SingleCellConfig
        The resolved configuration.
    state_ : AnnotatorState
        Everything learned, validated (what :meth:`to_dict` returns).
    fitted_ : Fitted
        The runtime form of ``state_`` (rebuilt from it, so a loaded annotator behaves
        exactly as the fitted one).
    x_kind_ : str
        The kind of RNA matrix it was fitted on (``counts`` or a normalised kind, ``none``).
    n_cells_fit_, n_samples_fit_ : int
        Cells (of the subsample, when ``fit`` was given ``max_cells_per_sample``) and
        samples the annotator was fitted on.
    subsample_ : dict or None
        ``max_cells_per_sample``, ``seed``, ``n_cells`` (kept) and ``n_cells_offered`` of a
        subsampled fit; ``None`` after a fit on every cell.
    """

    def __init__(self, *, config: ConfigLike = None, use_protein: bool = True) -> None:
        self.config = config
        self.use_protein = use_protein

    # ------------------------------------------------------------------ fitting
    def fit_annotation(
        self,
        adata: ad.AnnData,
        *,
        sample_key: str | None = None,
        patient_key: str | None = None,
        x_kind: str = "auto",
        default_sample: str = "sample",
    ) -> Annotation:
        """Fit on ``adata`` and return its labels as computed while fitting.

        Parameters
        ----------
        adata
            The training object (left unmodified).
        sample_key, patient_key
            ``obs`` columns; ``None`` uses the configuration's candidates, else one sample.
        x_kind
            ``auto``, ``counts``, ``log1p-cp10k``, ``log-tpm`` or ``tpm``.
        default_sample
            Sample name when there is no sample column.

        Raises
        ------
        SingleCellInputError
            As :func:`~blinaprofile.annotate.inputs.prepare`, or when neither protein nor
            genes allow calling T cells and CD4/CD8.
        """
        cfg = resolve_config(self.config)
        inp = prepare(
            adata,
            cfg,
            sample_key=sample_key,
            patient_key=patient_key,
            default_sample=default_sample,
            x_kind=x_kind,
            use_protein=self.use_protein,
        )
        qc = cell_qc(inp, cfg)
        fitted = Fitted(config=cfg)
        labels = run_cascade(inp, qc.passed, fitted, fitting=True)
        fitted.n_cells = int(inp.n_obs)
        fitted.n_qc_cells = int(qc.passed.sum())
        fitted.n_samples = len(inp.sample_names)
        fitted.sample_key = inp.sample_key or ""
        self._set_state(
            state_from_fitted(
                fitted, package_version=_package_version(), schema_version=SCHEMA_VERSION
            )
        )
        return Annotation(inp, qc, labels, self.fitted_, fitted_on_input=True)

    def fit(
        self,
        adata: ad.AnnData,
        y: None = None,
        *,
        sample_key: str | None = None,
        x_kind: str = "auto",
        max_cells_per_sample: int | None = None,
        subsample_seed: int = 0,
    ) -> Self:
        """Learn thresholds, mixtures and rates from a training cohort.

        Parameters
        ----------
        adata
            Cells of the training cohort (raw counts or normalised RNA, optional protein).
        y
            Ignored (scikit-learn signature).
        sample_key
            ``obs`` column of the sample (per-sample gates and priors while fitting).
        x_kind
            What the RNA matrix holds (see :func:`blinaprofile.io.singlecell.detect_x_kind`).
        max_cells_per_sample
            Fit on at most this many cells of every sample (a per-sample stratified random
            subsample, :func:`stratified_subsample`); ``None`` (default) fits on every cell.
            The fit's cost grows with cells and samples; labelling (``transform``) always
            uses every cell. On a simulated cohort, 300 cells per sample changed no feature
            by more than the bound ``docs/single_cell.md`` states.
        subsample_seed
            Seed of the subsample (fixed: the same object gives the same annotator).

        Returns
        -------
        TCellAnnotator
            ``self``, fitted.
        """
        self.subsample_: dict[str, int] | None = None
        if max_cells_per_sample is None:
            self.fit_annotation(adata, sample_key=sample_key, x_kind=x_kind)
            return self
        cfg = resolve_config(self.config)
        codes, names, _ = sample_codes(adata, cfg, sample_key=sample_key)
        rows = stratified_subsample(
            codes, names, max_cells_per_sample=max_cells_per_sample, seed=subsample_seed
        )
        self.fit_annotation(adata[rows], sample_key=sample_key, x_kind=x_kind)
        self.subsample_ = {
            "max_cells_per_sample": int(max_cells_per_sample),
            "seed": int(subsample_seed),
            "n_cells": int(rows.size),
            "n_cells_offered": int(adata.n_obs),
        }
        return self

    def panel_genes(self) -> list[str]:
        """The genes :meth:`transform` reads besides the mitochondrial ones: every gene of the
        configuration's gene sets and the fitted control genes (upper-case symbols).

        A gene panel holding these genes, the mitochondrial genes
        (``config_.cell_qc.mito_prefix``) and every cell's sums over all genes
        (:mod:`blinaprofile.io.h5ad_stream`) is labelled exactly as the whole matrix.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Not fitted.
        """
        check_is_fitted(self, "state_")
        sigs = self.config_.rna.signatures.values()
        genes = [g.upper() for s in sigs for g in (*s.up, *s.down, *s.secondary)]
        controls = self.fitted_.controls
        if controls is not None:
            genes += [g.upper() for b in controls.bins for g in b]
        return list(dict.fromkeys(genes))

    def _set_state(self, state: AnnotatorState) -> None:
        self.state_ = state
        self.fitted_ = fitted_from_state(state)
        self.config_ = state.config
        self.x_kind_ = state.x_kind
        self.n_cells_fit_ = state.n_cells
        self.n_samples_fit_ = state.n_samples

    # ------------------------------------------------------------------ applying
    def annotation(
        self,
        adata: ad.AnnData,
        *,
        sample_key: str | None = None,
        patient_key: str | None = None,
        x_kind: str = "auto",
        default_sample: str = "sample",
    ) -> Annotation:
        """Label ``adata`` with the fitted state (parameters as :meth:`fit_annotation`).

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Not fitted.
        SingleCellInputError
            As :func:`~blinaprofile.annotate.inputs.prepare`; also raw-count models applied
            to normalised data, or protein lacking an antibody the annotator was fitted with.
        """
        check_is_fitted(self, "state_")
        cfg = self.config_
        inp = prepare(
            adata,
            cfg,
            sample_key=sample_key,
            patient_key=patient_key,
            default_sample=default_sample,
            x_kind=x_kind,
            use_protein=self.use_protein,
        )
        qc = cell_qc(inp, cfg)
        labels = run_cascade(inp, qc.passed, self.fitted_, fitting=False)
        return Annotation(inp, qc, labels, self.fitted_, fitted_on_input=False)

    def transform(
        self, adata: ad.AnnData, *, sample_key: str | None = None, x_kind: str = "auto"
    ) -> pd.DataFrame:
        """Per-cell labels of ``adata`` (left unmodified) with the fitted state.

        Returns
        -------
        DataFrame
            The ``bp_*`` columns :func:`~blinaprofile.annotate.annotator.annotate` writes to
            ``obs``, indexed like ``adata.obs``; ``attrs['blinaprofile']`` holds the per-sample
            evidence.
        """
        ann = self.annotation(adata, sample_key=sample_key, x_kind=x_kind)
        obs, _ = ann.obs(adata.obs_names)
        obs.attrs["blinaprofile"] = {"evidence": ann.evidence()}
        return obs

    def fit_transform(
        self,
        adata: ad.AnnData,
        y: None = None,
        *,
        sample_key: str | None = None,
        x_kind: str = "auto",
    ) -> pd.DataFrame:
        """:meth:`fit` then the labels computed while fitting (as :meth:`transform` returns)."""
        ann = self.fit_annotation(adata, sample_key=sample_key, x_kind=x_kind)
        obs, _ = ann.obs(adata.obs_names)
        obs.attrs["blinaprofile"] = {"evidence": ann.evidence()}
        return obs

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        """The fitted state as plain JSON-able data (numbers, strings, lists, mappings).

        Raises
        ------
        sklearn.exceptions.NotFittedError
            Not fitted.
        """
        check_is_fitted(self, "state_")
        return dict(plain(self.state_.model_dump(mode="json")))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None) -> TCellAnnotator:
        """A fitted annotator from :meth:`to_dict` output, validated (no code is loaded).

        Raises
        ------
        ConfigError
            Not an annotator state, another format version, unknown keys, non-finite or
            out-of-range numbers, mismatched lengths or references to missing models; the
            message names the key.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"an annotator state must be a mapping, not {type(data).__name__}", path=source
            )
        state = validate_config(AnnotatorState, dict(data), source=source or "<annotator state>")
        est = cls(config=state.config)
        est._set_state(state)
        return est

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_dict` as strict JSON (no NaN) to ``path``."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False, sort_keys=True)
        Path(path).write_text(text + "\n", encoding="utf-8")

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> TCellAnnotator:
        """Read an annotator written by :meth:`to_json` (validated as :meth:`from_dict`)."""
        p = Path(path)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read an annotator state: {err}", path=p) from None
        return cls.from_dict(data, source=str(p))
