"""Per-sample gate placement: rectangle thresholds that follow each sample's populations.

A rectangle bound with an ``adaptive`` spec in the gating YAML
(:class:`~blinaprofile.config.AdaptiveSpec`) is placed, for each sample, from the
populations of the gate's parent on that dimension; :mod:`blinaprofile.gating.density`
does the estimation. Brightness changes (voltage, laser power, reagent lot) move
populations along the scale and the threshold moves with them. The configured bound is a
prior: used only when the sample shows no population structure, and the reference a
sample is compared with for the shift flag.

The sample's own axis
---------------------
Populations are found on ``u = asinh(x / s)`` of the raw (compensated, untransformed)
values ``x``, with ``s`` a scale statistic of the parent's values
(:class:`~blinaprofile.gating.density.ScaleFreeAxis`): linear over the negative (noise)
population, logarithmic beyond, like a logicle display whose linear width is fitted to the
sample. Multiplying a channel by ``c`` multiplies ``s`` by ``c`` and leaves ``u``
unchanged, so every density, valley, mode and tail below is the same for a sample recorded
0.25x or 4x as bright, and the threshold (mapped back to raw, then to gate units) moves by
exactly that factor. Parents above :data:`MAX_EVENTS` events are placed on the events
whose row number is a multiple of ``k`` (deterministic).

Decision per bound
------------------
1. Fewer than :data:`MIN_EVENTS` parent events: the configured bound (``"few events"``).
2. The search range: the configured bound plus and minus ``decades`` (default 0.8:
   brightness 0.16x-6.3x) times the transformed width of one decade
   (:func:`decade_units`), or explicit ``low``/``high``.
3. **Valley.** The density (improved Sheather-Jones bandwidth on the binned values) is
   searched for minima that leave at least :data:`MIN_SIDE_SHARE` of the events on each
   side; the deepest one inside the range at least :data:`STRUCTURE_DEPTH` deep separates
   two populations and the threshold goes to the middle of its floor. If it is at least
   ``min_confidence`` deep, that is the placement (``"valley"``).
4. **Reference.** Otherwise, when the spec names a ``reference`` gate (the other lineage
   for the CCR7/CD45RA memory gates: naive CD4 cells are the CCR7+ CD45RA+ population of
   almost every blood sample), the bound is placed on that gate's events with the same
   rules. A confident valley there is used (``"reference"``), so both lineages share the
   threshold an analyst would draw on the clearer one; so is any confident reference
   placement when the parent's own (steps 5-6) is not confident.
5. **Tail.** Otherwise, with a ``tail`` side (``above``: a minority or shoulder above the
   main population, TIM3+, PD-1+, CD25+; ``below``: CD127lo below the positives;
   ``auto``, the default: the side where more events lie beyond ``tail_sd`` SDs than the
   mirrored half predicts), the threshold is ``tail_sd`` robust SDs from the main
   population's mode, the SD taken from the half facing away from the minority
   (``"tail"``). A valley 3. found but not confident is preferred to a tail gate that is
   not confident either.
6. Otherwise the configured bound (``"configured"``).

Confidence (0-1, ``GatingResult.confidence``, per-sample mode)
--------------------------------------------------------------
* valley and reference: the valley's depth ``1 - f(valley) / min(peak below, peak
  above)``: 0 = the second population is a shoulder without a dip, 0.5 = the density
  halves between the two populations, 1 = an empty gap;
* tail: the estimated purity of the events beyond the threshold, ``1 - m / b``, ``b``
  their share and ``m`` the share the main population's own tail puts there (its near
  half mirrored): 1 = everything beyond the threshold is a separate population;
* 0 for the configured bound.

QC flags (``GatingResult.flags``; each states what was measured)
----------------------------------------------------------------
Per-sample mode: a threshold placed with confidence below ``min_confidence`` (the gate,
the dimension, where, the measured depth or purity and the required one); a configured
bound kept although it cuts through the parent's single population (5-95% of its events
below it); the populations separating outside the search range.

Both modes, **shift**: when a sample's populations separate (a confident valley,
reference or tail) more than :data:`SHIFT_DECADES` decades from a configured bound, one
flag lists every such dimension with the signed distance. One decade is the transformed
width between ``10 r`` and ``100 r``, ``r`` the configured bound's raw value but at least
1,000 (``1 / M`` on logicle: the log part of the scale). In fixed mode (``apply=False``)
placement runs only for this flag; the configured bounds gate the sample.

Bounds shared by several gates (the same dimension, parent, configured value and spec:
CCR7 and CD45RA of the four memory subsets, CD4 and CD8 of the CD4 and CD8 gates) are
placed once, so the subsets still partition their parent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from blinaprofile.errors import GatingError
from blinaprofile.gating.density import (
    Density,
    ScaleFreeAxis,
    Valley,
    binned_density,
    raw_quantiles,
    tail_fit,
    valleys,
)

if TYPE_CHECKING:
    from blinaprofile.gating.events import EventCache
    from blinaprofile.gating.gates import Dim, Gate, GatingResult

__all__ = [
    "MAX_EVENTS",
    "MIN_EVENTS",
    "MIN_SIDE_SHARE",
    "MIN_TAIL_SHARE",
    "SHIFT_DECADES",
    "STRUCTURE_DEPTH",
    "Placement",
    "decade_units",
    "place_threshold",
    "place_thresholds",
    "search_range",
]

#: fewer parent events than this: keep the configured bound
MIN_EVENTS = 200
#: share of the parent's events a valley must leave on each side
MIN_SIDE_SHARE = 0.01
#: a density dip at least this deep separates two populations
STRUCTURE_DEPTH = 0.2
#: populations separating further than this from the configured bound flag a shift
SHIFT_DECADES = 0.3
#: a tail gate with fewer events beyond it than this share found no minority to judge
MIN_TAIL_SHARE = 0.005
#: larger parents are placed on every k-th event (deterministic), at most this many
MAX_EVENTS = 40_000


@dataclass(frozen=True)
class Placement:
    """Where one bound goes for this sample, and why.

    Attributes
    ----------
    threshold
        The bound to use in per-sample mode (transformed units).
    confidence
        0-1, see the module docstring.
    method
        ``"valley"``, ``"reference"``, ``"tail"``, ``"configured"`` or ``"few events"``.
    found
        Where the sample's populations put the bound (``None`` when they do not).
    low, high
        The search range.
    share_below
        Share of the parent's events below ``threshold``.
    outside
        Position of a confident valley (or tail threshold) the populations would need
        outside the range.
    side
        For a tail threshold: ``"above"`` or ``"below"`` the main population.
    """

    threshold: float
    confidence: float
    method: str
    found: float | None = None
    low: float = float("nan")
    high: float = float("nan")
    share_below: float = float("nan")
    outside: float | None = None
    side: str | None = None

    @property
    def moved(self) -> bool:
        """Whether the sample's populations decided the bound."""
        return self.found is not None

    @property
    def reason(self) -> str:
        """Alias of :attr:`method` (older name)."""
        return self.method


def decade_units(transform: Any, at: float) -> float | None:
    """Transformed width of one decade on the log part of the scale (``None``: linear).

    Measured between ``10 r`` and ``100 r``, ``r`` the raw value of ``at`` but at least
    1,000 (so always in the logarithmic region): ``1 / M`` for logicle, ``ln 10`` for
    asinh.
    """
    if transform is None or getattr(transform, "kind", "") == "flin":
        return None
    r = float(np.asarray(transform.inverse(np.array([at], dtype=np.float64)))[0])
    r = max(abs(r), 1000.0) if np.isfinite(r) else 1000.0
    a, b = np.asarray(transform.apply(np.array([10.0 * r, 100.0 * r])), dtype=np.float64)
    unit = float(b - a)
    return unit if np.isfinite(unit) and unit > 0 else None


def search_range(configured: float, spec: Any, transform: Any) -> tuple[float, float]:
    """The range a bound may land in: ``spec.low``/``spec.high``, else ``decades`` around it.

    The default range is the configured bound plus and minus ``spec.decades`` times the
    transformed width of one decade (:func:`decade_units`; 0.1 units per decade when the
    dimension is untransformed): brightness 0.16x-6.3x for 0.8 decades in the log region
    of the scale, and wider in raw terms near zero, where logicle-type scales are linear.
    """
    dec = float(getattr(spec, "decades", 0.8))
    lo: float | None = getattr(spec, "low", None)
    hi: float | None = getattr(spec, "high", None)
    unit = decade_units(transform, configured) or 0.1
    auto_lo, auto_hi = configured - dec * unit, configured + dec * unit
    return (auto_lo if lo is None else float(lo)), (auto_hi if hi is None else float(hi))


def place_threshold(
    values: np.ndarray,
    *,
    configured: float,
    low: float,
    high: float,
    transform: Any = None,
    min_confidence: float = 0.5,
    tail: str | None = None,
    tail_sd: float = 3.0,
) -> Placement:
    """Place one bound from one parent's values (steps 1, 3, 5 and 6 of the module doc).

    Parameters
    ----------
    values
        The parent's values: raw (compensated, untransformed) when ``transform`` is
        given, else already in gate units.
    configured
        The configured bound (the prior).
    low, high
        Search range (transformed units).
    transform
        The dimension's transform (``apply``/``inverse``) or ``None``.
    min_confidence
        A valley shallower than this is used only when nothing better exists.
    tail, tail_sd
        Side of a minority population without a valley, and the SDs off the main mode.
    """
    return _decide(
        _structure(values, transform),
        configured=configured,
        low=low,
        high=high,
        min_confidence=min_confidence,
        tail=tail,
        tail_sd=tail_sd,
    )


@dataclass(frozen=True)
class _Structure:
    """What one parent's values show, whatever the bound: axis, density, valleys."""

    axis: _Axis
    density: Density
    valleys: list[Valley]


def _structure(values: np.ndarray, transform: Any) -> _Structure | None:
    """The populations of one parent's values (``None``: fewer than :data:`MIN_EVENTS`)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < MIN_EVENTS:
        return None
    # one pass for the axis's scale and the density's range
    q_lo, q05, q50, q_hi = raw_quantiles(x, (0.0005, 0.05, 0.5, 0.9995))
    axis = _Axis(transform, x, (q05, q50))
    # the grid follows the data, not the search range
    d = binned_density(x, axis.axis, value_range=(q_lo, q_hi))
    every = valleys(d, float(d.grid[0]), float(d.grid[-1]), min_share=MIN_SIDE_SHARE, limit=8)
    return _Structure(axis, d, every)


def _decide(
    found_in: _Structure | None,
    *,
    configured: float,
    low: float,
    high: float,
    min_confidence: float,
    tail: str | None,
    tail_sd: float,
) -> Placement:
    """Steps 1, 3, 5 and 6 of the module doc on a parent's :func:`_structure`."""
    if found_in is None:
        return Placement(float(configured), 0.0, "few events", None, low, high)
    axis, d, every = found_in.axis, found_in.density, found_in.valleys
    lo_u, hi_u = axis.to_axis(low), axis.to_axis(high)
    found = [v for v in every if lo_u <= v.position <= hi_u]
    best = found[0] if found and found[0].depth >= STRUCTURE_DEPTH else None
    outside = None
    if (
        every
        and not lo_u <= every[0].position <= hi_u
        and every[0].depth >= max(min_confidence, (best.depth if best else 0.0) + 0.3)
    ):
        # the clearest separation lies outside the search range
        outside = axis.to_gate(every[0].position)
    if best is not None and best.depth >= min_confidence:
        at = axis.to_gate(best.position)
        return Placement(at, best.depth, "valley", at, low, high, best.share_below, outside)
    fit = None
    if tail is not None and tail != "none":
        near = hi_u if tail == "above" else lo_u if tail == "below" else None
        fit = tail_fit(d, side=tail, k=tail_sd, mode_near=near)
        if tail == "auto" and fit.share_beyond * fit.purity < MIN_TAIL_SHARE:
            fit = None
    if fit is not None and (best is None or fit.purity >= min_confidence):
        pos = min(max(fit.position, lo_u), hi_u)
        side = "above" if fit.position > fit.mode else "below"
        at = axis.to_gate(pos)
        if pos != fit.position:
            outside = axis.to_gate(fit.position)
        return Placement(at, fit.purity, "tail", at, low, high, d.share_below(pos), outside, side)
    if best is not None:
        at = axis.to_gate(best.position)
        return Placement(at, best.depth, "valley", at, low, high, best.share_below, outside)
    return Placement(
        float(configured),
        0.0,
        "configured",
        None,
        low,
        high,
        d.share_below(axis.to_axis(configured)),
        outside,
    )


class _Axis:
    """Gate units <-> the axis placement works on (:class:`ScaleFreeAxis` of the raw values)."""

    def __init__(
        self, transform: Any, raw: np.ndarray, quantiles: tuple[float, float] | None = None
    ) -> None:
        """``quantiles``: the 5th percentile and median of ``raw`` (see ``raw_quantiles``)."""
        self.transform = transform
        if transform is None:
            self.axis = None
        elif quantiles is not None:
            self.axis = ScaleFreeAxis.from_quantiles(*quantiles)
        else:
            self.axis = ScaleFreeAxis.from_values(raw)

    def to_axis(self, t: float) -> float:
        if self.transform is None or self.axis is None:
            return float(t)
        r = np.asarray(self.transform.inverse(np.array([t], dtype=np.float64)))
        return float(self.axis.apply(r)[0])

    def to_gate(self, u: float) -> float:
        if self.transform is None or self.axis is None:
            return float(u)
        r = self.axis.inverse(np.array([u], dtype=np.float64))
        return float(np.asarray(self.transform.apply(r))[0])


# ---------------------------------------------------------------------- per sample
@dataclass
class SampleState:
    """What placement remembers while one sample is gated (kept on its event cache)."""

    placements: dict[tuple[Any, ...], Placement] = field(default_factory=dict)
    flagged: set[tuple[Any, ...]] = field(default_factory=set)
    shifts: dict[str, float] = field(default_factory=dict)
    shift_flag: int | None = None
    ranges: dict[tuple[Any, ...], tuple[float, float]] = field(default_factory=dict)
    units: dict[tuple[Any, ...], float | None] = field(default_factory=dict)
    #: each parent's placement rows (:func:`_subsample`), shared by its gates' bounds
    rows: dict[str | None, np.ndarray | None] = field(default_factory=dict)
    #: populations per (parent, channel, ratio, compensation, transform)
    structures: dict[tuple[Any, ...], _Structure | None] = field(default_factory=dict)


_NOT_YET = np.empty(0, dtype=np.intp)  # a parent whose rows are not chosen yet


def _state(event_cache: EventCache) -> SampleState:
    st = getattr(event_cache, "placement_state", None)
    if not isinstance(st, SampleState):
        st = SampleState()
        event_cache.placement_state = st
    return st


def _values(event_cache: EventCache, d: Dim, where: np.ndarray | None) -> tuple[np.ndarray, Any]:
    """A dimension's parent values and the transform to bin them with."""
    if d.ratio is not None or d.transform is None:
        return event_cache.transformed(d, where), None
    assert d.channel is not None, "bind the strategy first"
    return event_cache.raw(d.channel, d.compensation, where), event_cache.transform(d.transform)


def _subsample(n: int, mask: np.ndarray | None) -> np.ndarray | None:
    """The parent's rows; above :data:`MAX_EVENTS` those whose row number is a multiple of k.

    Selecting by row number (not by rank within the parent) keeps the same events when
    the parent gains or loses a few, so placement stays stable between close parents.
    """
    if mask is None:
        return None if n <= MAX_EVENTS else np.arange(0, n, -(-n // MAX_EVENTS))
    size = int(np.count_nonzero(mask))
    if size <= MAX_EVENTS:
        return np.flatnonzero(mask)
    k = -(-size // MAX_EVENTS)
    # the parent's rows that are multiples of k, without listing every parent row first
    return np.flatnonzero(mask[::k]) * k


def _confident(p: Placement, min_confidence: float) -> bool:
    return p.method in ("valley", "reference", "tail") and p.confidence >= min_confidence


def _place_on(
    event_cache: EventCache,
    st: SampleState,
    d: Dim,
    spec: Any,
    bound: float,
    parent: str | None,
    mask: np.ndarray | None,
) -> tuple[Placement, tuple[Any, ...], Any]:
    transform = (
        None
        if d.ratio is not None
        else (event_cache.transform(d.transform) if d.transform else None)
    )
    rkey = (bound, spec, None if d.ratio is not None else d.transform)
    rng = st.ranges.get(rkey)
    if rng is None:
        rng = st.ranges[rkey] = search_range(bound, spec, transform)
    low, high = rng
    key = (
        parent,
        d.channel,
        d.ratio,
        d.compensation,
        d.transform,
        low,
        high,
        bound,
        spec.tail,
        spec.tail_sd,
        spec.min_confidence,
    )
    p = st.placements.get(key)
    if p is None:
        # the parent's populations on this dimension, found once for all its bounds
        skey = key[:5]
        if skey in st.structures:
            found = st.structures[skey]
        else:
            where = st.rows.get(parent, _NOT_YET)
            if where is _NOT_YET:
                where = st.rows[parent] = _subsample(event_cache.n, mask)
            found = st.structures[skey] = _structure(*_values(event_cache, d, where))
        p = _decide(
            found,
            configured=bound,
            low=low,
            high=high,
            min_confidence=spec.min_confidence,
            tail=spec.tail,
            tail_sd=spec.tail_sd,
        )
        st.placements[key] = p
    return p, key, transform


def place_thresholds(
    gate: Gate,
    event_cache: EventCache,
    parent_mask: np.ndarray | None,
    result: GatingResult,
    *,
    apply: bool = True,
) -> tuple[Dim, ...]:
    """Per-sample bounds of one rectangle gate (called by ``GateTree.apply``).

    Parameters
    ----------
    gate
        A bound rectangle gate with ``adaptive`` specs.
    event_cache
        The sample's :class:`~blinaprofile.gating.events.EventCache`.
    parent_mask
        The parent's events (``None``: all events).
    result
        Receives confidences (``"gate:dim:min|max"``, per-sample mode) and QC flags; its
        ``masks`` supply ``reference`` gates.
    apply
        Per-sample mode; ``False`` (fixed mode) keeps the configured bounds and only
        raises the shift flag.

    Returns
    -------
    tuple of Dim
        The gate's dimensions with the bounds to use.
    """
    st = _state(event_cache)
    specs: Sequence[Any] = gate.adaptive
    out = []
    for d, spec in zip(
        gate.dims, list(specs) + [None] * (len(gate.dims) - len(specs)), strict=True
    ):
        if spec is None:
            out.append(d)
            continue
        new = d
        for side in ("min", "max"):
            bound = getattr(d, side)
            if bound is None:
                continue
            p, key, transform = _place_on(event_cache, st, d, spec, bound, gate.parent, parent_mask)
            if spec.reference and not (
                p.method == "valley" and p.confidence >= spec.min_confidence
            ):
                p = _with_reference(event_cache, st, gate, d, spec, bound, p, result)
            _shift(st, result, d, gate, bound, p, transform, spec, apply)
            if apply:
                result.confidence[f"{gate.id}:{d.name}:{side}"] = float(p.confidence)
                _flag(st, result, key, gate, d, bound, p, spec)
                t = float(p.threshold)
                new = replace(new, min=t) if side == "min" else replace(new, max=t)
        out.append(new)
    return tuple(out)


def _with_reference(
    event_cache: EventCache,
    st: SampleState,
    gate: Gate,
    d: Dim,
    spec: Any,
    bound: float,
    own: Placement,
    result: GatingResult,
) -> Placement:
    ref = spec.reference
    mask = result.masks.get(ref)
    if mask is None:
        raise GatingError(
            f"gate {gate.id!r}: adaptive reference {ref!r} is not a gate evaluated before it"
        )
    rp, _key, _tf = _place_on(event_cache, st, d, spec, bound, ref, mask)
    # a confident valley on the reference beats anything but a confident own valley; any
    # confident reference placement beats an own placement that is not confident
    ref_valley = rp.method == "valley" and rp.confidence >= spec.min_confidence
    if ref_valley or (
        _confident(rp, spec.min_confidence) and not _confident(own, spec.min_confidence)
    ):
        return Placement(
            rp.threshold,
            rp.confidence,
            "reference",
            rp.found,
            rp.low,
            rp.high,
            own.share_below,
            None,
            rp.side,
        )
    return own


def _flag(
    st: SampleState,
    result: GatingResult,
    key: tuple[Any, ...],
    gate: Gate,
    d: Dim,
    bound: float,
    p: Placement,
    spec: Any,
) -> None:
    if key in st.flagged:
        return
    where = f"gate {gate.id}: {d.name}"
    on = f"{gate.parent or 'all'} events"
    text: str | None = None
    if p.method in ("valley", "reference") and p.confidence < spec.min_confidence:
        src = f"{spec.reference} events" if p.method == "reference" else on
        text = (
            f"{where} threshold placed at {p.threshold:.3f} with low confidence: the "
            f"valley between the populations on {src} is only {p.confidence:.2f} deep "
            f"(needs {spec.min_confidence:.2f})"
        )
    elif p.method == "tail" and p.confidence < spec.min_confidence:
        beyond = 1.0 - p.share_below if p.side == "above" else p.share_below
        if beyond >= MIN_TAIL_SHARE:
            text = (
                f"{where} threshold placed at {p.threshold:.3f} off the main population's "
                f"tail on {on} with low confidence: of the {beyond:.1%} of events "
                f"{p.side} it, only {p.confidence:.0%} stand out from that tail "
                f"(needs {spec.min_confidence:.0%})"
            )
    elif p.method == "configured" and 0.05 <= p.share_below <= 0.95:
        text = (
            f"{where}: no separate populations on {on} within [{p.low:.3f}, {p.high:.3f}]; "
            f"the configured threshold {bound} was kept although it cuts through the single "
            f"population ({p.share_below:.0%} of the events below it)"
        )
    if text is None and p.outside is not None:
        what = (
            f"the main population's tail on {on} ends at {p.outside:.3f}"
            if p.method == "tail" and p.threshold != p.outside
            else f"the populations on {on} separate at {p.outside:.3f}"
        )
        text = (
            f"{where}: {what}, outside the search range [{p.low:.3f}, {p.high:.3f}]; "
            f"threshold {p.threshold:.3f} used"
        )
    if text is not None:
        st.flagged.add(key)
        result.flags.append(text)


def _shift(
    st: SampleState,
    result: GatingResult,
    d: Dim,
    gate: Gate,
    bound: float,
    p: Placement,
    transform: Any,
    spec: Any,
    apply: bool,
) -> None:
    if p.found is None or not _confident(p, spec.min_confidence):
        return
    ukey = ("unit", bound, d.transform)
    if ukey not in st.units:
        st.units[ukey] = decade_units(transform, bound)
    unit = st.units[ukey]
    if unit is None:
        return
    dec = (p.found - bound) / unit
    label = f"{d.name} on {gate.parent or 'all'}"
    if abs(dec) <= SHIFT_DECADES or abs(dec) <= abs(st.shifts.get(label, 0.0)):
        return
    st.shifts[label] = dec
    parts = ", ".join(f"{k} {v:+.2f}" for k, v in st.shifts.items())
    how = (
        "per-sample thresholds follow them"
        if apply
        else "fixed thresholds used, gates may cut through populations"
    )
    text = (
        f"sample looks shifted: populations separate more than {SHIFT_DECADES} decades "
        f"from the configured thresholds ({parts} decades; {how})"
    )
    if st.shift_flag is None:
        st.shift_flag = len(result.flags)
        result.flags.append(text)
    else:
        result.flags[st.shift_flag] = text
