"""Per-sample gating figures: FlowJo-like axes, quadrant panels, sparse parents, layout."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

from blinaprofile.gating.axes import format_decade, scale_ticks
from blinaprofile.gating.events import fcs_scaling
from blinaprofile.gating.plot import DPI, gating_figure, plot_sample, save_gating_png
from blinaprofile.gating.sample import gate_events
from blinaprofile.gating.strategy import load_strategy
from blinaprofile.gating.transforms import AsinhTransform, LinearTransform, LogicleTransform
from blinaprofile.io.fcs import read_fcs

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LOGICLE = LogicleTransform(t=262144, w=0.5, m=4.5, a=0)
DECADE = re.compile(r"^(0|\u2212?10[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+)$")
PCT = re.compile(r"(\d+\.\d)%")
MEMORY = ("naive", "cm", "em", "temra")


def _gated(f: Path, n_events: int | None = None):
    data = read_fcs(f)
    if n_events is not None:
        data = dataclasses.replace(data, events=data.events[:n_events])
    bound, res = gate_events(data, load_strategy(), adaptive=True)
    return data, bound, res


def _figure(data, bound, res, **kw):
    return gating_figure(
        bound,
        res,
        data.events,
        data.channels,
        markers=data.markers,
        spillover=data.spillover,
        scaling=fcs_scaling(data),
        **kw,
    )


def _panels(fig: Figure) -> dict[str, Axes]:
    """Gate ids (comma-joined) -> panel."""
    return {str(ax.get_gid()): ax for ax in fig.get_axes()}


def _labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks if t.get_text()]


@pytest.fixture(scope="module")
def sample(small_cohort):
    return _gated(sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0])


@pytest.fixture(scope="module")
def figure(sample):
    data, bound, res = sample
    return _figure(data, bound, res, title="sample", width=7.0)


def test_every_gate_is_drawn_once_with_its_percent(sample, figure, tmp_path: Path) -> None:
    _, bound, res = sample
    panels = _panels(figure)
    drawn = [gid for key in panels for gid in key.split(",")]
    gates = [g for g in bound.gates if g.kind != "boolean"]
    assert sorted(drawn) == sorted(g.id for g in gates)
    assert len(panels) < len(gates)  # siblings share panels
    pct = res.parent_percent(bound)
    for key, ax in panels.items():
        notes = {t.get_gid(): t.get_text() for t in ax.texts}
        for gid in key.split(","):
            assert f"{pct[gid]:.1f}%" in notes[gid], (gid, notes)
        if "," not in key:  # a gate of its own: count and percent in the title
            title = ax.get_title()
            assert f"{res.counts[key]:,} events" in title and f"{pct[key]:.1f}% of parent" in title
            g = bound.gate(key)
            assert ax.patches if len(g.dims) == 2 or g.kind == "polygon" else ax.lines
    assert any("adaptive conf" in ax.get_title() for ax in panels.values())
    labels = {ax.get_xlabel() for ax in panels.values()} | {
        ax.get_ylabel() for ax in panels.values()
    }
    assert {"TIM-3 (PE-A)", "CCR7 (BV421-A)", "CD45RA (FITC-A)", "FSC-A"} <= labels
    out = save_gating_png(figure, tmp_path / "plots" / "sample.png")
    from PIL import Image

    with Image.open(out) as im:
        assert im.info["dpi"][0] == pytest.approx(150, abs=0.5) and DPI >= 150
        assert im.size[0] == round(7.0 * DPI)
    assert not list(out.parent.glob("*.tmp"))


def test_logicle_axes_show_decades_at_transformed_positions(sample, figure) -> None:
    ax = _panels(figure)["cd3"]
    labels = _labels(ax.get_xticklabels())
    assert labels and all(DECADE.match(s) for s in labels), labels
    assert {"0", "10\u00b3", "10\u2074"} <= set(labels)
    for tick, text in zip(
        ax.get_xticks(), (t.get_text() for t in ax.get_xticklabels()), strict=True
    ):
        if text:
            raw = 0.0 if text == "0" else float(format_decade_value(text))
            assert tick == pytest.approx(float(LOGICLE.apply(np.array([raw]))[0]), abs=1e-9)
    # linear scatter axes in thousands
    lymph = _panels(figure)["lymphocytes"]
    scatter = _labels(lymph.get_xticklabels())
    assert scatter and all(re.fullmatch(r"0|\d+K", s) for s in scatter), scatter
    # minor ticks (2..9 x 10^k) are drawn
    assert any(line.get_gid() == "minor-xticks" for line in ax.lines)


def format_decade_value(text: str) -> float:
    """The raw value of a decade label (inverse of ``format_decade``)."""
    sup = str.maketrans(
        "\u2070\u00b9\u00b2\u00b3\u2074\u2075\u2076\u2077\u2078\u2079", "0123456789"
    )
    sign = -1.0 if text.startswith("\u2212") else 1.0
    k = int(text.lstrip("\u2212")[2:].translate(sup))
    return sign * 10.0**k


def test_scale_ticks_decades_minors_and_negative_decades() -> None:
    t = scale_ticks(LOGICLE, 0.05, 1.0, char_frac=0.02)
    assert [s for s in t.labels if s] == ["0", "10\u00b2", "10\u00b3", "10\u2074", "10\u2075"]
    expect = LOGICLE.apply(np.array([1e3, 2e3, 5e3]))
    assert expect[0] in t.major
    assert np.isclose(t.minor, expect[1]).any() and np.isclose(t.minor, expect[2]).any()
    assert "\u221210\u00b2" in scale_ticks(LOGICLE, -0.1, 1.0, char_frac=0.02).labels
    neg = scale_ticks(LOGICLE, -0.5, 1.0, char_frac=0.02)
    assert "\u221210\u00b3" in neg.labels  # the scale shows -1,000
    assert format_decade(-1000.0) == "\u221210\u00b3"
    asinh = scale_ticks(AsinhTransform(t=262144, m=4.5, a=0), -0.2, 1.0, char_frac=0.02)
    assert {"0", "10\u00b3", "10\u2075"} <= set(asinh.labels)
    lin = scale_ticks(LinearTransform(t=262144, a=0), 0.0, 0.8, char_frac=0.02)
    assert "100K" in lin.labels and "200K" in lin.labels


def test_one_quadrant_panel_per_lineage(sample, figure) -> None:
    res = sample[2]
    panels = _panels(figure)
    for lineage in ("cd4", "cd8"):
        ids = [f"{lineage}_{s}" for s in MEMORY]
        mine = [key for key in panels if set(ids) <= set(key.split(","))]
        assert len(mine) == 1, (lineage, list(panels))
        ax = panels[mine[0]]
        notes = {t.get_gid(): t.get_text() for t in ax.texts}
        values = [float(PCT.findall(notes[i])[-1]) for i in ids]
        assert sum(values) == pytest.approx(100.0, abs=0.5)
        assert 100.0 * sum(res.counts[i] for i in ids) / res.counts[lineage] == pytest.approx(
            100.0, abs=0.01
        )
        assert ax.get_xlabel() == "CCR7 (BV421-A)" and ax.get_ylabel() == "CD45RA (FITC-A)"
        assert "naive" in notes[f"{lineage}_naive"] and "TEMRA" in notes[f"{lineage}_temra"]
        # each label in its own corner of the panel
        corners = {(t.get_horizontalalignment(), t.get_verticalalignment()) for t in ax.texts}
        assert len(corners) == 4
    # nothing else is drawn four times over
    xy = [(ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) for ax in panels.values()]
    assert len(set(xy)) == len(xy)


def test_sparse_parents_are_dots_large_parents_a_density(small_cohort, figure) -> None:
    from matplotlib.collections import PathCollection
    from matplotlib.image import AxesImage

    big = _panels(figure)["lymphocytes"]
    assert any(isinstance(a, AxesImage) for a in big.get_children())
    assert not any(isinstance(c, PathCollection) for c in big.collections)
    data, bound, res = _gated(sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0], 1_500)
    fig = _figure(data, bound, res, width=7.0)
    two_d = [ax for ax in fig.get_axes() if ax.get_ylabel() != "count"]
    assert two_d
    for ax in two_d:
        assert any(isinstance(c, PathCollection) for c in ax.collections), ax.get_gid()
        assert not ax.images, ax.get_gid()


def test_long_titles_wrap_inside_the_figure(sample, tmp_path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    data, bound, res = sample
    long = "CD8 effector memory T cells re-expressing CD45RA (TEMRA) xyz"
    assert len(long) == 60
    tree = dataclasses.replace(
        bound, gates=[dataclasses.replace(g, label=long) for g in bound.gates]
    )
    fig = _figure(data, tree, res, title="a sample title " * 8, width=7.0)
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text()]
    assert len(texts) > 50
    for t in texts:
        bb = t.get_window_extent(renderer)
        assert (
            bb.x0 >= box.x0 - 1
            and bb.x1 <= box.x1 + 1
            and bb.y0 >= box.y0 - 1
            and bb.y1 <= box.y1 + 1
        ), (t.get_text(), bb, box)
    titles = [ax.get_title() for ax in fig.get_axes() if "," not in ax.get_gid()]
    assert all("\n" in tt.split(" events")[0] for tt in titles)  # the label wrapped
    assert all("\u2026" not in tt and "(TEMRA) xyz" in tt.replace("\n", " ") for tt in titles)
    save_gating_png(fig, tmp_path / "long.png")


def test_plot_sample_draws_ellipses_and_polygons_from_gatingml(
    shared_data: Path, tmp_path: Path
) -> None:
    from blinaprofile.gating.interop import load_gatingml
    from blinaprofile.gating.plot import sibling_panels

    gml = shared_data / "gatingml2-compliance"
    data = read_fcs(gml / "data1.fcs")
    tree = load_gatingml(gml / "gml" / "gml_boolean_and2_gate.xml")
    fig = plot_sample(data, tree)
    assert len(fig.get_axes()) == len(sibling_panels(tree.gates))
    names = [type(p).__name__ for ax in fig.get_axes() for p in ax.patches]
    assert "Ellipse" in names and "Polygon" in names
    png = save_gating_png(fig, tmp_path / "gml.png")
    assert png.stat().st_size > 10_000
    assert np.isfinite(fig.get_size_inches()).all()
