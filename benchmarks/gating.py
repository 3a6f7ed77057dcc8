"""Gating speed: blinaprofile's gate-tree engine versus FlowKit's ``GatingStrategy.gate_sample``.

A 1,000,000-event sample is simulated in memory with the default post-transplant T-cell
panel (15 parameters, $SPILLOVER) and gated with the default T-cell strategy (17 gates:
2 polygons on scatter, 15 rectangles on compensated logicle channels). The same file is
written once as FCS so that FlowKit reads exactly the same events; both engines are timed
on events already in memory (FCS parsing excluded), in the same run, and their per-event
membership is checked to be identical.

Run::

    .venv/bin/python benchmarks/gating.py [--events 1000000] [--repeats 5]

Prints events/s of both engines, the ratio (goal: >= 20x), and the engine's peak extra
memory (tracemalloc) against the size of the event matrix (goal: < 4x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def simulate_sample(n_events: int, seed: int = 7) -> tuple[np.ndarray, list[str], list[str], tuple]:
    """One simulated acquisition: (events float32, channels, markers, spillover)."""
    from blinaprofile.config import PanelConfig, SimulationConfig, load_config
    from blinaprofile.simulate.cohort import draw_cohort
    from blinaprofile.simulate.flow import _DYES, SPILLOVER, _panel_columns, simulate_events

    cfg = load_config(SimulationConfig, ROOT / "configs" / "simulation" / "default.yaml")
    panel = load_config(PanelConfig, ROOT / "configs" / "panels" / "post_hct_tcell.yaml")
    row = draw_cohort(cfg, seed=seed).iloc[0].to_dict()
    rng = np.random.default_rng(seed)
    cols, _truth = simulate_events(row, n_events=n_events, rng=rng, config=cfg)
    channels, markers, keys = _panel_columns(panel)
    events = np.column_stack([cols[k] for k in keys]).astype(np.float32)
    spill_channels = [channels[keys.index(d)] for d in _DYES if d in keys]
    idx = [_DYES.index(d) for d in _DYES if d in keys]
    return events, channels, markers, (spill_channels, SPILLOVER[np.ix_(idx, idx)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of our engine")
    ap.add_argument("--flowkit-repeats", type=int, default=1)
    a = ap.parse_args(argv)

    import flowkit as fk

    from blinaprofile.gating.events import fcs_scaling
    from blinaprofile.gating.strategy import load_strategy
    from blinaprofile.io.fcs import read_fcs
    from blinaprofile.io.fcs_write import write_fcs

    t0 = time.perf_counter()
    events32, channels, markers, spill = simulate_sample(a.events)
    print(
        f"simulated {a.events:,} events x {len(channels)} channels in {time.perf_counter() - t0:.1f} s"
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.fcs"
        write_fcs(path, events32, channels=channels, markers=markers, spillover=spill)
        data = read_fcs(path)  # float64, exactly what FlowKit reads
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FlowKit warns about the simulated file's keywords
            sample = fk.Sample(str(path))
    events = data.events
    tree = load_strategy().bind(data.channels, data.markers, path=str(path))
    n_gates = len(tree.gates)
    scaling = fcs_scaling(data)

    def ours() -> object:
        return tree.apply(
            events, data.channels, spillover=data.spillover, scaling=scaling, adaptive=False
        )

    ours()  # warm-up: first-use imports and compensation set-up
    times = []
    for _ in range(a.repeats):
        t = time.perf_counter()
        res = ours()
        times.append(time.perf_counter() - t)
    t_ours = statistics.median(times)

    tracemalloc.start()
    res = ours()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    gs = tree.to_flowkit()
    fk_times = []
    for _ in range(a.flowkit_repeats):
        t = time.perf_counter()
        fk_res = gs.gate_sample(sample)
        fk_times.append(time.perf_counter() - t)
    t_fk = statistics.median(fk_times)

    mismatched = [
        g.id
        for g in tree.gates
        if not np.array_equal(fk_res.get_gate_membership(g.id), res.masks[g.id])  # type: ignore[attr-defined]
    ]
    n = events.shape[0]
    mat = events.nbytes
    print(f"strategy       {tree.name} ({n_gates} gates), {os.cpu_count()} CPUs")
    print(
        f"blinaprofile   {t_ours:8.3f} s  {n / t_ours:14,.0f} events/s  (median of {a.repeats}: {', '.join(f'{x:.3f}' for x in times)})"
    )
    print(
        f"FlowKit {fk.__version__:<6} {t_fk:8.3f} s  {n / t_fk:14,.0f} events/s  (median of {a.flowkit_repeats})"
    )
    print(f"speed-up       {t_fk / t_ours:8.1f}x   (goal >= 20x)")
    print(f"event matrix   {mat / 2**20:8.1f} MiB ({events.dtype}, {n:,} x {events.shape[1]})")
    print(
        f"peak memory    {peak / 2**20:8.1f} MiB allocated by the engine = {peak / mat:.2f}x the event matrix (goal < 4x)"
    )
    print(
        f"membership     {'identical to FlowKit for all gates' if not mismatched else f'DIFFERS for {mismatched}'}"
    )
    return 0 if not mismatched else 1


if __name__ == "__main__":
    sys.exit(main())
