"""A sample's marks on a cached cohort panel, drawn on the figure without an ``Axes``.

The report's cohort figure is a cached background (every panel's boxes, dots, ticks and
frame) with each sample's line, value label and title drawn on top. Those few marks used to
get an invisible ``Axes`` per panel, and an ``Axes`` costs more to make and draw (its ticks,
spines and layout bookkeeping) than everything drawn in it. Here they are figure artists
placed through the same transforms an ``Axes`` would give them: ``axes fraction`` is the
panel's box in the figure, the title sits ``axes.titlepad`` points above the panel's top
edge with the alignment an ``Axes`` title has, and lines are clipped to the panel as
``axhline`` is. The pixels are those the ``Axes`` drew.

Nothing here imports matplotlib at module level.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["overlay_panel"]


def overlay_panel(
    fig: Figure,
    position: Sequence[float],
    *,
    value: float | None,
    off: str | None,
    label: str,
    color: str,
    fontsize: float,
    title: str,
    title_style: Mapping[str, Any],
) -> None:
    """Draw one sample's marks on the panel at ``position`` (figure fraction).

    Parameters
    ----------
    fig
        The overlay figure (the size of the cached background).
    position
        ``(x0, y0, width, height)`` of the panel's axes in figure fraction.
    value
        The sample's value as a fraction of the panel's height (``None``: not drawn).
    off
        ``"above"`` or ``"below"``: the sample is off the value axis and drawn as an arrow
        at that edge with ``label`` and "(off scale)".
    label, color, fontsize
        The value's text, its colour and size in points.
    title, title_style
        The panel's title and its text properties (``fontsize``, ``color``, ``fontweight``).
    """
    import matplotlib as mpl
    from matplotlib.lines import Line2D
    from matplotlib.text import Annotation, Text
    from matplotlib.transforms import (
        Bbox,
        BboxTransformTo,
        IdentityTransform,
        ScaledTranslation,
        TransformedBbox,
    )

    box = TransformedBbox(Bbox.from_bounds(*position), fig.transFigure)
    axes_frac = BboxTransformTo(box)  # what ``ax.transAxes`` is for a panel at ``position``
    pad = float(mpl.rcParams["axes.titlepad"])
    head = Text(
        0.5,
        1.0,
        title,
        horizontalalignment="center",
        verticalalignment="baseline",
        linespacing=None,
        **title_style,
    )
    head.set_transform(axes_frac + ScaledTranslation(0.0, pad / 72, fig.dpi_scale_trans))
    fig.add_artist(head)
    if value is None:
        return
    note = {"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85}
    text: dict[str, Any] = {
        "fontsize": fontsize,
        "color": color,
        "fontweight": "bold",
        "bbox": note,
        "zorder": 4,
    }
    if off is None:
        line = Line2D([0.0, 1.0], [value, value], color=color, lw=1.6, zorder=3)
        high = value > 0.8  # label below the line, clear of the title
        ann = Annotation(
            label,
            xy=(1.0, value),
            xycoords=axes_frac,
            xytext=(-1, -1.5 if high else 1.5),
            textcoords="offset points",
            ha="right",
            va="top" if high else "bottom",
            **text,
        )
    else:
        edge = 1.0 if off == "above" else 0.0
        line = Line2D([0.0, 1.0], [edge, edge], color=color, lw=1.0, ls="--", zorder=3)
        ann = Annotation(
            f"{label} (off scale)",
            xy=(0.5, edge),
            xycoords=axes_frac,
            xytext=(0.5, 0.6 if off == "above" else 0.4),
            textcoords=axes_frac,
            ha="center",
            va="center",
            arrowprops={"arrowstyle": "-|>", "color": color, "lw": 1.4},
            **text,
        )
    line.set_transform(axes_frac)
    line.set_clip_box(box)  # as ``axhline`` is clipped to its axes
    fig.add_artist(line)
    ann.set_transform(IdentityTransform())  # as ``Axes.annotate`` sets it
    fig.add_artist(ann)
