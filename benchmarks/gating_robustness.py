"""Gate placement under brightness shifts: fixed thresholds versus per-sample placement.

Three parts, each printing a table:

1. **Simulated cohort** (``blinaprofile.simulate.flow``, no built-in brightness jitter): the
   fluorescence values of the written events are multiplied per channel (0.25x, 0.5x,
   1x, 2x, 4x on every channel; a random mix of those factors per channel, with the file's
   spillover matrix kept or rescaled consistently) or spread out (each value times a
   log-normal factor, CV ~25%; extra additive noise, SD 150). Per-subset F1 against the
   simulator's per-event truth, pooled over samples, for every memory subset, TIM3+,
   PD-1+ and Treg (and CD3/CD4/CD8), fixed thresholds and per-sample placement side by
   side (``fixed/per-sample``), plus the worst sample.
2. **Real files** (``../shared/data``): each file gated as read and as a copy with every
   fluorescence channel scaled by 0.25x, 0.5x, 2x and 4x (stored values scaled before
   compensation, so the scaled copy is what the instrument would have recorded), and a
   per-channel mix of those factors (matrix kept: voltage changes without new
   compensation; matrix rescaled: recompensated). F1 of each gate's membership on the
   copy against the original (shift invariance).
3. **68983.fcs against its manual labels** (``gatingResult.csv``): F1 of CD4 and CD8 T
   cells under the same shifts.

It also times per-sample placement (all ``place_thresholds`` calls of one sample) on a
100,000-event simulated sample.

Run::

    .venv/bin/python benchmarks/gating_robustness.py [--samples 8] [--events 50000]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
FACTORS = (0.25, 0.5, 2.0, 4.0)
SUBSETS = (
    "cd3",
    "cd4",
    "cd8",
    "cd8_naive",
    "cd8_cm",
    "cd8_em",
    "cd8_temra",
    "cd4_naive",
    "cd4_cm",
    "cd4_em",
    "cd4_temra",
    "cd8_tim3",
    "cd8_pd1",
    "cd4_treg",
)


# ---------------------------------------------------------------------- shifted copies
def fluorescence_channels(data: Any) -> list[str]:
    """The channels a brightness shift acts on (the spillover detectors, else non-scatter)."""
    if data.spillover is not None:
        return list(data.spillover[0])
    return [c for c in data.channels if not c.upper().startswith(("FSC", "SSC", "TIME"))]


def scaled_copy(data: Any, factors: dict[str, float] | float, *, consistent: bool = True) -> Any:
    """A copy of an FCS sample with fluorescence channels multiplied before compensation.

    ``consistent``: rescale the spillover matrix too (``S'[i, j] = S[i, j] c_j / c_i``), so
    the compensated values are exactly the original ones times ``c``; otherwise the matrix
    is kept (identical when every channel has the same factor).
    """
    if not isinstance(factors, dict):
        factors = dict.fromkeys(fluorescence_channels(data), float(factors))
    ev = np.array(data.events, dtype=np.float64, copy=True)
    for ch, c in factors.items():
        ev[:, data.channels.index(ch)] *= c
    sp = data.spillover
    if sp is not None and consistent:
        det, m = sp
        cs = np.array([factors.get(x, 1.0) for x in det])
        sp = (list(det), np.asarray(m) * cs[None, :] / cs[:, None])
    return dataclasses.replace(data, events=ev, spillover=sp)


def spread_copy(data: Any, *, cv: float = 0.0, noise: float = 0.0, seed: int = 0) -> Any:
    """A copy with wider populations and more electronic noise.

    Every compensated fluorescence value is multiplied by its own ``exp(N(0, cv))`` (each
    population's spread grows; spillover stays consistent: the values are spilled back
    with the file's matrix), then ``N(0, noise)`` is added to every stored value.
    """
    rng = np.random.default_rng(seed)
    ev = np.array(data.events, dtype=np.float64, copy=True)
    chans = fluorescence_channels(data)
    cols = [data.channels.index(c) for c in chans]
    if cv:
        if data.spillover is not None:
            det, m = data.spillover
            order = [list(det).index(c) for c in chans]
            s = np.asarray(m, dtype=np.float64)[np.ix_(order, order)]
            comp = np.linalg.solve(s.T, ev[:, cols].T).T
            comp *= np.exp(rng.normal(0.0, cv, comp.shape))
            ev[:, cols] = comp @ s
        else:
            ev[:, cols] *= np.exp(rng.normal(0.0, cv, (ev.shape[0], len(cols))))
    if noise:
        ev[:, cols] += rng.normal(0.0, noise, (ev.shape[0], len(cols)))
    return dataclasses.replace(data, events=ev)


def mixed_factors(data: Any, seed: int) -> dict[str, float]:
    """A random factor of 0.25x, 0.5x, 2x or 4x for each fluorescence channel."""
    rng = np.random.default_rng(seed)
    choices = FACTORS
    return {ch: float(rng.choice(choices)) for ch in fluorescence_channels(data)}


def scenarios() -> list[tuple[str, Callable[[Any, int], Any]]]:
    """Named transformations of a sample (the int is a per-sample seed)."""

    def uniform(factor: float) -> Callable[[Any, int], Any]:
        def make(d: Any, s: int) -> Any:
            return scaled_copy(d, factor) if factor != 1.0 else d

        return make

    out: list[tuple[str, Callable[[Any, int], Any]]] = [
        (f"{f:g}x", uniform(f)) for f in (0.25, 0.5, 1.0, 2.0, 4.0)
    ]
    out.append(("mix", lambda d, s: scaled_copy(d, mixed_factors(d, s), consistent=False)))
    out.append(("mix+comp", lambda d, s: scaled_copy(d, mixed_factors(d, s))))
    out.append(("cv25%", lambda d, s: spread_copy(d, cv=0.25, seed=s)))
    out.append(("noise150", lambda d, s: spread_copy(d, noise=150.0, seed=s)))
    out.append(("0.5x+cv", lambda d, s: spread_copy(scaled_copy(d, 0.5), cv=0.25, seed=s)))
    return out


def f1(mask: np.ndarray, truth: np.ndarray) -> float:
    """F1 of a gate's membership against a reference membership (1.0 if both empty)."""
    tp = int(np.count_nonzero(mask & truth))
    fp = int(np.count_nonzero(mask & ~truth))
    fn = int(np.count_nonzero(~mask & truth))
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0


# ---------------------------------------------------------------------- part 1
def simulated(n_samples: int, n_events: int, seed: int, work: Path) -> pd.DataFrame:
    """Pooled and worst-sample F1 per subset, scenario and mode on a simulated cohort."""
    from blinaprofile.config import PanelConfig, SimulationConfig, load_config
    from blinaprofile.gating.sample import gate_events
    from blinaprofile.gating.strategy import load_strategy
    from blinaprofile.io.fcs import read_fcs
    from blinaprofile.simulate.flow import simulate_cohort, truth_masks

    cfg = load_config(SimulationConfig, ROOT / "configs" / "simulation" / "default.yaml")
    panel = load_config(PanelConfig, ROOT / "configs" / "panels" / "post_hct_tcell.yaml")
    cohort = simulate_cohort(
        cfg,
        work,
        panel=panel,
        n_patients=n_samples,
        events_per_sample=n_events,
        seed=seed,
        brightness_shift=0.0,
    )
    strategy = load_strategy()
    rows = []
    for i, f in enumerate(sorted((cohort.out_dir / "fcs").glob("*.fcs"))):
        data = read_fcs(f)
        truth = truth_masks(pd.read_parquet(cohort.out_dir / "truth" / f"{f.stem}.parquet"))
        for name, make in scenarios():
            d = make(data, seed + i)
            for adaptive in (False, True):
                bound, res = gate_events(d, strategy, adaptive=adaptive)
                if adaptive:
                    rows.append(
                        {
                            "scenario": name,
                            "mode": "oracle",
                            "sample": f.stem,
                            "gate": "cd8_tim3",
                            **_oracle(bound, res, d, truth["cd8_tim3"], "cd8_tim3", "TIM3", "cd8"),
                        }
                    )
                shifted = any(fl.startswith("sample looks shifted") for fl in res.flags)
                for g in SUBSETS:
                    m, t = res.masks[g], truth[g]
                    rows.append(
                        {
                            "scenario": name,
                            "mode": "per-sample" if adaptive else "fixed",
                            "sample": f.stem,
                            "gate": g,
                            "tp": int(np.count_nonzero(m & t)),
                            "fp": int(np.count_nonzero(m & ~t)),
                            "fn": int(np.count_nonzero(~m & t)),
                            "f1": f1(m, t),
                            "flags": len(res.flags),
                            "shift_flag": shifted,
                        }
                    )
    return pd.DataFrame(rows)


def _oracle(
    bound: Any, res: Any, data: Any, truth: np.ndarray, gate: str, dim: str, parent: str
) -> dict[str, Any]:
    """Tallies of the best single threshold for one sample (on the per-sample parent)."""
    from blinaprofile.gating.events import EventCache, fcs_scaling

    ev = EventCache(
        bound, data.events, data.channels, data.spillover, None, scaling=fcs_scaling(data)
    )
    d = next(x for x in bound.gate(gate).dims if x.name == dim)
    rows = np.flatnonzero(res.masks[parent])
    x = ev.transformed(d, rows)
    t = truth[rows]
    missed = int(np.count_nonzero(truth)) - int(np.count_nonzero(t))  # outside the parent
    best = (-1.0, 0, 0, 0)
    for cut in np.quantile(x, np.linspace(0.3, 0.999, 400)):
        m = x >= cut
        tp = int(np.count_nonzero(m & t))
        fp = int(np.count_nonzero(m & ~t))
        fn = int(np.count_nonzero(~m & t)) + missed
        score = 2 * tp / max(1, 2 * tp + fp + fn)
        if score > best[0]:
            best = (score, tp, fp, fn)
    return {
        "tp": best[1],
        "fp": best[2],
        "fn": best[3],
        "f1": best[0],
        "flags": 0,
        "shift_flag": False,
    }


def print_simulated(df: pd.DataFrame) -> None:
    names = [n for n, _ in scenarios()]
    pooled = df.groupby(["gate", "scenario", "mode"])[["tp", "fp", "fn"]].sum()
    pooled["f1"] = 2 * pooled.tp / (2 * pooled.tp + pooled.fp + pooled.fn)
    worst = df[df["mode"] != "oracle"].groupby(["gate", "scenario", "mode"])["f1"].min()
    n = df["sample"].nunique()
    print(f"\n1. Simulated cohort, {n} samples: pooled F1 against truth, fixed/per-sample")
    print(f"{'subset':<11}" + "".join(f"{s:>13}" for s in names))
    for g in SUBSETS:
        cells = [
            f"{pooled.loc[(g, s, 'fixed'), 'f1']:.3f}/{pooled.loc[(g, s, 'per-sample'), 'f1']:.3f}"
            for s in names
        ]
        print(f"{g:<11}" + "".join(f"{c:>13}" for c in cells))
    cells = [f"{pooled.loc[('cd8_tim3', s, 'oracle'), 'f1']:.3f}" for s in names]
    print(f"{'tim3 best':<11}" + "".join(f"{c:>13}" for c in cells))
    print(
        f"{'worst':<11}"
        + "".join(
            f"{worst.xs((s, 'fixed'), level=(1, 2)).min():.3f}/"
            f"{worst.xs((s, 'per-sample'), level=(1, 2)).min():.3f}".rjust(13)
            for s in names
        )
    )
    per = df[df["mode"] == "per-sample"].groupby("scenario")
    fix = df[df["mode"] == "fixed"].groupby("scenario")
    flag_rate = [
        f"{fix.get_group(s).groupby('sample')['shift_flag'].first().mean():.0%}/"
        f"{per.get_group(s).groupby('sample')['shift_flag'].first().mean():.0%}"
        for s in names
    ]
    print(f"{'shift flag':<11}" + "".join(f"{c:>13}" for c in flag_rate))
    print("(worst: lowest F1 of any subset in any sample; shift flag: share of samples flagged)")
    print("(tim3 best: the best single TIM3 threshold per sample on the per-sample CD8 gate)")
    low = df[(df["mode"] == "per-sample") & (df["f1"] < 0.97) & (df["scenario"] != "mix")]
    best = df[df["mode"] == "oracle"].set_index(["scenario", "sample"])["f1"]
    for r in low.sort_values("f1").head(10).itertuples():
        extra = (
            f" (best single threshold {best.loc[(r.scenario, r.sample)]:.3f})"
            if r.gate == "cd8_tim3"
            else ""
        )
        print(f"  per-sample below 0.97: {r.scenario} {r.sample} {r.gate} F1 {r.f1:.3f}{extra}")


# ---------------------------------------------------------------------- part 2 and 3
def real_cases() -> list[tuple[str, Path, Path]]:
    """(name, FCS file, strategy) of the real-file checks."""
    gating = ROOT / "configs" / "gating"
    return [
        ("100715", SHARED / "real-fcs" / "100715.fcs", gating / "memory_cd45ro.yaml"),
        ("68983", SHARED / "flowjo-workspace" / "68983.fcs", gating / "mouse_spleen_68983.yaml"),
        (
            "comp_example",
            SHARED / "real-fcs" / "test_comp_example.fcs",
            gating / "lsrii_comp_example.yaml",
        ),
    ]


def real_shifts() -> list[tuple[str, Callable[[Any], Any]]]:
    """Named shifted copies of a real file (uniform factors; per-channel mixes)."""

    def uniform(factor: float) -> Callable[[Any], Any]:
        return lambda d: scaled_copy(d, factor)

    out: list[tuple[str, Callable[[Any], Any]]] = [(f"{f:g}x", uniform(f)) for f in FACTORS]
    out.append(("mix", lambda d: scaled_copy(d, mixed_factors(d, 11), consistent=False)))
    out.append(("mix+comp", lambda d: scaled_copy(d, mixed_factors(d, 11))))
    return out


def real_invariance() -> tuple[pd.DataFrame, pd.DataFrame]:
    """F1 of every gate on shifted copies against the original; 68983 against manual labels."""
    from blinaprofile.gating.sample import gate_events
    from blinaprofile.gating.strategy import load_strategy
    from blinaprofile.io.fcs import read_fcs

    rows, manual = [], []
    for name, path, strat in real_cases():
        data = read_fcs(path)
        strategy = load_strategy(strat)
        labels = None
        if name == "68983":
            labels = pd.read_csv(path.parent / "gatingResult.csv", header=None)[0].to_numpy()
        for adaptive in (False, True):
            mode = "per-sample" if adaptive else "fixed"
            bound, base = gate_events(data, strategy, adaptive=adaptive)
            for shift, make in [("1x", lambda d: d), *real_shifts()]:
                _, res = gate_events(make(data), strategy, adaptive=adaptive)
                for g in bound.gate_ids:
                    rows.append(
                        {
                            "file": name,
                            "gate": g,
                            "n": int(base.counts[g]),
                            "mode": mode,
                            "shift": shift,
                            "f1": f1(res.masks[g], base.masks[g]),
                        }
                    )
                if labels is not None:
                    for g, lab in (("cd4", "CD4 T cells"), ("cd8", "CD8 T cells")):
                        manual.append(
                            {
                                "gate": lab,
                                "mode": mode,
                                "shift": shift,
                                "f1": f1(res.masks[g], labels == lab),
                            }
                        )
    return pd.DataFrame(rows), pd.DataFrame(manual)


def print_real(df: pd.DataFrame, manual: pd.DataFrame) -> None:
    shifts = [s for s, _ in real_shifts()]
    print("\n2. Real files: F1 of each gate on the shifted copy against the file as read,")
    print("   fixed/per-sample (n: events in the gate on the original, per-sample mode)")
    print(f"{'file:gate':<26}{'n':>7}" + "".join(f"{s:>13}" for s in shifts))
    for (file, gate), sub in df.groupby(["file", "gate"], sort=False):
        n = int(sub[(sub["mode"] == "per-sample") & (sub["shift"] == "1x")]["n"].iloc[0])
        cells = []
        for s in shifts:
            fx = sub[(sub["mode"] == "fixed") & (sub["shift"] == s)]["f1"].iloc[0]
            ad = sub[(sub["mode"] == "per-sample") & (sub["shift"] == s)]["f1"].iloc[0]
            cells.append(f"{fx:.3f}/{ad:.3f}")
        print(f"{file + ':' + gate:<26}{n:>7}" + "".join(f"{c:>13}" for c in cells))
    print("\n3. 68983.fcs against the manual labels (gatingResult.csv): F1, fixed/per-sample")
    cols = ["1x", *shifts]
    print(f"{'population':<14}" + "".join(f"{s:>13}" for s in cols))
    for lab, sub in manual.groupby("gate"):
        cells = []
        for s in cols:
            fx = sub[(sub["mode"] == "fixed") & (sub["shift"] == s)]["f1"].iloc[0]
            ad = sub[(sub["mode"] == "per-sample") & (sub["shift"] == s)]["f1"].iloc[0]
            cells.append(f"{fx:.3f}/{ad:.3f}")
        print(f"{lab:<14}" + "".join(f"{c:>13}" for c in cells))


# ---------------------------------------------------------------------- timing
def placement_cost(n_events: int, work: Path, repeats: int = 9) -> dict[str, float]:
    """Cost (ms, fastest of ``repeats``) of per-sample placement on one simulated sample.

    ``placement``: all ``place_thresholds`` calls of one ``apply`` (wall clock) and
    ``placement_cpu`` (process CPU time, robust to other jobs on a shared machine);
    ``with``/``without``: the whole per-sample ``apply`` and the same tree with every
    adaptive spec removed (no placement at all); ``calls``: placement calls.
    """
    import blinaprofile.gating.tree as tree_mod
    from blinaprofile.config import PanelConfig, SimulationConfig, load_config
    from blinaprofile.gating.events import fcs_scaling
    from blinaprofile.gating.strategy import load_strategy
    from blinaprofile.io.fcs import read_fcs
    from blinaprofile.simulate.flow import simulate_cohort

    cfg = load_config(SimulationConfig, ROOT / "configs" / "simulation" / "default.yaml")
    panel = load_config(PanelConfig, ROOT / "configs" / "panels" / "post_hct_tcell.yaml")
    cohort = simulate_cohort(
        cfg, work, panel=panel, n_patients=2, events_per_sample=n_events, seed=5
    )
    f = sorted((cohort.out_dir / "fcs").glob("*.fcs"))[0]
    data = read_fcs(f)
    bound = load_strategy().bind(data.channels, data.markers)
    scaling = fcs_scaling(data)
    original = tree_mod.place_thresholds
    wall: list[float] = []
    cpu: list[float] = []

    def timed(*args: Any, **kw: Any) -> Any:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kw)
        finally:
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)

    def run(tree: Any, adaptive: bool) -> float:
        t0 = time.perf_counter()
        tree.apply(
            data.events, data.channels, spillover=data.spillover, adaptive=adaptive, scaling=scaling
        )
        return time.perf_counter() - t0

    out = {"placement": np.inf, "placement_cpu": np.inf, "with": np.inf, "without": np.inf}
    tree_mod.place_thresholds = timed
    try:
        run(bound, True)  # warm-up (imports, FFT plans)
        for _ in range(repeats):
            wall.clear()
            cpu.clear()
            total = run(bound, True)
            out["with"] = min(out["with"], total)
            out["placement"] = min(out["placement"], sum(wall))
            out["placement_cpu"] = min(out["placement_cpu"], sum(cpu))
        out["calls"] = len(wall)
    finally:
        tree_mod.place_thresholds = original
    plain = dataclasses.replace(
        bound, gates=[dataclasses.replace(g, adaptive=()) for g in bound.gates]
    )
    for _ in range(repeats):
        out["without"] = min(out["without"], run(plain, False))
    return {k: (v * 1e3 if k != "calls" else v) for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=2026)
    ap.add_argument("--skip-sim", action="store_true")
    ap.add_argument("--skip-real", action="store_true")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        c = placement_cost(100_000, Path(tmp) / "timing")
        print(
            f"placement cost per 100,000-event sample ({int(c['calls'])} placement calls, "
            f"fastest of 9): {c['placement']:.1f} ms wall, {c['placement_cpu']:.1f} ms CPU "
            f"(goal <= 50 ms); whole apply {c['with']:.1f} ms with placement, "
            f"{c['without']:.1f} ms without (marginal {c['with'] - c['without']:.1f} ms)"
        )
        if not a.skip_sim:
            print_simulated(simulated(a.samples, a.events, a.seed, Path(tmp) / "sim"))
    if not a.skip_real:
        if not SHARED.is_dir():
            print(f"\n{SHARED} not found: real-file checks skipped")
        else:
            print_real(*real_invariance())
    return 0


if __name__ == "__main__":
    sys.exit(main())
