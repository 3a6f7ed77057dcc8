"""Per-sample gating figures: every gate drawn on its parent's events.

:func:`gating_figure` returns a :class:`matplotlib.figure.Figure` (no pyplot state, so
reports can embed it); :func:`save_gating_png` writes it atomically. Two-dimensional
gates (polygons, 2-D rectangles and quadrants, ellipses) are drawn on a density plot of
the parent's events; one-dimensional range gates on a histogram with their bounds. Each
panel's title gives the gate, its count and its percent of parent; adaptive thresholds
are drawn where the engine placed them, with their confidence.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blinaprofile.gating.events import EventCache
from blinaprofile.gating.gates import Dim, Gate, GatingResult
from blinaprofile.gating.tree import GateTree
from blinaprofile.io.atomic import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from blinaprofile.io.fcs import FCSData

__all__ = ["gating_figure", "plot_sample", "save_gating_png"]

_MAX_POINTS = 60_000


def _label(d: Dim, markers: Mapping[str, str]) -> str:
    if d.ratio is not None:
        return d.name
    ch = d.channel or d.name
    mk = markers.get(ch, "")
    if mk and mk != ch:
        return f"{mk} ({ch})"
    return ch


def _adapted(g: Gate, result: GatingResult) -> tuple[Dim, ...]:
    out = []
    for d in g.dims:
        lo = result.thresholds.get(f"{g.id}:{d.name}:min", d.min)
        hi = result.thresholds.get(f"{g.id}:{d.name}:max", d.max)
        out.append(replace(d, min=lo, max=hi))
    return tuple(out)


def _title(g: Gate, result: GatingResult, parent_n: int) -> str:
    n = result.counts[g.id]
    pct = 100.0 * n / parent_n if parent_n else float("nan")
    name = g.label or g.id
    if len(name) > 34:
        name = name[:33] + "…"
    conf = [v for k, v in result.confidence.items() if k.startswith(f"{g.id}:")]
    extra = f", adaptive conf {min(conf):.2f}" if conf else ""
    return f"{name}\n{n:,} events, {pct:.1f}% of parent{extra}"


def _sample_rows(rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rows.size <= _MAX_POINTS:
        return rows
    return np.sort(rng.choice(rows, _MAX_POINTS, replace=False))


def _limits(v: np.ndarray, bounds: Sequence[float | None]) -> tuple[float, float]:
    finite = v[np.isfinite(v)]
    if finite.size:
        lo, hi = (float(q) for q in np.quantile(finite, [0.001, 0.999]))
    else:
        lo, hi = 0.0, 1.0
    for b in bounds:
        if b is not None and np.isfinite(b):
            lo, hi = min(lo, b), max(hi, b)
    pad = 0.05 * (hi - lo or 1.0)
    return lo - pad, hi + pad


def _draw_2d(ax: Axes, g: Gate, dims: Sequence[Dim], x: np.ndarray, y: np.ndarray) -> None:
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Ellipse, Polygon, Rectangle

    if g.kind == "polygon":
        v = np.asarray(g.vertices, dtype=float)
        xb: list[float | None] = [float(a) for a in v[:, 0]]
        yb: list[float | None] = [float(a) for a in v[:, 1]]
    elif g.kind == "rectangle":
        xb = [dims[0].min, dims[0].max]
        yb = [dims[1].min, dims[1].max]
    else:
        cx, cy = g.mean[0], g.mean[1]
        cov = np.asarray(g.covariance, dtype=float)
        r = math.sqrt(g.distance_square) * np.sqrt(np.abs(np.diag(cov)))
        xb, yb = [cx - r[0], cx + r[0]], [cy - r[1], cy + r[1]]
    xl, yl = _limits(x, xb), _limits(y, yb)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.any():
        ax.hist2d(
            x[ok], y[ok], bins=160, range=[xl, yl], norm=LogNorm(), cmap="viridis", rasterized=True
        )
    ax.set_xlim(xl)
    ax.set_ylim(yl)
    style: dict[str, Any] = {"fill": False, "edgecolor": "red", "linewidth": 1.6}
    if g.kind == "polygon":
        ax.add_patch(Polygon(np.asarray(g.vertices, dtype=float), closed=True, **style))
    elif g.kind == "rectangle":
        x0 = dims[0].min if dims[0].min is not None else xl[0] - 1.0
        x1 = dims[0].max if dims[0].max is not None else xl[1] + 1.0
        y0 = dims[1].min if dims[1].min is not None else yl[0] - 1.0
        y1 = dims[1].max if dims[1].max is not None else yl[1] + 1.0
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, **style))
    else:
        cov = np.asarray(g.covariance, dtype=float)
        vals, vecs = np.linalg.eigh(cov)
        angle = math.degrees(math.atan2(vecs[1, -1], vecs[0, -1]))
        w, h = 2 * np.sqrt(np.maximum(vals[::-1], 0) * g.distance_square)
        ax.add_patch(Ellipse((g.mean[0], g.mean[1]), w, h, angle=angle, **style))


def _draw_1d(ax: Axes, d: Dim, x: np.ndarray) -> None:
    xl = _limits(x, [d.min, d.max])
    ok = np.isfinite(x)
    ax.hist(x[ok], bins=200, range=xl, color="0.35", histtype="stepfilled")
    ax.set_xlim(xl)
    ax.set_yscale("log")
    for b in (d.min, d.max):
        if b is not None:
            ax.axvline(b, color="red", linewidth=1.6)
    lo = d.min if d.min is not None else xl[0]
    hi = d.max if d.max is not None else xl[1]
    ax.axvspan(lo, hi, color="red", alpha=0.08)
    ax.set_ylabel("events")


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
    ncols: int = 4,
    seed: int = 0,
) -> Figure:
    """One panel per gate (boolean gates excepted) on its parent's events.

    Parameters
    ----------
    tree, result
        The bound strategy and what :meth:`GateTree.apply` returned for these events.
    events, channels, markers, spillover, scaling
        The sample, as given to :meth:`GateTree.apply` (markers label the axes).
    title
        Figure title (e.g. the sample id).
    ncols
        Panels per row.
    seed
        Seed of the subsampling of large parents (at most 60,000 events drawn).
    """
    from matplotlib.figure import Figure

    if not tree.bound:
        from blinaprofile.errors import GatingError

        raise GatingError("bind the strategy before plotting it")
    mk = dict(zip(channels, markers, strict=True)) if markers is not None else {}
    ev = EventCache(tree, np.asarray(events), list(channels), spillover, None, scaling=scaling)
    gates = [g for g in tree.gates if g.kind != "boolean" and g.dims]
    n = max(1, len(gates))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.9 * nrows), layout="constrained")
    if title:
        fig.suptitle(title)
    rng = np.random.default_rng(seed)
    all_rows = np.arange(result.n_events)
    for i, g in enumerate(gates):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        parent_rows = np.flatnonzero(result.masks[g.parent]) if g.parent else all_rows
        rows = _sample_rows(parent_rows, rng)
        dims = _adapted(g, result) if g.kind == "rectangle" else g.dims
        if len(dims) >= 2 and g.kind in ("polygon", "rectangle", "ellipsoid"):
            x = ev.transformed(dims[0], rows)
            y = ev.transformed(dims[1], rows)
            _draw_2d(ax, g, dims, x, y)
            ax.set_xlabel(_label(dims[0], mk))
            ax.set_ylabel(_label(dims[1], mk))
        else:
            x = ev.transformed(dims[0], rows)
            _draw_1d(ax, dims[0], x)
            ax.set_xlabel(_label(dims[0], mk))
        parent_name = g.parent or "all events"
        ax.set_title(_title(g, result, parent_rows.size) + f"\nparent: {parent_name}", fontsize=9)
    return fig


def plot_sample(
    data: FCSData,
    strategy: GateTree | None = None,
    *,
    adaptive: bool = False,
    title: str | None = None,
) -> Figure:
    """Gate an FCS sample and draw every gate (see :func:`gating_figure`)."""
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
    )


def save_gating_png(fig: Figure, path: str | os.PathLike[str], *, dpi: int = 90) -> Path:
    """Write a figure as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return Path(path)
