"""Gate types: dimensions, ratio dimensions, gates and the result of gating a sample.

Small immutable value classes in the spirit of FlowKit's gate classes. A :class:`Gate`
names its parent, its kind (rectangle, polygon, ellipsoid, boolean) and its
:class:`Dim` (a channel or a :class:`Ratio`, with a compensation and a transform id).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from blinaprofile.config import TransformSpec

if TYPE_CHECKING:
    pass

__all__ = [
    "FCS_COMP",
    "FILE_COMP",
    "UNCOMPENSATED",
    "Dim",
    "Gate",
    "GateKind",
    "GatingResult",
    "Ratio",
    "make_transform",
]

#: compensation id of a dimension read as acquired
UNCOMPENSATED = "uncompensated"
#: the file's $SPILLOVER; the file must have one (our YAML strategies)
FILE_COMP = "file"
#: the file's $SPILLOVER if it has one, else uncompensated (GatingML 2.0 ``FCS``)
FCS_COMP = "FCS"

GateKind = Literal["rectangle", "polygon", "ellipsoid", "boolean"]

# relative width of the band around a bound inside which events are decided again with
# FlowKit's arithmetic (our fast path agrees with it to ~1e-13 relative)
_BAND = 1e-9
# absolute width (raw units) of that band for compensated values
_ABS_BAND = 1e-6


class HasGates(Protocol):
    """A strategy, as far as percent-of-parent needs it."""

    @property
    def gates(self) -> Sequence[Gate]: ...


@dataclass(frozen=True)
class Ratio:
    """A derived dimension ``a * (x - b) / (y - c)`` of two channels (GatingML ``fratio``).

    ``numerator``/``denominator`` are names (channels or markers) resolved like any
    dimension; ``channels`` holds the bound channel names. As in FlowKit, the ratio is
    computed from scaled, uncompensated values.
    """

    numerator: str
    denominator: str
    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    channels: tuple[str, str] | None = None


@dataclass(frozen=True)
class Dim:
    """One gate dimension: a channel, how it is compensated, how it is transformed.

    ``min``/``max`` bound rectangle gates ([min, max), transformed units). ``name`` is
    what the strategy calls the dimension before binding (a marker or a channel; for a
    ratio dimension the ratio's id). ``compensation`` is :data:`UNCOMPENSATED`,
    :data:`FILE_COMP`, :data:`FCS_COMP` or the id of a matrix in
    :attr:`GateTree.matrices`; ``transform`` the id of a transform in
    :attr:`GateTree.transforms` (``None``: untransformed).
    """

    name: str
    channel: str | None = None
    compensation: str = UNCOMPENSATED
    transform: str | None = None
    min: float | None = None
    max: float | None = None
    ratio: Ratio | None = None


@dataclass(frozen=True)
class Gate:
    """A gate of the tree; ``parent`` is ``None`` for gates on all events.

    Attributes
    ----------
    kind
        ``rectangle`` (any number of dims, bounds in the dims), ``polygon`` (2 dims,
        ``vertices``), ``ellipsoid`` (``mean``, ``covariance``, ``distance_square``: events
        with Mahalanobis distance squared ``<= distance_square``) or ``boolean`` (``op``
        ``and``/``or``/``not`` over ``refs``, each ``(gate id, complement)``).
    complement
        Select the events outside the shape (still within the parent).
    group
        The quadrant gate a rectangle came from (GatingML/FlowJo quadrants).
    adaptive
        Per-dim ``AdaptiveSpec`` (or ``None``) of a rectangle; see :mod:`blinaprofile.gating.placement`.
    """

    id: str
    kind: GateKind
    dims: tuple[Dim, ...]
    parent: str | None = None
    vertices: tuple[tuple[float, float], ...] = ()
    label: str = ""
    adaptive: tuple[Any, ...] = ()
    mean: tuple[float, ...] = ()
    covariance: tuple[tuple[float, ...], ...] = ()
    distance_square: float = 1.0
    op: Literal["and", "or", "not"] | None = None
    refs: tuple[tuple[str, bool], ...] = ()
    complement: bool = False
    group: str | None = None


@dataclass
class GatingResult:
    """Per-event membership of every gate plus what the engine decided.

    Attributes
    ----------
    masks
        gate id -> boolean vector (event in gate and all its ancestors).
    counts
        gate id -> number of events.
    thresholds
        ``"gate_id:dim_name:min|max"`` -> threshold used (transformed units).
    flags
        QC flags raised while gating (e.g. an adaptive gate that could not be placed).
    confidence
        ``"gate_id:dim_name:min|max"`` -> confidence of an adaptive placement (0-1).
    """

    masks: dict[str, np.ndarray]
    counts: dict[str, int]
    n_events: int
    thresholds: dict[str, float] = field(default_factory=dict)
    confidence: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def parent_percent(self, tree: HasGates) -> dict[str, float]:
        """Percent of parent for every gate."""
        out = {}
        for g in tree.gates:
            parent = self.counts[g.parent] if g.parent else self.n_events
            out[g.id] = 100.0 * self.counts[g.id] / parent if parent else float("nan")
        return out


def make_transform(spec: TransformSpec | Any) -> Any:
    """Our fast transform for a YAML transform spec (or pass through a ready transform)."""
    import blinaprofile.gating.transforms as tr

    if not isinstance(spec, TransformSpec):
        return spec
    if spec.type == "linear":
        return tr.LinearTransform(t=spec.t, a=spec.a)
    if spec.type == "log":
        return tr.LogTransform(t=spec.t, m=spec.m)
    if spec.type == "asinh":
        return tr.AsinhTransform(t=spec.t, m=spec.m, a=spec.a)
    if spec.type == "logicle":
        return tr.LogicleTransform(t=spec.t, w=spec.w, m=spec.m, a=spec.a)
    return tr.HyperlogTransform(t=spec.t, w=spec.w, m=spec.m, a=spec.a)
