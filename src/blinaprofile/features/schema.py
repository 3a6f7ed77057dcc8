"""The versioned per-sample feature schema shared by flow and single-cell data.

Every per-sample feature table produced by blinaprofile (from FCS files or from
single-cell objects) has one row per sample and the columns listed here. A model
records the schema version it was trained on and refuses tables of another version.

Units
-----
``pct_of_parent``
    Percent (0-100) of the parent population named in ``parent``.
``ratio``
    Dimensionless ratio of two counts.
``median_intensity``
    Median of the compensated, transformed intensity (flow only).
``count``
    A number of events or cells (QC columns).

Change features
---------------
Paired designs (:mod:`blinaprofile.features.change`) add ``delta_<feature>`` columns: the
value at a later timepoint minus the value at the patient's baseline. They are described by
:data:`CHANGE_FEATURES` (``Feature.change`` true): a percentage's change is in percentage
points of the same parent ("percentage points of CD8"), a ratio's and an intensity's as a
difference in the feature's own unit. :data:`FEATURE_INFO` maps every schema and change
feature name to its description (labels and units for reports).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

__all__ = [
    "CHANGE_FEATURES",
    "CHANGE_PREFIX",
    "FEATURES",
    "FEATURE_INFO",
    "MODEL_FEATURES",
    "PARENT_LABELS",
    "QC_COLUMNS",
    "SCHEMA_VERSION",
    "Feature",
    "change_feature",
    "feature_columns",
    "feature_names",
    "schema_table",
]

SCHEMA_VERSION = "1.0"

Unit = Literal["pct_of_parent", "ratio", "median_intensity", "count"]
Modality = Literal["flow", "single_cell"]


#: plain-language names of the parent populations, for :attr:`Feature.units`
PARENT_LABELS: dict[str, str] = {
    "live": "live lymphocytes",
    "cd3": "CD3",
    "cd4": "CD4",
    "cd8": "CD8",
}


@dataclass(frozen=True)
class Feature:
    """One column of the feature schema.

    Attributes
    ----------
    name
        The column's code name (``cd8_em_pct_cd8``).
    definition
        What is counted, in cytometry terms.
    unit
        One of the units in the module docstring.
    parent
        The parent population (a gate id: ``live``, ``cd3``, ``cd4``, ``cd8``).
    modalities
        The data types that provide the feature.
    label
        A plain-language name for readers of reports ("Effector-memory CD8 T cells").
    change
        A change feature (``delta_<feature>``, :func:`change_feature`): the value at a later
        timepoint minus the value at baseline, in :attr:`units` of change.
    """

    name: str
    definition: str
    unit: Unit
    parent: str
    modalities: tuple[Modality, ...] = ("flow", "single_cell")
    label: str = ""
    change: bool = False

    @property
    def units(self) -> str:
        """The unit in plain language: ``% of CD8``, ``ratio of counts``...

        A change feature's: ``percentage points of CD8``, ``difference in ratio of counts``...
        """
        if self.change:
            if self.unit == "pct_of_parent":
                return f"percentage points of {PARENT_LABELS.get(self.parent, self.parent)}"
            return "difference in " + replace(self, change=False).units
        if self.unit == "pct_of_parent":
            return f"% of {PARENT_LABELS.get(self.parent, self.parent)}"
        if self.unit == "ratio":
            return "ratio of counts"
        if self.unit == "median_intensity":
            return "transformed median intensity"
        return "count"

    @property
    def title(self) -> str:
        """Label, units and code name: ``Effector-memory CD8 T cells, % of CD8 (cd8_em_pct_cd8)``."""
        return f"{self.label or self.name}, {self.units} ({self.name})"


FEATURES: tuple[Feature, ...] = (
    Feature(
        "cd3_pct_lymph",
        "CD3+ T cells as % of live single lymphocytes (single-cell: of QC-passed non-myeloid cells)",
        "pct_of_parent",
        "live",
        label="CD3+ T cells",
    ),
    Feature(
        "cd4_pct_cd3", "CD4+CD8- as % of CD3+ T cells", "pct_of_parent", "cd3", label="CD4+ T cells"
    ),
    Feature(
        "cd8_pct_cd3", "CD8+CD4- as % of CD3+ T cells", "pct_of_parent", "cd3", label="CD8+ T cells"
    ),
    Feature(
        "cd4_cd8_ratio", "CD4+ count divided by CD8+ count", "ratio", "cd3", label="CD4/CD8 ratio"
    ),
    Feature(
        "cd8_naive_pct_cd8",
        "CCR7+ CD45RA+ as % of CD8+",
        "pct_of_parent",
        "cd8",
        label="Naive CD8 T cells",
    ),
    Feature(
        "cd8_cm_pct_cd8",
        "CCR7+ CD45RA- (central memory) as % of CD8+",
        "pct_of_parent",
        "cd8",
        label="Central-memory CD8 T cells",
    ),
    Feature(
        "cd8_em_pct_cd8",
        "CCR7- CD45RA- (effector memory) as % of CD8+",
        "pct_of_parent",
        "cd8",
        label="Effector-memory CD8 T cells",
    ),
    Feature(
        "cd8_temra_pct_cd8",
        "CCR7- CD45RA+ (TEMRA) as % of CD8+",
        "pct_of_parent",
        "cd8",
        label="TEMRA CD8 T cells",
    ),
    Feature(
        "cd4_naive_pct_cd4",
        "CCR7+ CD45RA+ as % of CD4+",
        "pct_of_parent",
        "cd4",
        label="Naive CD4 T cells",
    ),
    Feature(
        "cd4_cm_pct_cd4",
        "CCR7+ CD45RA- (central memory) as % of CD4+",
        "pct_of_parent",
        "cd4",
        label="Central-memory CD4 T cells",
    ),
    Feature(
        "cd4_em_pct_cd4",
        "CCR7- CD45RA- (effector memory) as % of CD4+",
        "pct_of_parent",
        "cd4",
        label="Effector-memory CD4 T cells",
    ),
    Feature(
        "cd4_temra_pct_cd4",
        "CCR7- CD45RA+ (TEMRA) as % of CD4+",
        "pct_of_parent",
        "cd4",
        label="TEMRA CD4 T cells",
    ),
    Feature(
        "cd8_tim3_pct_cd8",
        "TIM3+ as % of CD8+ (single-cell: checkpoint-high state from a gene-set or protein)",
        "pct_of_parent",
        "cd8",
        label="TIM-3+ CD8 T cells",
    ),
    Feature(
        "cd8_pd1_pct_cd8", "PD-1+ as % of CD8+", "pct_of_parent", "cd8", label="PD-1+ CD8 T cells"
    ),
    Feature(
        "cd4_treg_pct_cd4",
        "CD25+ CD127lo regulatory T cells as % of CD4+",
        "pct_of_parent",
        "cd4",
        label="Regulatory CD4 T cells (Treg)",
    ),
    Feature(
        "cd8_tim3_median",
        "median transformed TIM3 intensity of CD8+ T cells",
        "median_intensity",
        "cd8",
        ("flow",),
        label="TIM-3 on CD8 T cells",
    ),
    Feature(
        "cd8_pd1_median",
        "median transformed PD-1 intensity of CD8+ T cells",
        "median_intensity",
        "cd8",
        ("flow",),
        label="PD-1 on CD8 T cells",
    ),
)

#: Features both modalities provide; the default models use these.
MODEL_FEATURES: tuple[str, ...] = tuple(
    f.name for f in FEATURES if set(f.modalities) == {"flow", "single_cell"}
)

#: Prefix of a change feature's column: ``delta_cd8_em_pct_cd8``.
CHANGE_PREFIX = "delta_"


def change_feature(feature: Feature) -> Feature:
    """The change feature of a schema feature: ``delta_<name>``, later value minus baseline."""
    return replace(
        feature,
        name=CHANGE_PREFIX + feature.name,
        definition=(
            f"{feature.name} at the later timepoint minus at the patient's baseline "
            f"({feature.definition})"
        ),
        label=f"Change in {feature.label or feature.name}",
        change=True,
    )


#: The change feature of every schema feature (paired designs).
CHANGE_FEATURES: tuple[Feature, ...] = tuple(change_feature(f) for f in FEATURES)

#: Every schema feature and change feature by name (schema order, then the changes).
FEATURE_INFO: dict[str, Feature] = {f.name: f for f in (*FEATURES, *CHANGE_FEATURES)}

#: QC columns carried beside the features (counts; not model inputs).
QC_COLUMNS: tuple[str, ...] = (
    "n_events",  # events (or cells) read
    "n_live",  # live single lymphocytes (single-cell: QC-passed cells)
    "n_cd3",
    "n_cd4",
    "n_cd8",
)


def feature_names(*, modality: Modality | None = None) -> list[str]:
    """Names of the schema's features, optionally only those a modality provides."""
    return [f.name for f in FEATURES if modality is None or modality in f.modalities]


def feature_columns() -> list[str]:
    """Column order of every feature table, flow and single-cell alike (the one list).

    Single-cell tables add ``tim3_estimator``; a featurizer adds ``error`` for failed samples.
    """
    return [
        "sample_id",
        "patient_id",
        "modality",
        "schema_version",
        *feature_names(),
        *QC_COLUMNS,
        "qc_pass",
        "qc_reasons",
    ]


def schema_table():  # -> pandas.DataFrame (pandas imported lazily)
    """The schema as a DataFrame (name, label, definition, unit, parent, modalities, version)."""
    import pandas as pd

    return pd.DataFrame(
        {
            "name": [f.name for f in FEATURES],
            "label": [f.label for f in FEATURES],
            "definition": [f.definition for f in FEATURES],
            "unit": [f.unit for f in FEATURES],
            "parent": [f.parent for f in FEATURES],
            "modalities": [",".join(f.modalities) for f in FEATURES],
            "schema_version": SCHEMA_VERSION,
        }
    )


def ood_scale(name: str) -> Literal["logit", "log", "identity"]:
    """The scale on which a feature's distance from the training cohort is measured.

    Percentages are skewed near 0 and 100, so they are compared on the logit scale, ratios on
    the log scale, and everything else (change features too: they can be negative) as is; on
    these scales the simulator's (and typical cytometry) features are close to normal, so a
    robust z has its usual meaning.
    """
    unit = next((f.unit for f in FEATURES if f.name == name), None)
    if unit == "pct_of_parent":
        return "logit"
    if unit == "ratio":
        return "log"
    return "identity"


def to_ood_scale(name: str, values):  # values: array-like -> numpy.ndarray
    """Map feature values onto :func:`ood_scale` (percent clipped to [0.05, 99.95])."""
    import numpy as np

    x = np.asarray(values, dtype=float)
    scale = ood_scale(name)
    if scale == "logit":
        p = np.clip(x / 100.0, 5e-4, 1 - 5e-4)
        return np.log(p) - np.log1p(-p)
    if scale == "log":
        return np.log(np.clip(x, 1e-3, None))
    return x
