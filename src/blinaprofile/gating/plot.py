"""Per-sample gating figures: every gate drawn on its parent's events, as FlowJo shows them.

:func:`gating_figure` returns a :class:`matplotlib.figure.Figure` (no pyplot state, so
reports can embed it); :func:`save_gating_png` writes it atomically. One panel per gate,
except that sibling rectangle gates on the same two dimensions (a CCR7 x CD45RA quadrant,
CD4 vs CD8) share one panel with each gate's percentage in its corner
(:func:`sibling_panels`). Two-dimensional gates are drawn on a pseudo-colour density of the
parent's events (a 2-D histogram, log-scaled colour), or on its individual events as dots
when the parent is small; one-dimensional range gates on a histogram with their bounds.
Axes show raw values through the dimension's transform (decades on biexponential scales,
``50K`` on linear scatter; see :mod:`blinaprofile.gating.axes`) and limits from robust
quantiles of the parent's events, so populations fill the panels. Titles give the gate, its
count and percent of parent, and the confidence of adaptive placements; long titles wrap.
"""

from __future__ import annotations

import functools
import math
import os
import re
import textwrap
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blinaprofile.gating.axes import apply_ticks, axis_label, robust_limits, scale_ticks
from blinaprofile.gating.events import EventCache
from blinaprofile.gating.gates import Dim, Gate, GatingResult
from blinaprofile.gating.tree import GateTree
from blinaprofile.io.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
    from matplotlib.text import Text

    from blinaprofile.io.fcs import FCSData

__all__ = [
    "DPI",
    "SPARSE_EVENTS",
    "Panel",
    "gating_figure",
    "plot_sample",
    "save_gating_png",
    "sibling_panels",
]

#: resolution of saved gating figures (dots per inch)
DPI = 150
#: parents with fewer events are drawn as dots, larger ones as a density
SPARSE_EVENTS = 2_000
_MAX_POINTS = 100_000  # events histogrammed per panel (a random subset beyond)
_PANEL_INCHES = 2.6  # target panel width when the number of columns is chosen
_GATE_COLOR = "black"
_DOT_COLOR = "#1f2f8a"
_TITLE_PT = 7.0
_LABEL_PT = 7.0
_TICK_PT = 6.5
_NOTE_PT = 6.5
_CHAR_EM = 0.6  # mean glyph width of DejaVu Sans, in em


@dataclass(frozen=True)
class Panel:
    """One panel of the figure: a gate, or sibling gates drawn on the same two dimensions.

    Attributes
    ----------
    gates
        The gates drawn (more than one: siblings on the same two dimensions).
    """

    gates: tuple[Gate, ...]

    @property
    def parent(self) -> str | None:
        """The gates' common parent (``None``: all events)."""
        return self.gates[0].parent

    @property
    def grouped(self) -> bool:
        """Whether several sibling gates share this panel."""
        return len(self.gates) > 1


# ------------------------------------------------------------------------ panels
def _dim_key(d: Dim) -> Hashable:
    """What makes two dimensions the same axis: channel, compensation, transform, ratio."""
    return (d.channel or d.name, d.compensation, d.transform, d.ratio)


def _pair_key(g: Gate) -> Hashable | None:
    """``(parent, {dim, dim})`` of a plain 2-D rectangle, the key siblings are grouped by."""
    if g.kind != "rectangle" or len(g.dims) != 2 or g.complement:
        return None
    a, b = (_dim_key(d) for d in g.dims)
    if a == b:
        return None
    return (g.parent, frozenset((a, b)))


def sibling_panels(gates: Sequence[Gate]) -> list[Panel]:
    """The figure's panels: sibling 2-D rectangles on the same dimensions share one.

    Rectangle gates with the same parent and the same two dimensions (in either order,
    same compensation and transform) are drawn together, like a FlowJo quadrant gate
    (e.g. naive / central memory / effector memory / TEMRA on CCR7 x CD45RA). Every other
    gate gets its own panel; boolean gates and gates without dimensions get none.

    Parameters
    ----------
    gates
        The strategy's gates, in drawing order.

    Returns
    -------
    list of Panel
        In the order of each panel's first gate.
    """
    drawn = [g for g in gates if g.kind != "boolean" and g.dims]
    groups: dict[Hashable, list[Gate]] = {}
    for g in drawn:
        key = _pair_key(g)
        if key is not None:
            groups.setdefault(key, []).append(g)
    out: list[Panel] = []
    done: set[Hashable] = set()
    for g in drawn:
        key = _pair_key(g)
        if key is None:
            out.append(Panel((g,)))
        elif key not in done:
            done.add(key)
            out.append(Panel(tuple(groups[key])))
    return out


def _short_names(labels: Sequence[str]) -> list[str]:
    """Sibling labels without their common words and parenthesised details.

    ``["CD8 naive (CCR7+ CD45RA+)", "CD8 TEMRA (CCR7- CD45RA+)"]`` -> ``["naive", "TEMRA"]``.
    """
    words = [re.sub(r"\s*\([^)]*\)", "", s).split() for s in labels]
    if any(not w for w in words):
        return list(labels)
    pre = 0
    while all(len(w) > pre + 1 for w in words) and len({w[pre] for w in words}) == 1:
        pre += 1
    suf = 0
    while all(len(w) > pre + suf + 1 for w in words) and len({w[-1 - suf] for w in words}) == 1:
        suf += 1
    short = [" ".join(w[pre : len(w) - suf]) for w in words]
    return short if len(set(short)) == len(short) else list(labels)


# ------------------------------------------------------------------------ text
def _chars(width_in: float, points: float) -> int:
    """How many characters of ``points`` size fit in ``width_in`` inches (at least 6)."""
    return max(6, int(width_in * 72 / (points * _CHAR_EM)))


def _wrap_segments(segments: Sequence[str], width: int) -> list[str]:
    """Join segments with ``", "`` into lines of at most ``width`` characters.

    A segment is only broken when it is longer than a line by itself.
    """
    lines: list[str] = []
    for seg in segments:
        if lines and len(lines[-1]) + 2 + len(seg) <= width:
            lines[-1] += ", " + seg
        else:
            lines.extend(textwrap.wrap(seg, width) or [""])
    return lines


@dataclass(frozen=True)
class _Context:
    """What every panel needs: events, result, labels, sizes."""

    tree: GateTree
    result: GatingResult
    ev: EventCache
    markers: Mapping[str, str]
    panel_in: float
    rng: np.random.Generator

    def gate_name(self, gate_id: str | None) -> str:
        if gate_id is None:
            return "all events"
        g = self.tree.gate(gate_id)
        return g.label or g.id

    def confidence(self, gates: Sequence[Gate]) -> str | None:
        conf = [
            v for g in gates for k, v in self.result.confidence.items() if k.startswith(f"{g.id}:")
        ]
        return f"adaptive conf {min(conf):.2f}" if conf else None

    def parent_rows(self, panel: Panel) -> np.ndarray:
        if panel.parent is None:
            return np.arange(self.result.n_events)
        return np.flatnonzero(self.result.masks[panel.parent])

    def percent(self, g: Gate, parent_n: int) -> float:
        return 100.0 * self.result.counts[g.id] / parent_n if parent_n else float("nan")

    def transform(self, d: Dim) -> Any | None:
        return self.ev.transform(d.transform) if d.transform is not None else None


def _title(ctx: _Context, panel: Panel, parent_n: int, xy: Sequence[Dim]) -> str:
    """The gate (or the siblings' parent and axes), counts, parent, adaptive confidence."""
    width = _chars(ctx.panel_in * 0.8, _TITLE_PT)  # the axes' width: titles are centred on it
    conf = ctx.confidence(panel.gates)
    if panel.grouped:
        names = " \u00d7 ".join(d.name for d in xy)
        head = textwrap.wrap(f"{ctx.gate_name(panel.parent)}: {names}", width)
        counts = [f"{parent_n:,} events in parent"]
        rest = [conf] if conf else []
    else:
        g = panel.gates[0]
        head = textwrap.wrap(g.label or g.id, width)
        counts = [
            f"{ctx.result.counts[g.id]:,} events",
            f"{ctx.percent(g, parent_n):.1f}% of parent",
        ]
        rest = [f"parent: {ctx.gate_name(g.parent)}"] + ([conf] if conf else [])
    return "\n".join(head + _wrap_segments(counts, width) + _wrap_segments(rest, width))


# ------------------------------------------------------------------------ drawing
def _adapted(g: Gate, result: GatingResult) -> tuple[Dim, ...]:
    """A rectangle's dimensions with the thresholds the engine used on this sample."""
    if g.kind != "rectangle":
        return g.dims
    out = []
    for d in g.dims:
        lo = result.thresholds.get(f"{g.id}:{d.name}:min", d.min)
        hi = result.thresholds.get(f"{g.id}:{d.name}:max", d.max)
        out.append(replace(d, min=lo, max=hi))
    return tuple(out)


def _aligned(g: Gate, result: GatingResult, ref: Sequence[Dim]) -> tuple[Dim, ...]:
    """``g``'s adapted dimensions in the order of the panel's axes ``ref``."""
    dims = _adapted(g, result)
    if len(dims) == 2 and _dim_key(dims[0]) != _dim_key(ref[0]):
        return (dims[1], dims[0])
    return dims


def _sample_rows(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rows.size <= _MAX_POINTS:
        return rows
    return np.sort(rng.choice(rows, _MAX_POINTS, replace=False))


@functools.cache
def _pseudocolor() -> Colormap:
    """FlowJo-like pseudo-colour: blue (rare) through green and yellow to red (dense)."""
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

    return ListedColormap(colormaps["jet"](np.linspace(0.12, 0.95, 256)), name="pseudocolor")


def _smooth(h: np.ndarray) -> np.ndarray:
    """A 2-D histogram blurred once by the separable kernel ``[1, 2, 1] / 4``."""
    p = np.pad(h, 1)
    r = 0.25 * p[:-2, :] + 0.5 * p[1:-1, :] + 0.25 * p[2:, :]
    return 0.25 * r[:, :-2] + 0.5 * r[:, 1:-1] + 0.25 * r[:, 2:]


def _draw_events(
    ax: Axes,
    x: np.ndarray,
    y: np.ndarray,
    xl: tuple[float, float],
    yl: tuple[float, float],
    *,
    parent_n: int,
) -> None:
    """Density (large parent) or dots (small parent) of the events in view."""
    from matplotlib.colors import LogNorm

    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if not x.size:
        ax.text(0.5, 0.5, "no events", transform=ax.transAxes, ha="center", va="center")
        return
    if parent_n < SPARSE_EVENTS:
        alpha = float(np.clip(1.0 - parent_n / 2500.0, 0.35, 0.8))
        ax.scatter(x, y, s=3.0, c=_DOT_COLOR, alpha=alpha, linewidths=0, rasterized=True)
        return
    # about two pixels a bin in a 2.3-inch panel at 150 dpi; fewer for fewer events
    bins = int(np.clip(math.sqrt(x.size), 80, 140))
    h, _, _ = np.histogram2d(x, y, bins=bins, range=[xl, yl])
    if not h.any():
        return
    s = _smooth(h)
    shown = s[h > 0]
    vmax = float(shown.max())
    vmin = min(float(shown.min()), vmax / 10.0)
    ax.imshow(
        np.ma.masked_where(h == 0, s).T,
        origin="lower",
        extent=(xl[0], xl[1], yl[0], yl[1]),
        aspect="auto",
        interpolation="nearest",
        cmap=_pseudocolor(),
        norm=LogNorm(vmin=vmin, vmax=vmax),
    )


def _box(lo: float | None, hi: float | None, lim: tuple[float, float]) -> tuple[float, float]:
    """A rectangle's extent on one axis, open sides reaching past the view."""
    span = lim[1] - lim[0]
    return (
        lo if lo is not None else lim[0] - span,
        hi if hi is not None else lim[1] + span,
    )


def _anchor(
    xs: tuple[float, float],
    ys: tuple[float, float],
    xl: tuple[float, float],
    yl: tuple[float, float],
) -> tuple[float, float, str, str]:
    """Where a rectangle's label goes: the panel corner it reaches, else its middle."""
    out: list[tuple[float, str]] = []
    for (a, b), (lo, hi), names in (
        (xs, xl, ("left", "center", "right")),
        (ys, yl, ("bottom", "center", "top")),
    ):
        inset = 0.025 * (hi - lo)
        a, b = max(a, lo), min(b, hi)
        low_edge, high_edge = a <= lo, b >= hi
        if low_edge and not high_edge:
            out.append((lo + inset, names[0]))
        elif high_edge and not low_edge:
            out.append((hi - inset, names[2]))
        else:
            out.append((0.5 * (a + b), names[1]))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def _note(ax: Axes, x: float, y: float, text: str, ha: str, va: str, gid: str) -> None:
    t = ax.text(
        x,
        y,
        text,
        ha=ha,
        va=va,
        fontsize=_NOTE_PT,
        fontweight="bold",
        linespacing=1.1,
        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.7},
        zorder=5,
    )
    t.set_gid(gid)


def _shape_bounds(g: Gate, dims: Sequence[Dim]) -> tuple[list[float | None], list[float | None]]:
    """The x and y positions a gate's outline reaches (for axis limits)."""
    if g.kind == "polygon":
        v = np.asarray(g.vertices, dtype=float)
        return [float(a) for a in v[:, 0]], [float(a) for a in v[:, 1]]
    if g.kind == "rectangle":
        return [dims[0].min, dims[0].max], [dims[1].min, dims[1].max]
    cx, cy = g.mean[0], g.mean[1]
    cov = np.asarray(g.covariance, dtype=float)
    r = math.sqrt(g.distance_square) * np.sqrt(np.abs(np.diag(cov)))
    return [cx - r[0], cx + r[0]], [cy - r[1], cy + r[1]]


def _outline(ax: Axes, patch: Patch) -> None:
    """Add a gate's outline to the panel (in data units, clipped to the axes).

    As ``add_patch`` does, less the data limits it updates from the outline's path: the
    panel's limits are set from the events and gates (:func:`robust_limits`), never from
    autoscaling, and an open quadrant side reaches far past the view.
    """
    ax.add_artist(patch)


def _draw_shape(
    ax: Axes,
    g: Gate,
    dims: Sequence[Dim],
    xl: tuple[float, float],
    yl: tuple[float, float],
) -> tuple[float, float, str, str]:
    """Draw a 2-D gate's outline; return where its percentage goes."""
    from matplotlib.patches import Ellipse, Polygon, Rectangle

    style: dict[str, Any] = {"fill": False, "edgecolor": _GATE_COLOR, "linewidth": 1.2}
    if g.kind == "rectangle":
        xs = _box(dims[0].min, dims[0].max, xl)
        ys = _box(dims[1].min, dims[1].max, yl)
        _outline(ax, Rectangle((xs[0], ys[0]), xs[1] - xs[0], ys[1] - ys[0], **style))
        return _anchor(xs, ys, xl, yl)
    if g.kind == "polygon":
        _outline(ax, Polygon(np.asarray(g.vertices, dtype=float), closed=True, **style))
    else:
        cov = np.asarray(g.covariance, dtype=float)[:2, :2]
        vals, vecs = np.linalg.eigh(cov)
        angle = math.degrees(math.atan2(vecs[1, -1], vecs[0, -1]))
        w, h = 2 * np.sqrt(np.maximum(vals[::-1], 0) * g.distance_square)
        _outline(ax, Ellipse((g.mean[0], g.mean[1]), w, h, angle=angle, **style))
    bx, by = _shape_bounds(g, dims)
    x0 = max(min(float(b) for b in bx if b is not None), xl[0])
    x1 = min(max(float(b) for b in bx if b is not None), xl[1])
    top = min(max(float(b) for b in by if b is not None), yl[1])
    span = yl[1] - yl[0]
    if top < yl[1] - 0.12 * span:
        return 0.5 * (x0 + x1), top + 0.01 * span, "center", "bottom"
    return 0.5 * (x0 + x1), top - 0.02 * span, "center", "top"


def _ticks(ctx: _Context, ax: Axes, which: str, d: Dim, lim: tuple[float, float]) -> None:
    char = _TICK_PT * _CHAR_EM / 72 / (0.8 * ctx.panel_in)
    ticks = scale_ticks(ctx.transform(d), lim[0], lim[1], char_frac=char)
    apply_ticks(ax, "x" if which == "x" else "y", ticks, lim)


def _axis_text(ctx: _Context, d: Dim) -> str:
    return "\n".join(
        textwrap.wrap(axis_label(d, ctx.markers), _chars(ctx.panel_in * 0.9, _LABEL_PT))
    )


def _draw_2d(ctx: _Context, ax: Axes, panel: Panel, rows: np.ndarray, parent_n: int) -> list[Dim]:
    ref = list(_adapted(panel.gates[0], ctx.result)[:2])
    shapes = [(g, _aligned(g, ctx.result, ref)) for g in panel.gates]
    x = ctx.ev.transformed(ref[0], rows)
    y = ctx.ev.transformed(ref[1], rows)
    hard_x: list[float | None] = []
    hard_y: list[float | None] = []
    soft_x: list[float | None] = []
    soft_y: list[float | None] = []
    for g, dims in shapes:
        bx, by = _shape_bounds(g, dims)
        if g.kind == "rectangle":
            hard_x += bx
            hard_y += by
        else:
            soft_x += bx
            soft_y += by
    xl = robust_limits(x, bounds=hard_x, soft_bounds=soft_x)
    yl = robust_limits(y, bounds=hard_y, soft_bounds=soft_y)
    _draw_events(ax, x, y, xl, yl, parent_n=parent_n)
    names = _short_names([g.label or g.id for g in panel.gates]) if panel.grouped else [""]
    for (g, dims), name in zip(shapes, names, strict=True):
        px, py, ha, va = _draw_shape(ax, g, dims, xl, yl)
        pct = f"{ctx.percent(g, parent_n):.1f}%"
        if name:
            # the name wraps within the part of the panel its gate covers
            xs = _box(dims[0].min, dims[0].max, xl)
            share = (min(xs[1], xl[1]) - max(xs[0], xl[0])) / (xl[1] - xl[0])
            width = _chars(0.8 * ctx.panel_in * share * 0.8, _NOTE_PT * 1.2)  # bold glyphs
            lines = textwrap.wrap(name, width, break_long_words=False)
            if len(lines) <= 3 and all(len(line) <= width for line in lines):
                pct = "\n".join([*lines, pct])  # else the percentage alone: no overflow
        _note(ax, px, py, pct, ha, va, g.id)
    _ticks(ctx, ax, "x", ref[0], xl)
    _ticks(ctx, ax, "y", ref[1], yl)
    ax.set_ylabel(_axis_text(ctx, ref[1]), fontsize=_LABEL_PT)
    return ref


def _draw_1d(ctx: _Context, ax: Axes, g: Gate, rows: np.ndarray, parent_n: int) -> list[Dim]:
    from matplotlib.ticker import MaxNLocator
    from matplotlib.transforms import blended_transform_factory

    d = _adapted(g, ctx.result)[0]
    x = ctx.ev.transformed(d, rows)
    xl = robust_limits(x, bounds=[d.min, d.max])
    ok = np.isfinite(x)
    bins = int(np.clip(1.2 * math.sqrt(max(ok.sum(), 1)), 24, 128))
    counts, edges = np.histogram(x[ok], bins=bins, range=xl)
    ax.stairs(counts, edges, fill=True, color="#9aa7bd")
    ax.stairs(counts, edges, color="#3b4a5f", lw=0.6)
    top = float(np.max(counts)) if np.size(counts) else 1.0
    ax.set_ylim(0, 1.22 * top or 1.0)
    for b in (d.min, d.max):
        if b is not None:
            ax.axvline(b, color=_GATE_COLOR, linewidth=1.2)
    lo = max(d.min if d.min is not None else xl[0], xl[0])
    hi = min(d.max if d.max is not None else xl[1], xl[1])
    ax.axvspan(lo, hi, color="0.5", alpha=0.12, lw=0)
    blend = blended_transform_factory(ax.transData, ax.transAxes)
    pct = f"{ctx.percent(g, parent_n):.1f}%"
    t = ax.text(
        0.5 * (lo + hi),
        0.97,
        pct,
        transform=blend,
        ha="center",
        va="top",
        fontsize=_NOTE_PT,
        fontweight="bold",
    )
    t.set_gid(g.id)
    _ticks(ctx, ax, "x", d, xl)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True))
    ax.set_ylabel("count", fontsize=_LABEL_PT)
    return [d]


def _draw_panel(ctx: _Context, ax: Axes, panel: Panel) -> None:
    parent_rows = ctx.parent_rows(panel)
    rows = _sample_rows(parent_rows, ctx.rng)
    g = panel.gates[0]
    ax.tick_params(labelsize=_TICK_PT, length=3, pad=1.5)
    two_d = len(g.dims) >= 2 and g.kind in ("polygon", "rectangle", "ellipsoid")
    if two_d:
        dims = _draw_2d(ctx, ax, panel, rows, parent_rows.size)
    else:
        dims = _draw_1d(ctx, ax, g, rows, parent_rows.size)
    ax.set_xlabel(_axis_text(ctx, dims[0]), fontsize=_LABEL_PT)
    # a fixed title position skips matplotlib's per-draw search above the tick labels
    ax.set_title(
        _title(ctx, panel, parent_rows.size, dims), fontsize=_TITLE_PT, linespacing=1.15, y=1.0
    )
    ax.set_gid(",".join(p.id for p in panel.gates))
    # what is drawn inside the axes never widens the layout: skip it there (faster)
    for artist in (*ax.images, *ax.patches, *ax.collections, *ax.lines, *ax.texts):
        artist.set_in_layout(False)


def gating_figure(
    tree: GateTree,
    result: GatingResult,
    events: np.ndarray,
    channels: Sequence[str],
    *,
    markers: Sequence[str] | None = None,
    spillover: tuple[Sequence[str], np.ndarray] | None = None,
    scaling: Mapping[str, Any] | None = None,
    title: str = "",
    width: float = 10.4,
    ncols: int | None = None,
    seed: int = 0,
) -> Figure:
    """Every gate (boolean gates excepted) on its parent's events, siblings sharing panels.

    Parameters
    ----------
    tree, result
        The bound strategy and what :meth:`GateTree.apply` returned for these events.
    events, channels, markers, spillover, scaling
        The sample, as given to :meth:`GateTree.apply` (markers label the axes).
    title
        Figure title (e.g. the sample id).
    width
        Figure width in inches (saved at :data:`DPI`, it is ``width * DPI`` pixels wide:
        make it the width the figure is displayed at).
    ncols
        Panels per row; default: as many ~2.6-inch panels as fit in ``width``.
    seed
        Seed of the subsampling of large parents (at most 100,000 events drawn).

    Returns
    -------
    Figure
        Panels on an equal grid sized to their text (no layout engine); each panel's
        ``gid`` is its gate ids joined by commas, and each percentage label's ``gid`` its
        gate id.

    Raises
    ------
    GatingError
        The strategy is not bound to the sample's channels.
    """
    from matplotlib.figure import Figure

    if not tree.bound:
        from blinaprofile.errors import GatingError

        raise GatingError("bind the strategy before plotting it")
    mk = dict(zip(channels, markers, strict=True)) if markers is not None else {}
    ev = EventCache(tree, np.asarray(events), list(channels), spillover, None, scaling=scaling)
    panels = sibling_panels(tree.gates)
    n = max(1, len(panels))
    cols = ncols if ncols is not None else max(1, round(width / _PANEL_INCHES))
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    panel_in = width / cols
    fig = Figure(figsize=(width, rows * panel_in * 1.12 + (0.3 if title else 0.0)), dpi=DPI)
    head = None
    if title:
        text = "\n".join(textwrap.wrap(title, _chars(width * 0.95, 9.0)))
        head = fig.suptitle(text, fontsize=9.0)
    ctx = _Context(tree, result, ev, mk, panel_in, np.random.default_rng(seed))
    axes = []
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        _draw_panel(ctx, ax, panel)
        axes.append(ax)
    _grid_layout(fig, axes, rows, cols, head)
    return fig


def _grid_layout(
    fig: Figure, axes: Sequence[Axes], rows: int, cols: int, head: Text | None
) -> None:
    """Place the panels on a grid of equal axes, each row and column as wide as its text.

    What matplotlib's constrained layout does for this grid, measured on the few texts that
    decide it (titles, axis labels, tick labels; nothing drawn inside the axes counts) rather
    than on every artist twice: rows get the room their tallest title and x labels need,
    columns the room their widest y labels need, the figure title its own.
    """
    import matplotlib as mpl
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # the one savefig at DPI draws with
    pt = fig.dpi / 72.0
    pad = 0.04 * fig.dpi  # around the figure and between panels (inches, as before)
    title_pad = float(mpl.rcParams["axes.titlepad"]) * pt

    def size(texts: Sequence[Any]) -> tuple[float, float]:
        boxes = [t.get_window_extent(renderer) for t in texts if t.get_visible() and t.get_text()]
        return max((b.width for b in boxes), default=0.0), max(
            (b.height for b in boxes), default=0.0
        )

    left = np.zeros(cols)
    right = np.zeros(cols)
    top = np.zeros(rows)
    bottom = np.zeros(rows)

    def mark(axis: Any) -> float:  # a tick mark and the gap to its label, in pixels
        ticks = axis.get_major_ticks()[:1]
        return sum(t.get_tick_padding() + t.get_pad() for t in ticks) * pt

    for i, ax in enumerate(axes):
        r, c = divmod(i, cols)
        xw, xh = size(ax.get_xticklabels())
        yw, _ = size(ax.get_yticklabels())
        _, title_h = size([ax.title])
        _, xlabel_h = size([ax.xaxis.label])
        ylabel_w, _ = size([ax.yaxis.label])
        top[r] = max(top[r], title_h + title_pad)
        bottom[r] = max(bottom[r], mark(ax.xaxis) + xh + ax.xaxis.labelpad * pt + xlabel_h)
        left[c] = max(left[c], mark(ax.yaxis) + yw + ax.yaxis.labelpad * pt + ylabel_w)
        right[c] = max(right[c], 0.5 * xw)  # the last x label may overhang the axes
    _, head_h = size([head] if head is not None else [])
    width, height = fig.bbox.width, fig.bbox.height
    head_room = head_h + pad if head is not None and head_h else 0.0
    if head is not None:
        head.set_y(1.0 - pad / height)  # it hangs from the top margin
    w = (width - left.sum() - right.sum() - pad * (cols + 1)) / cols
    h = (height - head_room - top.sum() - bottom.sum() - pad * (rows + 1)) / rows
    if w <= 0 or h <= 0:  # the text leaves no room (a tiny figure): the plain grid stays
        return
    for i, ax in enumerate(axes):
        r, c = divmod(i, cols)
        x0 = pad * (c + 1) + left[: c + 1].sum() + right[:c].sum() + w * c
        y_top = head_room + pad * (r + 1) + top[: r + 1].sum() + bottom[:r].sum() + h * r
        ax.set_position((x0 / width, 1.0 - (y_top + h) / height, w / width, h / height))


def plot_sample(
    data: FCSData,
    strategy: GateTree | None = None,
    *,
    adaptive: bool = True,
    title: str | None = None,
    width: float = 10.4,
) -> Figure:
    """Gate an FCS sample and draw every gate (see :func:`gating_figure`).

    Parameters
    ----------
    data
        The sample.
    strategy
        The gating strategy (default: the packaged default strategy).
    adaptive
        Place adaptive thresholds on this sample.
    title
        Figure title; default: the file name and the strategy's name.
    width
        Figure width in inches.

    Returns
    -------
    Figure
    """
    from blinaprofile.gating.events import fcs_scaling
    from blinaprofile.gating.sample import gate_events
    from blinaprofile.gating.strategy import load_strategy

    strategy = strategy or load_strategy()
    bound, res = gate_events(data, strategy, adaptive=adaptive)
    return gating_figure(
        bound,
        res,
        data.events,
        data.channels,
        markers=data.markers,
        spillover=data.spillover,
        scaling=fcs_scaling(data),
        title=title if title is not None else f"{Path(data.path).name}: {bound.name}",
        width=width,
    )


def save_gating_png(fig: Figure, path: str | os.PathLike[str], *, dpi: int = DPI) -> Path:
    """Write a figure as PNG atomically.

    Parameters
    ----------
    fig
        From :func:`gating_figure`.
    path
        The PNG file (its folder is created).
    dpi
        Resolution.

    Returns
    -------
    Path
        ``path``.
    """
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", metadata={"Software": None})
    return Path(path)
