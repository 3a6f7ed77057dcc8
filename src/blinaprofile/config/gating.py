"""The staining panel (``configs/panels/*.yaml``) and gating strategy
(``configs/gating/*.yaml``) models: what ``gate``, ``featurize`` and ``score`` read."""

from __future__ import annotations

import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from blinaprofile.config.base import ChannelName, MarkerName, Positive, StrictModel

__all__ = [
    "AdaptiveSpec",
    "GateSpec",
    "GatingConfig",
    "PanelChannel",
    "PanelConfig",
    "RangeSpec",
    "TransformSpec",
]


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
