"""Typed, validated YAML configuration.

Every YAML file in ``configs/`` is loaded through :func:`load_config` into a
pydantic model that forbids unknown keys. Problems raise :class:`ConfigError`
naming the file and the key (``gates.3.dims: field required``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError

__all__ = [
    "GateSpec",
    "GatingConfig",
    "PanelChannel",
    "PanelConfig",
    "QCConfig",
    "SimulationConfig",
    "TrainConfig",
    "TransformSpec",
    "load_config",
]

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Positive = Annotated[float, Field(gt=0.0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- panel
class PanelChannel(_Strict):
    """One detector of a panel: the channel name the instrument writes and its marker."""

    channel: str
    marker: str | None = None
    kind: Literal["scatter", "time", "fluorescence", "viability", "mass"] = "fluorescence"


class PanelConfig(_Strict):
    """A staining panel (``configs/panels/*.yaml``)."""

    name: str
    description: str = ""
    instrument: str = ""
    channels: list[PanelChannel] = Field(min_length=1)
    max_value: Positive = 262144.0

    @model_validator(mode="after")
    def _unique(self) -> PanelConfig:
        names = [c.channel for c in self.channels]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate channel names: {dup}")
        return self


# --------------------------------------------------------------------------- gating
class TransformSpec(_Strict):
    """A GatingML-2.0 style transform (parameters as FlowKit names them)."""

    type: Literal["linear", "log", "logicle", "asinh", "hyperlog"]
    t: Positive = 262144.0
    w: Annotated[float, Field(ge=0.0)] = 0.5
    m: Positive = 4.5
    a: Annotated[float, Field(ge=0.0)] = 0.0


class AdaptiveSpec(_Strict):
    """Limits within which an adaptive gate may move a threshold (transformed units)."""

    low: float
    high: float
    min_confidence: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5

    @model_validator(mode="after")
    def _order(self) -> AdaptiveSpec:
        if not self.low < self.high:
            raise ValueError(f"adaptive.low ({self.low}) must be below adaptive.high ({self.high})")
        return self


class RangeSpec(_Strict):
    """A rectangle gate's range on one dimension; ``None`` means unbounded."""

    min: float | None = None
    max: float | None = None
    adaptive: AdaptiveSpec | None = None

    @model_validator(mode="after")
    def _order(self) -> RangeSpec:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and not self.min < self.max:
            raise ValueError(f"min ({self.min}) must be below max ({self.max})")
        return self


class GateSpec(_Strict):
    """One gate. ``dims`` are markers (resolved through the panel) or channel names."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")]
    parent: str = "root"
    type: Literal["rectangle", "polygon"]
    label: str = ""
    ranges: dict[str, RangeSpec] | None = None
    dims: list[str] | None = None
    vertices: list[tuple[float, float]] | None = None

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


class GatingConfig(_Strict):
    """A gating strategy (``configs/gating/*.yaml``)."""

    name: str
    version: str = "1"
    description: str = ""
    compensation: Literal["file", "none"] = "file"
    transforms: dict[str, TransformSpec]
    channel_transforms: dict[str, str] = Field(
        description="channel or marker -> transform id; key 'default' for the rest"
    )
    gates: list[GateSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _tree(self) -> GatingConfig:
        ids = [g.id for g in self.gates]
        dup = sorted({i for i in ids if ids.count(i) > 1})
        if dup:
            raise ValueError(f"duplicate gate ids: {dup}")
        seen = {"root"}
        for g in self.gates:
            if g.parent not in seen:
                raise ValueError(
                    f"gate '{g.id}': parent '{g.parent}' is not defined before it"
                )
            seen.add(g.id)
        for key, tid in self.channel_transforms.items():
            if tid not in self.transforms:
                raise ValueError(f"channel_transforms.{key}: unknown transform '{tid}'")
        return self


# --------------------------------------------------------------------------- simulation
class LatentSpec(_Strict):
    """A per-patient fraction drawn as logit-normal; class means differ for signal."""

    responder: Fraction
    nonresponder: Fraction
    sd: Positive = Field(description="between-patient SD on the logit scale")


class SubsetSplit(_Strict):
    """Dirichlet split of a parent into subsets (class-independent)."""

    mean: dict[str, Fraction]
    concentration: Positive = 30.0

    @field_validator("mean")
    @classmethod
    def _sums_to_one(cls, v: dict[str, float]) -> dict[str, float]:
        total = sum(v.values())
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"subset means must sum to 1 (got {total:.4f})")
        return v


class SimulationConfig(_Strict):
    """A simulated cohort scenario (``configs/simulation/*.yaml``)."""

    name: str
    description: str = ""
    n_patients: Annotated[int, Field(ge=2, le=100_000)] = 40
    responder_fraction: Fraction = 0.5
    timepoints: list[str] = Field(default_factory=lambda: ["D28"], min_length=1)
    within_patient_sd: Annotated[float, Field(ge=0.0)] = 0.2
    events_per_sample: Annotated[int, Field(ge=100, le=50_000_000)] = 20_000
    brightness_shift: Annotated[float, Field(ge=0.0, lt=0.9)] = 0.10
    latent: dict[str, LatentSpec]
    cd8_memory: SubsetSplit
    cd4_memory: SubsetSplit
    composition: dict[str, Fraction]
    seed: int = 0


# --------------------------------------------------------------------------- train / QC
class ModelSpec(_Strict):
    """One candidate model family with its hyper-parameter grid."""

    family: Literal["logreg_l2", "logreg_l1", "logreg_elasticnet", "random_forest", "xgboost", "linear_svm"]
    params: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class ThresholdRule(_Strict):
    """How the decision threshold is chosen inside cross-validation."""

    rule: Literal["max_balanced_accuracy", "min_sensitivity", "fixed"] = "max_balanced_accuracy"
    value: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5


class TrainConfig(_Strict):
    """Training configuration (``configs/train/*.yaml``)."""

    experiment: str = "blinaprofile"
    registered_model: str = "blinaprofile-responder"
    alias: str = "champion"
    features: list[str] | None = None
    models: list[ModelSpec] = Field(min_length=1)
    select_by: Literal["roc_auc", "brier"] = "roc_auc"
    outer_folds: Annotated[int, Field(ge=2, le=20)] = 5
    inner_folds: Annotated[int, Field(ge=2, le=20)] = 3
    repeats: Annotated[int, Field(ge=1, le=100)] = 2
    n_bootstrap: Annotated[int, Field(ge=0, le=100_000)] = 500
    n_permutations: Annotated[int, Field(ge=0, le=100_000)] = 0
    threshold: ThresholdRule = ThresholdRule()
    seed: int = 0


class QCConfig(_Strict):
    """QC and abstention thresholds."""

    min_events: Annotated[int, Field(ge=0)] = 5_000
    min_live: Annotated[int, Field(ge=0)] = 1_000
    min_cd3: Annotated[int, Field(ge=0)] = 300
    min_cd8: Annotated[int, Field(ge=0)] = 100
    min_cd4: Annotated[int, Field(ge=0)] = 100
    ood_max_z: Annotated[float, Field(gt=0.0)] = 4.0


M = TypeVar("M", bound=BaseModel)


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def validate_config(model: type[M], data: Any, *, source: str | os.PathLike[str] | None = None) -> M:
    """Validate an already-parsed mapping, raising :class:`ConfigError` naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"expected a mapping at the top level, got {type(data).__name__}", path=source
        )
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(
            f"invalid {model.__name__}: {_format_validation_error(err)}", path=source
        ) from None


def load_config(model: type[M], path: str | os.PathLike[str]) -> M:
    """Read a YAML file and validate it as ``model``.

    Raises
    ------
    ConfigError
        The file is missing, is not valid YAML, or does not match the model; the
        message names the file and the offending key.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("config file not found", path=p) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config: {err}", path=p) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"not valid YAML: {err}".replace("\n", " "), path=p) from None
    return validate_config(model, data, source=p)
