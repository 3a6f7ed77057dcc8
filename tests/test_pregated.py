"""Any lab's data: pre-gated exports, panels and --marker, display-scale values, CSV tables.

The pre-gated files are made from a simulated sample the way FlowJo exports gated cells:
the events of one population, compensated, only some channels, no spillover matrix.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from blinaprofile.errors import GatingError, InputError, PanelMismatchError
from blinaprofile.features.flow import featurize_fcs, qc_labels
from blinaprofile.gating.panel import canonical_marker, plan_gates
from blinaprofile.gating.sample import gate_events
from blinaprofile.gating.strategy import (
    as_exported,
    check_panel,
    load_strategy,
    scale_problems,
)
from blinaprofile.gating.transforms import LogicleTransform
from blinaprofile.io.fcs import read_fcs
from blinaprofile.io.fcs_write import write_fcs
from blinaprofile.io.read import FCSReadOptions, read_flow
from blinaprofile.io.table import convert_table, read_table
from conftest_fcs_helpers import float_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
#: the four markers of a minimal T-cell memory export
MEMORY_PANEL = ("CD4", "CD8", "CD197 (CCR7)", "CD45RA")
SUBSETS = (
    "cd4",
    "cd8",
    *(f"{lin}_{s}" for lin in ("cd8", "cd4") for s in ("naive", "cm", "em", "temra")),
)


def _compensated(data) -> np.ndarray:
    """The events with the file's spillover removed (what FlowJo exports)."""
    det, spill = data.spillover
    cols = [data.channels.index(c) for c in det]
    out = np.asarray(data.events, dtype=np.float64).copy()
    out[:, cols] = out[:, cols] @ np.linalg.inv(np.asarray(spill, dtype=np.float64))
    return out


@pytest.fixture(scope="module")
def source(small_cohort):
    """A simulated sample, gated in full (fixed and per-sample placement)."""
    path = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    data = read_fcs(path)
    tree = load_strategy()
    _, fixed = gate_events(data, tree, adaptive=False)
    _, adaptive = gate_events(data, tree, adaptive=True)
    return path, data, fixed, adaptive


def _export(data, mask, markers, path: Path) -> Path:
    """Write the events of ``mask``, compensated, on the channels labelled ``markers``."""
    keep = [i for i, m in enumerate(data.markers) if m in markers]
    events = _compensated(data)[mask][:, keep]
    write_fcs(
        path,
        events,
        channels=[data.channels[i] for i in keep],
        markers=[data.markers[i] for i in keep],
    )
    return path


@pytest.fixture(scope="module")
def tcell_export(source, tmp_path_factory) -> Path:
    """CD3+ T cells of the simulated sample with only CD4, CD8, CCR7 and CD45RA."""
    _, data, fixed, _ = source
    out = tmp_path_factory.mktemp("pregated") / "tcells.fcs"
    return _export(data, fixed.masks["cd3"], MEMORY_PANEL, out)


# --------------------------------------------------------------------------- pre-gated
def test_default_strategy_gates_a_cd4_cd8_ccr7_cd45ra_export_like_the_full_file(
    source, tcell_export
) -> None:
    _, _, fixed, adaptive = source
    data = read_flow(tcell_export)
    tree = replace(as_exported(replace(load_strategy(), partial=True), data), partial=True)
    bound, res = gate_events(data, tree, adaptive=False)
    assert set(bound.gate_ids) == set(SUBSETS)
    assert bound.gate("cd4").parent is None and bound.gate("cd8").parent is None
    # the export holds exactly the full file's CD3+ events: fixed gates give the same counts
    # (float32 rounding of the compensated values may move an event sitting on a bound)
    for gid in SUBSETS:
        assert abs(res.counts[gid] - fixed.counts[gid]) <= 2, (gid, res.counts, fixed.counts)
    _, per = gate_events(data, tree, adaptive=True)
    for gid in SUBSETS:  # per-sample placement sees the same populations on fewer events
        tol = max(5, 0.03 * adaptive.counts[gid])
        assert abs(per.counts[gid] - adaptive.counts[gid]) <= tol, gid
    assert {g: a.policy for g, a in bound.skipped.items()} == {
        "lymphocytes": "skip",
        "singlets": "skip",
        "live": "skip",
        "cd3": "skip",
        "cd8_tim3": "omit",
        "cd8_pd1": "omit",
        "cd4_treg": "omit",
    }
    assert bound.skipped["cd3"].reason == "no CD3 channel (pre-gated export?)"
    assert bound.skipped["lymphocytes"].reason == "no FSC-A, SSC-A channels (pre-gated export?)"
    assert bound.skipped["cd4_treg"].reason == "no CD25, CD127 channels"
    assert bound.skipped["cd3"].start is None  # its children start from all events


def test_featurize_pregated_export_nan_with_reasons_and_sensible_qc(
    source, tcell_export, tmp_path
) -> None:
    _, _, fixed, _ = source
    row = featurize_fcs(tcell_export, adaptive=False).row
    n = fixed.counts["cd3"]
    assert row["n_events"] == n and row["n_live"] == n and row["n_cd3"] == n
    assert row["n_cd8"] == pytest.approx(fixed.counts["cd8"], abs=2)
    assert row["cd8_em_pct_cd8"] == pytest.approx(
        100 * fixed.counts["cd8_em"] / fixed.counts["cd8"], abs=0.3
    )
    assert row["cd4_cd8_ratio"] == pytest.approx(
        fixed.counts["cd4"] / fixed.counts["cd8"], rel=0.01
    )
    for name in (
        "cd3_pct_lymph",
        "cd4_pct_cd3",
        "cd8_pct_cd3",
        "cd8_tim3_pct_cd8",
        "cd8_pd1_pct_cd8",
        "cd4_treg_pct_cd4",
        "cd8_tim3_median",
        "cd8_pd1_median",
    ):
        assert math.isnan(row[name]), name
    notes = row["warnings"].split(" | ")
    assert (
        "cd3_pct_lymph, cd4_pct_cd3, cd8_pct_cd3 NaN: no CD3 channel (pre-gated export?)" in notes
    )
    assert "cd8_tim3_pct_cd8, cd8_tim3_median NaN: no TIM3 channel" in notes
    assert "cd4_treg_pct_cd4 NaN: no CD25, CD127 channels" in notes
    assert any(
        w.startswith("gates skipped (pre-gated export?): lymphocytes (no FSC-A, SSC-A channels)")
        for w in notes
    )
    assert any("no spillover matrix" in w for w in notes)
    # the counts are above the QC minimums: a pre-gated export is not a QC failure by itself
    assert row["qc_pass"] and row["qc_reasons"] == ""
    # the export's events are the live cells: min_live applies to them, not min_events
    few = tmp_path / "few.fcs"
    d = read_fcs(tcell_export)
    write_fcs(few, d.events[:1500], channels=d.channels, markers=d.markers)
    reasons = featurize_fcs(few, adaptive=False).row["qc_reasons"]
    assert "events (< 5000)" not in reasons and "(< 1000)" not in reasons, reasons
    # below them, QC says what it counted
    small = featurize_fcs(tcell_export, adaptive=False, qc=_qc(min_live=10**6)).row
    assert (
        f"only {n} events in the file (no live gate: no Viability channel) (< 1000000)"
        in small["qc_reasons"]
    )


def _qc(**kw):
    from blinaprofile.config import QCConfig

    return QCConfig(**kw)


def test_qc_labels_name_the_gates_used() -> None:
    tree = load_strategy().bind(
        ["FSC-A", "FSC-H", "SSC-A", "V", "C3", "C4", "C8", "RA", "R7", "T3", "P1", "25", "127"],
        [
            "",
            "",
            "",
            "Viability",
            "CD3",
            "CD4",
            "CD8",
            "CD45RA",
            "CCR7",
            "TIM3",
            "PD1",
            "CD25",
            "CD127",
        ],
    )
    assert qc_labels(tree) == {"n_live": "events in gate live (lymphocytes > singlets > live)"}


def test_gate_cli_on_the_export_names_skipped_gates(tcell_export, tmp_path) -> None:
    r = _cli("gate", str(tcell_export), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert set(out["counts"]) == set(SUBSETS)
    assert out["skipped_gates"]["live"] == "no Viability channel (pre-gated export?)"
    assert out["skipped_gates"]["cd8_pd1"] == "no PD1 channel"
    assert any(
        w.startswith("gates not evaluated: cd8_tim3 (no TIM3 channel)") for w in out["warnings"]
    )
    text = _cli("gate", str(tcell_export), cwd=tmp_path)
    assert "gate cd3 skipped: no CD3 channel (pre-gated export?)" in text.stdout
    assert "gate cd4_treg not evaluated: no CD25, CD127 channels" in text.stdout


def test_a_required_marker_is_still_a_panel_mismatch(source, tmp_path) -> None:
    _, data, fixed, _ = source
    f = _export(
        data, fixed.masks["cd3"], ("CD4", "CD197 (CCR7)", "CD45RA"), tmp_path / "no_cd8.fcs"
    )
    with pytest.raises(PanelMismatchError) as info:
        featurize_fcs(f)
    msg = str(info.value)
    assert msg.startswith(
        f"{f}: missing marker(s) CD8 (gates cd4, cd8) of gating strategy 'default-tcell'"
    )
    assert "the file has: BUV496-A='CD4'" in msg
    r = _cli("gate", str(f), cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "missing marker(s) CD8" in r.stderr


def test_no_gate_bound_at_all_is_a_panel_mismatch(tcell_export, tmp_path) -> None:
    strategy = {
        "name": "scatter-only",
        "compensation": "none",
        "transforms": {"lin": {"type": "linear"}},
        "channel_transforms": {"default": "lin"},
        "gates": [
            {"id": "lymphocytes", "type": "rectangle", "ranges": {"FSC-A": {"min": 0.1}}},
            {
                "id": "live",
                "parent": "lymphocytes",
                "type": "rectangle",
                "ranges": {"Viability": {"max": 0.5}},
            },
        ],
    }
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(strategy), encoding="utf-8")
    data = read_flow(tcell_export)
    with pytest.raises(
        PanelMismatchError,
        match=r"no gate of gating strategy 'scatter-only' can be bound: missing marker\(s\) FSC-A, Viability",
    ):
        replace(load_strategy(p), partial=True).bind(data.channels, data.markers, path=data.path)


def test_if_absent_in_the_yaml_overrides_the_default(tcell_export, tmp_path) -> None:
    cfg = yaml.safe_load((CONFIGS / "gating" / "default_tcell.yaml").read_text(encoding="utf-8"))
    for g in cfg["gates"]:
        if g["id"] == "live":
            g["if_absent"] = "error"
        if g["id"] == "cd8_pd1":
            g["if_absent"] = "error"
    p = tmp_path / "strict_live.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    with pytest.raises(PanelMismatchError) as info:
        featurize_fcs(tcell_export, strategy=load_strategy(p))
    assert "missing marker(s) Viability (gate live); PD1 (gate cd8_pd1)" in str(info.value)


def test_plan_gates_reparents_omits_and_drops_references() -> None:
    from blinaprofile.config import AdaptiveSpec
    from blinaprofile.gating.gates import Dim, Gate

    gates = [
        Gate("live", "rectangle", (Dim("Viability", max=0.5),)),
        Gate("cd3", "rectangle", (Dim("CD3", min=0.4),), "live"),
        Gate("tim3", "rectangle", (Dim("TIM3", min=0.4),), "cd3"),
        Gate("tim3_hi", "rectangle", (Dim("CD4", min=0.4),), "tim3"),
        Gate(
            "cd4",
            "rectangle",
            (Dim("CD4", min=0.4),),
            "cd3",
            adaptive=(AdaptiveSpec(reference="tim3"),),
        ),
    ]
    plan = plan_gates(gates, ["c3", "c4"], ["CD3", "CD4"], policies={"tim3": "omit"}, strategy="t")
    assert [g.id for g in plan.gates] == ["cd3", "cd4"]
    assert plan.gates[0].parent is None  # live skipped: cd3 gated from all events
    assert plan.gates[1].adaptive[0].reference is None  # its reference was omitted
    assert plan.absent["tim3_hi"].reason == "gate tim3 is not evaluated"
    assert plan.mapping == {"CD3": "c3", "CD4": "c4"}
    with pytest.raises(PanelMismatchError, match="ambiguous marker"):
        plan_gates(gates, ["a", "b"], ["CD3", "CD3"])


def test_featurize_needs_cd4_and_cd8_gates_not_live_or_cd3(tcell_export) -> None:
    from blinaprofile.features.flow import REQUIRED_GATES, features_from_gating

    assert REQUIRED_GATES == ("cd4", "cd8")
    data = read_flow(tcell_export)
    tree = as_exported(replace(load_strategy(), partial=True), data)
    bound, res = gate_events(data, tree)
    del res.counts["cd8"]
    with pytest.raises(GatingError, match=r"lacks gate\(s\) \['cd8'\]"):
        features_from_gating(bound, res)


def test_scoring_names_the_markers_the_models_features_need(tcell_export) -> None:
    """The model's features are requested: a marker they need is a panel mismatch."""
    from blinaprofile.scoring.score import NO_CALL, score_sample

    res = score_sample(tcell_export, interval=False)
    assert res.call == NO_CALL and res.probability is None
    (reason,) = res.reasons
    assert reason.startswith(
        "panel mismatch: missing marker(s) CD3, Viability, TIM3, PD1, CD25, CD127 needed by "
        "feature(s) cd3_pct_lymph, cd4_pct_cd3, cd8_pct_cd3, cd8_tim3_pct_cd8, "
        "cd8_pd1_pct_cd8, cd4_treg_pct_cd4; the file has: BUV496-A='CD4'"
    ), reason
    assert str(tcell_export) not in reason
    # featurizing requests nothing: the same file gives its features, NaN where it must
    row = featurize_fcs(tcell_export).row
    assert math.isfinite(row["cd8_em_pct_cd8"]) and math.isnan(row["cd3_pct_lymph"])
    with pytest.raises(PanelMismatchError, match=r"missing marker\(s\) TIM3 needed by feature"):
        featurize_fcs(tcell_export, requested=["cd8_em_pct_cd8", "cd8_tim3_median"])


def test_cd3_skipped_below_evaluated_gates_is_a_qc_flag(source, tmp_path) -> None:
    """A raw file whose CD3 channel is unlabelled is no T-cell export: flagged, not trusted."""
    path, data, _, _ = source
    f = tmp_path / "no_cd3_label.fcs"
    markers = ["" if m == "CD3" else m for m in data.markers]
    write_fcs(f, data.events, channels=data.channels, markers=markers, spillover=data.spillover)
    row = featurize_fcs(f).row
    assert not row["qc_pass"]
    assert (
        "gate cd3 skipped (no CD3 channel) although gate live was evaluated: the CD4/CD8 gates "
        "see every live event, not T cells (an unlabelled CD3 channel? --marker CHANNEL=CD3)"
    ) in row["qc_reasons"]
    fixed = featurize_fcs(f, fcs_options=FCSReadOptions(markers=(("BUV395-A", "CD3"),))).row
    assert fixed["qc_pass"] == featurize_fcs(path).row["qc_pass"]


# --------------------------------------------------------------------------- panel and --marker
def test_marker_option_relabels_and_declares(source, tmp_path) -> None:
    path, data, _, _ = source
    i = data.markers.index("CD197 (CCR7)")
    unlabeled = [("" if j == i else m) for j, m in enumerate(data.markers)]
    f = tmp_path / "no_label.fcs"
    write_fcs(f, data.events, channels=data.channels, markers=unlabeled, spillover=data.spillover)
    with pytest.raises(PanelMismatchError, match="missing marker"):
        featurize_fcs(f)
    opts = FCSReadOptions(markers=((data.channels[i], "CCR7"),))
    row = featurize_fcs(f, fcs_options=opts).row
    ref = featurize_fcs(path).row
    assert row["cd8_em_pct_cd8"] == ref["cd8_em_pct_cd8"]
    # a marker name the privacy filter does not know is kept verbatim once declared
    opts = FCSReadOptions(markers=((data.channels[i], "MyLabDye 7"),))
    assert read_flow(f, fcs_options=opts).markers[i] == "MyLabDye 7"
    assert read_flow(f, fcs_options=FCSReadOptions()).markers[i] == ""
    with pytest.raises(PanelMismatchError) as info:
        read_flow(f, fcs_options=FCSReadOptions(markers=(("Nope-A", "CCR7"),)))
    assert "--marker Nope-A=CCR7: the file has no channel 'Nope-A'" in str(info.value)


def test_panel_option_labels_empty_channels_and_warns_on_conflicts(source, tmp_path) -> None:
    path, data, _, _ = source
    f = tmp_path / "unlabelled.fcs"
    markers = ["" for _ in data.markers]
    markers[data.channels.index("FITC-A")] = "CD3"  # conflicts with the panel's CD45RA
    write_fcs(f, data.events, channels=data.channels, markers=markers, spillover=data.spillover)
    panel = CONFIGS / "panels" / "post_hct_tcell.yaml"
    got = read_flow(f, fcs_options=FCSReadOptions(panel=str(panel)))
    assert got.markers[data.channels.index("BV421-A")] == "CD197 (CCR7)"
    assert got.markers[data.channels.index("FITC-A")] == "CD3"  # the file's label is kept
    assert got.warnings == [
        "channel FITC-A: the file's $PnS label differs from the panel's marker 'CD45RA'; the "
        "file's label is used (--marker FITC-A=CD45RA uses the panel's)"
    ]
    opts = FCSReadOptions(panel=str(panel), markers=(("FITC-A", "CD45RA"),))
    assert (
        featurize_fcs(f, fcs_options=opts).row["cd8_em_pct_cd8"]
        == featurize_fcs(path).row["cd8_em_pct_cd8"]
    )


def test_check_panel_names_what_the_panel_lacks(tmp_path) -> None:
    skipped = check_panel(load_strategy(), CONFIGS / "panels" / "post_hct_tcell.yaml")
    assert skipped == {}
    cytof = load_strategy(CONFIGS / "gating" / "cytof_tcell.yaml")
    panel = CONFIGS / "panels" / "post_hct_tcell.yaml"
    with pytest.raises(PanelMismatchError) as info:
        check_panel(cytof, panel)
    assert str(info.value).startswith(
        f"{panel}: missing marker(s) DNA1, DNA2 (gate cells) of gating strategy 'cytof-tcell'; "
        "the panel has: Time, FSC-A"
    )
    skipped = check_panel(load_strategy(), CONFIGS / "panels" / "cytof_tcell.yaml")
    assert sorted(skipped) == ["cd4_treg", "cd8_pd1", "cd8_tim3", "lymphocytes", "singlets"]


def test_cli_panel_and_marker_options(tcell_export, tmp_path) -> None:
    panel = CONFIGS / "panels" / "post_hct_tcell.yaml"
    cytof = CONFIGS / "gating" / "cytof_tcell.yaml"
    for cmd in (
        ["gate", str(tcell_export)],
        ["featurize", str(tcell_export), "--out", str(tmp_path / "f.csv")],
    ):
        r = _cli(*cmd, "--strategy", str(cytof), "--panel", str(panel), cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, r.stderr
        assert lines[0].startswith(f"error: {panel}: missing marker(s) DNA1, DNA2 (gate cells)")
    r = _cli("gate", str(tcell_export), "--marker", "BV421-A", cwd=tmp_path)
    assert r.returncode == 2 and "--marker takes CHANNEL=MARKER, got ['BV421-A']" in r.stderr
    r = _cli("gate", str(tcell_export), "--marker", "BV421-A=CD45RA", "--json", cwd=tmp_path)
    assert r.returncode == 2 and "ambiguous marker(s) CD45RA" in r.stderr


# --------------------------------------------------------------------------- display scale
def _display_file(data, path: Path, *, prange: int | None) -> Path:
    """The sample as a display-scale export: logicle channel numbers 0-prange (compensated)."""
    logicle = LogicleTransform(t=262144.0, w=0.5, m=4.5, a=0.0)
    comp = _compensated(data)
    out = np.empty_like(comp)
    for j, ch in enumerate(data.channels):
        col = comp[:, j]
        if ch == "Time":
            out[:, j] = col
        elif ch.startswith(("FSC", "SSC")):
            out[:, j] = col / 262144.0 * (prange or 1.0)
        else:
            out[:, j] = np.asarray(logicle.apply(col)) * (prange or 1.0)
    extra = {}
    for j, m in enumerate(data.markers, start=1):
        if m:
            extra[f"$P{j}S"] = m
        if prange and data.channels[j - 1] != "Time":
            extra[f"$P{j}R"] = str(prange)
    path.write_bytes(float_file(out, data.channels, extra=extra))
    return path


def test_display_scale_is_detected_and_declared(source, tmp_path) -> None:
    _, data, fixed, _ = source
    f = _display_file(data, tmp_path / "display.fcs", prange=1024)
    row = featurize_fcs(f, adaptive=False).row
    assert not row["qc_pass"]
    assert (
        "channels FSC-A, SSC-A, FSC-H, BV510-A, BUV395-A, BUV496-A and 7 more span 0-1024 ($PnR)"
        in row["qc_reasons"]
    )
    assert (
        "a display-scale (channel-value) export? declare it with --display-scale" in row["warnings"]
    )
    declared = featurize_fcs(f, adaptive=False, fcs_options=FCSReadOptions(display_scale=True)).row
    assert "values declared display-scale (--display-scale)" in declared["warnings"]
    assert "span 0-" not in declared["qc_reasons"]
    # mapped back through the same logicle: the fixed gates find the same cells
    assert declared["n_live"] == pytest.approx(fixed.counts["live"], abs=3)
    assert declared["n_cd8"] == pytest.approx(fixed.counts["cd8"], abs=3)
    r = _cli("gate", str(f), "--display-scale", "--fixed-gates", "--json", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["counts"]["cd3"] == pytest.approx(
        fixed.counts["cd3"], abs=3
    )


def test_already_transformed_values_are_detected(source, tmp_path) -> None:
    _, data, _, _ = source
    f = _display_file(data, tmp_path / "unit.fcs", prange=None)  # logicle units 0-1
    data2 = read_flow(f)
    bound = as_exported(replace(load_strategy(), partial=True), data2).bind(
        data2.channels, data2.markers
    )
    (msg,) = scale_problems(bound, data2)
    assert msg.startswith("every value of BV510-A, BUV395-A")
    assert "is below 10 (max 0." in msg and "already transformed?" in msg
    # a strategy whose transforms are `none` declares it: no problem
    cfg = yaml.safe_load((CONFIGS / "gating" / "default_tcell.yaml").read_text(encoding="utf-8"))
    cfg["transforms"] = {"asis": {"type": "none"}}
    cfg["channel_transforms"] = {"default": "asis"}
    p = tmp_path / "display.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    declared = as_exported(load_strategy(p), data2).bind(data2.channels, data2.markers)
    assert scale_problems(declared, data2) == []


# --------------------------------------------------------------------------- tables
def _table(data, mask, path: Path, *, sep: str = ",") -> Path:
    comp = _compensated(data)[mask]
    head = [c if not m else f"{c} :: {m}" for c, m in zip(data.channels, data.markers, strict=True)]
    lines = [sep.join(head)] + [sep.join(f"{v:.9g}" for v in row) for row in comp]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_table_converts_and_gates_like_the_file(source, tmp_path) -> None:
    _, data, fixed, _ = source
    csv = _table(data, fixed.masks["live"], tmp_path / "live.csv")
    out = tmp_path / "live.fcs"
    table = convert_table(csv, out)
    assert table.n_events == fixed.counts["live"]
    assert table.channels == data.channels
    assert table.markers[data.channels.index("BV421-A")] == "CD197 (CCR7)"
    assert table.markers[data.channels.index("FSC-A")] == ""
    row = featurize_fcs(out, adaptive=False).row
    assert row["n_cd3"] == pytest.approx(fixed.counts["cd3"], abs=2)
    assert row["cd8_em_pct_cd8"] == pytest.approx(
        100 * fixed.counts["cd8_em"] / fixed.counts["cd8"], abs=0.5
    )
    # tabs work the same (and plain marker headers name both channel and marker)
    tsv = tmp_path / "t.tsv"
    tsv.write_text("CD4\tCD8\n1.5\t2\n\n3\t4e2\n", encoding="utf-8")
    t = read_table(tsv)
    assert t.channels == ["CD4", "CD8"] and t.markers == ["CD4", "CD8"]
    np.testing.assert_array_equal(t.events, [[1.5, 2.0], [3.0, 400.0]])


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        (
            "FSC-A,CD4\n1,2\n3,n/a\n",
            "line 3 (event 2), column 2 ('CD4'): 'n/a' is not a finite number",
        ),
        ("FSC-A,CD4\n1,2\n\n3,\n", "line 4 (event 2), column 2 ('CD4'): an empty cell"),
        (
            "FSC-A;CD4\n1;2,5\n",
            "line 2 (event 1), column 2 ('CD4'): '2,5' is not a finite number (a decimal comma?",
        ),
        ("FSC-A,CD4\n1,inf\n", "'inf' is not a finite number"),
        ("FSC-A,,CD4\n1,2,3\n", "column 2 of the header has no name"),
        ("CD4,CD4\n1,2\n", "column name(s) ['CD4'] appear more than once"),
        ("CD4,CD8\n", "the table has a header but no events"),
        ("", "the table is empty"),
        ("CD4,CD8\n1,2,3\n", "not a valid table"),
    ],
)
def test_bad_tables_are_one_error_naming_file_line_and_column(tmp_path, text, phrase) -> None:
    p = tmp_path / "bad.csv"
    p.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as info:
        read_table(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: ") and phrase in msg and "\n" not in msg, msg


def test_convert_cli(tmp_path) -> None:
    good = tmp_path / "ok.csv"
    good.write_text("FSC-A,BV421-A :: CCR7\n100,0.5\n200,1.5\n", encoding="utf-8")
    r = _cli("convert", str(good), "--out", str(tmp_path / "ok.fcs"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(
        f"wrote {tmp_path / 'ok.fcs'}: 2 events x 2 channels (FSC-A, BV421-A=CCR7)"
    )
    assert "already transformed" in r.stderr  # marker values below 10
    back = read_fcs(tmp_path / "ok.fcs")
    assert back.channels == ["FSC-A", "BV421-A"] and back.markers == ["", "CCR7"]
    bad = tmp_path / "bad.csv"
    bad.write_text("FSC-A,CD4\n1,2\n3,abc\n", encoding="utf-8")
    r = _cli("convert", str(bad), "--out", str(tmp_path / "bad.fcs"), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert (
        r.stderr
        == f"error: {bad}: line 3 (event 2), column 2 ('CD4'): 'abc' is not a finite number\n"
    )
    assert not (tmp_path / "bad.fcs").exists()


def test_flow_channel_names_are_not_read_as_isotopes() -> None:
    assert canonical_marker("Pt195Di") == "Viability"
    assert canonical_marker("Ir191Di") == "DNA1" and canonical_marker("193Ir") == "DNA2"
    for name in ("BV510-A", "FL1-H", "B530-A", "V450", "PE-Cy7-A", "FSC-A"):
        assert canonical_marker(name) is None, name


# --------------------------------------------------------------------------- helpers
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        [sys.executable, "-m", "blinaprofile", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
