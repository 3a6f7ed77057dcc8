"""Adaptive gates: per-sample placement of rectangle thresholds at the density valley.

A rectangle bound with an ``adaptive: {low, high, min_confidence}`` spec in the gating
YAML is moved, for each sample, to the valley of the (smoothed) density of the gate's
parent events on that dimension, searched only within ``[low, high]``. Run-to-run
brightness shifts, voltage changes and compensation drift move populations; the valley
between the negative and the positive population moves with them.

Decision per bound (dimension values in transformed units, parent events only):

1. Fewer than :data:`MIN_EVENTS` parent events: the configured bound is kept
   (reason ``"few events"``, confidence 0; the sample's QC counts report the sparse parent).
2. The smoothed density (bandwidth ``(high - low) / 10``) has no two modes separated by a
   valley at least 20% deep with :data:`MIN_SIDE_SHARE` of the events on each side: there
   is nothing to separate and the configured bound is kept (``"one population"``,
   confidence 0, no flag).
3. Otherwise the valley is the lowest point of the density inside ``[low, high]``; its
   confidence is its depth, ``1 - f(valley) / min(peak left, peak right)``. When the
   valley is at least ``min_confidence`` deep and the density does not keep falling
   beyond a limit, the bound moves: to the equal-likelihood point of a two-Gaussian
   mixture fitted around the valley when that lies within the limits (``"mixture"``),
   else to the middle of the valley floor (``"valley"``). If not (``"no valley"``), both
   populations are there but cannot be separated within the limits: the configured
   bound is kept and a QC flag names the gate, the dimension and why.

Bounds shared by several gates (the same dimension, parent and limits: CCR7 of the four
CD8 memory subsets, CD8 of the CD4 and CD8 gates) are placed once, so subsets still
partition their parent.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from blinaprofile.gating.events import EventCache
    from blinaprofile.gating.gates import Dim, Gate, GatingResult

__all__ = ["MIN_EVENTS", "MIN_SIDE_SHARE", "Placement", "find_valley", "place_thresholds"]

#: fewer parent events than this: keep the configured bound
MIN_EVENTS = 200
#: share of parent events needed on each side of the search window to look for a valley
MIN_SIDE_SHARE = 0.01


@dataclass(frozen=True)
class Placement:
    """Where a bound ended up and why.

    Attributes
    ----------
    threshold
        The bound used (transformed units).
    confidence
        Depth of the valley (0-1); 0 when no valley was looked for.
    moved
        Whether the configured bound was replaced.
    reason
        ``"valley"``, ``"few events"``, ``"one population"`` or ``"no valley"``.
    """

    threshold: float
    confidence: float
    moved: bool
    reason: str


def _smoothed_density(
    x: np.ndarray, lo: float, hi: float, h: float
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-smoothed histogram density of ``x`` on a grid over ``[lo, hi]``."""
    step = h / 4.0
    nbins = max(8, int(np.ceil((hi - lo) / step)))
    counts, edges = np.histogram(x, bins=nbins, range=(lo, hi))
    centers = 0.5 * (edges[:-1] + edges[1:])
    half = int(np.ceil(4 * h / step))
    k = np.exp(-0.5 * ((np.arange(-half, half + 1) * step) / h) ** 2)
    k /= k.sum()
    dens = np.convolve(counts.astype(np.float64), k, mode="same")
    return centers, dens


def find_valley(
    x: np.ndarray,
    *,
    start: float,
    low: float,
    high: float,
    min_confidence: float = 0.5,
    bandwidth: float | None = None,
) -> Placement:
    """Place one threshold at the density valley of ``x`` within ``[low, high]``.

    Parameters
    ----------
    x
        Transformed values of the parent events.
    start
        The configured threshold (kept when no reliable valley is found).
    low, high
        Limits within which the threshold may move.
    min_confidence
        Minimum valley depth to move the threshold.
    bandwidth
        Smoothing bandwidth (transformed units); default ``(high - low) / 10``, at least 0.01.
    """
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = x.size
    if n < MIN_EVENTS:
        return Placement(float(start), 0.0, False, "few events")
    h = bandwidth if bandwidth is not None else max(0.01, (high - low) / 10.0)
    qlo, qhi = np.quantile(x, [0.002, 0.998])
    grid_lo = min(low, float(qlo)) - 3 * h
    grid_hi = max(high, float(qhi)) + 3 * h
    centers, dens = _smoothed_density(x, grid_lo, grid_hi, h)
    if _n_populations(x, centers, dens) < 2:
        return Placement(float(start), 0.0, False, "one population")
    inside = np.flatnonzero((centers >= low) & (centers <= high))
    if inside.size < 3:
        return Placement(float(start), 0.0, False, "no valley")
    first, last = int(inside[0]), int(inside[-1])
    j = first + int(np.argmin(dens[first : last + 1]))
    fmin = float(dens[j])
    i_left = int(np.argmax(dens[: j + 1]))
    i_right = j + int(np.argmax(dens[j:]))
    top = float(min(dens[i_left], dens[i_right]))
    depth = 0.0 if top <= 0 else max(0.0, 1.0 - fmin / top)
    # the deepest point between the two peaks must lie inside the limits: if the density
    # keeps falling beyond a limit, the populations moved further than allowed
    gmin = float(dens[i_left : i_right + 1].min())
    outside = fmin - gmin > 0.05 * max(top - gmin, 0.0)
    if outside or depth < min_confidence:
        return Placement(float(start), depth, False, "no valley")
    # the middle of the valley floor inside the limits (flat-bottomed gaps between well
    # separated populations)
    floor = fmin + 0.05 * (top - fmin)
    a = j
    while a - 1 >= first and dens[a - 1] <= floor:
        a -= 1
    b = j
    while b + 1 <= last and dens[b + 1] <= floor:
        b += 1
    valley = float(0.5 * (centers[a] + centers[b]))
    boundary = _mixture_boundary(x, valley)
    if boundary is not None and low <= boundary <= high:
        return Placement(boundary, depth, True, "mixture")
    return Placement(valley, depth, True, "valley")


def _n_populations(x: np.ndarray, centers: np.ndarray, dens: np.ndarray) -> int:
    """1 or 2: whether the density has two modes, each side holding enough events.

    Modes are local maxima of the smoothed density at least 5% of its maximum; two
    neighbouring modes count as two populations when the valley between them is at
    least 20% deep and each side of it holds :data:`MIN_SIDE_SHARE` of the events.
    """
    top = float(dens.max())
    if top <= 0:
        return 1
    d = dens
    peaks = [
        i
        for i in range(1, d.size - 1)
        if d[i] > d[i - 1] and d[i] >= d[i + 1] and d[i] >= 0.05 * top
    ]
    n = x.size
    for a, b in itertools.pairwise(peaks):
        v = a + int(np.argmin(d[a : b + 1]))
        depth = 1.0 - float(d[v]) / float(min(d[a], d[b]))
        share = np.count_nonzero(x < centers[v]) / n
        if depth >= 0.2 and MIN_SIDE_SHARE <= share <= 1.0 - MIN_SIDE_SHARE:
            return 2
    return 1


def _mixture_boundary(x: np.ndarray, split: float, n_iter: int = 30) -> float | None:
    """Equal-likelihood point of a two-Gaussian mixture fitted around a valley.

    The density valley between a large and a small population lies close to the small
    one (the large population's tail fills it); the point where the two fitted component
    densities are equal (priors ignored) splits them evenly, which is what a gate
    drawn by eye between two populations does. EM is started from the split at the
    valley; ``None`` when the fit degenerates.
    """
    left = x < split
    if left.sum() < 10 or (~left).sum() < 10:
        return None
    w = np.array([left.mean(), 1.0 - left.mean()])
    mu = np.array([x[left].mean(), x[~left].mean()])
    sd = np.array([x[left].std(), x[~left].std()])
    for _ in range(n_iter):
        sd = np.maximum(sd, 1e-3)
        z = (x[:, None] - mu[None, :]) / sd[None, :]
        like = w[None, :] * np.exp(-0.5 * z * z) / sd[None, :]
        tot = like.sum(axis=1, keepdims=True)
        tot[tot == 0] = 1.0
        r = like / tot
        nk = r.sum(axis=0)
        if np.any(nk < 5):
            return None
        w = nk / x.size
        mu = (r * x[:, None]).sum(axis=0) / nk
        sd = np.sqrt((r * (x[:, None] - mu[None, :]) ** 2).sum(axis=0) / nk)
    if not mu[0] < mu[1]:
        return None
    # log N(t; mu0, sd0) = log N(t; mu1, sd1): a t^2 + b t + c = 0
    s0, s1 = float(sd[0]) ** 2, float(sd[1]) ** 2
    a = 1.0 / s1 - 1.0 / s0
    b = 2.0 * (mu[0] / s0 - mu[1] / s1)
    c = mu[1] ** 2 / s1 - mu[0] ** 2 / s0 + np.log(s1 / s0)
    if abs(a) < 1e-12:
        roots = np.array([-c / b]) if b != 0 else np.array([])
    else:
        disc = b * b - 4 * a * c
        if disc < 0:
            return None
        q = np.sqrt(disc)
        roots = np.array([(-b - q) / (2 * a), (-b + q) / (2 * a)])
    between = roots[(roots > mu[0]) & (roots < mu[1])]
    return float(between[0]) if between.size else None


def place_thresholds(
    gate: Gate,
    event_cache: EventCache,
    parent_mask: np.ndarray | None,
    result: GatingResult,
) -> tuple[Dim, ...]:
    """Adaptive bounds of one rectangle gate for this sample.

    Called by :meth:`GateTree.apply <blinaprofile.gating.tree.GateTree.apply>` with
    ``adaptive=True``. Records every adaptive bound's confidence in
    ``result.confidence`` (``"gate:dim:min|max"``) and appends a QC flag to
    ``result.flags`` for a bound that could not be placed reliably.

    Returns
    -------
    tuple of Dim
        The gate's dimensions with adapted ``min``/``max``.
    """
    cache: dict[tuple[Any, ...], Placement] = event_cache.__dict__.setdefault("_adaptive", {})
    flagged: set[tuple[Any, ...]] = event_cache.__dict__.setdefault("_adaptive_flagged", set())
    where = None if parent_mask is None else np.flatnonzero(parent_mask)
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
            key = (gate.parent, d.channel, d.compensation, d.transform, spec.low, spec.high, bound)
            p = cache.get(key)
            if p is None:
                x = event_cache.transformed(d, where)
                p = find_valley(
                    x,
                    start=bound,
                    low=spec.low,
                    high=spec.high,
                    min_confidence=spec.min_confidence,
                )
                cache[key] = p
            result.confidence[f"{gate.id}:{d.name}:{side}"] = p.confidence
            if p.reason == "no valley" and key not in flagged:
                flagged.add(key)
                why = (
                    f"valley depth {p.confidence:.2f} < {spec.min_confidence}"
                    if p.confidence < spec.min_confidence
                    else "the populations lie beyond the limits"
                )
                result.flags.append(
                    f"adaptive gate {gate.id}: no reliable {d.name} valley within "
                    f"[{spec.low}, {spec.high}] ({why}); configured threshold {bound} kept"
                )
            new = replace(new, min=p.threshold) if side == "min" else replace(new, max=p.threshold)
        out.append(new)
    return tuple(out)
