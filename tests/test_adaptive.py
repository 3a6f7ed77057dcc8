"""Per-sample gate placement: thresholds follow the populations; QC flags say what happened."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pandas as pd
import pytest

from blinaprofile.config import AdaptiveSpec
from blinaprofile.gating.density import ScaleFreeAxis, binned_density, tail_fit, valleys
from blinaprofile.gating.gates import Dim, Gate
from blinaprofile.gating.placement import (
    SHIFT_DECADES,
    decade_units,
    place_threshold,
    search_range,
)
from blinaprofile.gating.sample import gate_events
from blinaprofile.gating.strategy import load_strategy
from blinaprofile.gating.transforms import LinearTransform, LogicleTransform
from blinaprofile.gating.tree import GateTree
from blinaprofile.io.fcs import read_fcs
from blinaprofile.simulate.flow import simulate_cohort, truth_masks

REQUIRED = ("cd8_naive", "cd8_cm", "cd8_em", "cd8_temra", "cd8_tim3", "cd4_treg")
SUBSETS = (*REQUIRED, "cd4_naive", "cd4_cm", "cd4_em", "cd4_temra", "cd8_pd1")
LOGICLE = LogicleTransform(t=262144, w=0.5, m=4.5, a=0)


@pytest.fixture(scope="module")
def shifted_cohort(tmp_path_factory, sim_config, panel):
    """10 patients, 30,000 events each, brightness shifted by up to +-25% per dye and run."""
    out = tmp_path_factory.mktemp("shifted")
    return simulate_cohort(
        sim_config,
        out,
        panel=panel,
        n_patients=10,
        events_per_sample=30_000,
        brightness_shift=0.25,
        seed=2026,
    )


def _f1(tp: int, fp: int, fn: int) -> float:
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")


def _scaled(data, factor: float):
    """The sample as recorded with every fluorescence channel ``factor`` times brighter."""
    ev = np.array(data.events, dtype=np.float64, copy=True)
    for ch in data.spillover[0]:
        ev[:, data.channels.index(ch)] *= factor
    return dataclasses.replace(data, events=ev)


def test_adaptive_f1_under_25pct_brightness_shift(shifted_cohort) -> None:
    strategy = load_strategy()
    tallies = {(g, a): np.zeros(3, dtype=np.int64) for g in REQUIRED for a in (False, True)}
    per_sample: dict[tuple[str, bool], list[float]] = {k: [] for k in tallies}
    flags = 0
    for f in sorted((shifted_cohort.out_dir / "fcs").glob("*.fcs")):
        data = read_fcs(f)
        truth = truth_masks(pd.read_parquet(shifted_cohort.out_dir / "truth" / f"{f.stem}.parquet"))
        for adaptive in (False, True):
            _, res = gate_events(data, strategy, adaptive=adaptive)
            if adaptive:
                flags += len(res.flags)
                for fl in res.flags:
                    print(f"\n{f.name}: {fl}", end="")
                assert res.confidence, "adaptive gating must record confidences"
            for g in REQUIRED:
                m, t = res.masks[g], truth[g]
                tp, fp, fn = int((m & t).sum()), int((m & ~t).sum()), int((~m & t).sum())
                tallies[(g, adaptive)] += (tp, fp, fn)
                per_sample[(g, adaptive)].append(_f1(tp, fp, fn))
    print("\n\nF1 against truth, 10 samples, brightness shift +-25% (pooled events; worst sample)")
    print(f"{'population':<12}{'fixed':>8}{'adaptive':>10}{'fixed min':>11}{'adaptive min':>14}")
    for g in REQUIRED:
        fx, ad = _f1(*tallies[(g, False)]), _f1(*tallies[(g, True)])
        print(
            f"{g:<12}{fx:>8.4f}{ad:>10.4f}{min(per_sample[(g, False)]):>11.4f}{min(per_sample[(g, True)]):>14.4f}"
        )
        assert ad >= 0.97, g
        assert ad >= fx - 0.005, f"adaptive worse than fixed for {g}"
    print(f"QC flags raised by adaptive placement: {flags}")
    # +-25% (0.1 decades) is ordinary run-to-run variation: nothing to flag
    assert flags == 0


def test_per_sample_placement_follows_4x_and_quarter_brightness(shifted_cohort) -> None:
    """0.25x and 4x (0.6 decades): per-sample gates give the unshifted sample's subsets."""
    strategy = load_strategy()
    f = sorted((shifted_cohort.out_dir / "fcs").glob("*.fcs"))[1]
    data = read_fcs(f)
    truth = truth_masks(pd.read_parquet(shifted_cohort.out_dir / "truth" / f"{f.stem}.parquet"))
    _, base = gate_events(data, strategy, adaptive=True)
    for factor in (0.25, 4.0):
        shifted = _scaled(data, factor)
        _, per = gate_events(shifted, strategy, adaptive=True)
        _, fixed = gate_events(shifted, strategy, adaptive=False)
        worst_fixed = 1.0
        for g in SUBSETS:
            t = truth[g]
            f_per = _f1(*_tally(per.masks[g], t))
            worst_fixed = min(worst_fixed, _f1(*_tally(fixed.masks[g], t)))
            # the thresholds moved with the populations: the same events as unshifted, so
            # the same accuracy (TIM3+ of this sample overlaps its negatives: 0.935)
            same = _f1(*_tally(per.masks[g], base.masks[g]))
            assert same >= 0.995, (factor, g, same)
            assert f_per >= _f1(*_tally(base.masks[g], t)) - 0.005, (factor, g, f_per)
            assert f_per >= 0.93, (factor, g, f_per)
        assert worst_fixed < 0.9, "a 4-fold shift should break fixed gates"
        # both modes say the sample is shifted, with the direction and the size
        for res in (per, fixed):
            shift = [fl for fl in res.flags if fl.startswith("sample looks shifted")]
            assert len(shift) == 1, res.flags
            sizes = [float(v) for v in re.findall(r" ([+-]\d+\.\d+)", shift[0])]
            assert sizes and all(abs(v) > SHIFT_DECADES for v in sizes), shift[0]
            assert all((v > 0) == (factor > 1) for v in sizes), shift[0]
        assert "fixed thresholds used" in next(fl for fl in fixed.flags if "shifted" in fl)


def _tally(m: np.ndarray, t: np.ndarray) -> tuple[int, int, int]:
    return int((m & t).sum()), int((m & ~t).sum()), int((~m & t).sum())


def test_adaptive_subsets_still_partition_cd8(shifted_cohort) -> None:
    f = sorted((shifted_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    data = read_fcs(f)
    bound, res = gate_events(data, load_strategy(), adaptive=True)
    total = sum(res.masks[g].astype(int) for g in ("cd8_naive", "cd8_cm", "cd8_em", "cd8_temra"))
    assert np.array_equal(total, res.masks["cd8"].astype(int))
    # every adaptive bound is recorded inside its search range, with a confidence
    for g in bound.gates:
        for d, spec in zip(g.dims, g.adaptive or (None,) * len(g.dims), strict=True):
            if spec is None:
                continue
            configured = d.min if d.min is not None else d.max
            assert configured is not None
            low, high = search_range(configured, spec, LOGICLE)
            for side in ("min", "max"):
                if getattr(d, side) is None:
                    continue
                key = f"{g.id}:{d.name}:{side}"
                assert low <= res.thresholds[key] <= high, key
                assert 0.0 <= res.confidence[key] <= 1.0, key


def test_search_range_is_decades_around_the_configured_bound() -> None:
    unit = decade_units(LOGICLE, 0.45)
    assert unit == pytest.approx(1 / 4.5, rel=0.01)
    low, high = search_range(0.45, AdaptiveSpec(), LOGICLE)
    assert unit is not None
    assert (low, high) == pytest.approx((0.45 - 0.8 * unit, 0.45 + 0.8 * unit))
    # a 4-fold brightness change of a positive population stays inside
    r = float(LOGICLE.inverse(np.array([0.55]))[0])
    assert (
        low
        < float(LOGICLE.apply(np.array([r / 4]))[0])
        < float(LOGICLE.apply(np.array([r * 4]))[0])
        < high + 0.1
    )
    assert search_range(0.45, AdaptiveSpec(low=0.3, high=0.5), LOGICLE) == (0.3, 0.5)


def test_place_threshold_valley_tail_configured_and_few_events() -> None:
    rng = np.random.default_rng(0)
    neg = rng.normal(0.2, 0.04, 6000)
    pos = rng.normal(0.62, 0.05, 3000)
    p = place_threshold(np.concatenate([neg, pos]), configured=0.45, low=0.25, high=0.65)
    assert p.method == "valley" and 0.33 < p.threshold < 0.5 and p.confidence > 0.9
    assert p.found == p.threshold and 0.6 < p.share_below < 0.72
    # one population, no tail side: the configured bound, nothing found
    u = place_threshold(neg, configured=0.45, low=0.25, high=0.65, tail="none")
    assert u.method == "configured" and u.threshold == 0.45 and u.found is None
    # a 5% shoulder above the main population: a tail gate 3 SDs above its mode
    shoulder = np.concatenate([neg, rng.normal(0.33, 0.05, 320)])
    t = place_threshold(shoulder, configured=0.3, low=0.1, high=0.5, tail="above")
    assert t.method == "tail" and t.side == "above"
    assert t.threshold == pytest.approx(0.2 + 3 * 0.04, abs=0.02)
    assert t.confidence > 0.8  # nearly all events above it are not the main tail
    # the clearest separation lies outside the search range: reported
    far = place_threshold(
        np.concatenate([rng.normal(0.45, 0.03, 6000), rng.normal(0.85, 0.03, 3000)]),
        configured=0.45,
        low=0.3,
        high=0.55,
        tail="none",
    )
    assert far.outside is not None and 0.6 < far.outside < 0.75
    assert place_threshold(neg[:50], configured=0.45, low=0.3, high=0.55).method == "few events"


def test_placement_is_equivariant_under_brightness_scaling() -> None:
    """Placement works on the sample's own scale-free axis: 4x brighter, 4x the threshold."""
    rng = np.random.default_rng(5)
    raw = np.concatenate([rng.normal(0, 60, 20_000), np.exp(rng.normal(np.log(3000), 0.5, 8000))])

    def place(values: np.ndarray):
        return place_threshold(values, configured=0.45, low=0.05, high=0.9, transform=LOGICLE)

    base = place(raw)
    assert base.method == "valley"
    for c in (0.25, 0.5, 2.0, 4.0):
        p = place(raw * c)
        ratio = float(LOGICLE.inverse(np.array([p.threshold]))[0]) / float(
            LOGICLE.inverse(np.array([base.threshold]))[0]
        )
        assert ratio == pytest.approx(c, rel=0.02), c
        assert p.confidence == pytest.approx(base.confidence, abs=0.02)
    axis = ScaleFreeAxis.from_values(raw)
    assert np.allclose(
        ScaleFreeAxis.from_values(3 * raw).apply(3 * raw[:100]), axis.apply(raw[:100])
    )


def test_density_building_blocks() -> None:
    rng = np.random.default_rng(2)
    x = np.concatenate([rng.normal(0.0, 1.0, 5000), rng.normal(6.0, 1.0, 5000)])
    d = binned_density(x, None)
    assert 0.1 < d.bandwidth < 0.6  # ISJ, about 1.06 * 1 * 5000^-0.2 = 0.19 per mode
    v = valleys(d, -10, 20, min_share=0.01)[0]
    assert v.position == pytest.approx(3.0, abs=0.3) and v.depth > 0.95
    assert v.share_below == pytest.approx(0.5, abs=0.02)
    one = binned_density(
        np.concatenate([rng.normal(0.0, 1.0, 9500), rng.normal(2.5, 0.5, 500)]), None
    )
    fit = tail_fit(one, side="above", k=3.0)
    assert fit.mode == pytest.approx(0.0, abs=0.15) and fit.sd == pytest.approx(1.0, abs=0.15)
    assert 0.01 < fit.share_beyond < 0.05 and fit.purity > 0.8


def _one_gate_tree(spec: AdaptiveSpec, bound: float = 0.5) -> GateTree:
    d = Dim("A", "A", transform="id", min=bound)
    return GateTree(
        "t",
        [Gate("pos", "rectangle", (d,), adaptive=(spec,))],
        {"id": LinearTransform(t=1.0)},
        bound=True,
    )


def test_low_confidence_flag_states_the_measured_depth() -> None:
    rng = np.random.default_rng(1)
    # two overlapping populations: a shallow valley (0.2-0.5 deep)
    x = np.concatenate([rng.normal(0.30, 0.05, 5000), rng.normal(0.45, 0.05, 5000)])
    events = np.column_stack([x, rng.normal(0.5, 0.1, x.size)])
    tree = _one_gate_tree(AdaptiveSpec(low=0.2, high=0.6, tail="none"), bound=0.38)
    res = tree.apply(events, ["A", "B"], adaptive=True)
    conf = res.confidence["pos:A:min"]
    assert 0.2 <= conf < 0.5
    assert len(res.flags) == 1 and res.flags[0].startswith("gate pos: A threshold placed at")
    said = re.search(r"only (\d\.\d\d) deep \(needs (\d\.\d\d)\)", res.flags[0])
    placed = re.search(r"placed at (\d\.\d+)", res.flags[0])
    assert said is not None and placed is not None
    assert float(said.group(1)) == pytest.approx(conf, abs=0.005) and said.group(2) == "0.50"
    assert float(said.group(1)) < float(said.group(2))  # the text is true
    assert float(placed.group(1)) == pytest.approx(res.thresholds["pos:A:min"], abs=5e-4)


def test_configured_bound_cutting_one_population_is_flagged() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 0.05, 8000)
    events = np.column_stack([x, x])
    res = _one_gate_tree(AdaptiveSpec(low=0.3, high=0.7, tail="none")).apply(
        events, ["A", "B"], adaptive=True
    )
    assert res.thresholds["pos:A:min"] == 0.5 and res.confidence["pos:A:min"] == 0.0
    assert len(res.flags) == 1 and "cuts through the single population" in res.flags[0]
    share = re.search(r"\((\d+)% of the events below it\)", res.flags[0])
    assert share is not None
    assert float(share.group(1)) == pytest.approx(100 * (x < 0.5).mean(), abs=1.0)
    # all events on one side of the configured bound: consistent, nothing to flag
    clear = _one_gate_tree(AdaptiveSpec(low=0.3, high=0.7, tail="none"), bound=0.7).apply(
        np.column_stack([x - 0.15, x]), ["A", "B"], adaptive=True
    )
    assert not clear.flags


def test_fixed_mode_flags_a_shift_but_keeps_the_configured_gate() -> None:
    rng = np.random.default_rng(4)
    raw = np.r_[rng.normal(0, 60, 5000), np.exp(rng.normal(np.log(3000), 0.4, 5000))]
    d = Dim("A", "A", transform="lg", min=0.36)  # where placement lands on this sample
    tree = GateTree(
        "t",
        [Gate("pos", "rectangle", (d,), adaptive=(AdaptiveSpec(),))],
        {"lg": LOGICLE},
        bound=True,
    )
    unshifted = tree.apply(np.column_stack([raw, raw]), ["A", "B"], adaptive=False)
    assert not unshifted.flags and not unshifted.confidence
    events = np.column_stack([4 * raw, raw])  # 4x brighter: 0.6 decades
    fixed = tree.apply(events, ["A", "B"], adaptive=False)
    per = tree.apply(events, ["A", "B"], adaptive=True)
    assert fixed.thresholds["pos:A:min"] == 0.36  # fixed mode gates as configured
    assert per.thresholds["pos:A:min"] == pytest.approx(0.506, abs=0.01)
    for res, how in ((fixed, "fixed thresholds used"), (per, "per-sample thresholds follow")):
        assert len(res.flags) == 1 and res.flags[0].startswith("sample looks shifted")
        assert how in res.flags[0]
        said = re.search(r"A on all ([+-]\d\.\d\d) decades", res.flags[0])
        assert said is not None
        assert float(said.group(1)) == pytest.approx(np.log10(4), abs=0.06)  # the text is true
    assert per.counts["pos"] == 5000 and fixed.counts["pos"] > 5000


def test_reference_gate_places_a_bound_its_parent_cannot() -> None:
    """CD8 memory gates fall back on CD4 (the naive CD4 cells show CCR7+ clearly)."""
    rng = np.random.default_rng(6)
    n4, n8 = 6000, 6000
    lineage = np.r_[np.zeros(n4), np.ones(n8)]
    # CD4: CCR7- and CCR7+ well separated; CD8: almost all CCR7- with a smear, no valley
    ccr7 = np.r_[
        np.where(rng.random(n4) < 0.5, rng.normal(0.2, 0.03, n4), rng.normal(0.6, 0.03, n4)),
        rng.normal(0.2, 0.03, n8) + rng.exponential(0.08, n8),
    ]
    events = np.column_stack([lineage, ccr7])
    lin = Dim("L", "L", transform="id")
    spec = AdaptiveSpec(low=0.25, high=0.55, tail="none", reference="cd4")
    gates = [
        Gate("cd4", "rectangle", (dataclasses.replace(lin, max=0.5),)),
        Gate("cd8", "rectangle", (dataclasses.replace(lin, min=0.5),)),
        Gate(
            "cd8_ccr7",
            "rectangle",
            (Dim("C", "C", transform="id", min=0.4),),
            "cd8",
            adaptive=(spec,),
        ),
        Gate(
            "cd4_ccr7",
            "rectangle",
            (Dim("C", "C", transform="id", min=0.4),),
            "cd4",
            adaptive=(spec.model_copy(update={"reference": None}),),
        ),
    ]
    tree = GateTree("t", gates, {"id": LinearTransform(t=1.0)}, bound=True)
    res = tree.apply(events, ["L", "C"], adaptive=True)
    assert res.thresholds["cd8_ccr7:C:min"] == res.thresholds["cd4_ccr7:C:min"]
    assert 0.3 < res.thresholds["cd8_ccr7:C:min"] < 0.5
    assert res.confidence["cd8_ccr7:C:min"] == res.confidence["cd4_ccr7:C:min"] > 0.9
