"""Mass cytometry: the shipped CyTOF strategy on the four real CyTOF files (../shared/data).

The files are unstimulated PBMC controls (2 donors x 2 batches, 1,000 events each), already
gated on live single cells by their authors, with raw ion counts (arcsinh cofactor 5).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from blinaprofile.errors import PanelMismatchError
from blinaprofile.features.flow import featurize_fcs
from blinaprofile.gating.sample import gate_events
from blinaprofile.gating.strategy import is_mass_cytometry, load_strategy, scale_problems
from blinaprofile.io.fcs import read_fcs
from blinaprofile.io.fcs_write import write_fcs
from blinaprofile.io.read import FCSReadOptions, read_flow

ROOT = Path(__file__).resolve().parents[1]
STRATEGY = ROOT / "configs" / "gating" / "cytof_tcell.yaml"
PANEL = ROOT / "configs" / "panels" / "cytof_tcell.yaml"
FILES = (
    "Gates_PTLG021_Unstim_Control_1.fcs",
    "Gates_PTLG021_Unstim_Control_2.fcs",
    "Gates_PTLG028_Unstim_Control_1.fcs",
    "Gates_PTLG028_Unstim_Control_2.fcs",
)
MEMORY = ("naive", "cm", "em", "temra")


@pytest.fixture(scope="module")
def cytof(shared_data: Path) -> Path:
    return shared_data / "cytof"


def _gate(path: Path, **kw):
    data = read_flow(path, declared_markers=load_strategy(STRATEGY).needed_names(), **kw)
    tree = replace(load_strategy(STRATEGY), partial=True)
    bound, res = gate_events(data, tree)
    return data, bound, res


@pytest.mark.parametrize("name", FILES)
def test_gate_counts_are_plausible(cytof: Path, name: str) -> None:
    data, bound, res = _gate(cytof / name)
    c = res.counts
    assert res.n_events == 1000 and bound.skipped == {}
    # already gated live singlets: nearly every event has DNA, a single-cell length, no cisplatin
    assert c["cells"] >= 960 and c["singlets"] == c["cells"] and c["live"] == c["singlets"]
    cd3_share = c["cd3"] / c["live"]
    assert 0.18 <= cd3_share <= 0.35, cd3_share  # PBMC with many B cells in these controls
    assert (c["cd4"] + c["cd8"]) / c["cd3"] >= 0.85  # few double-negative/positive T cells
    assert 1.0 <= c["cd4"] / c["cd8"] <= 2.5
    for lineage in ("cd4", "cd8"):  # the memory subsets partition their parent
        assert sum(c[f"{lineage}_{s}"] for s in MEMORY) == c[lineage]
        assert all(c[f"{lineage}_{s}"] > 0 for s in MEMORY)
    assert 0.02 <= c["cd4_treg"] / c["cd4"] <= 0.12
    # the CD3 bound is in asinh(x / 5) units: recount it by hand
    t = res.thresholds["cd3:CD3:min"]
    assert 1.5 <= t <= 3.5
    live = res.masks["live"]
    cd3 = np.arcsinh(data.events[:, data.channels.index("Er170Di")].astype(float) / 5.0)
    assert int(np.sum(live & (cd3 >= t))) == c["cd3"]


def test_features_and_qc_on_cytof(cytof: Path) -> None:
    rows = [featurize_fcs(cytof / n, strategy=load_strategy(STRATEGY)).row for n in FILES]
    for row in rows:
        for name in (
            "cd3_pct_lymph",
            "cd4_pct_cd3",
            "cd8_pct_cd3",
            "cd4_cd8_ratio",
            "cd4_treg_pct_cd4",
            *(f"cd8_{s}_pct_cd8" for s in MEMORY),
            *(f"cd4_{s}_pct_cd4" for s in MEMORY),
        ):
            assert math.isfinite(row[name]), name
        assert sum(row[f"cd8_{s}_pct_cd8"] for s in MEMORY) == pytest.approx(100.0)
        assert math.isnan(row["cd8_tim3_pct_cd8"]) and math.isnan(row["cd8_pd1_median"])
        assert (
            "cd8_tim3_pct_cd8, cd8_pd1_pct_cd8, cd8_tim3_median, cd8_pd1_median NaN: not "
            "measured by gating strategy 'cytof-tcell'" in row["warnings"]
        )
        # 1,000 events: below the flow QC minimums, and QC says so in the gates' own terms
        assert not row["qc_pass"]
        reasons = row["qc_reasons"]
        assert (
            "only 1000 events (< 5000): too few for the QC minimums (a subsampled or gated "
            "export?)" in reasons
        )
        assert (
            f"only {row['n_live']} events in gate live (cells > singlets > live) (< 1000)"
            in reasons
        )
        assert "lymphocytes" not in reasons and "scatter" not in reasons
    cd4_mem = [row["cd4_naive_pct_cd4"] + row["cd4_cm_pct_cd4"] for row in rows]
    assert all(40 <= v <= 85 for v in cd4_mem), cd4_mem  # CCR7+ CD4 T cells


def test_panel_labels_cisplatin_and_gives_the_same_gating(cytof: Path) -> None:
    path = cytof / FILES[0]
    _, _, plain = _gate(path)
    data, bound, labelled = _gate(path, fcs_options=FCSReadOptions(panel=str(PANEL)))
    assert data.markers[data.channels.index("Pt195Di")] == "Cisplatin"
    assert data.markers[data.channels.index("Ir191Di")] == "DNA1"  # declared, kept verbatim
    assert bound.channel_map()["Viability"] == "Pt195Di"
    assert labelled.counts == plain.counts


def test_default_flow_strategy_on_cytof_is_flagged(cytof: Path) -> None:
    data = read_flow(cytof / FILES[0])
    assert is_mass_cytometry(data)
    bound = replace(load_strategy(), partial=True).bind(data.channels, data.markers)
    # no scatter (skipped), no TIM3/PD-1/CD127 (omitted); cisplatin stands for viability
    assert sorted(bound.skipped) == ["cd4_treg", "cd8_pd1", "cd8_tim3", "lymphocytes", "singlets"]
    assert bound.channel_map()["Viability"] == "Pt195Di"
    (msg,) = scale_problems(bound, data)
    assert msg.startswith("mass-cytometry data (channels Er170Di")
    assert "use a strategy with `arcsinh` transforms (cofactor 5)" in msg
    row = featurize_fcs(cytof / FILES[0]).row
    assert msg in row["qc_reasons"] and msg in row["warnings"]


def _without_dna(src: Path, dst: Path, *, rename: bool) -> Path:
    d = read_fcs(src)
    dna = {"Ir191Di": "Chan191", "Ir193Di": "Chan193"}
    if rename:  # the channels are there, named and labelled otherwise
        channels = [dna.get(c, c) for c in d.channels]
        markers = ["" if c in dna else m for c, m in zip(d.channels, d.markers, strict=True)]
        write_fcs(dst, d.events, channels=channels, markers=markers)
        return dst
    keep = [i for i, c in enumerate(d.channels) if c not in dna]
    write_fcs(
        dst,
        d.events[:, keep],
        channels=[d.channels[i] for i in keep],
        markers=[d.markers[i] for i in keep],
    )
    return dst


def test_cytof_file_without_dna_is_one_clear_error(cytof: Path, tmp_path: Path) -> None:
    f = _without_dna(cytof / FILES[0], tmp_path / "no_dna.fcs", rename=False)
    with pytest.raises(PanelMismatchError) as info:
        featurize_fcs(f, strategy=load_strategy(STRATEGY))
    msg = str(info.value)
    assert msg.startswith(
        f"{f}: missing marker(s) DNA1, DNA2 (gate cells) of gating strategy 'cytof-tcell' "
        "(DNA1/DNA2 are the iridium DNA intercalator (Ir191Di/Ir193Di)"
    )
    r = _cli("gate", str(f), "--strategy", str(STRATEGY), cwd=tmp_path)
    lines = r.stderr.splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0] == f"error: {msg}"
    assert r.stdout == ""


def test_marker_option_names_dna_channels(cytof: Path, tmp_path: Path) -> None:
    f = _without_dna(cytof / FILES[0], tmp_path / "renamed.fcs", rename=True)
    with pytest.raises(PanelMismatchError, match="missing marker"):
        featurize_fcs(f, strategy=load_strategy(STRATEGY))
    opts = FCSReadOptions(markers=(("Chan191", "DNA1"), ("Chan193", "DNA2")))
    row = featurize_fcs(f, strategy=load_strategy(STRATEGY), fcs_options=opts).row
    ref = featurize_fcs(cytof / FILES[0], strategy=load_strategy(STRATEGY)).row
    assert row["n_live"] == ref["n_live"] and row["cd8_em_pct_cd8"] == ref["cd8_em_pct_cd8"]
    r = _cli(
        "gate",
        str(f),
        "--strategy",
        str(STRATEGY),
        "--marker",
        "Chan191=DNA1",
        "--marker",
        "Chan193=DNA2",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert f"cells{ref['n_live']:>18}" in r.stdout


def test_cytof_strategy_is_identical_to_flowkit(cytof: Path) -> None:
    """arcsinh (as GatingML asinh), untransformed event length, no compensation."""
    import warnings

    import flowkit as fk

    path = cytof / FILES[1]
    data = read_flow(path, declared_markers=load_strategy(STRATEGY).needed_names())
    bound, res = gate_events(data, load_strategy(STRATEGY), adaptive=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sample = fk.Sample(str(path))
        fkres = bound.to_flowkit().gate_sample(sample)
    for g in bound.gates:
        diff = int((fkres.get_gate_membership(g.id) != res.masks[g.id]).sum())
        assert diff == 0, g.id


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
