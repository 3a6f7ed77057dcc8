"""Per-sample features in the versioned schema from a single-cell object.

With a fitted :class:`~blinaprofile.annotate.estimator.TCellAnnotator` (the one stored with a
model) a sample gets the same features alone as inside any cohort; without one, an annotator
is fitted on the object given and the table records that it was.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from blinaprofile.annotate.cascade import Labels, tim3_estimator
from blinaprofile.annotate.config import (
    MEMORY_LABELS,
    PathLike,
    SampleQCSpec,
    SingleCellConfig,
)
from blinaprofile.annotate.estimator import Annotation, TCellAnnotator
from blinaprofile.config import QCConfig, load_config
from blinaprofile.errors import ConfigError, SingleCellInputError
from blinaprofile.features.schema import QC_COLUMNS, SCHEMA_VERSION, feature_columns, feature_names
from blinaprofile.io.read import RESPONSE_CODES
from blinaprofile.io.singlecell import XKind, read_single_cell


# =========================================================================== features
def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den > 0 else float("nan")


def _features_for_sample(
    lab: Labels, sel: np.ndarray, n_events: int, cfg: SingleCellConfig, q: SampleQCSpec
) -> tuple[dict[str, float], list[str]]:
    soft = cfg.fraction_estimator == "posterior_mean"
    t = sel & lab.t_call
    c8 = sel & (lab.lineage == "CD8")
    c4 = sel & (lab.lineage == "CD4")
    n_live = int(sel.sum())
    n3, n4, n8 = int(t.sum()), int(c4.sum()), int(c8.sum())
    den = (
        int((sel & (lab.cell_type != "myeloid")).sum())
        if cfg.cd3_denominator == "lymphocytes"
        else n_live
    )
    f: dict[str, float] = {name: float("nan") for name in feature_names()}
    f["cd3_pct_lymph"] = float("nan") if cfg.t_cells_prefiltered else _pct(n3, den)
    f["cd4_pct_cd3"] = _pct(n4, n3)
    f["cd8_pct_cd3"] = _pct(n8, n3)
    f["cd4_cd8_ratio"] = n4 / n8 if n8 else float("nan")

    def frac(p: np.ndarray, parent: np.ndarray) -> float:
        v = p[parent]
        v = v[~np.isnan(v)]
        if v.size == 0:
            return float("nan")
        return float(100.0 * (v.mean() if soft else (v >= 0.5).mean()))

    for lin, parent in (("cd8", c8), ("cd4", c4)):
        mp = lab.mem_prob[parent]
        mp = mp[~np.isnan(mp).any(axis=1)]
        if mp.shape[0]:
            share = (
                mp.mean(axis=0)
                if soft
                else np.bincount(np.argmax(mp, axis=1), minlength=4) / mp.shape[0]
            )
            share = share / share.sum()
            for k, label in enumerate(MEMORY_LABELS):
                f[f"{lin}_{label.lower()}_pct_{lin}"] = float(100.0 * share[k])
    f["cd8_tim3_pct_cd8"] = frac(lab.tim3, c8)
    f["cd8_pd1_pct_cd8"] = frac(lab.pd1, c8)
    f["cd4_treg_pct_cd4"] = frac(lab.treg, c4)

    reasons: list[str] = []
    if n_live < q.min_cells:
        reasons.append(f"only {n_live} QC-passed cells (< {q.min_cells})")
        f["cd3_pct_lymph"] = float("nan")
    if n3 < q.min_cd3:
        reasons.append(f"only {n3} T cells (< {q.min_cd3})")
        for name in ("cd4_pct_cd3", "cd8_pct_cd3", "cd4_cd8_ratio"):
            f[name] = float("nan")
    for lin, n_lin, min_lin in (("cd8", n8, q.min_cd8), ("cd4", n4, q.min_cd4)):
        if n_lin < min_lin:
            reasons.append(f"only {n_lin} {lin.upper()} T cells (< {min_lin})")
            for name in f:
                if name.endswith(f"_pct_{lin}"):
                    f[name] = float("nan")
            f["cd4_cd8_ratio"] = float("nan")
    f.update(
        {
            "n_events": float(n_events),
            "n_live": float(n_live),
            "n_cd3": float(n3),
            "n_cd4": float(n4),
            "n_cd8": float(n8),
        }
    )
    return f, reasons


@dataclass
class SingleCellFeatures:
    """Features of a single-cell object and what produced them.

    Attributes
    ----------
    table
        One row per sample (see :func:`featurize_single_cell`).
    annotator
        The fitted annotator used (the one given, or the one fitted on the object: store it
        with a model so that samples scored later are labelled the same way).
    fitted_on_input
        ``True`` when no fitted annotator was given and one was fitted on this object.
    evidence
        Per sample, the evidence behind every call (also in
        ``table.attrs['blinaprofile']['evidence']``).
    """

    table: pd.DataFrame
    annotator: TCellAnnotator
    fitted_on_input: bool
    evidence: dict[str, dict[str, Any]]


def _read(
    data: ad.AnnData | PathLike, sample_key: str | None, x_kind: str
) -> tuple[ad.AnnData, str]:
    if isinstance(data, ad.AnnData):
        return data, "sample"
    adata = read_single_cell(data, sample_key=sample_key, x_kind=x_kind)  # type: ignore[arg-type]
    return adata, file_sample_name(data)


def file_sample_name(path: PathLike) -> str:
    """The sample name of a one-sample object read from ``path``: the file's name without
    its ``.h5ad``/``.h5``/``.hdf5`` suffix, or the 10x folder's name for a ``matrix.mtx``."""
    p = Path(path)
    base = p.parent if p.name.lower().endswith((".mtx", ".mtx.gz")) else p
    return re.sub(r"\.(h5ad|h5|hdf5)$", "", base.name, flags=re.IGNORECASE)


def featurize_cells(
    data: ad.AnnData | PathLike,
    *,
    annotator: TCellAnnotator | None = None,
    sample_key: str | None = None,
    patient_key: str | None = None,
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None = None,
    x_kind: XKind = "auto",
    sample_qc: SampleQCSpec | None = None,
) -> SingleCellFeatures:
    """Per-sample features, the annotator behind them and whether it was fitted here.

    Parameters are those of :func:`featurize_single_cell`.

    Returns
    -------
    SingleCellFeatures
    """
    if annotator is not None and config is not None:
        raise ConfigError(
            "pass either a fitted annotator (its config is used) or a config, not both"
        )
    adata, default = _read(data, sample_key, x_kind)
    fitted_here = annotator is None
    ann: Annotation
    if annotator is None:
        annotator = TCellAnnotator(config=config)
        ann = annotator.fit_annotation(
            adata,
            sample_key=sample_key,
            patient_key=patient_key,
            x_kind=x_kind,
            default_sample=default,
        )
    else:
        ann = annotator.annotation(
            adata,
            sample_key=sample_key,
            patient_key=patient_key,
            x_kind=x_kind,
            default_sample=default,
        )
    cfg = ann.fitted.config
    sample_qc = sample_qc or cfg.sample_qc
    inp, lab = ann.inp, ann.labels
    grp_qc = inp.sample[ann.qc.passed]
    n_events = np.bincount(inp.sample, minlength=len(inp.sample_names))
    estimator = tim3_estimator(lab)
    evidence = ann.evidence()
    rows = []
    for i, sid in enumerate(inp.sample_names):
        sel = grp_qc == i
        f, reasons = _features_for_sample(lab, sel, int(n_events[i]), cfg, sample_qc)
        row: dict[str, Any] = {
            "sample_id": sid,
            "patient_id": inp.patient_of_sample[i],
            "modality": "single_cell",
            "schema_version": SCHEMA_VERSION,
        }
        row.update({k: f[k] for k in feature_names()})
        row.update({k: int(f[k]) for k in QC_COLUMNS})
        row["qc_pass"] = not reasons
        row["qc_reasons"] = "; ".join(reasons)
        row["tim3_estimator"] = estimator
        rows.append(row)
        c8 = sel & (lab.lineage == "CD8")
        ex = lab.exhausted[c8]
        ex = ex[~np.isnan(ex)]
        evidence[sid]["states"] = {
            "exhausted_pct_cd8": float(100.0 * ex.mean()) if ex.size else float("nan"),
            "note": "exhausted = checkpoint-high CD8 (TIM3+ PD-1+ protein, else the RNA "
            "checkpoint set); not a schema feature",
        }
    cols = [*feature_columns(), "tim3_estimator"]
    df = pd.DataFrame(rows, columns=cols)
    df["qc_pass"] = df["qc_pass"].astype(bool)
    df.attrs["blinaprofile"] = {
        "source": inp.source or "",
        "sample_key": inp.sample_key or "",
        "patient_key": inp.patient_key or "",
        "x_kind": inp.x_kind,
        "estimators": dict(lab.evidence),
        "evidence": evidence,
        "fraction_estimator": cfg.fraction_estimator,
        "sample_qc": sample_qc.model_dump(),
        "annotator": ann.annotator_info(),
        "annotator_fitted_on_input": fitted_here,
    }
    return SingleCellFeatures(df, annotator, fitted_here, evidence)


def featurize_single_cell(
    data: ad.AnnData | PathLike,
    *,
    annotator: TCellAnnotator | None = None,
    sample_key: str | None = None,
    patient_key: str | None = None,
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None = None,
    x_kind: XKind = "auto",
    sample_qc: SampleQCSpec | None = None,
) -> pd.DataFrame:
    """Per-sample features in the versioned schema from a single-cell object.

    Parameters
    ----------
    data
        A path (anything :func:`read_single_cell` reads) or an AnnData (left unmodified).
    annotator
        A fitted :class:`~blinaprofile.annotate.estimator.TCellAnnotator` (the one stored
        with the model): every sample is then labelled exactly as in training, alone or not.
        ``None`` fits an annotator on ``data`` itself (model-free): the features then depend
        on what else is in ``data``; ``attrs['blinaprofile']['annotator_fitted_on_input']``
        says so (and :func:`featurize_cells` returns the fitted annotator and the flag).
    sample_key, patient_key
        ``obs`` columns of the sample and the patient. ``None`` uses the first of
        ``config.sample_key_candidates`` / ``patient_key_candidates`` present; without a
        sample column the whole object is one sample named after the file (or ``sample``);
        without a patient column each sample is its own patient.
    config
        For the model-free fit: a :class:`SingleCellConfig`, a mapping, a YAML path, or
        ``None`` for the default. Not allowed with ``annotator`` (whose config is used).
    x_kind
        What the RNA matrix holds: ``auto`` (detect), ``counts``, ``log1p-cp10k``,
        ``log-tpm`` or ``tpm`` (see :func:`blinaprofile.io.singlecell.detect_x_kind`).
    sample_qc
        Per-sample QC minimums overriding the configuration's ``sample_qc`` (the
        ``single_cell`` section of a ``--qc`` file, :func:`load_qc_file`); ``None`` keeps the
        annotator's (or ``config``'s).

    Returns
    -------
    DataFrame
        One row per sample (in order of first appearance): ``sample_id``, ``patient_id``,
        ``modality`` (``"single_cell"``), ``schema_version``, every feature of
        :func:`blinaprofile.features.schema.feature_names` (flow-only ones NaN), the QC columns
        ``n_events`` (cells read), ``n_live`` (QC-passed cells), ``n_cd3``, ``n_cd4``,
        ``n_cd8``, then ``qc_pass``, ``qc_reasons`` (``""`` when passing, else ``"; "``-joined
        reasons) and ``tim3_estimator``. Percent features are 0-100 of the schema's parent;
        lineage shares come from the hard calls (``cd4_cd8_ratio = n_cd4 / n_cd8``), memory
        and state shares are the mean posterior over the parent's cells
        (``fraction_estimator``). Features whose parent has too few cells are NaN.
        ``df.attrs['blinaprofile']``: ``estimators`` (label -> estimator), ``evidence``
        (per sample: per label the source protein/RNA/unavailable, markers, gene sets and
        genes used, genes missing, per-sample gate methods; cells removed by each cell-QC
        rule; the matrix kind; ``exhausted_pct_cd8``), ``annotator`` (what it was fitted
        on), ``annotator_fitted_on_input``, ``x_kind``, ``sample_qc`` (the minimums
        applied), the keys used (``patient_key`` is ``""`` when no patient column was found
        and each sample is its own patient).

    Raises
    ------
    SingleCellInputError
        Unreadable input, unknown sample/patient key, a sample spanning several patients, a
        cytometry object, an unusable matrix, or neither protein nor genes to call T cells
        and CD4/CD8 (the message names the file).
    ConfigError
        Both ``annotator`` and ``config`` given.
    """
    return featurize_cells(
        data,
        annotator=annotator,
        sample_key=sample_key,
        patient_key=patient_key,
        config=config,
        x_kind=x_kind,
        sample_qc=sample_qc,
    ).table


class FoldAnnotatorFeatures:
    """The annotator refitted inside each CV training split (a ``FoldFeaturizer``).

    :func:`blinaprofile.models.validation.evaluate` calls :meth:`fold_features` once per
    distinct outer training split: a fresh :class:`TCellAnnotator` with the configuration
    of the whole-cohort one is fitted on the cells of that split's samples only, and every
    sample asked for (the split's training and test samples) is featurized with it. No
    labels are used, and no cell of a test sample informs a threshold, mixture or rate.

    Parameters
    ----------
    adata
        The cohort object the features came from (left unmodified).
    annotator
        The annotator fitted on the whole cohort (its configuration is reused per fold; the
        final model keeps this one).
    sample_key, patient_key
        The ``obs`` columns (``None``: the first of the configuration's candidates present;
        a sample column is required).
    x_kind
        What the RNA matrix holds (the kind resolved for the whole cohort).
    sample_qc
        The per-sample QC minimums applied to the cohort's features (``None``: the
        annotator's).
    """

    def __init__(
        self,
        adata: ad.AnnData,
        *,
        annotator: TCellAnnotator,
        sample_key: str | None,
        patient_key: str | None = None,
        x_kind: XKind = "auto",
        sample_qc: SampleQCSpec | None = None,
    ) -> None:
        self.adata = adata
        self.config = annotator.config_
        key, _ = sample_column(
            adata, sample_key=sample_key, candidates=self.config.sample_key_candidates
        )
        if key is None:
            raise SingleCellInputError(
                "per-fold annotator fits need a sample column (obs has none of "
                f"{list(self.config.sample_key_candidates)})",
                path=_source_name(adata),
            )
        self.sample_key = key
        self.patient_key = patient_key
        self.x_kind: XKind = x_kind
        self.sample_qc = sample_qc

    def _cells_of(self, sample_ids: Sequence[str]) -> ad.AnnData:
        key, names = sample_column(self.adata, sample_key=self.sample_key)
        wanted = {str(s) for s in sample_ids}
        unknown = sorted(wanted - set(names))
        if unknown:
            raise SingleCellInputError(
                f"sample(s) {unknown[:5]} are not in obs {key!r}", path=_source_name(self.adata)
            )
        if wanted == set(names):
            return self.adata
        keep = self.adata.obs[key].astype(str).isin(wanted).to_numpy()
        return self.adata[keep].copy()

    def fit_split(self, train_ids: Sequence[str]) -> TCellAnnotator:
        """A fresh annotator fitted on the cells of the samples ``train_ids`` only."""
        return TCellAnnotator(config=self.config).fit(
            self._cells_of(train_ids), sample_key=self.sample_key, x_kind=self.x_kind
        )

    def fold_features(self, train_ids: Sequence[str], sample_ids: Sequence[str]) -> pd.DataFrame:
        """Features of ``sample_ids`` labelled by an annotator fitted on ``train_ids`` alone.

        The training samples get the features computed while fitting (as the whole-cohort
        features of the final model are), the others are labelled with the fitted state
        (each sample on its own cells, as when scored).

        Returns
        -------
        DataFrame
            :func:`featurize_single_cell` columns, indexed by sample id, in the order of
            ``sample_ids``.
        """
        fitted = featurize_cells(
            self._cells_of(train_ids),
            config=self.config,
            sample_key=self.sample_key,
            patient_key=self.patient_key,
            x_kind=self.x_kind,
            sample_qc=self.sample_qc,
        )
        parts = [fitted.table]
        held_out = [str(s) for s in sample_ids if str(s) not in set(map(str, train_ids))]
        if held_out:
            applied = featurize_cells(
                self._cells_of(held_out),
                annotator=fitted.annotator,
                sample_key=self.sample_key,
                patient_key=self.patient_key,
                x_kind=self.x_kind,
                sample_qc=self.sample_qc,
            )
            parts.append(applied.table)
        table = pd.concat(parts, ignore_index=True).set_index("sample_id")
        return table.loc[[str(s) for s in sample_ids]]


# =========================================================================== cohort objects
def sample_column(
    adata: ad.AnnData, *, sample_key: str | None = None, candidates: Sequence[str] = ()
) -> tuple[str | None, list[str]]:
    """The ``obs`` column naming samples and its values, as the annotator resolves them.

    Parameters
    ----------
    adata
        A single-cell object (as :func:`~blinaprofile.io.singlecell.read_single_cell` returns).
    sample_key
        The column to use; ``None`` takes the first of ``candidates`` present.
    candidates
        Columns tried in order (``SingleCellConfig.sample_key_candidates``).

    Returns
    -------
    key, names
        The column (``None`` when there is none: the object is one sample) and the sample
        names (``str`` of the values) in order of first appearance (``[]`` without a column).

    Raises
    ------
    SingleCellInputError
        ``sample_key`` is not an ``obs`` column (the message names the file).
    """
    obs = adata.obs
    if sample_key is not None and sample_key not in obs.columns:
        raise SingleCellInputError(
            f"sample key {sample_key!r} is not an obs column (obs has: "
            f"{', '.join(map(str, obs.columns)) or 'no columns'})",
            path=_source_name(adata),
        )
    key = sample_key or next((c for c in candidates if c in obs.columns), None)
    if key is None:
        return None, []
    return key, [str(v) for v in pd.unique(obs[key].astype(str))]


def _source_name(adata: ad.AnnData) -> str | None:
    meta = adata.uns.get("blinaprofile", {})
    src = meta.get("source") if isinstance(meta, Mapping) else None
    return str(src) if src else None


#: Response labels accepted in a single-cell ``obs`` column (case, spaces, ``-`` and ``_``
#: ignored): the manifest codes plus ``true``/``false`` and numeric ``1.0``/``0.0``.
SINGLE_CELL_RESPONSE_CODES: dict[str, int] = {
    **{re.sub(r"[\s_-]+", "", k): v for k, v in RESPONSE_CODES.items()},
    "true": 1,
    "false": 0,
    "1.0": 1,
    "0.0": 0,
}


def response_code(value: Any) -> int | None:
    """``1`` (responder), ``0`` (nonresponder) or ``None`` (missing) for one label.

    Accepted, whatever the case and with spaces, ``-`` or ``_`` anywhere:
    ``responder``/``nonresponder`` (``Non-responder``, ``non responder``...), ``R``/``NR``,
    ``CR``, ``1``/``0``, ``true``/``false``, ``yes``/``no``; booleans and the numbers 1 and 0.

    Raises
    ------
    ValueError
        Any other value (the caller names the column and the values found).
    """
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return None
    text = re.sub(r"[\s_-]+", "", str(value).strip().lower())
    if text in ("", "nan", "none", "na"):
        return None
    if text not in SINGLE_CELL_RESPONSE_CODES:
        raise ValueError(str(value))
    return SINGLE_CELL_RESPONSE_CODES[text]


def sample_responses(
    adata: ad.AnnData, *, label_key: str, sample_key: str | None, default_sample: str
) -> dict[str, int | None]:
    """Each sample's response (1/0, ``None`` when its cells carry no label) from ``obs``.

    Parameters
    ----------
    adata
        The single-cell object.
    label_key
        The ``obs`` column holding the response (see :func:`response_code`).
    sample_key
        The ``obs`` column naming samples (``None``: the object is one sample).
    default_sample
        The sample's name when there is no sample column.

    Returns
    -------
    dict
        Sample name -> 1, 0 or ``None``.

    Raises
    ------
    SingleCellInputError
        ``label_key`` is not an ``obs`` column, it holds values that are not response
        labels (all of them are listed), or one sample's cells carry both labels.
    """
    obs = adata.obs
    src = _source_name(adata)
    if label_key not in obs.columns:
        raise SingleCellInputError(
            f"label key {label_key!r} is not an obs column (obs has: "
            f"{', '.join(map(str, obs.columns)) or 'no columns'})",
            path=src,
        )
    values = pd.unique(obs[label_key].astype(object))
    codes: dict[Any, int | None] = {}
    bad: list[str] = []
    for v in values:
        try:
            codes[v] = response_code(v)
        except ValueError:
            bad.append(str(v))
    if bad:
        more = f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""
        raise SingleCellInputError(
            f"obs {label_key!r} holds value(s) that are not response labels: "
            f"{sorted(bad)[:10]}{more}; accepted, any case: responder/nonresponder, R/NR, "
            "1/0, true/false, yes/no",
            path=src,
        )
    coded = obs[label_key].astype(object).map(codes)
    samples = (
        obs[sample_key].astype(str)
        if sample_key is not None
        else pd.Series(default_sample, obs.index)
    )
    out: dict[str, int | None] = {}
    for sid, part in coded.groupby(samples.to_numpy(), sort=False):
        have = sorted({int(c) for c in part.dropna()})
        if len(have) > 1:
            raise SingleCellInputError(
                f"sample {sid!r} has cells labelled both responder and nonresponder in "
                f"obs {label_key!r}; a sample has one response",
                path=src,
            )
        out[str(sid)] = have[0] if have else None
    return out


class QCFile(QCConfig):
    """A ``--qc`` file: :class:`~blinaprofile.config.QCConfig` plus an optional ``single_cell``
    section with the single-cell per-sample minimums (:class:`SampleQCSpec`:
    ``min_cells``, ``min_cd3``, ``min_cd4``, ``min_cd8``)."""

    single_cell: SampleQCSpec | None = None


def load_qc_file(path: PathLike) -> tuple[QCConfig, SampleQCSpec | None]:
    """Read a ``--qc`` YAML file for either modality.

    Parameters
    ----------
    path
        YAML with the keys of ``configs/qc.yaml`` (all optional) and optionally a
        ``single_cell:`` mapping overriding ``sample_qc`` of ``configs/single_cell.yaml``.

    Returns
    -------
    qc, single_cell
        The flow/scoring thresholds and the single-cell minimums (``None`` when the file has
        no ``single_cell`` section: the annotator's configuration applies).

    Raises
    ------
    ConfigError
        Missing file, bad YAML, unknown keys or bad values (the message names the key).
    """
    f = load_config(QCFile, path)
    return QCConfig.model_validate(f.model_dump(exclude={"single_cell"})), f.single_cell
