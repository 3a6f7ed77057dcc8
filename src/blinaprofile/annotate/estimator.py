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
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Self

import anndata as ad
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from blinaprofile.annotate.cascade import Labels, run_cascade
from blinaprofile.annotate.config import PathLike, SingleCellConfig, resolve_config
from blinaprofile.annotate.inputs import CellInput, CellQC, cell_qc, prepare
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

__all__ = ["Annotation", "TCellAnnotator"]

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
        Cells and samples of the training object.
    """

    def __init__(self, *, config: ConfigLike = None) -> None:
        self.config = config

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

        Returns
        -------
        TCellAnnotator
            ``self``, fitted.
        """
        self.fit_annotation(adata, sample_key=sample_key, x_kind=x_kind)
        return self

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
