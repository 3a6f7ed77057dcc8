"""Benchmark: where the gate engine's transform speed comes from, and what delegation costs.

Run ``python benchmarks/transforms.py`` (``--help`` for options). On 1M events x 11
cytometry-like channels, with logicle (T=262144, W=0.5, M=4.5, A=0), it times

1. a range gate ``lo <= logicle(x) < hi`` per channel decided the engine's way (bounds
   mapped to raw units once with ``LogicleTransform.inverse``, raw comparison, events in
   a 1e-9 band around a raw bound re-decided with ``apply_reference``) against FlowKit's
   way (``flowutils.transforms.logicle`` on every event, then the comparison), and checks
   that membership is identical;
2. ``LogicleTransform.apply`` against ``flowutils.transforms.logicle`` (which it calls:
   the wrapper's overhead, values must be identical);
3. ``WSPBiexTransform.apply`` against FlowKit's ``WSPBiexTransform.apply`` (likewise).

Timings (wall clock and CPU time of this process) are the best of ``--repeats``
interleaved runs, so load from other processes affects both sides alike.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

import blinaprofile.gating.transforms as bt

T, W, M, A = 262144.0, 0.5, 4.5, 0.0
#: relative half-width of the band re-decided with the forward transform (as the engine)
BAND = 1e-9


def make_events(n_events: int, n_channels: int, seed: int = 0) -> npt.NDArray[np.float64]:
    """Cytometry-like compensated data: a negative/near-zero population, log-normal
    positive populations, exact zeros and a few values beyond T."""
    rng = np.random.default_rng(seed)
    data = np.empty((n_events, n_channels))
    for j in range(n_channels):
        neg = rng.random(n_events) < 0.35
        col = np.exp(rng.normal(6.0 + 0.3 * j, 1.8, n_events))
        col[neg] = rng.normal(0.0, 80.0 + 20.0 * j, int(neg.sum()))
        col[rng.random(n_events) < 0.002] = 0.0
        col[rng.random(n_events) < 0.0005] = rng.uniform(T, 4 * T)
        data[:, j] = col
    return data


def timed(func: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = func()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def compare(
    label: str,
    ours: Callable[[], npt.NDArray[Any]],
    reference: Callable[[], npt.NDArray[Any]],
    repeats: int,
) -> None:
    """Print best-of-``repeats`` timings of both and check that their results are equal."""
    t_ours = c_ours = t_ref = c_ref = float("inf")
    ours_result = ref_result = None
    for _ in range(repeats):  # interleaved, best of
        wall, cpu, ours_result = timed(ours)
        t_ours, c_ours = min(t_ours, wall), min(c_ours, cpu)
        wall, cpu, ref_result = timed(reference)
        t_ref, c_ref = min(t_ref, wall), min(c_ref, cpu)
    identical = np.array_equal(ours_result, ref_result, equal_nan=True)  # type: ignore[arg-type]
    print(f"\n== {label}")
    print(f"  reference : {t_ref:7.3f} s wall  {c_ref:7.3f} s cpu")
    print(f"  ours      : {t_ours:7.3f} s wall  {c_ours:7.3f} s cpu")
    print(f"  speed-up  : {t_ref / t_ours:7.1f} x wall  {c_ref / c_ours:7.1f} x cpu")
    print(f"  results   : {'identical' if identical else 'DIFFER'}")


def range_gate_raw(
    data: npt.NDArray[np.float64], tr: bt.LogicleTransform, lo: float, hi: float
) -> npt.NDArray[np.bool_]:
    """``lo <= tr(x) < hi`` per column, the engine's way (raw bounds, band re-decided)."""
    raw_lo, raw_hi = tr.inverse(np.array([lo, hi]))
    out = np.empty(data.shape, dtype=bool)
    for j in range(data.shape[1]):
        x = data[:, j]
        inside = (x >= raw_lo) & (x < raw_hi)
        near = np.flatnonzero(
            (np.abs(x - raw_lo) <= BAND * max(1.0, abs(raw_lo)))
            | (np.abs(x - raw_hi) <= BAND * max(1.0, abs(raw_hi)))
        )
        if near.size:
            y = tr.apply_reference(x[near])
            inside[near] = (y >= lo) & (y < hi)
        out[:, j] = inside
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--channels", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import flowutils.transforms as fu
    from flowkit import transforms as fkt

    print(f"load average: {os.getloadavg()}  cpus: {os.cpu_count()}")
    data = make_events(args.events, args.channels)
    print(f"input: {data.shape[0]:,} x {data.shape[1]} float64 ({data.nbytes / 2**20:.1f} MiB)")
    tr = bt.LogicleTransform(T, W, M, A)
    lo, hi = 0.31, 0.69

    def range_gate_forward() -> npt.NDArray[np.bool_]:
        y = fu.logicle(data, None, t=T, m=M, w=W, a=A)
        return np.asarray((y >= lo) & (y < hi))

    compare(
        f"range gate {lo} <= logicle(x) < {hi} on every channel (vs forward transform)",
        lambda: range_gate_raw(data, tr, lo, hi),
        range_gate_forward,
        args.repeats,
    )
    compare(
        f"logicle T={T:g} W={W} M={M} A={A}, all channels (vs flowutils.transforms.logicle)",
        lambda: tr.apply(data),
        lambda: fu.logicle(data, None, t=T, m=M, w=W, a=A),
        args.repeats,
    )
    biex = bt.WSPBiexTransform()
    fk_biex = fkt.WSPBiexTransform()
    compare(
        "FlowJo biex, defaults, all channels (vs FlowKit WSPBiexTransform)",
        lambda: np.column_stack([biex.apply(data[:, j]) for j in range(data.shape[1])]),
        lambda: np.column_stack([fk_biex.apply(data[:, j]) for j in range(data.shape[1])]),
        args.repeats,
    )


if __name__ == "__main__":
    main()
