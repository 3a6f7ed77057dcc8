"""Axes of gating plots as a cytometrist reads them (FlowJo conventions).

Events and gates are drawn in transformed (display) units, but the tick labels are raw
values placed through the dimension's transform: for biexponential scales (logicle,
hyperlog, FlowJo biex), asinh and log scales, the decades ``0, 10², 10³, 10⁴, 10⁵`` (and
``-10³``... where the scale shows negative values) at ``transform.apply(10**k)``, with minor
ticks at ``2..9 x 10**k``; for linear scatter scales, round values in thousands (``50K``,
``100K``). Labels that would collide are dropped, the tick mark stays. Axis limits come from
robust quantiles of the parent's events plus the gate, so the population fills the panel.

Nothing here imports matplotlib at module level: the functions take the ``Axes`` to adorn.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from blinaprofile.gating.gates import Dim

__all__ = [
    "AxisTicks",
    "apply_ticks",
    "axis_label",
    "format_decade",
    "linear_ticks",
    "robust_limits",
    "scale_ticks",
]

#: transform kinds drawn with decade ticks (everything but linear)
_LINEAR_KINDS = frozenset({"flin"})
_SUPERSCRIPT = str.maketrans("0123456789-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁻")
#: decades tried for tick marks: 10**0 .. 10**7 (any cytometer's range)
_DECADES = range(8)
#: minor ticks are drawn in decades at least this share of the axis wide
_MINOR_DECADE = 0.12


@dataclass(frozen=True)
class AxisTicks:
    """Tick marks of one axis, in display (transformed) units.

    Attributes
    ----------
    major, labels
        Labelled tick positions and their labels.
    minor
        Unlabelled tick positions: ``2..9 x 10**k`` in decades wide enough to show them, and
        decades whose label would collide with another.
    """

    major: tuple[float, ...]
    labels: tuple[str, ...]
    minor: tuple[float, ...] = ()


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def axis_label(dim: Dim, markers: Mapping[str, str]) -> str:
    """``"marker (channel)"`` for a dimension, as FlowJo labels a compensated parameter.

    Parameters
    ----------
    dim
        A bound dimension.
    markers
        channel -> marker (``$PnS``) of the sample.

    Returns
    -------
    str
        ``"CCR7 (BV421-A)"``; the channel alone when it has no marker; a ratio's name. When
        the marker carries an alias in parentheses (``"CD197 (CCR7)"``) and the strategy
        names the dimension by that alias, the strategy's name is used.
    """
    if dim.ratio is not None:
        return dim.name
    ch = dim.channel or dim.name
    mk = markers.get(ch, "")
    if not mk or mk == ch:
        return ch
    name = dim.name
    if "(" in mk and _norm(name) and _norm(name) in _norm(mk) and _norm(name) != _norm(ch):
        mk = name
    return f"{mk} ({ch})"


def format_decade(value: float) -> str:
    """A decade as a label: ``0``, ``10³``, ``-10²`` (with a real minus sign)."""
    if value == 0:
        return "0"
    k = round(math.log10(abs(value)))
    text = "10" + str(k).translate(_SUPERSCRIPT)
    return ("\u2212" + text) if value < 0 else text


def _format_k(value: float) -> str:
    """A raw linear value as FlowJo writes it: ``0``, ``500``, ``50K``, ``1.5M``."""
    a = abs(value)
    if a >= 1e6:
        return f"{value / 1e6:g}M"
    if a >= 1e3:
        return f"{value / 1e3:g}K"
    return f"{value:g}"


def _in_range(pos: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.isfinite(pos) & (pos >= lo) & (pos <= hi)


def _thin(
    candidates: Iterable[tuple[float, str]], lo: float, hi: float, char_frac: float
) -> dict[float, str]:
    """Keep labels in priority order when they do not collide with one kept before."""
    span = (hi - lo) or 1.0
    kept: dict[float, str] = {}
    for pos, text in candidates:
        half = 0.5 * len(text) * char_frac
        ok = all(
            abs(pos - p) / span >= half + 0.5 * len(t) * char_frac + char_frac
            for p, t in kept.items()
        )
        if ok:
            kept[pos] = text
    return kept


def linear_ticks(
    transform: Any | None, lo: float, hi: float, *, char_frac: float = 0.03
) -> AxisTicks:
    """Round raw values (``50K``, ``100K``...) placed through a linear transform.

    Parameters
    ----------
    transform
        The dimension's transform (``apply``/``inverse``), or ``None`` for raw units.
    lo, hi
        Axis limits in display units.
    char_frac
        Width of one label character as a fraction of the axis length.

    Returns
    -------
    AxisTicks
    """
    from matplotlib.ticker import MaxNLocator

    if transform is None:
        raw_lo, raw_hi = lo, hi
    else:
        raw_lo, raw_hi = (float(v) for v in transform.inverse(np.array([lo, hi])))
    raw = np.asarray(MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(raw_lo, raw_hi))
    pos = raw if transform is None else np.asarray(transform.apply(raw), dtype=float)
    ok = _in_range(pos, lo, hi)
    kept = _thin(
        ((float(p), _format_k(float(r))) for p, r in zip(pos[ok], raw[ok], strict=True)),
        lo,
        hi,
        char_frac,
    )
    major = tuple(sorted(kept))
    minor_raw = np.asarray(
        MaxNLocator(nbins=25, steps=[1, 2, 2.5, 5, 10]).tick_values(raw_lo, raw_hi)
    )
    mpos = minor_raw if transform is None else np.asarray(transform.apply(minor_raw), dtype=float)
    unlabeled = [float(p) for p in pos[ok] if float(p) not in kept]
    candidates = unlabeled + [float(p) for p in mpos[_in_range(mpos, lo, hi)]]
    minor = _spaced(candidates, major, 0.01 * ((hi - lo) or 1.0))
    return AxisTicks(major, tuple(kept[p] for p in major), minor)


def scale_ticks(
    transform: Any | None, lo: float, hi: float, *, char_frac: float = 0.03
) -> AxisTicks:
    """Tick marks of an axis showing ``transform``'s display units between ``lo`` and ``hi``.

    Parameters
    ----------
    transform
        The dimension's transform (an object with ``apply``, ``inverse`` and ``kind``, see
        :mod:`blinaprofile.gating.transforms`), or ``None`` when values are raw.
    lo, hi
        Axis limits in display units.
    char_frac
        Width of one label character as a fraction of the axis length (labels closer than
        their widths are dropped, biggest decades first).

    Returns
    -------
    AxisTicks
        Decades for non-linear transforms (``0`` and negative decades where the scale
        shows them), round raw values for linear ones.
    """
    if transform is None or getattr(transform, "kind", "") in _LINEAR_KINDS:
        return linear_ticks(transform, lo, hi, char_frac=char_frac)
    decades = np.array([10.0**k for k in _DECADES])
    signed = np.concatenate([decades, -decades])
    minors = np.array([m * d for d in decades for m in range(2, 10)])
    minors = np.concatenate([minors, -minors])
    raw = np.concatenate([[0.0], signed, minors])
    with np.errstate(all="ignore"):
        pos = np.asarray(transform.apply(raw), dtype=float)
        back = np.asarray(transform.inverse(pos), dtype=float)
        # width of the decade each minor tick lies in, as a fraction of the axis
        first = np.repeat(pos[1 : 1 + 2 * decades.size], 8)
        last = np.repeat(transform.apply(10.0 * signed), 8)
        wide = np.abs(last - first) >= _MINOR_DECADE * ((hi - lo) or 1.0)
    # a value the scale clamps or cannot show does not come back from the inverse
    exact = np.isclose(back, raw, rtol=1e-2, atol=1.0)
    ok = _in_range(pos, lo, hi) & exact
    n_major = 1 + signed.size
    # minor ticks only in decades wide enough to tell them apart (not around zero)
    ok[n_major:] &= wide
    major_idx = [i for i in range(n_major) if ok[i]]
    # priority: 0, then the biggest decades (positive before negative)
    order = sorted(major_idx, key=lambda i: (raw[i] != 0, -abs(raw[i]), raw[i] < 0))
    kept = _thin(((float(pos[i]), format_decade(raw[i])) for i in order), lo, hi, char_frac)
    major = tuple(sorted(kept))
    # decades without a label become minor ticks; marks closer than ~1% of the axis go
    unlabeled = [float(pos[i]) for i in major_idx if float(pos[i]) not in kept]
    candidates = sorted(unlabeled) + sorted(float(p) for p in pos[n_major:][ok[n_major:]])
    minor = _spaced(candidates, major, 0.01 * ((hi - lo) or 1.0))
    return AxisTicks(major, tuple(kept[p] for p in major), minor)


def _spaced(candidates: Iterable[float], taken: Iterable[float], gap: float) -> tuple[float, ...]:
    """Candidates (in priority order) at least ``gap`` from ``taken`` and from each other."""
    have = list(taken)
    out: list[float] = []
    for c in candidates:
        if all(abs(c - h) >= gap for h in have):
            have.append(c)
            out.append(c)
    return tuple(sorted(out))


def apply_ticks(
    ax: Axes,
    which: Literal["x", "y"],
    ticks: AxisTicks,
    limits: tuple[float, float],
    *,
    minor_length: float = 1.8,
) -> None:
    """Set ``ticks`` on one axis of ``ax`` and keep its view at ``limits``.

    Parameters
    ----------
    ax
        The panel.
    which
        ``"x"`` or ``"y"``.
    ticks
        From :func:`scale_ticks`.
    limits
        The axis limits in display units (set after the ticks, which would widen them).
    minor_length
        Length of the minor tick marks in points. They are drawn as one line of tick
        markers (gid ``minor-xticks``/``minor-yticks``), not as matplotlib minor ticks.
    """
    from matplotlib.markers import TICKDOWN, TICKLEFT

    axis = ax.xaxis if which == "x" else ax.yaxis
    axis.set_ticks(list(ticks.major), labels=list(ticks.labels))
    axis.set_ticks([], minor=True)
    if ticks.minor:
        # one marker line instead of one Tick artist per minor tick (10x cheaper to draw)
        minor = np.asarray(ticks.minor)
        edge = np.zeros_like(minor)
        xy = (minor, edge) if which == "x" else (edge, minor)
        line = ax.plot(
            *xy,
            transform=ax.get_xaxis_transform() if which == "x" else ax.get_yaxis_transform(),
            linestyle="none",
            marker=TICKDOWN if which == "x" else TICKLEFT,
            markersize=minor_length,
            markeredgewidth=0.6,
            color="black",
            clip_on=False,
        )[0]
        line.set_gid(f"minor-{which}ticks")
    if which == "x":
        ax.set_xlim(limits)
    else:
        ax.set_ylim(limits)


def robust_limits(
    values: np.ndarray,
    *,
    bounds: Iterable[float | None] = (),
    soft_bounds: Iterable[float | None] = (),
    quantiles: tuple[float, float] = (0.005, 0.995),
    pad: float = 0.05,
) -> tuple[float, float]:
    """Axis limits that let the parent's events fill the panel and show the gate.

    Parameters
    ----------
    values
        The parent's events in display units (non-finite values ignored).
    bounds
        Gate positions that must be visible (rectangle thresholds).
    soft_bounds
        Gate positions shown only as far as they are near the events (polygon vertices,
        ellipse extents): clipped to the events' range widened by a quarter.
    quantiles
        The events' range: these quantiles of the finite values.
    pad
        Margin on each side, as a fraction of the range.

    Returns
    -------
    tuple of float
        ``(low, high)``, ``low < high``.
    """
    v = np.asarray(values, dtype=float)
    finite = v[np.isfinite(v)]
    if finite.size:
        lo, hi = (float(q) for q in np.quantile(finite, quantiles))
    else:
        lo, hi = math.nan, math.nan
    hard = [float(b) for b in bounds if b is not None and math.isfinite(b)]
    if not math.isfinite(lo):
        pts = hard + [float(b) for b in soft_bounds if b is not None and math.isfinite(b)]
        lo, hi = (min(pts), max(pts)) if pts else (0.0, 1.0)
    span = (hi - lo) or 1.0
    for b in soft_bounds:
        if b is not None and math.isfinite(b):
            c = min(max(float(b), lo - 0.25 * span), hi + 0.25 * span)
            lo, hi = min(lo, c), max(hi, c)
    for b in hard:
        lo, hi = min(lo, b), max(hi, b)
    span = (hi - lo) or 1.0
    return lo - pad * span, hi + pad * span
