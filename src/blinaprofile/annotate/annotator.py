"""The public entry point of the single-cell annotator: :func:`annotate` writes per-cell
T-cell, lineage, memory and state calls into ``obs["bp_*"]`` (scanpy style).

The stages live in :mod:`~blinaprofile.annotate.inputs` (:func:`prepare`, :func:`cell_qc`),
:mod:`~blinaprofile.annotate.cascade` (the label cascade, fitted or applied),
:mod:`~blinaprofile.annotate.estimator` (:class:`TCellAnnotator`) and
:mod:`~blinaprofile.annotate.output` (``obs``/``uns`` and per-sample evidence).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anndata as ad
import numpy as np

from blinaprofile.annotate.cascade import Labels, run_cascade, tim3_estimator
from blinaprofile.annotate.config import PathLike, SingleCellConfig
from blinaprofile.annotate.estimator import Annotation, TCellAnnotator
from blinaprofile.annotate.inputs import CellInput, CellQC, cell_qc, prepare
from blinaprofile.errors import ConfigError

__all__ = [
    "Annotation",
    "CellInput",
    "CellQC",
    "Labels",
    "TCellAnnotator",
    "annotate",
    "cell_qc",
    "prepare",
    "run_cascade",
    "tim3_estimator",
]


def annotate(
    adata: ad.AnnData,
    *,
    annotator: TCellAnnotator | None = None,
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None = None,
    sample_key: str | None = None,
    x_kind: str = "auto",
    use_protein: bool | None = None,
    copy: bool = False,
) -> ad.AnnData | None:
    """Label cells: T cells, CD4/CD8, naive/CM/EM/TEMRA, TIM3/checkpoint-high, PD-1, Treg,
    exhausted CD8.

    Parameters
    ----------
    adata
        An object as :func:`~blinaprofile.io.singlecell.read_single_cell` returns (raw counts
        in ``layers['counts']``/``X``, or normalised ``X``; protein in ``obsm``), possibly
        holding many samples.
    annotator
        A fitted :class:`TCellAnnotator` (e.g. loaded with the model); ``None`` fits one on
        ``adata`` itself, which makes every label depend on what else is in ``adata``
        (recorded as ``uns['blinaprofile']['annotator']['fitted_on_input']``).
    config
        Configuration for the fit when ``annotator`` is ``None`` (a
        :class:`SingleCellConfig`, a mapping, a YAML path, or ``None`` for the default).
    sample_key
        ``obs`` column of the sample: protein gates and state priors are per sample.
        ``None`` uses the first of ``config.sample_key_candidates`` present, else treats the
        object as one sample.
    x_kind
        ``auto``, ``counts``, ``log1p-cp10k``, ``log-tpm`` or ``tpm``.
    use_protein
        ``False``: RNA only, even when the object holds protein (as deleting
        ``obsm['protein']`` of an object from
        :func:`~blinaprofile.io.singlecell.read_single_cell`). Protein is read from that one
        key for such objects; see :func:`~blinaprofile.annotate.inputs.prepare`. ``None``
        (default): the ``annotator``'s own setting, else ``True``; with a fitted
        ``annotator`` a different value is an error.
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    AnnData or None
        The annotated copy with ``copy=True``; ``None`` otherwise (``adata`` is annotated in
        place). Written: ``obs``: ``bp_qc_pass``; ``bp_cell_type`` (T/B/NK/myeloid/other/
        non_T); ``bp_t_cell``; ``bp_lineage`` (CD4/CD8/other/non_T); ``bp_memory``
        (naive/CM/EM/TEMRA); ``bp_effector`` (EM/TEMRA of CCR7-low T cells, with
        ``bp_effector_prob``: the memory call's EM/TEMRA cells, or, when naive vs CM is not
        separable, a call of its own); ``bp_tim3``, ``bp_pd1``, ``bp_treg``, ``bp_exhausted`` with
        ``bp_<state>_prob``; ``bp_evidence`` (protein/RNA/protein+RNA/prefiltered/none);
        ``bp_confidence`` (0-1, the smallest of the per-label ``bp_<label>_conf``); gene-set
        scores ``bp_score_<set>``. Labels are categoricals with fixed categories in a fixed
        order (also those without cells here, so per-sample outputs concatenate), missing
        (QC-failed, not applicable, not estimable) is NaN; yes/no labels are categoricals of
        ``False``/``True`` so that ``sc.pl.umap(color=...)`` and
        ``sc.tl.rank_genes_groups(groupby=...)`` take them (``rank_genes_groups`` refuses a
        category with fewer than two cells: pass ``groups=`` with the populated ones, or
        subset the object, which drops unused categories). ``obsm['bp_protein_clr']``: CLR
        protein. ``uns['blinaprofile']``: the estimator behind each label (``evidence``), the
        per-sample evidence (``sample_evidence``), the TIM3 estimator, per-sample protein
        thresholds (``protein.gates.<marker>.<sample>``), the RNA models
        (``rna.models.<set>@<scope>``) and the annotator summary (``annotator``).

    Raises
    ------
    SingleCellInputError
        ``sample_key`` is not an ``obs`` column, the matrix cannot be used, the object is
        cytometry data, or neither protein nor genes allow calling T cells and CD4/CD8 (the
        message names the file).
    ConfigError
        Both ``annotator`` and ``config`` given.
    """
    if annotator is not None and config is not None:
        raise ConfigError("pass either a fitted annotator or a config, not both")
    if annotator is not None and use_protein not in (None, annotator.use_protein):
        raise ConfigError(
            f"use_protein={use_protein} but the annotator was built with "
            f"use_protein={annotator.use_protein}: set it on TCellAnnotator(use_protein=...)"
        )
    target = adata.copy() if copy else adata
    ann: Annotation
    if annotator is None:
        ann = TCellAnnotator(config=config, use_protein=use_protein is not False).fit_annotation(
            target, sample_key=sample_key, x_kind=x_kind
        )
    else:
        ann = annotator.annotation(target, sample_key=sample_key, x_kind=x_kind)
    obs, clr = ann.obs(target.obs_names)
    for c in obs.columns:
        col = obs[c]
        target.obs[c] = col.array if not isinstance(col.dtype, np.dtype) else col.to_numpy()
    if clr is not None:
        target.obsm["bp_protein_clr"] = clr
    info = dict(target.uns.get("blinaprofile", {}))
    info.update(ann.uns())
    target.uns["blinaprofile"] = info
    return target if copy else None
