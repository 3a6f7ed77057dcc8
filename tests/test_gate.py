"""The gate-tree engine: per-event identity with FlowKit, gate kinds, binding, export."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import blinaprofile.gating.transforms as tr
from blinaprofile.errors import GatingError, PanelMismatchError
from blinaprofile.gating.events import fcs_scaling, points_in_polygon
from blinaprofile.gating.gates import FCS_COMP, UNCOMPENSATED, Dim, Gate
from blinaprofile.gating.interop import gatingml_text, load_gatingml, rename_gates
from blinaprofile.gating.sample import gate_events
from blinaprofile.gating.strategy import load_strategy
from blinaprofile.gating.tree import GateTree
from blinaprofile.io.fcs import read_fcs
from blinaprofile.io.fcs_write import write_fcs


def _flowkit_sample(path: Path, **kw):
    import flowkit as fk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fk.Sample(str(path), **kw)


def _assert_identical_to_flowkit(bound: GateTree, res, sample) -> dict[str, int]:
    # the strategy as applied to this sample (per-sample placement moved its thresholds)
    fkres = bound.placed(res).to_flowkit().gate_sample(sample)
    for g in bound.gates:
        fk_mask = fkres.get_gate_membership(g.id)
        diff = int((fk_mask != res.masks[g.id]).sum())
        assert diff == 0, f"gate {g.id}: {diff} events differ from FlowKit"
    return {g.id: int(res.counts[g.id]) for g in bound.gates}


def test_default_strategy_identical_to_flowkit_on_simulated_cohort(small_cohort) -> None:
    files = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))
    assert len(files) == 8
    strategy = load_strategy()
    for f in files:
        data = read_fcs(f)
        bound, res = gate_events(data, strategy)
        counts = _assert_identical_to_flowkit(bound, res, _flowkit_sample(f))
        assert counts["cd3"] > 0 and counts["cd8"] > 0 and counts["cd8_em"] > 0
    print(f"\n{len(files)} simulated files x {len(strategy.gates)} gates: identical to FlowKit")


def _exact_flowkit_values(data, channel: str, transform) -> np.ndarray:
    """A channel compensated and transformed with FlowKit's/flowutils' own code."""
    import flowutils

    det, spill = data.spillover
    cols = [data.channels.index(c) for c in det]
    comp = flowutils.compensate.compensate(np.asarray(data.events, dtype=np.float64), spill, cols)
    return np.asarray(transform.to_flowkit().apply(comp[:, [data.channels.index(channel)]]))[:, 0]


def _real_tree(data) -> GateTree:
    """Every gate kind on compensated logicle/asinh channels of a real file, with bounds
    placed exactly on event values (ties must be decided as FlowKit decides them)."""
    det = list(data.spillover[0])
    lgc = tr.LogicleTransform(t=262144.0, w=0.5, m=4.5, a=0.0)
    ash = tr.AsinhTransform(t=262144.0, m=4.5, a=0.0)
    lin = tr.LinearTransform(t=262144.0, a=0.0)
    a, b, c, e = det[0], det[1], det[2], det[3]
    va = _exact_flowkit_values(data, a, lgc)
    vb = _exact_flowkit_values(data, b, lgc)
    vc = _exact_flowkit_values(data, c, lgc)
    ve = _exact_flowkit_values(data, e, ash)
    vc_asinh = _exact_flowkit_values(data, c, ash)
    h = "FSC-H" if "FSC-H" in data.channels else "FSC-W"
    fsc = np.asarray(data.events[:, data.channels.index("FSC-A")]) / 262144.0
    # bounds equal to actual event values
    t_a = float(np.sort(va)[va.size // 2])
    t_e = float(np.sort(ve)[int(ve.size * 0.8)])
    qb = np.quantile(vb, [0.1, 0.9])
    qc = np.quantile(vc, [0.1, 0.9])
    mean = (float(np.median(vc_asinh)), float(np.median(ve)))
    cov = np.cov(np.vstack([vc_asinh, ve]))
    f0, f1 = np.quantile(fsc, [0.02, 0.98])

    def D(ch: str, t: str | None, comp: str = FCS_COMP, lo=None, hi=None) -> Dim:
        return Dim(name=ch, compensation=comp, transform=t, min=lo, max=hi)

    gates = [
        Gate(
            "cells",
            "polygon",
            (D("FSC-A", "lin", UNCOMPENSATED), D(h, "lin", UNCOMPENSATED)),
            vertices=((f0, 0.0), (f1, 0.0), (f1, 1.0), (f0, 1.0)),
        ),
        Gate("a_pos", "rectangle", (D(a, "lgc", lo=t_a),), "cells"),
        Gate(
            "bc",
            "polygon",
            (D(b, "lgc"), D(c, "lgc")),
            "cells",
            vertices=(
                (qb[0], qc[0]),
                (qb[1], qc[0] + 0.02),
                (qb[1] - 0.01, qc[1]),
                (qb[0] + 0.03, qc[1] - 0.01),
            ),
        ),
        Gate(
            "bc_out",
            "polygon",
            (D(b, "lgc"), D(c, "lgc")),
            "cells",
            vertices=((qb[0], qc[0]), (qb[1], qc[0]), (qb[1], qc[1])),
            complement=True,
        ),
        Gate(
            "ell",
            "ellipsoid",
            (D(c, "ash"), D(e, "ash")),
            "a_pos",
            mean=mean,
            covariance=tuple(tuple(float(x) for x in row) for row in cov),
            distance_square=2.0,
        ),
        Gate(
            "e_low", "rectangle", (D(e, "ash", hi=t_e), D(a, None, UNCOMPENSATED, lo=0.0)), "a_pos"
        ),
        Gate("bool_and", "boolean", (), "cells", op="and", refs=(("a_pos", False), ("bc", True))),
        Gate("bool_or", "boolean", (), None, op="or", refs=(("ell", False), ("e_low", False))),
        Gate("bool_not", "boolean", (), "cells", op="not", refs=(("bc", False),)),
    ]
    return GateTree(name="real", gates=gates, transforms={"lgc": lgc, "ash": ash, "lin": lin})


@pytest.mark.parametrize("name", ["100715.fcs", "test_comp_example.fcs"])
def test_every_gate_kind_identical_to_flowkit_on_real_files(shared_data: Path, name: str) -> None:
    path = shared_data / "real-fcs" / name
    data = read_fcs(path)
    tree = _real_tree(data)
    bound, res = gate_events(data, tree)
    sample = _flowkit_sample(path, ignore_offset_error=True)
    counts = _assert_identical_to_flowkit(bound, res, sample)
    print(f"\n{name}: identical to FlowKit, counts {counts}")
    assert 0 < counts["a_pos"] < counts["cells"]
    assert 0 < counts["ell"] < counts["a_pos"] and 0 < counts["bc"] < counts["cells"]


def test_default_strategy_identical_to_flowkit_on_real_file_markers(shared_data: Path) -> None:
    """A marker-based YAML strategy bound to a real file through synonyms."""
    path = shared_data / "real-fcs" / "100715.fcs"
    data = read_fcs(path)
    root = Path(__file__).resolve().parents[1]
    strategy = load_strategy(root / "configs" / "gating" / "memory_cd45ro.yaml")
    bound, res = gate_events(data, strategy)
    counts = _assert_identical_to_flowkit(bound, res, _flowkit_sample(path))
    assert bound.channel_map()["CCR7"] == "G610-A" and bound.channel_map()["CD14"] == "V450-A"
    assert counts["cd3"] > 1000 and counts["cd4"] > 0 and counts["cd8"] > 0
    print(f"\n100715.fcs with memory_cd45ro.yaml: {counts}")


def test_lazy_compensation_on_small_parent_equals_full(small_cohort) -> None:
    """Compensating only the rows a deep gate needs gives the same masks."""
    f = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    data = read_fcs(f)
    bound = load_strategy().bind(data.channels, data.markers)
    full = bound.apply(data.events, data.channels, spillover=data.spillover)
    # float32 events and a tree whose first compensated gate sits below a narrow parent
    narrow = [g for g in bound.gates]
    first = narrow[0]
    narrow[0] = Gate(
        first.id, "rectangle", (Dim("FSC-A", "FSC-A", UNCOMPENSATED, "scatter", 0.25, 0.26),)
    )
    small = GateTree("narrow", narrow, bound.transforms, bound=True)
    res32 = small.apply(data.events.astype(np.float32), data.channels, spillover=data.spillover)
    res64 = small.apply(data.events, data.channels, spillover=data.spillover)
    assert res64.counts["lymphocytes"] < 0.3 * res64.n_events
    for gid in small.gate_ids:
        assert np.array_equal(res32.masks[gid], res64.masks[gid]), gid
    assert full.counts["cd3"] > res64.counts["cd3"] > 0


def test_points_in_polygon_matches_flowutils_including_self_intersecting() -> None:
    from flowutils import gating

    rng = np.random.default_rng(3)
    pts = rng.uniform(-0.2, 1.2, size=(50_000, 2))
    # a bow-tie and a star: crossing edges, horizontal edges, vertices on the grid
    polys = [
        np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]),
        np.array([[0.5, 0.0], [0.6, 0.8], [0.0, 0.3], [1.0, 0.3], [0.4, 0.8]]),
        np.array([[0.1, 0.1], [0.9, 0.1], [0.9, 0.9], [0.5, 0.5], [0.1, 0.9]]),
    ]
    grid = np.round(pts * 10) / 10  # many points exactly on vertices and edges
    for v in polys:
        for p in (pts, grid):
            ours = points_in_polygon(v, p[:, 0], p[:, 1])
            theirs = gating.points_in_polygon(v, p)
            assert np.array_equal(ours, theirs)


def test_fcs_scaling_matches_flowkit_raw_events(shared_data: Path) -> None:
    """$PnG gain and $PnE log decoding as FlowKit's 'raw' events."""
    path = shared_data / "gatingml2-compliance" / "data1.fcs"
    data = read_fcs(path)
    scaling = fcs_scaling(data)
    assert "FSC-H" in scaling and "FL1-H" in scaling  # gain 3.67, 4-decade log
    sample = _flowkit_sample(path)
    raw = sample.get_events(source="raw")
    for j, ch in enumerate(data.channels):
        ours = scaling[ch](data.events[:, j]) if ch in scaling else data.events[:, j]
        assert np.array_equal(ours, raw[:, j]), ch


def test_panel_mismatch_names_missing_marker_and_file_channels(small_cohort) -> None:
    f = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    data = read_fcs(f)
    markers = ["" if m == "TIM-3" else m for m in data.markers]
    with pytest.raises(PanelMismatchError) as ei:
        load_strategy().bind(data.channels, markers, path=str(f))
    msg = str(ei.value)
    assert "TIM3" in msg and "PE-A" in msg and f.name in msg


def test_unbound_and_missing_spillover_errors(small_cohort) -> None:
    f = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    data = read_fcs(f)
    with pytest.raises(GatingError, match="bound"):
        load_strategy().apply(data.events, data.channels)
    bound = load_strategy().bind(data.channels, data.markers)
    with pytest.raises(GatingError, match="SPILLOVER"):
        bound.apply(data.events, data.channels, spillover=None, path=str(f))


def test_gatingml_export_roundtrip_keeps_membership(small_cohort, tmp_path: Path) -> None:
    f = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[1]
    data = read_fcs(f)
    bound, res = gate_events(data, load_strategy())
    placed = bound.placed(res)  # the strategy as applied to this sample
    out = placed.export_gatingml(tmp_path / "strategy.xml")
    back = load_gatingml(out)
    assert gatingml_text(placed) == out.read_text(encoding="utf-8")
    assert sorted(back.gate_ids) == sorted(bound.gate_ids)
    assert all(back.gate(g.id).parent == g.parent for g in bound.gates)
    _, res2 = gate_events(data, back)
    for gid in bound.gate_ids:
        assert np.array_equal(res.masks[gid], res2.masks[gid]), gid


def test_rename_gates_and_reference_update(shared_data: Path) -> None:
    tree = load_gatingml(shared_data / "gatingml2-compliance" / "gml" / "gml_boolean_and2_gate.xml")
    renamed = rename_gates(tree, {"Range1": "r1", "Polygon1": "p1"})
    assert "r1" in renamed.gate_ids and "Range1" not in renamed.gate_ids
    and2 = renamed.gate("And2")
    assert {r for r, _ in and2.refs} >= {"r1", "p1"}
    with pytest.raises(GatingError, match="unknown"):
        rename_gates(tree, {"nope": "x"})


def test_load_strategy_dispatches_on_suffix(shared_data: Path) -> None:
    gml = load_strategy(shared_data / "gatingml2-compliance" / "gml" / "gml_rect1_gate.xml")
    assert gml.gate_ids == ["Rectangle1"]
    wsp = load_strategy(shared_data / "flowjo-workspace" / "gating.wsp")
    assert "CD8 T cells" in wsp.gate_ids


def test_written_and_reread_sample_gates_the_same(tmp_path: Path, small_cohort) -> None:
    f = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[2]
    data = read_fcs(f)
    out = tmp_path / "copy.fcs"
    write_fcs(
        out,
        data.events.astype(np.float32),
        channels=data.channels,
        markers=data.markers,
        spillover=data.spillover,
    )
    _, a = gate_events(data, load_strategy())
    _, b = gate_events(read_fcs(out), load_strategy())
    assert a.counts == b.counts
