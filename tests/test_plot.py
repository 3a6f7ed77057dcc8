"""Per-sample gating figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from blinaprofile.gating.events import fcs_scaling
from blinaprofile.gating.plot import gating_figure, plot_sample, save_gating_png
from blinaprofile.gating.sample import gate_events
from blinaprofile.gating.strategy import load_strategy
from blinaprofile.io.fcs import read_fcs


def test_every_gate_has_a_panel_with_count_and_percent(small_cohort, tmp_path: Path) -> None:
    f = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    data = read_fcs(f)
    bound, res = gate_events(data, load_strategy(), adaptive=True)
    fig = gating_figure(
        bound,
        res,
        data.events,
        data.channels,
        markers=data.markers,
        spillover=data.spillover,
        scaling=fcs_scaling(data),
        title=f.stem,
    )
    axes = fig.get_axes()
    assert len(axes) == len(bound.gates)
    pct = res.parent_percent(bound)
    for ax, g in zip(axes, bound.gates, strict=True):
        title = ax.get_title()
        assert f"{res.counts[g.id]:,} events" in title, title
        assert f"{pct[g.id]:.1f}% of parent" in title, title
        two_d = g.kind == "polygon" or len(g.dims) == 2
        if two_d:
            assert ax.patches, f"gate {g.id} not drawn"  # polygon / rectangle outline
        else:
            assert ax.lines, f"bound of {g.id} not drawn"  # threshold line(s)
    # adaptive gates show the confidence of their placement
    assert any("adaptive conf" in ax.get_title() for ax in axes)
    # axis labels name marker and channel
    labels = {ax.get_xlabel() for ax in axes} | {ax.get_ylabel() for ax in axes}
    assert "TIM-3 (PE-A)" in labels
    out = save_gating_png(fig, tmp_path / "plots" / f"{f.stem}.png")
    blob = out.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 50_000
    assert not list(out.parent.glob("*.tmp"))


def test_plot_sample_draws_ellipses_and_polygons_from_gatingml(
    shared_data: Path, tmp_path: Path
) -> None:
    from blinaprofile.gating.interop import load_gatingml

    gml = shared_data / "gatingml2-compliance"
    data = read_fcs(gml / "data1.fcs")
    tree = load_gatingml(gml / "gml" / "gml_boolean_and2_gate.xml")
    fig = plot_sample(data, tree)
    kinds = {g.id: g.kind for g in tree.gates if g.kind != "boolean"}
    assert len(fig.get_axes()) == len(kinds)
    names = [type(p).__name__ for ax in fig.get_axes() for p in ax.patches]
    assert "Ellipse" in names and "Polygon" in names
    png = save_gating_png(fig, tmp_path / "gml.png")
    assert png.stat().st_size > 10_000
    assert np.isfinite(fig.get_size_inches()).all()
