"""A self-contained HTML report of one scored sample, for lab scientists.

One file that opens offline: CSS is inline, figures are base64 PNGs, nothing refers to an
external URL. It shows the call (or "no call" and why), the responder probability with
its interval and the decision threshold, the QC verdict against the configured thresholds,
the out-of-distribution check, the features that contributed most, the sample placed
against the training cohort (responders vs nonresponders), every gate of the gating
strategy drawn on the sample's events, and the provenance (model name, version, alias;
input checksum; panel; gating strategy).

The page is the Jinja2 template ``templates/report.html.j2`` rendered with autoescaping:
every value from the result is HTML-escaped and nothing is marked safe (the figures are
base64 text, which escaping leaves unchanged). Like the result it renders, the report never
contains the input file's name or FCS TEXT keywords.
"""

from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined

from blinaprofile.io.atomic import write_text

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from blinaprofile.gating.gates import GatingResult
    from blinaprofile.gating.tree import GateTree
    from blinaprofile.scoring.score import ScoreResult

__all__ = ["gating_figure", "render_report", "training_figure", "write_report"]

_RESPONDER = "#1b7837"
_NONRESPONDER = "#b2182b"
_NOCALL = "#6b6b6b"
_CALL_COLORS = {"responder": _RESPONDER, "nonresponder": _NONRESPONDER}
#: the report template, in ``blinaprofile/scoring/templates/``
_TEMPLATE = "report.html.j2"


# --------------------------------------------------------------------------- figures
def _png(fig: Figure, *, dpi: int = 80) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def training_figure(result: ScoreResult, training: pd.DataFrame, features: list[str]) -> Figure:
    """The sample's value of each model feature against the training cohort by class.

    Parameters
    ----------
    result
        The scored sample (its features and robust z against the cohort).
    training
        The training cohort's features, with a ``response`` column (1 responder).
    features
        The features to draw, one panel each.

    Returns
    -------
    Figure
        Box plots of responders and nonresponders per feature, the sample as a line.
    """
    n = len(features)
    ncol = 5
    nrow = int(np.ceil(n / ncol))
    fig = _new_figure(2.4 * ncol, 2.1 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    rng = np.random.default_rng(0)
    y = training["response"].astype(int).to_numpy() if "response" in training else None
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.set_visible(False)
            continue
        f = features[k]
        vals = training[f].astype(float).to_numpy()
        groups = [(1, "R", _RESPONDER), (0, "NR", _NONRESPONDER)] if y is not None else []
        for pos, (cls, _lab, color) in enumerate(groups):
            v = vals[(y == cls) & np.isfinite(vals)]
            ax.boxplot(
                [v],
                positions=[pos],
                widths=0.5,
                showfliers=False,
                medianprops={"color": color},
                boxprops={"color": color},
                whiskerprops={"color": color},
                capprops={"color": color},
            )
            ax.scatter(pos + rng.uniform(-0.18, 0.18, v.size), v, s=6, color=color, alpha=0.55)
        sv = result.features.get(f)
        if sv is not None and np.isfinite(sv):
            ax.axhline(sv, color="#2166ac", lw=2)
        ax.set_xticks([0, 1], ["R", "NR"])
        z = result.ood_z.get(f)
        ztxt = f" (z={z:+.1f})" if z is not None and np.isfinite(z) else ""
        ax.set_title(f"{f}{ztxt}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        "This sample (blue line) vs the training cohort: R responders, NR nonresponders",
        fontsize=9,
    )
    return fig


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
class _Contribution:
    """One row of the top-contributions table, with its bar."""

    feature: str
    value: float
    contribution: float
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

    call_color: str
    interval_level: int
    has_interval: bool
    gauge: _Gauge | None
    straddles: bool
    interval_method: str
    qc_counts: list[dict[str, Any]]
    flags: list[str]
    ood: _Ood | None
    qc_thresholds: dict[str, Any]
    contributions: list[_Contribution]
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
    return env


def _data_uri(png: str | None) -> str | None:
    """A data URI of a base64 PNG; autoescaping leaves it unchanged, so it is not marked safe."""
    return f"data:image/png;base64,{png}" if png else None


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
    straddles = (
        r.probability_low is not None
        and r.probability_high is not None
        and r.threshold is not None
        and r.probability_low < r.threshold <= r.probability_high
    )
    z = {k: v for k, v in r.ood_z.items() if v is not None and np.isfinite(v)}
    ood = None
    if z:
        worst = max(z, key=lambda k: abs(z[k]))
        limit = r.qc.get("ood_max_z")
        ood = _Ood(worst, abs(z[worst]), limit, abs(z[worst]) <= float(limit or np.inf))
    contributions = []
    if r.top_features:
        mx = max(abs(float(t["contribution"])) for t in r.top_features) or 1.0
        for t in r.top_features:
            c = float(t["contribution"])
            contributions.append(
                _Contribution(
                    feature=str(t["feature"]),
                    value=float(t["value"]),
                    contribution=c,
                    width=120 * abs(c) / mx,
                    color=_RESPONDER if c > 0 else _NONRESPONDER,
                    direction="towards responder" if c > 0 else "towards nonresponder",
                )
            )
    counts = r.gating.get("counts") or {}
    pct = r.gating.get("percent_of_parent", {})
    parents = r.gating.get("parents", {})
    gates = [_GateRow(g, parents.get(g, ""), int(n), pct.get(g)) for g, n in counts.items()]
    cmap = r.input.get("channel_map") or {}
    return _View(
        call_color=_CALL_COLORS.get(r.call, _NOCALL),
        interval_level=int(100 * float(r.interval.get("level", 0.95))),
        has_interval=has_interval,
        gauge=gauge,
        straddles=straddles,
        interval_method=r.interval.get("description") or r.interval.get("note") or "",
        qc_counts=r.qc.get("counts") or [],
        flags=r.gating.get("flags") or [],
        ood=ood,
        qc_thresholds=r.qc.get("thresholds") or {},
        contributions=contributions,
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


def write_report(
    result: ScoreResult,
    path: str | os.PathLike[str],
    *,
    training: pd.DataFrame | None = None,
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

    Returns
    -------
    Path
        ``path``, written with :func:`blinaprofile.io.atomic.write_text`.

    Raises
    ------
    OutputError
        The file cannot be written; ``path`` is unchanged.
    """
    from blinaprofile.scoring.score import load_scoring_model

    notes: list[str] = []
    if training is None and result.model.get("uri"):
        training = load_scoring_model(result.model["uri"]).training
    feats = [f for f in (result.ood_z or {}) if training is not None and f in training.columns]
    if not feats and training is not None:
        from blinaprofile.features.schema import MODEL_FEATURES

        feats = [f for f in MODEL_FEATURES if f in training.columns]
    training_png = (
        _png(training_figure(result, training, feats)) if training is not None and feats else None
    )
    gating_png = None
    ctx = result.context
    if ctx is not None and ctx.tree is not None and ctx.gating is not None:
        gating_png = _png(gating_figure(ctx.path, ctx.tree, ctx.gating), dpi=150)
    elif result.modality == "flow":
        notes.append("Gating plots need score_sample(..., keep_gating=True).")
    text = render_report(result, training_png=training_png, gating_png=gating_png, notes=notes)
    return write_text(path, text)
