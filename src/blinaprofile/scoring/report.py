"""A self-contained HTML report of one scored sample, for lab scientists.

One file that opens offline: CSS is inline, figures are base64 PNGs, nothing refers to an
external URL. It shows the call (or "no call" and why), the responder probability with
its interval and the decision threshold, the QC verdict against the configured thresholds
with the absolute counts, the out-of-distribution check, every feature with its count and
its contribution, the sample placed against the training cohort (responders vs
nonresponders), every gate of the gating strategy drawn on the sample's events, and the
provenance (model name, version, alias; input checksum; panel; gating strategy).

Features are named in plain language with their units beside the code name
("Effector-memory CD8 T cells, % of CD8 (cd8_em_pct_cd8)"), from the one list of labels in
:data:`blinaprofile.features.schema.FEATURES`.

Printed (or saved as PDF from a browser) the report takes at most two pages: the headline,
QC, features and the cohort comparison on the first, the gating plots with the gate counts
and the provenance on the second, ending with a line for the reviewer's name and date.

The page is the Jinja2 template ``templates/report.html.j2`` rendered with autoescaping:
every value from the result is HTML-escaped and nothing is marked safe (the figures are
base64 text, which escaping leaves unchanged). Like the result it renders, the report never
contains the input file's name or FCS TEXT keywords.
"""

from __future__ import annotations

import base64
import io
import os
import re
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined

from blinaprofile.features.schema import FEATURE_INFO, MODEL_FEATURES, Feature
from blinaprofile.io.atomic import write_text
from blinaprofile.scoring.overlay import overlay_panel

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from blinaprofile.gating.gates import GatingResult
    from blinaprofile.gating.tree import GateTree
    from blinaprofile.io.read import FCSReadOptions
    from blinaprofile.scoring.helper import Helper
    from blinaprofile.scoring.score import ScoreResult

__all__ = [
    "ReportFrame",
    "cohort_png",
    "gating_figure",
    "render_report",
    "training_figure",
    "write_report",
]

_RESPONDER = "#1b7837"
_NONRESPONDER = "#b2182b"
_SAMPLE = "#2166ac"
_CALL_CLASSES = {"responder": "responder", "nonresponder": "nonresponder", "uncertain": "uncertain"}
#: the heading of the reasons box, by call state
_REASONS_TITLES = {"no call": "No call", "uncertain": "Uncertain"}
#: the report template, in ``blinaprofile/scoring/templates/``
_TEMPLATE = "report.html.j2"
#: resolution of the embedded figures (dots per inch); each is drawn at the width it is shown
_FIGURE_DPI = 150
#: width of the cohort figure in inches: the report's content width at :data:`_FIGURE_DPI`
_TRAINING_WIDTH = 7.0
#: zlib level of the embedded PNGs: faster than PIL's default (6) and, on these figures
#: (flat colours, density images), no bigger
_PNG_LEVEL = 3
_TITLE_PT = 6.3
_TICK_PT = 6.0
_CHAR_EM = 0.56  # mean glyph width of DejaVu Sans, in em
#: a sample farther than this many training ranges beyond them is drawn as an arrow at the edge
_REACH = 1.0
_SCHEMA: dict[str, Feature] = dict(FEATURE_INFO)  # schema features, then change features


# --------------------------------------------------------------------------- figures
def _png(fig: Figure, *, dpi: int = _FIGURE_DPI) -> str:
    buf = io.BytesIO()
    fig.savefig(
        buf,
        format="png",
        dpi=dpi,
        metadata={"Software": None},
        pil_kwargs={"compress_level": _PNG_LEVEL},
    )
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _feature_title(name: str) -> str:
    """``Label, units (code)`` from the schema; the code name alone for a feature it lacks."""
    f = _SCHEMA.get(name)
    return f.title if f is not None else name


def _fmt_value(name: str, value: float) -> str:
    """A feature value as the report prints it: percentages with one decimal, else two."""
    f = _SCHEMA.get(name)
    return f"{value:.1f}" if f is not None and f.unit == "pct_of_parent" else f"{value:.2f}"


def _axis_range(
    values: np.ndarray, sample: float | None, *, reach: float = _REACH, pad: float = 0.07
) -> tuple[float, float, str | None]:
    """The value axis of a cohort panel, and where the sample lies off it.

    Parameters
    ----------
    values
        The training cohort's finite values of the feature.
    sample
        The sample's value (``None`` or non-finite: not drawn).
    reach
        A sample at most ``reach`` training ranges beyond the training values extends the
        axis (it is drawn at its true position); a sample farther is off the axis.
    pad
        Margin added on both sides, as a fraction of the range.

    Returns
    -------
    tuple
        ``(low, high, off)``; ``off`` is ``"above"`` or ``"below"`` for a sample drawn as
        an arrow at that edge, ``None`` otherwise.
    """
    has_sample = sample is not None and bool(np.isfinite(sample))
    if values.size:
        lo, hi = float(values.min()), float(values.max())
    elif has_sample:
        lo = hi = float(sample)  # type: ignore[arg-type]
    else:
        lo, hi = 0.0, 1.0
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
    off = None
    if has_sample:
        s = float(sample)  # type: ignore[arg-type]
        if lo - reach * span <= s <= hi + reach * span:
            lo, hi = min(lo, s), max(hi, s)
        else:
            off = "above" if s > hi else "below"
    span = hi - lo if hi > lo else max(abs(hi), 1.0) * 0.1
    return lo - pad * span, hi + pad * span, off


def _cohort_panel(
    ax: Axes,
    name: str,
    values: np.ndarray,
    response: np.ndarray | None,
    sample: float | None,
    z: float | None,
    z_limit: float | None,
    rng: np.random.Generator,
    title_chars: int,
) -> None:
    """One feature: training responders and nonresponders (boxes, every sample a dot) and
    this sample as a line at its value, or an arrow at the edge when it is far off."""
    _cohort_background(ax, values, response, rng)
    lo, hi, off = _axis_range(values[np.isfinite(values)], sample)
    ax.set_ylim(lo, hi)
    _cohort_sample(ax, name, sample, lo, hi, off)
    _cohort_title(ax, name, z, z_limit, title_chars)


def _cohort_groups(
    values: np.ndarray, response: np.ndarray | None
) -> list[tuple[int, str, str, np.ndarray]]:
    """``(position, label, colour, finite values)`` of each training group of a panel."""
    finite = np.isfinite(values)
    if response is None:
        return [(0, "all", "#555555", values[finite])]
    groups = [(1, "R", _RESPONDER), (0, "NR", _NONRESPONDER)]
    return [
        (pos, lab, color, values[finite & (response == cls)])
        for pos, (cls, lab, color) in enumerate(groups)
    ]


def _cohort_background(
    ax: Axes, values: np.ndarray, response: np.ndarray | None, rng: np.random.Generator
) -> None:
    """What a cohort panel shows whatever the sample: the training groups (boxes, every
    sample a dot), the group ticks and the frame (the caller sets the value axis)."""
    groups = _cohort_groups(values, response)
    ticks = []
    for pos, lab, color, v in groups:
        ticks.append(f"{lab} n={v.size}")
        if v.size:
            ax.boxplot(
                [v],
                positions=[pos],
                widths=0.55,
                showfliers=False,
                medianprops={"color": color, "lw": 1.2},
                boxprops={"color": color, "lw": 0.8},
                whiskerprops={"color": color, "lw": 0.8},
                capprops={"color": color, "lw": 0.8},
            )
            jitter = rng.uniform(-0.2, 0.2, v.size)
            ax.scatter(pos + jitter, v, s=5, color=color, alpha=0.6, lw=0, zorder=2)
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xticks(range(len(groups)), ticks)
    ax.tick_params(labelsize=_TICK_PT, length=2, pad=1.5)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _cohort_sample(
    ax: Axes, name: str, sample: float | None, lo: float, hi: float, off: str | None
) -> None:
    """The sample on a cohort panel whose value axis is ``[lo, hi]``: a line labelled with
    its value, or (``off``) an arrow at that edge."""
    if sample is None or not np.isfinite(sample):
        return
    label = _fmt_value(name, sample)
    box = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85}
    if off is None:
        high = sample > lo + 0.8 * (hi - lo)  # label below the line, clear of the title
        ax.axhline(sample, color=_SAMPLE, lw=1.6, zorder=3)
        ax.annotate(
            label,
            xy=(1.0, sample),
            xycoords=("axes fraction", "data"),
            xytext=(-1, -1.5 if high else 1.5),
            textcoords="offset points",
            ha="right",
            va="top" if high else "bottom",
            fontsize=_TICK_PT,
            color=_SAMPLE,
            fontweight="bold",
            bbox=box,
            zorder=4,
        )
    else:
        edge = 1.0 if off == "above" else 0.0
        ax.axhline(hi if off == "above" else lo, color=_SAMPLE, lw=1.0, ls="--", zorder=3)
        ax.annotate(
            f"{label} (off scale)",
            xy=(0.5, edge),
            xycoords="axes fraction",
            xytext=(0.5, 0.6 if off == "above" else 0.4),
            textcoords="axes fraction",
            ha="center",
            va="center",
            fontsize=_TICK_PT,
            color=_SAMPLE,
            fontweight="bold",
            bbox=box,
            arrowprops={"arrowstyle": "-|>", "color": _SAMPLE, "lw": 1.4},
            zorder=4,
        )


def _cohort_title_lines(name: str, z: float | None, title_chars: int) -> list[str]:
    """A cohort panel's title: the feature's name and units, and the sample's robust z."""
    title = _feature_title(name)
    if z is not None and np.isfinite(z):
        title += f" z={z:+.1f}"
    return textwrap.wrap(title, title_chars)


def _cohort_title(
    ax: Axes, name: str, z: float | None, z_limit: float | None, title_chars: int
) -> None:
    """Title a cohort panel (:func:`_cohort_title_lines`; red and bold beyond the OOD limit)."""
    ax.set_title(
        "\n".join(_cohort_title_lines(name, z, title_chars)), **_cohort_title_style(z, z_limit)
    )


def _cohort_title_style(z: float | None, z_limit: float | None) -> dict[str, Any]:
    """A cohort panel title's size, colour and weight: red and bold beyond the OOD limit."""
    far = z is not None and bool(np.isfinite(z)) and z_limit is not None and abs(z) > float(z_limit)
    return {
        "fontsize": _TITLE_PT,
        "color": _NONRESPONDER if far else "black",
        "fontweight": "bold" if far else "normal",
    }


def training_figure(
    result: ScoreResult,
    training: pd.DataFrame,
    features: Sequence[str],
    *,
    ncols: int = 5,
    width: float = _TRAINING_WIDTH,
) -> Figure:
    """The sample's value of each feature against the training cohort by class.

    Each panel is one feature, titled with its plain-language name, units and code name:
    box plots of the training responders (R) and nonresponders (NR) with every training
    sample as a dot, and this sample as a blue line labelled with its value. The value axis
    covers every training sample; a sample outside them extends it (drawn at its true
    position), unless it lies more than one training range beyond, when it is an arrow at
    the edge with its value printed. The robust z against the cohort is in the corner (red
    beyond the OOD limit ``result.qc['ood_max_z']``).

    Parameters
    ----------
    result
        The scored sample (its features and robust z against the cohort).
    training
        The training cohort's features, with a ``response`` column (1 responder); without
        it the cohort is drawn as one group.
    features
        The features to draw, one panel each.
    ncols
        Panels per row.
    width
        Figure width in inches (drawn to be shown at that size; saved at 150 dpi).

    Returns
    -------
    Figure
        Constrained layout, no pyplot state.
    """
    n = len(features)
    ncol = max(1, min(ncols, n))
    nrow = max(1, int(np.ceil(n / ncol)))
    fig = _new_figure(width, 0.95 * nrow)
    fig.set_layout_engine("constrained", w_pad=0.02, h_pad=0.02, wspace=0.04, hspace=0.04)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    rng = np.random.default_rng(0)
    response = training["response"].astype(int).to_numpy() if "response" in training else None
    limit = result.qc.get("ood_max_z")
    chars = max(12, int(width / ncol * 72 / (_CHAR_EM * _TITLE_PT)))  # title characters a line
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.set_visible(False)
            continue
        f = features[k]
        _cohort_panel(
            ax,
            f,
            training[f].astype(float).to_numpy(),
            response,
            result.features.get(f),
            result.ood_z.get(f),
            limit,
            rng,
            chars,
        )
    return fig


#: Part of the key of a cached cohort background: change it when the drawing changes.
_COHORT_LAYOUT_VERSION = "1"
#: Cohort backgrounds drawn in this process: key -> (RGBA pixels, per-panel geometry).
_COHORT_BACKGROUNDS: dict[str, tuple[np.ndarray, list[dict[str, Any]]]] = {}


def cohort_png(
    result: ScoreResult,
    training: pd.DataFrame,
    features: Sequence[str],
    *,
    ncols: int = 5,
    width: float = _TRAINING_WIDTH,
) -> str:
    """:func:`training_figure` as a base64 PNG, its training-cohort background drawn once.

    The background (every panel's boxes, dots, ticks and frame, and the layout) depends
    only on the model's training cohort: it is drawn once per cohort and kept in this
    process and in the user cache (:mod:`blinaprofile.cache`, keyed by the cohort's values
    and this drawing's version); each sample adds its lines, labels and titles on top. A
    panel whose value axis the sample extends is drawn again whole in its place; a sample
    whose z would re-wrap a title gets the whole figure drawn as :func:`training_figure`
    draws it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    n = len(features)
    ncol = max(1, min(ncols, n))
    chars = max(12, int(width / ncol * 72 / (_CHAR_EM * _TITLE_PT)))
    cols = {f: training[f].astype(float).to_numpy() for f in features}
    for f in features:
        z = result.ood_z.get(f)
        if len(_cohort_title_lines(f, z, chars)) != len(_cohort_title_lines(f, 0.0, chars)):
            return _png(training_figure(result, training, features, ncols=ncols, width=width))
    response = training["response"].astype(int).to_numpy() if "response" in training else None
    back, geometry = _cohort_background_layer(cols, response, list(features), ncol, width, chars)
    fig = Figure(figsize=(back.shape[1] / _FIGURE_DPI, back.shape[0] / _FIGURE_DPI))
    fig.set_dpi(_FIGURE_DPI)
    fig.patch.set_alpha(0.0)
    limit = result.qc.get("ood_max_z")
    drawn = 0  # training values drawn before this panel: where its jitter starts
    for f, geo in zip(features, geometry, strict=True):
        values, sample, z = cols[f], result.features.get(f), result.ood_z.get(f)
        lo, hi, off = _axis_range(values[np.isfinite(values)], sample)
        if [lo, hi] != geo["ylim"]:  # the sample extends the axis: this panel anew
            # under the panel drawn anew (an Axes is at zorder 0): it hides the old one only
            blank = Rectangle(geo["region"][:2], *geo["region"][2:], fc="white", lw=0, zorder=-1)
            fig.add_artist(blank)
            rng = np.random.default_rng(0)
            rng.uniform(size=drawn)  # the state training_figure reaches this panel with
            ax = fig.add_axes(geo["position"])
            _cohort_panel(ax, f, values, response, sample, z, limit, rng, chars)
        else:  # the sample's marks alone, without an Axes (cheaper to make and draw)
            shown = sample is not None and bool(np.isfinite(sample))
            overlay_panel(
                fig,
                geo["position"],
                value=(float(sample) - lo) / (hi - lo) if shown else None,  # type: ignore[arg-type]
                off=off,
                label=_fmt_value(f, sample) if shown else "",  # type: ignore[arg-type]
                color=_SAMPLE,
                fontsize=_TICK_PT,
                title="\n".join(_cohort_title_lines(f, z, chars)),
                title_style=_cohort_title_style(z, limit),
            )
        drawn += sum(v.size for *_, v in _cohort_groups(values, response))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    top = np.asarray(canvas.buffer_rgba(), dtype=np.float32) / 255.0
    under = back.astype(np.float32) / 255.0
    alpha = top[..., 3:4]
    rgb = top[..., :3] * alpha + under[..., :3] * (1.0 - alpha)
    out = np.concatenate([rgb, np.maximum(alpha, under[..., 3:4])], axis=-1)
    from PIL import Image  # matplotlib's own PNG writer

    buf = io.BytesIO()
    pixels = np.round(out * 255.0).astype(np.uint8)
    Image.fromarray(pixels, "RGBA").save(
        buf, format="png", dpi=(_FIGURE_DPI, _FIGURE_DPI), compress_level=_PNG_LEVEL
    )
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _cohort_background_layer(
    cols: Mapping[str, np.ndarray],
    response: np.ndarray | None,
    features: list[str],
    ncol: int,
    width: float,
    chars: int,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """The cohort figure without any sample: RGBA pixels and each panel's position and
    axes (from this process, the user cache, or drawn now and cached)."""
    import hashlib
    import json

    import matplotlib

    h = hashlib.sha256()
    meta = [_COHORT_LAYOUT_VERSION, matplotlib.__version__, features, ncol, width, chars]
    h.update(json.dumps(meta).encode("utf-8"))
    for f in features:
        h.update(np.ascontiguousarray(cols[f], dtype=np.float64).tobytes())
    if response is not None:
        h.update(np.ascontiguousarray(response, dtype=np.int64).tobytes())
    key = h.hexdigest()
    if key in _COHORT_BACKGROUNDS:
        return _COHORT_BACKGROUNDS[key]
    from blinaprofile.cache import read_entry, write_entry

    entry = read_entry("report-cohort", key + ".npz")
    layer = None
    if entry is not None:
        try:
            with np.load(io.BytesIO(entry), allow_pickle=False) as z:
                layer = (z["pixels"], json.loads(bytes(z["geometry"]).decode("utf-8")))
        except (OSError, ValueError, KeyError):
            layer = None
    if layer is None:
        layer = _draw_cohort_background(cols, response, features, ncol, width, chars)
        buf = io.BytesIO()
        text = json.dumps(layer[1]).encode("utf-8")
        np.savez_compressed(buf, pixels=layer[0], geometry=np.frombuffer(text, dtype=np.uint8))
        write_entry("report-cohort", key + ".npz", buf.getvalue())
    _COHORT_BACKGROUNDS[key] = layer
    return layer


def _draw_cohort_background(
    cols: Mapping[str, np.ndarray],
    response: np.ndarray | None,
    features: list[str],
    ncol: int,
    width: float,
    chars: int,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Draw the cohort figure's background; the layout reserves each title's lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    n = len(features)
    nrow = max(1, int(np.ceil(n / ncol)))
    fig = _new_figure(width, 0.95 * nrow)
    fig.set_layout_engine("constrained", w_pad=0.02, h_pad=0.02, wspace=0.04, hspace=0.04)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    rng = np.random.default_rng(0)  # the dots where training_figure puts them
    panels = []
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.set_visible(False)
            continue
        f = features[k]
        _cohort_background(ax, cols[f], response, rng)
        lo, hi, _ = _axis_range(cols[f][np.isfinite(cols[f])], None)
        ax.set_ylim(lo, hi)
        _cohort_title(ax, f, 0.0, None, chars)  # a stand-in of the sample's title
        panels.append(ax)
    fig.set_dpi(_FIGURE_DPI)
    canvas = FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # the constrained layout, once
    fig.set_layout_engine("none")
    renderer = canvas.get_renderer()
    to_fig = fig.transFigure.inverted()
    geometry = [
        {
            "position": list(ax.get_position().bounds),
            "xlim": list(ax.get_xlim()),
            "ylim": list(ax.get_ylim()),
            # the panel with its ticks and title, which a redrawn panel covers
            "region": list(ax.get_tightbbox(renderer).transformed(to_fig).bounds),
        }
        for ax in panels
    ]
    for ax in panels:
        ax.title.set_visible(False)  # each sample draws its own
    canvas.draw()
    return np.array(canvas.buffer_rgba(), dtype=np.uint8), geometry


def _gating_png(
    path: str | os.PathLike[str], tree: GateTree, gres: GatingResult, options: FCSReadOptions
) -> str:
    """:func:`gating_figure` as a base64 PNG, the file read with ``options`` (the job a
    :mod:`~blinaprofile.scoring.helper` process runs)."""
    from blinaprofile.io.read import fcs_read_options

    with fcs_read_options(options):
        return _png(gating_figure(path, tree, gres))


def gating_figure(
    path: str | os.PathLike[str], tree: GateTree, gres: GatingResult, *, width_px: int = 1050
) -> Figure:
    """Every gate of ``tree`` drawn on the sample's events (count and % of parent).

    Parameters
    ----------
    path
        The sample's FCS file (read again for its events; its name is not shown).
    tree, gres
        The bound gating strategy and its result on this sample.
    width_px
        Width of the figure saved at :data:`blinaprofile.gating.plot.DPI`: the report's
        content width (1,140 px page less margins), so the PNG is shown unscaled.

    Returns
    -------
    Figure
        From :func:`blinaprofile.gating.plot.gating_figure`, titled with the strategy.
    """
    from blinaprofile.gating.events import fcs_scaling
    from blinaprofile.gating.plot import DPI
    from blinaprofile.gating.plot import gating_figure as plot_gates
    from blinaprofile.io.read import read_flow

    data = read_flow(path)
    return plot_gates(
        tree,
        gres,
        data.events,
        data.channels,
        markers=data.markers,
        spillover=data.spillover,
        scaling=fcs_scaling(data),
        title=f"Gating strategy '{tree.name}' on this sample",
        width=width_px / DPI,
    )


# --------------------------------------------------------------------------- HTML
@dataclass(frozen=True)
class _Gauge:
    """Positions on the probability gauge, in percent of its width."""

    point: float
    low: float
    width: float
    threshold: float


@dataclass(frozen=True)
class _Ood:
    """The feature farthest from the training cohort and the verdict against the limit."""

    feature: str
    z: float
    limit: Any
    passed: bool


@dataclass(frozen=True)
class _FeatureRow:
    """One row of the features table: names, value, counts, z and contribution."""

    name: str
    label: str
    units: str
    value: str
    counts: str
    z: float | None
    z_far: bool
    contribution: float | None
    rank: int | None
    width: float
    color: str
    direction: str


@dataclass(frozen=True)
class _GateRow:
    """One row of the gate-counts table."""

    name: str
    parent: str
    count: int
    percent: Any


@dataclass(frozen=True)
class _View:
    """Values the template shows that take more than formatting to derive from a result."""

    call_class: str
    call_reason: str
    simulated: bool
    cv_auc: str
    perm_p: str
    interval_level: int
    has_interval: bool
    gauge: _Gauge | None
    interval_method: str
    reasons_title: str
    reasons: list[str]
    qc_counts: list[dict[str, Any]]
    flags: list[str]
    ood: _Ood | None
    qc_thresholds: dict[str, Any]
    features: list[_FeatureRow]
    n_contributions: int
    training_src: str | None
    gating_src: str | None
    gates: list[_GateRow]
    channel_map: str


def _num(x: Any, nd: int = 3) -> str:
    """``x`` with ``nd`` decimals if it is a float, as text otherwise; ``-`` when missing."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return "-" if not np.isfinite(x) else f"{x:.{nd}f}"
    return str(x)


def _count(x: Any) -> str:
    """A count with thousands separators (``15,830``); ``-`` when missing."""
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "-"
    try:
        return f"{int(x):,d}"
    except (TypeError, ValueError):
        return str(x)


def _none_as_empty(x: Any) -> Any:
    """Render ``None`` as nothing (the template's ``finalize``)."""
    return "" if x is None else x


@cache
def _environment() -> Environment:
    """The Jinja2 environment of the report templates: autoescaped, strict about names."""
    env = Environment(
        loader=PackageLoader("blinaprofile.scoring", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        finalize=_none_as_empty,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = _num
    env.filters["count"] = _count
    return env


def _data_uri(png: str | None) -> str | None:
    """A data URI of a base64 PNG; autoescaping leaves it unchanged, so it is not marked safe."""
    return f"data:image/png;base64,{png}" if png else None


@cache
def _feature_pattern() -> re.Pattern[str]:
    """The schema's code names as whole words, longest first."""
    names = sorted(_SCHEMA, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")


def _name_features(text: str) -> str:
    """``text`` with every feature code name given its plain-language name and units."""
    return _feature_pattern().sub(lambda m: _feature_title(m.group(1)), text)


def _feature_counts(name: str, counts: Mapping[str, Any], qc: Mapping[str, Any]) -> str:
    """The absolute counts behind a feature: ``347 of 1,447`` (subset of its parent).

    The subset of a percentage ``<gate>_pct_<parent>`` is the gate named before ``_pct_``;
    a ratio ``<a>_<b>_ratio`` is the count of ``a`` over that of ``b``. Counts come from the
    gating (flow) or the QC columns ``n_<population>``; what neither has is left out.
    """
    f = _SCHEMA.get(name)
    if f is None or f.change:  # a change has no counts of its own
        return ""

    def n(pop: str) -> Any:
        v = counts.get(pop)
        return v if v is not None else qc.get(f"n_{pop}")

    if f.unit == "ratio" and name.endswith("_ratio"):
        a, _, b = name.removesuffix("_ratio").partition("_")
        na, nb = n(a), n(b)
        return f"{_count(na)} / {_count(nb)}" if na is not None and nb is not None else ""
    parent = n(f.parent)
    if parent is None:
        return ""
    sub = counts.get(name.split("_pct_")[0]) if f.unit == "pct_of_parent" else None
    return f"{_count(sub)} of {_count(parent)}" if sub is not None else f"of {_count(parent)}"


def _feature_rows(r: ScoreResult) -> list[_FeatureRow]:
    """Every schema feature the sample has, in schema order, with counts, z and contribution."""
    contrib = {str(t["feature"]): float(t["contribution"]) for t in r.top_features}
    ranks = {f: i + 1 for i, f in enumerate(sorted(contrib, key=lambda k: -abs(contrib[k])))}
    largest = max((abs(c) for c in contrib.values()), default=0.0) or 1.0
    limit = r.qc.get("ood_max_z")
    counts = r.gating.get("counts") or {}
    rows = []
    for f in _SCHEMA.values():  # change features (paired models) after the schema's
        v = r.features.get(f.name)
        if v is None or not np.isfinite(v):
            continue
        z = r.ood_z.get(f.name)
        z = float(z) if z is not None and np.isfinite(z) else None
        c = contrib.get(f.name)
        rows.append(
            _FeatureRow(
                name=f.name,
                label=f.label or f.name,
                units=f.units,
                value=_fmt_value(f.name, float(v)),
                counts=_feature_counts(f.name, counts, r.features),
                z=z,
                z_far=z is not None and limit is not None and abs(z) > float(limit),
                contribution=c,
                rank=ranks.get(f.name),
                width=0.0 if c is None else 60 * abs(c) / largest,
                color=_RESPONDER if (c or 0) > 0 else _NONRESPONDER,
                direction="" if c is None else ("R" if c > 0 else "NR"),
            )
        )
    return rows


def _evidence_text(model: Mapping[str, Any]) -> tuple[str, str]:
    """The model's CV ROC AUC with its 95% CI, and its permutation p, as the headline shows them."""
    auc, lo, hi = (model.get(k) for k in ("cv_roc_auc", "cv_roc_auc_ci_low", "cv_roc_auc_ci_high"))
    ci = f" [95% CI {lo:.3f}-{hi:.3f}]" if lo is not None and hi is not None else ""
    auc_text = "not recorded" if auc is None else f"{auc:.3f}{ci}"
    p, n = model.get("perm_pvalue"), model.get("n_permutations")
    p_text = "not computed" if p is None else f"{p:.3f} ({n} label permutations)"
    return auc_text, p_text


def _view(result: ScoreResult, training_png: str | None, gating_png: str | None) -> _View:
    """What the template needs beyond ``result`` itself."""
    r = result
    has_interval = r.probability_low is not None and r.probability_high is not None
    gauge = None
    if r.probability is not None:
        lo = 100 * r.probability_low if r.probability_low is not None else 0.0
        hi = 100 * r.probability_high if r.probability_high is not None else 0.0
        thr = 100 * r.threshold if r.threshold is not None else 0.0
        gauge = _Gauge(100 * r.probability, lo, max(hi - lo, 0.4), thr)
    cv_auc, perm_p = _evidence_text(r.model)
    z = {k: v for k, v in r.ood_z.items() if v is not None and np.isfinite(v)}
    ood = None
    if z:
        worst = max(z, key=lambda k: abs(z[k]))
        limit = r.qc.get("ood_max_z")
        ood = _Ood(
            _feature_title(worst), abs(z[worst]), limit, abs(z[worst]) <= float(limit or np.inf)
        )
    counts = r.gating.get("counts") or {}
    pct = r.gating.get("percent_of_parent", {})
    parents = r.gating.get("parents", {})
    gates = [_GateRow(g, parents.get(g, ""), int(n), pct.get(g)) for g, n in counts.items()]
    cmap = r.input.get("channel_map") or {}
    return _View(
        call_class=_CALL_CLASSES.get(r.call, "nocall"),
        call_reason=_name_features(r.call_reason),
        simulated=bool(r.model.get("simulated")),
        cv_auc=cv_auc,
        perm_p=perm_p,
        interval_level=int(100 * float(r.interval.get("level", 0.95))),
        has_interval=has_interval,
        gauge=gauge,
        interval_method=r.interval.get("description") or r.interval.get("note") or "",
        reasons_title=_REASONS_TITLES.get(r.call, "Notes"),
        reasons=[_name_features(x) for x in r.reasons],
        qc_counts=r.qc.get("counts") or [],
        flags=r.gating.get("flags") or [],
        ood=ood,
        qc_thresholds=r.qc.get("thresholds") or {},
        features=_feature_rows(r),
        n_contributions=len(r.top_features),
        training_src=_data_uri(training_png),
        gating_src=_data_uri(gating_png),
        gates=gates,
        channel_map=", ".join(f"{k}={v}" for k, v in cmap.items()),
    )


def render_report(
    result: ScoreResult,
    *,
    training_png: str | None = None,
    gating_png: str | None = None,
    notes: list[str] | None = None,
) -> str:
    """The report's HTML for a scored sample, from the ``report.html.j2`` template.

    Parameters
    ----------
    result
        The scored sample.
    training_png, gating_png
        Base64-encoded PNGs of :func:`training_figure` and :func:`gating_figure`, embedded
        as data URIs; ``None`` shows why the figure is missing instead.
    notes
        Lines shown at the end of the report.

    Returns
    -------
    str
        One self-contained HTML document; every value in it is HTML-escaped.
    """
    from blinaprofile import __version__ as bp_version

    return (
        _environment()
        .get_template(_TEMPLATE)
        .render(
            r=result,
            v=_view(result, training_png, gating_png),
            now=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            version=bp_version,
            notes=notes or [],
        )
    )


@dataclass(frozen=True)
class ReportFrame:
    """A written report shown inline in a notebook (Jupyter calls :meth:`_repr_html_`).

    The report is embedded whole in an ``<iframe srcdoc=...>``: its styles stay inside the
    frame, and it shows wherever the notebook is opened, however far the file is from the
    notebook server's folder.

    Parameters
    ----------
    path
        A report written by :func:`write_report`.
    height
        Height of the frame in pixels (the report scrolls inside it).
    """

    path: Path
    height: int = 900

    def _repr_html_(self) -> str:
        from html import escape

        doc = escape(Path(self.path).read_text(encoding="utf-8"), quote=True)
        return (
            f'<iframe srcdoc="{doc}" title="blinaprofile report" '
            f'style="width:100%;height:{int(self.height)}px;border:1px solid #d0d4da"></iframe>'
        )


def write_report(
    result: ScoreResult,
    path: str | os.PathLike[str],
    *,
    training: pd.DataFrame | None = None,
    helper: Helper | None = None,
) -> Path:
    """Render ``result`` (with its figures) to one HTML file, written atomically.

    Parameters
    ----------
    result
        From :func:`blinaprofile.scoring.score.score_sample` (``keep_gating=True`` for gating
        plots).
    path
        The HTML file to write.
    training
        The training cohort's features and response; default: the table stored with the
        model named in ``result.model['uri']``.
    helper
        A process from :func:`blinaprofile.scoring.helper.start_helper`: it draws the gating
        figure while this process draws the cohort figure (and is used up). Without one,
        or should it fail, both are drawn here.

    Returns
    -------
    Path
        ``path``, written with :func:`blinaprofile.io.atomic.write_text`.

    Raises
    ------
    OutputError
        The file cannot be written; ``path`` is unchanged.
    """
    from blinaprofile.io.read import current_fcs_read_options
    from blinaprofile.scoring.score import load_scoring_model

    notes: list[str] = []
    ctx = result.context
    gated = ctx is not None and ctx.tree is not None and ctx.gating is not None
    try:
        if gated and helper is not None:
            assert ctx is not None  # gated
            helper.submit(_gating_png, ctx.path, ctx.tree, ctx.gating, current_fcs_read_options())
        if training is None and result.model.get("uri"):
            training = load_scoring_model(result.model["uri"]).training
        feats = [f for f in (result.ood_z or {}) if training is not None and f in training.columns]
        if not feats and training is not None:
            feats = [f for f in MODEL_FEATURES if f in training.columns]
        training_png = None
        if training is not None and feats:
            training_png = cohort_png(result, training, feats)
        gating_png = None
        if gated:
            assert ctx is not None and ctx.tree is not None and ctx.gating is not None
            gating_png = helper.result() if helper is not None else None
            if gating_png is None:  # no helper, or it failed: drawn here
                gating_png = _gating_png(ctx.path, ctx.tree, ctx.gating, current_fcs_read_options())
        elif result.modality == "flow":
            notes.append("Gating plots need score_sample(..., keep_gating=True).")
    finally:
        if helper is not None:
            helper.close()
    text = render_report(result, training_png=training_png, gating_png=gating_png, notes=notes)
    return write_text(path, text)
