"""Benchmark: blinaprofile's logicle vs flowutils' (what FlowKit 1.3 calls).

Run ``python benchmarks/transforms.py`` (``--help`` for options). Transforms 1M events x
11 channels with logicle (T=262144, W=0.5, M=4.5, A=0), timing

* flowutils: ``flowutils.transforms.logicle(data, None, ...)`` (FlowKit's code path),
* ours: ``blinaprofile.gating.transforms.transform_columns`` (cold = first call, including the
  per-parameter-set table build; warm = best of ``--repeats``),

and prints seconds, the speed-up, the max abs difference and the peak traced memory
(``tracemalloc``, which numpy reports its allocations to). Timings (wall clock and CPU
time of this process) are the best of ``--repeats`` interleaved runs, so load from other
processes affects both sides alike; with ``--threads > 1`` compare wall times only.
A second section repeats the comparison with a different logicle parameter set per
channel (11 table builds on the cold call), and a third with FlowJo's biex transform
against FlowKit's ``WSPBiexTransform``.
"""

from __future__ import annotations

import argparse
import os
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

import blinaprofile.gating.transforms as bt

T, W, M, A = 262144.0, 0.5, 4.5, 0.0


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


def peak_memory(func: Callable[[], Any]) -> float:
    """Peak traced allocation (bytes) while running ``func``, result freed afterwards."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = func()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    del result
    return float(peak)


def as_matrix(columns: dict[int, npt.NDArray[np.float64]]) -> npt.NDArray[np.float64]:
    return np.column_stack([columns[j] for j in sorted(columns)])


def compare(
    label: str,
    data: npt.NDArray[np.float64],
    ours: Callable[[], dict[int, npt.NDArray[np.float64]]],
    reference: Callable[[], npt.NDArray[np.float64]],
    repeats: int,
) -> None:
    cold, cold_cpu, ours_result = timed(ours)
    t_ours = c_ours = t_ref = c_ref = float("inf")
    ref_result: npt.NDArray[np.float64] | None = None
    for _ in range(repeats):  # interleaved, best of
        wall, cpu, ours_result = timed(ours)
        t_ours, c_ours = min(t_ours, wall), min(c_ours, cpu)
        wall, cpu, ref_result = timed(reference)
        t_ref, c_ref = min(t_ref, wall), min(c_ref, cpu)
    assert ref_result is not None
    diff = float(np.max(np.abs(as_matrix(ours_result) - ref_result)))
    input_mb = data.nbytes / 2**20
    mem_ours = peak_memory(ours) / 2**20
    mem_ref = peak_memory(reference) / 2**20
    print(f"\n== {label}")
    print(f"  input                   : {data.shape[0]:,} x {data.shape[1]} ({input_mb:.1f} MiB)")
    print(
        f"  reference               : {t_ref:7.3f} s wall  {c_ref:7.3f} s cpu  peak {mem_ref:6.1f} MiB"
    )
    print(
        f"  ours (warm)             : {t_ours:7.3f} s wall  {c_ours:7.3f} s cpu  peak {mem_ours:6.1f} MiB"
    )
    print(f"  ours (cold, incl. build): {cold:7.3f} s wall  {cold_cpu:7.3f} s cpu")
    print(f"  speed-up (warm)         : {t_ref / t_ours:7.1f} x wall  {c_ref / c_ours:7.1f} x cpu")
    print(f"  speed-up (cold)         : {t_ref / cold:7.1f} x wall  {c_ref / cold_cpu:7.1f} x cpu")
    print(f"  max abs difference      : {diff:.3e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--channels", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="n_threads for ours")
    args = parser.parse_args()

    import flowutils.transforms as fu
    from flowkit import transforms as fkt

    print(f"load average: {os.getloadavg()}  cpus: {os.cpu_count()}  threads: {args.threads}")
    data = make_events(args.events, args.channels)
    n_ch = args.channels

    # 1. one logicle parameter set for every channel (the headline number)
    tr = bt.LogicleTransform(T, W, M, A)
    compare(
        f"logicle T={T:g} W={W} M={M} A={A}, all channels",
        data,
        lambda: bt.transform_columns(data, dict.fromkeys(range(n_ch), tr), n_threads=args.threads),
        lambda: fu.logicle(data, None, t=T, m=M, w=W, a=A),
        args.repeats,
    )

    # 2. a distinct parameter set per channel, as FlowJo's per-channel widths give
    params = [(T, 0.3 + 0.1 * j, 4.5, 0.1 * (j % 3)) for j in range(n_ch)]
    per_channel: dict[int, bt.Transform] = {
        j: bt.LogicleTransform(*p) for j, p in enumerate(params)
    }

    def flowutils_per_channel() -> npt.NDArray[np.float64]:
        out = data.copy()
        for j, (t, w, m, a) in enumerate(params):
            out[:, j] = fu.logicle(data[:, j], None, t=t, m=m, w=w, a=a)
        return out

    compare(
        "logicle, a different (T, W, M, A) per channel",
        data,
        lambda: bt.transform_columns(data, per_channel, n_threads=args.threads),
        flowutils_per_channel,
        args.repeats,
    )

    # 3. FlowJo biex (FlowKit: scipy interp1d over a 4097-point table)
    biex = bt.WSPBiexTransform()
    fk_biex = fkt.WSPBiexTransform()
    compare(
        "FlowJo biex (FlowKit WSPBiexTransform defaults)",
        data,
        lambda: bt.transform_columns(
            data, dict.fromkeys(range(n_ch), biex), n_threads=args.threads
        ),
        lambda: np.column_stack([fk_biex.apply(data[:, j]) for j in range(n_ch)]),
        args.repeats,
    )


if __name__ == "__main__":
    main()
