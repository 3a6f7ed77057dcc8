"""Typed, validated YAML configuration.

Every YAML file in ``configs/`` is loaded through :func:`load_config` into a
pydantic model that forbids unknown keys. Problems raise :class:`ConfigError`
naming the file and the key (``gates.3.dims: field required``); a misspelt key gets the
closest known one (``compensaton: unknown key; did you mean `compensation`?``) and a value
outside a fixed set of choices gets the choices and what each is for.

Every key has a description (``Field(description=...)``; the choices of a fixed set in
``json_schema_extra={"choices": ...}``): ``scripts/config_reference.py`` renders them as
``docs/config_reference.md``.
"""

from __future__ import annotations

import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from blinaprofile.errors import ConfigError

__all__ = [
    "GateSpec",
    "GatingConfig",
    "PanelChannel",
    "PanelConfig",
    "PromotionRule",
    "QCConfig",
    "SimulationConfig",
    "TrainConfig",
    "TransformSpec",
    "choice_notes",
    "load_config",
    "parse_yaml",
    "validate_config",
]

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Positive = Annotated[float, Field(gt=0.0)]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys and non-finite numbers are errors."""

    # NaN/inf are refused in every float field: no threshold or rate can be infinite.
    # Schemas are built on first use (defer_build) so that the CLI starts quickly.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, defer_build=True)


# A name written into FCS TEXT ($PnN) and $SPILLOVER: printable, no comma, no surrounding
# blanks, not starting with the FCS delimiter.
ChannelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=256,
        pattern=r"^[^\s|,\x00-\x1f\x7f](?:[^,\x00-\x1f\x7f]*[^\s,\x00-\x1f\x7f])?$",
    ),
]
MarkerName = Annotated[
    str,
    Field(
        max_length=256,
        pattern=r"^(?:[^\s|\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?)?$",
    ),
]
# A name that becomes part of file names (sample IDs, timepoints).
FileSafeName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]


# --------------------------------------------------------------------------- panel
class PanelChannel(StrictModel):
    """One detector of a panel: the channel name the instrument writes and its marker."""

    channel: ChannelName = Field(
        description="the channel name ($PnN) the instrument writes, e.g. `BV421-A` or `Yb171Di`"
    )
    marker: MarkerName | None = Field(
        default=None,
        description="the marker stained on it (`CCR7`, `CD197 (CCR7)`); with `--panel` it "
        "labels a file channel whose $PnS is empty; omit for scatter and time",
    )
    kind: Literal["scatter", "time", "fluorescence", "viability", "mass"] = Field(
        default="fluorescence",
        description="what the channel measures",
        json_schema_extra={
            "choices": {
                "scatter": "for forward/side scatter (linear scale)",
                "time": "for the acquisition clock",
                "fluorescence": "for a fluorochrome-conjugated antibody",
                "viability": "for a viability dye (cisplatin on a mass cytometer)",
                "mass": "for a metal-tagged antibody or DNA intercalator (mass cytometry)",
            }
        },
    )


class PanelConfig(StrictModel):
    """A staining panel (``configs/panels/*.yaml``).

    ``--panel PANEL.yaml`` (gate, featurize, score, score-batch) labels the channels it
    lists whose ``$PnS`` is empty, declares its markers to the privacy filter and checks
    that the gating strategy's required markers are in it.
    """

    name: str = Field(description="the panel's name, reported with each scored sample")
    description: str = Field(default="", description="free text")
    instrument: str = Field(default="", description="the instrument it runs on (free text)")
    channels: list[PanelChannel] = Field(
        min_length=1, description="every channel the instrument writes (see PanelChannel)"
    )
    max_value: Positive = Field(
        default=262144.0, description="top of the instruments' data range (simulated $PnR)"
    )

    @model_validator(mode="after")
    def _unique(self) -> PanelConfig:
        names = [c.channel for c in self.channels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate channel names: {dup}")
        return self


# --------------------------------------------------------------------------- gating
class TransformSpec(StrictModel):
    """A channel transform: GatingML 2.0 ``t, w, m, a`` (as FlowKit names them), ``arcsinh``
    with a cofactor, or ``none``.

    ``arcsinh`` is ``asinh(x / cofactor)`` (cofactor 5 for mass cytometry, 150 for spectral
    flow), the GatingML ``asinh`` with ``t = cofactor * sinh(1)``, ``m = 1 / ln(10)``,
    ``a = 0``; gate bounds are in ``asinh(x / cofactor)`` units. ``none`` gates the values
    as they are stored (data already on a display scale, or event lengths).
    """

    type: Literal["linear", "log", "logicle", "asinh", "hyperlog", "arcsinh", "none"] = Field(
        description="the transform",
        json_schema_extra={
            "choices": {
                "linear": "is (x + a) / (t + a), for scatter",
                "log": "is GatingML flog, (1/m) log10(x / t) + 1",
                "logicle": "is GatingML logicle (t, w, m, a), for raw fluorescence intensities",
                "asinh": "is GatingML fasinh (t, m, a)",
                "hyperlog": "is GatingML hyperlog (t, w, m, a)",
                "arcsinh": "is asinh(x / cofactor), for mass cytometry (cofactor 5) and spectral "
                "flow (150)",
                "none": "uses the values as stored (display-scale data, event length)",
            }
        },
    )
    t: Annotated[float, Field(gt=0.0, le=1e12)] = Field(
        default=262144.0, description="top of scale T (linear, log, logicle, asinh, hyperlog)"
    )
    w: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        default=0.5, description="linearisation width W in decades (logicle, hyperlog)"
    )
    m: Annotated[float, Field(gt=0.0, le=100.0)] = Field(
        default=4.5, description="decades M of the full scale (log, logicle, asinh, hyperlog)"
    )
    a: Annotated[float, Field(ge=0.0, le=100.0)] = Field(
        default=0.0, description="extra negative decades A (linear: offset)"
    )
    cofactor: Annotated[float, Field(gt=0.0, le=1e6)] | None = Field(
        default=None,
        description="arcsinh only, required there: x is divided by it before asinh "
        "(5 for CyTOF ion counts, 150 for spectral flow)",
    )

    @model_validator(mode="after")
    def _parameters(self) -> TransformSpec:
        # the constraints of the GatingML 2.0 definitions (checked here so that the
        # error names the YAML file, not a sample)
        given = sorted(self.model_fields_set & {"t", "w", "m", "a"})
        if self.type == "arcsinh":
            if self.cofactor is None:
                raise ValueError("arcsinh needs a cofactor (5 for mass cytometry, 150 spectral)")
            if given:
                raise ValueError(f"arcsinh takes only `cofactor`; drop {given}")
        elif self.cofactor is not None:
            raise ValueError(f"`cofactor` is for type arcsinh, not {self.type}")
        if self.type == "none" and given:
            raise ValueError(f"type none takes no parameters; drop {given}")
        if self.type in ("logicle", "hyperlog"):
            if self.type == "hyperlog" and self.w <= 0:
                raise ValueError("hyperlog needs w > 0")
            if self.w > self.m / 2:
                raise ValueError(f"{self.type} needs w <= m / 2 (w={self.w}, m={self.m})")
            if self.a > self.m - 2 * self.w:
                raise ValueError(
                    f"{self.type} needs a <= m - 2w (a={self.a}, m={self.m}, w={self.w})"
                )
        return self

    def engine_spec(self) -> TransformSpec | None:
        """The spec the gating engine applies: ``arcsinh`` as its GatingML ``asinh``
        equivalent, ``none`` as ``None`` (untransformed), any other unchanged."""
        if self.type == "none":
            return None
        if self.type == "arcsinh":
            assert self.cofactor is not None
            return TransformSpec(
                type="asinh", t=self.cofactor * math.sinh(1.0), m=1.0 / math.log(10.0), a=0.0
            )
        return self


class AdaptiveSpec(StrictModel):
    """Per-sample placement of one rectangle bound (:mod:`blinaprofile.gating.placement`).

    ``low``/``high``: where the threshold may land (transformed units); each one left out
    is the configured bound ``decades`` decades down/up (0.8: 0.16x-6.3x brightness).
    ``min_confidence``: a threshold placed with less is a QC flag. ``tail``: where a
    minority lies relative to the main population when no valley separates them
    (``above``: TIM3+, PD-1+, CD25+; ``below``: CD127lo; ``auto``: the side with the
    excess; ``none``: no tail gate), placed ``tail_sd`` robust SDs from the main
    population's mode. ``reference``: a gate (evaluated earlier) whose
    events decide the bound when this gate's parent shows no confident valley (CD4 for
    the CD8 memory gates).
    """

    low: float | None = Field(
        default=None, description="lowest position of the bound (transformed units)"
    )
    high: float | None = Field(
        default=None, description="highest position of the bound (transformed units)"
    )
    decades: Annotated[float, Field(gt=0.0, le=3.0)] = Field(
        default=0.8,
        description="search range around the configured bound when low/high are left out",
    )
    min_confidence: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.5, description="a placement less confident than this is a QC flag"
    )
    tail: Literal["above", "below", "auto", "none"] = Field(
        default="auto",
        description="where a minority lies when no valley separates it",
        json_schema_extra={
            "choices": {
                "above": "for a minority above the main population (TIM3+, PD-1+, CD25+)",
                "below": "for one below it (CD127lo)",
                "auto": "takes the side with the excess of events",
                "none": "places no tail gate",
            }
        },
    )
    tail_sd: Annotated[float, Field(gt=0.0, le=10.0)] = Field(
        default=3.0, description="a tail gate lies this many robust SDs from the main mode"
    )
    reference: str | None = Field(
        default=None,
        description="a gate evaluated earlier whose events place the bound when the "
        "parent shows no confident valley",
    )

    @model_validator(mode="after")
    def _order(self) -> AdaptiveSpec:
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"adaptive.low ({self.low}) must be below adaptive.high ({self.high})")
        return self


class RangeSpec(StrictModel):
    """A rectangle gate's range on one dimension; ``None`` means unbounded."""

    min: float | None = Field(default=None, description="lower bound, included")
    max: float | None = Field(default=None, description="upper bound, excluded")
    adaptive: AdaptiveSpec | None = Field(
        default=None, description="per-sample placement of the bounds (see AdaptiveSpec)"
    )

    @model_validator(mode="after")
    def _order(self) -> RangeSpec:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self


class GateSpec(StrictModel):
    """One gate. ``dims`` are markers (resolved through the panel) or channel names."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=64)] = Field(
        description="the gate's id; features read `live`, `cd3`, `cd4`, `cd8`, `cd8_em`..."
    )
    parent: str = Field(default="root", description="the gate it refines (`root`: all events)")
    type: Literal["rectangle", "polygon"] = Field(
        description="the gate's shape",
        json_schema_extra={
            "choices": {
                "rectangle": "takes bounds per dimension (`ranges`)",
                "polygon": "takes two `dims` and their `vertices`",
            }
        },
    )
    label: str = Field(default="", description="a readable name for reports")
    ranges: dict[str, RangeSpec] | None = Field(
        default=None, description="rectangle: marker or channel -> RangeSpec"
    )
    dims: list[str] | None = Field(default=None, description="polygon: two markers or channels")
    vertices: list[tuple[float, float]] | None = Field(
        default=None, description="polygon: at least three (x, y) points, transformed units"
    )
    if_absent: Literal["skip", "omit", "error"] | None = Field(
        default=None,
        description="what to do with a sample that lacks the gate's markers (a pre-gated "
        "export); default `skip` for lymphocytes, singlets, live and cd3, `omit` for "
        "cd8_tim3, cd8_pd1 and cd4_treg, `error` for any other gate",
        json_schema_extra={
            "choices": {
                "skip": "leaves it out and gates its children from its nearest present ancestor",
                "omit": "leaves it out with every gate below it (their features are NaN)",
                "error": "refuses the sample (PanelMismatchError naming the missing markers)",
            }
        },
    )

    @model_validator(mode="after")
    def _shape(self) -> GateSpec:
        if self.type == "rectangle":
            if not self.ranges:
                raise ValueError("a rectangle gate needs 'ranges'")
            if self.dims or self.vertices:
                raise ValueError("a rectangle gate takes 'ranges', not 'dims'/'vertices'")
        else:
            if not self.dims or len(self.dims) != 2:
                raise ValueError("a polygon gate needs exactly two 'dims'")
            if not self.vertices or len(self.vertices) < 3:
                raise ValueError("a polygon gate needs at least three 'vertices'")
        return self


class GatingConfig(StrictModel):
    """A gating strategy (``configs/gating/*.yaml``)."""

    name: str = Field(description="the strategy's name, recorded with every result")
    version: str = Field(default="1", description="the strategy's version")
    description: str = Field(default="", description="free text")
    compensation: Literal["file", "none"] = Field(
        default="file",
        description="how fluorescence dimensions are compensated",
        json_schema_extra={
            "choices": {
                "file": "to compensate with the file's spillover matrix ($SPILLOVER, SPILL)",
                "none": "for data without spillover (mass cytometry, compensated exports)",
            }
        },
    )
    transforms: dict[str, TransformSpec] = Field(
        description="transform id -> TransformSpec, referred to by channel_transforms"
    )
    channel_transforms: dict[str, str] = Field(
        description="channel or marker -> transform id; key 'default' for the rest"
    )
    gates: list[GateSpec] = Field(
        min_length=1, description="the gates, each after its parent (see GateSpec)"
    )

    @model_validator(mode="after")
    def _tree(self) -> GatingConfig:
        ids = [g.id for g in self.gates]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate gate ids: {dup}")
        seen = {"root"}
        for g in self.gates:
            if g.parent not in seen:
                raise ValueError(f"gate '{g.id}': parent '{g.parent}' is not defined before it")
            seen.add(g.id)
        for key, tid in self.channel_transforms.items():
            if tid not in self.transforms:
                raise ValueError(f"channel_transforms.{key}: unknown transform '{tid}'")
        return self


# --------------------------------------------------------------------------- simulation
class LatentSpec(StrictModel):
    """A per-patient fraction drawn as logit-normal; class means differ for signal."""

    responder: Fraction
    nonresponder: Fraction
    sd: Positive = Field(description="between-patient SD on the logit scale")


class SubsetSplit(StrictModel):
    """Dirichlet split of a parent into subsets (class-independent)."""

    mean: dict[str, Fraction]
    concentration: Annotated[float, Field(ge=0.5, le=1e6)] = 30.0

    @field_validator("mean")
    @classmethod
    def _sums_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"subset means must sum to 1 (got {total:.4f})")
        return v


#: latent fractions the event simulator needs (also checked by :mod:`blinaprofile.simulate.cohort`).
SIMULATION_LATENT = (
    "cd3_pct_lymph",
    "cd8_pct_cd3",
    "cd8_em_pct_cd8",
    "cd8_tim3_pct_cd8",
    "cd8_pd1_pct_cd8",
    "cd4_treg_pct_cd4",
)
#: subset names of the CD8 non-EM split and of the CD4 split.
SIMULATION_CD8_SUBSETS = ("naive", "cm", "temra")
SIMULATION_CD4_SUBSETS = ("naive", "cm", "em", "temra")
#: composition keys the simulator reads; the first four are shares of all events.
SIMULATION_COMPOSITION = (
    "debris",
    "doublets",
    "monocytes",
    "dead_lymphocytes",
    "b_of_non_t",
    "dn_of_t",
)


class SimulationConfig(StrictModel):
    """A simulated cohort scenario (``configs/simulation/*.yaml``).

    ``n_patients`` is at least 2: every cohort gets at least one responder and one
    nonresponder (cross-validated training needs at least 2 patients of each class and
    says so itself, naming the counts).
    """

    name: str
    description: str = ""
    n_patients: Annotated[int, Field(ge=2, le=100_000)] = 40
    responder_fraction: Fraction = 0.5
    timepoints: list[FileSafeName] = Field(
        default_factory=lambda: ["D28"], min_length=1, max_length=100
    )
    within_patient_sd: Annotated[float, Field(ge=0.0, le=10.0)] = 0.2
    events_per_sample: Annotated[int, Field(ge=100, le=50_000_000)] = 20_000
    brightness_shift: Annotated[float, Field(ge=0.0, lt=0.9)] = 0.10
    latent: dict[str, LatentSpec]
    cd8_memory: SubsetSplit
    cd4_memory: SubsetSplit
    composition: dict[str, Fraction]
    seed: Annotated[int, Field(ge=0, lt=2**64)] = 0

    @model_validator(mode="after")
    def _simulatable(self) -> SimulationConfig:
        dup = sorted({t for t in self.timepoints if self.timepoints.count(t) > 1})
        if dup:
            raise ValueError(f"timepoints: duplicate name(s) {dup}")
        missing = [k for k in SIMULATION_LATENT if k not in self.latent]
        if missing:
            raise ValueError(f"latent: missing required fraction(s) {missing}")
        for field_name, need in (
            ("cd8_memory", SIMULATION_CD8_SUBSETS),
            ("cd4_memory", SIMULATION_CD4_SUBSETS),
        ):
            got = set(getattr(self, field_name).mean)
            if got != set(need):
                raise ValueError(
                    f"{field_name}.mean: needs exactly the subsets {list(need)}, got {sorted(got)}"
                )
        unknown = sorted(set(self.composition) - set(SIMULATION_COMPOSITION))
        if unknown:
            raise ValueError(
                f"composition: unknown key(s) {unknown}; known: {list(SIMULATION_COMPOSITION)}"
            )
        events = sum(self.composition.get(k, 0.0) for k in SIMULATION_COMPOSITION[:4])
        if events >= 0.95:
            raise ValueError(
                f"composition: debris + doublets + monocytes + dead_lymphocytes = {events:.3f} "
                f"leaves (almost) no live lymphocytes; keep it below 0.95"
            )
        return self


# --------------------------------------------------------------------------- train / QC
class ModelSpec(StrictModel):
    """One candidate model family with its hyper-parameter grid."""

    family: Literal[
        "logreg_l2", "logreg_l1", "logreg_elasticnet", "random_forest", "xgboost", "linear_svm"
    ] = Field(
        description="the model family",
        json_schema_extra={
            "choices": {
                "logreg_l2": "is L2-penalised logistic regression",
                "logreg_l1": "is L1-penalised (sparse) logistic regression",
                "logreg_elasticnet": "is elastic-net logistic regression",
                "random_forest": "is a random forest",
                "xgboost": "is gradient-boosted trees (XGBoost)",
                "linear_svm": "is a linear support-vector machine (calibrated)",
            }
        },
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="fixed pipeline parameters (`clf__C: 1.0`)"
    )
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="parameter -> values tuned by the inner CV"
    )

    @field_validator("params", "grid")
    @classmethod
    def _names(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = [k for k in v if not k.replace("__", "_").isidentifier()]
        if bad:
            raise ValueError(f"not valid parameter names: {bad}")
        return v


class ThresholdRule(StrictModel):
    """How the decision threshold is chosen inside cross-validation."""

    rule: Literal["max_balanced_accuracy", "min_sensitivity", "fixed"] = Field(
        default="max_balanced_accuracy",
        description="how the threshold is chosen",
        json_schema_extra={
            "choices": {
                "max_balanced_accuracy": "takes the threshold with the best balanced accuracy",
                "min_sensitivity": "takes the highest threshold reaching `value` sensitivity",
                "fixed": "uses `value` itself",
            }
        },
    )
    value: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        default=0.5, description="min_sensitivity: the sensitivity; fixed: the threshold"
    )


def _not_reserved_alias(name: str) -> str:
    if name.lower() == "latest" or (name[:1] in "vV" and name[1:].isdigit()):
        raise ValueError(f"{name!r} is reserved by the MLflow registry (latest, v1, v2...)")
    return name


# A registry alias: what MLflow accepts (letters, digits, _ and -), minus its reserved names.
AliasName = Annotated[
    str,
    Field(min_length=1, max_length=255, pattern=r"^[\w-]+$"),
    AfterValidator(_not_reserved_alias),
]


class PromotionRule(StrictModel):
    """The evidence a training run needs before it may move the serving alias.

    A criterion set to ``null`` is not required. A run that does not meet the rule is
    registered under ``candidate_alias`` and the serving alias stays where it was.
    """

    min_auc_ci_low: Annotated[float, Field(ge=0.0, lt=1.0)] | None = Field(
        default=0.5, description="the CV ROC AUC 95% CI lower bound must be above this"
    )
    max_perm_pvalue: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
        default=0.05, description="the permutation p-value must be below this"
    )
    candidate_alias: AliasName = Field(
        default="candidate", description="the alias a run without the evidence gets"
    )


class TrainConfig(StrictModel):
    """Training configuration (``configs/train/*.yaml``)."""

    experiment: str = Field(default="blinaprofile", description="MLflow experiment name")
    registered_model: str = Field(
        default="blinaprofile-responder", description="MLflow registered model name"
    )
    alias: AliasName = Field(
        default="champion", description="the serving alias a run meeting `promotion` takes"
    )
    features: list[str] | None = Field(
        default=None,
        description="feature columns to train on (null: the features both modalities provide)",
    )
    models: list[ModelSpec] = Field(
        min_length=1, description="candidate model families (see ModelSpec)"
    )
    select_by: Literal["roc_auc", "brier"] = Field(
        default="roc_auc",
        description="which family is refit and registered",
        json_schema_extra={
            "choices": {
                "roc_auc": "picks the highest out-of-fold ROC AUC",
                "brier": "picks the lowest out-of-fold Brier score",
            }
        },
    )
    outer_folds: Annotated[int, Field(ge=2, le=20)] = Field(
        default=5, description="patient-grouped, stratified outer CV folds"
    )
    inner_folds: Annotated[int, Field(ge=2, le=20)] = Field(
        default=3, description="inner CV folds (tuning and threshold)"
    )
    repeats: Annotated[int, Field(ge=1, le=100)] = Field(
        default=2, description="repetitions of the outer CV with other shuffles"
    )
    n_bootstrap: Annotated[int, Field(ge=0, le=100_000)] = Field(
        default=500, description="patient bootstrap resamples for the 95% CIs"
    )
    n_permutations: Annotated[int, Field(ge=0, le=100_000)] = Field(
        default=0, description="label permutations for the p-value (0: none)"
    )
    threshold: ThresholdRule = Field(
        default=ThresholdRule(), description="the decision threshold rule (see ThresholdRule)"
    )
    promotion: PromotionRule = Field(
        default_factory=PromotionRule,
        description="evidence needed to take `alias` (see PromotionRule)",
    )
    seed: int = Field(default=0, description="random seed of folds, models and resamples")

    @model_validator(mode="after")
    def _candidate_is_not_serving(self) -> TrainConfig:
        if self.promotion.candidate_alias == self.alias:
            raise ValueError(
                f"promotion.candidate_alias: must differ from alias ({self.alias!r}), the "
                "serving alias a run without the evidence must not take"
            )
        return self


class QCConfig(StrictModel):
    """QC and abstention thresholds (``configs/qc.yaml``).

    A sample below any count is a "no call". When a strategy has no ``live`` or ``cd3``
    gate for the sample (a pre-gated export), ``min_live``/``min_cd3`` apply to the events
    its first present gate starts from, and the QC text says so; without a ``live`` gate
    ``min_events`` is not checked (the file's events are the live cells).
    """

    min_events: Annotated[int, Field(ge=0)] = Field(
        default=5_000, description="events read from the file"
    )
    min_live: Annotated[int, Field(ge=0)] = Field(
        default=1_000, description="events in the `live` gate (live single cells)"
    )
    min_cd3: Annotated[int, Field(ge=0)] = Field(default=300, description="CD3+ T cells")
    min_cd8: Annotated[int, Field(ge=0)] = Field(
        default=100, description="CD8+ T cells (denominator of the key features)"
    )
    min_cd4: Annotated[int, Field(ge=0)] = Field(default=100, description="CD4+ T cells")
    ood_max_z: Annotated[float, Field(gt=0.0)] = Field(
        default=4.0,
        description="max |robust z| of a model feature against the training cohort",
    )


def _inner(annotation: Any) -> list[Any]:
    """The types an annotation allows (``Annotated``, ``Optional`` and unions unwrapped)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _inner(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return [t for a in typing.get_args(annotation) for t in _inner(a)]
    return [annotation]


def _annotation_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The annotation of the value at ``loc`` inside ``model`` (``None`` if unknown)."""
    current: Any = model
    for part in loc:
        nxt = None
        for t in _inner(current):
            origin = typing.get_origin(t)
            if isinstance(t, type) and issubclass(t, BaseModel) and isinstance(part, str):
                f = t.model_fields.get(part)
                nxt = f.annotation if f is not None else None
            elif origin in (list, tuple) and isinstance(part, int):
                nxt = typing.get_args(t)[0]
            elif origin is dict and isinstance(part, str):
                nxt = typing.get_args(t)[1]
            if nxt is not None:
                break
        if nxt is None:
            return None
        current = nxt
    return current


def _field_at(model: type[BaseModel], loc: tuple[Any, ...]) -> Any:
    """The pydantic ``FieldInfo`` of the key at ``loc`` (``None`` if ``loc`` is no field)."""
    if not loc or not isinstance(loc[-1], str):
        return None
    for t in _inner(_annotation_at(model, loc[:-1])):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t.model_fields.get(loc[-1])
    return None


def _unknown_key(model: type[BaseModel], loc: tuple[Any, ...]) -> str:
    """``unknown key``, with the closest key the model knows there."""
    keys = [
        k
        for t in _inner(_annotation_at(model, loc[:-1]))
        if isinstance(t, type) and issubclass(t, BaseModel)
        for k in t.model_fields
    ]
    close = difflib.get_close_matches(str(loc[-1]), keys, n=1, cutoff=0.6)
    return f"unknown key; did you mean `{close[0]}`?" if close else "unknown key"


def choice_notes(info: Any) -> dict[str, str]:
    """``choice -> what it is for`` of a field with a fixed set of choices (may be empty)."""
    extra = getattr(info, "json_schema_extra", None)
    notes = extra.get("choices") if isinstance(extra, dict) else None
    return {str(k): str(v) for k, v in notes.items()} if isinstance(notes, dict) else {}


def _bad_choice(model: type[BaseModel], e: Any) -> str:
    """A value outside a ``Literal``: the choices, the closest one and what each is for."""
    loc = tuple(e["loc"])
    choices = [str(a) for t in _inner(_annotation_at(model, loc)) for a in typing.get_args(t)] or [
        c.strip("'") for c in str(e.get("ctx", {}).get("expected", "")).split("' or '")
    ]
    value = e.get("input")
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    quoted = [f"`{c}`" for c in choices]
    use = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    text = f"{shown} is not allowed{hint}: use {use}"
    notes = choice_notes(_field_at(model, loc))
    if notes:
        text += "; " + ", ".join(f"`{k}` {v}" for k, v in notes.items())
    return text


def _format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    parts = []
    for e in err.errors(include_url=False):
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(model, tuple(e["loc"]))
        elif e["type"] in ("literal_error", "enum"):
            msg = _bad_choice(model, e)
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def validate_config[M: BaseModel](
    model: type[M], data: Any, *, source: str | os.PathLike[str] | None = None
) -> M:
    """Validate an already-parsed mapping, raising :class:`ConfigError` naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping at the top level, got {type(data).__name__}", path=source
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"invalid {model.__name__}: {_format_validation_error(err, model)}", path=source
        ) from None


#: Largest configuration file accepted (configs are a few kB; this stops accidents).
MAX_CONFIG_BYTES = 1_000_000


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses duplicate keys (the last would silently win)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # keys written in this mapping (not brought in by a ``<<: *anchor`` merge, which they
    # may override as YAML allows)
    explicit = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    written: set[Any] = set()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in written and id(key_node) in explicit
        except TypeError:  # an unhashable key (a list or mapping used as a key)
            raise yaml.constructor.ConstructorError(
                None, None, "a list or mapping cannot be a key", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        if id(key_node) in explicit:
            written.add(key)
        out[key] = loader.construct_object(value_node, deep=True)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str, *, source: str | os.PathLike[str] | None = None) -> Any:
    """Parse YAML text safely (no Python tags, no duplicate keys).

    Raises
    ------
    ConfigError
        Naming ``source`` and the line of the problem.
    """
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = " ".join(str(err.problem or err.context or "syntax error").split())
        raise ConfigError(f"not valid YAML{where}: {what}", path=source) from None
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {' '.join(str(err).split())}", path=source) from None
    except RecursionError:
        raise ConfigError("not valid YAML: nested too deeply", path=source) from None
    except (ValueError, TypeError, OverflowError) as err:
        # e.g. a date-like value that is not a real date (2024-13-45)
        raise ConfigError(f"not valid YAML: {' '.join(str(err).split())}", path=source) from None


def load_config[M: BaseModel](model: type[M], path: str | os.PathLike[str]) -> M:
    """Read a YAML file and validate it as ``model``.

    Raises
    ------
    ConfigError
        The file is missing, is not valid YAML, or does not match the model; the
        message names the file and the offending key.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise ConfigError("not a regular file (a folder?)", path=p)
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(
                f"config file is {size} bytes; configs are small YAML files "
                f"(limit {MAX_CONFIG_BYTES})",
                path=p,
            )
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError("config file not found", path=p) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"not UTF-8 text (byte {err.start})", path=p) from None
    except OSError as err:
        raise ConfigError(f"cannot read config: {err.strerror or err}", path=p) from None
    data = parse_yaml(text, source=p)
    return validate_config(model, data, source=p)
