"""Adaptive gates: thresholds follow run-to-run brightness shifts; unreliable ones are flagged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from blinaprofile.gating.gates import Dim, Gate
from blinaprofile.gating.placement import find_valley
from blinaprofile.gating.sample import gate_events
from blinaprofile.gating.strategy import load_strategy
from blinaprofile.gating.tree import GateTree
from blinaprofile.io.fcs import read_fcs
from blinaprofile.simulate.flow import simulate_cohort, truth_masks

REQUIRED = ("cd8_naive", "cd8_cm", "cd8_em", "cd8_temra", "cd8_tim3", "cd4_treg")


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
        assert ad >= 0.95, g
        assert ad >= fx - 0.005, f"adaptive worse than fixed for {g}"
    print(f"QC flags raised by adaptive placement: {flags}")


def test_adaptive_subsets_still_partition_cd8(shifted_cohort) -> None:
    f = sorted((shifted_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    _, res = gate_events(read_fcs(f), load_strategy(), adaptive=True)
    total = sum(res.masks[g].astype(int) for g in ("cd8_naive", "cd8_cm", "cd8_em", "cd8_temra"))
    assert np.array_equal(total, res.masks["cd8"].astype(int))
    # every adaptive bound is recorded with a position inside its limits and a confidence
    strategy = load_strategy()
    for g in strategy.gates:
        for d, spec in zip(g.dims, g.adaptive or (None,) * len(g.dims), strict=True):
            if spec is None:
                continue
            for side in ("min", "max"):
                if getattr(d, side) is None:
                    continue
                key = f"{g.id}:{d.name}:{side}"
                assert spec.low <= res.thresholds[key] <= spec.high, key
                assert 0.0 <= res.confidence[key] <= 1.0, key


def test_find_valley_bimodal_unimodal_and_shifted() -> None:
    rng = np.random.default_rng(0)
    neg = rng.normal(0.2, 0.04, 6000)
    pos = rng.normal(0.62, 0.05, 3000)
    p = find_valley(np.concatenate([neg, pos]), start=0.45, low=0.3, high=0.55)
    assert p.moved and 0.33 < p.threshold < 0.5 and p.confidence > 0.9
    # one population only: nothing to separate, configured bound kept, no valley claimed
    u = find_valley(neg, start=0.45, low=0.3, high=0.55)
    assert not u.moved and u.reason == "one population" and u.threshold == 0.45
    # populations moved so far that the valley lies outside the limits
    far = find_valley(
        np.concatenate([rng.normal(0.45, 0.05, 6000), rng.normal(0.85, 0.05, 3000)]),
        start=0.45,
        low=0.3,
        high=0.55,
    )
    assert not far.moved and far.reason == "no valley"
    # too few events
    assert find_valley(neg[:50], start=0.45, low=0.3, high=0.55).reason == "few events"


def test_unplaceable_gate_is_a_qc_flag_not_a_silent_guess() -> None:
    from blinaprofile.config import AdaptiveSpec
    from blinaprofile.gating.transforms import LinearTransform

    rng = np.random.default_rng(1)
    # two populations at 0.2 and 0.45 (valley ~0.33) but the limits only allow [0.40, 0.60]
    x = np.concatenate([rng.normal(0.2, 0.03, 5000), rng.normal(0.45, 0.03, 5000)])
    events = np.column_stack([x, rng.normal(0.5, 0.1, x.size)])
    d = Dim("A", "A", transform="id", min=0.5)
    tree = GateTree(
        "t",
        [Gate("pos", "rectangle", (d,), adaptive=(AdaptiveSpec(low=0.40, high=0.60),))],
        {"id": LinearTransform(t=1.0)},
        bound=True,
    )
    res = tree.apply(events, ["A", "B"], adaptive=True)
    assert res.thresholds["pos:A:min"] == 0.5  # configured bound kept
    assert len(res.flags) == 1 and "pos" in res.flags[0] and "A" in res.flags[0]
    fixed = tree.apply(events, ["A", "B"], adaptive=False)
    assert fixed.counts == res.counts and not fixed.flags
