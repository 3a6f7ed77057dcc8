"""Batch scoring throughput and memory: 1 vs 2 local workers, and memory vs batch size.

Simulates ``--samples`` FCS files of ``--events`` events (default 200 x 300,000), then runs
``blinaprofile.score_samples`` on them with 1 and with 2 workers, each run in a fresh
subprocess watched by a sampler (psutil, every 0.2 s) that records the resident memory of
every worker process. Prints samples per minute, the speed-up, peak RSS per worker, and
whether worker memory grows with the batch: RSS over the first vs the last quarter of the
run, and the peak of a batch a quarter of the size vs the full batch.

Usage::

    python benchmarks/batch.py                      # 200 x 300k (long: ~3 GB of FCS)
    python benchmarks/batch.py --samples 40 --events 100000
    python benchmarks/batch.py --model models/default

Without ``--model`` (and without ``models/default``) a small model is trained first on a
separate simulated cohort.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _train_model(work: Path) -> str:
    from blinaprofile.config import (
        ModelSpec,
        PanelConfig,
        SimulationConfig,
        TrainConfig,
        load_config,
    )
    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.models.train import train
    from blinaprofile.settings import settings
    from blinaprofile.simulate.flow import simulate_cohort

    out = work / "model"
    if (out / "MLmodel").is_file():
        return str(out)
    sim = load_config(SimulationConfig, settings.default_simulation)
    panel = load_config(PanelConfig, settings.default_panel)
    cohort = simulate_cohort(
        sim, work / "train", panel=panel, n_patients=30, events_per_sample=10_000, seed=11
    )
    table = featurize_manifest(cohort.manifest, n_jobs=1)
    cfg = TrainConfig(
        models=[ModelSpec(family="logreg_l2")], outer_folds=3, repeats=1, n_bootstrap=0
    )
    train(
        table,
        config=cfg,
        export_dir=out,
        tracking_uri=f"sqlite:///{(work / 'mlflow.db').resolve()}",
        trained_on="benchmark (simulated)",
    )
    return str(out)


def _simulate(work: Path, n: int, events: int) -> Path:
    from blinaprofile.config import PanelConfig, SimulationConfig, load_config
    from blinaprofile.settings import settings
    from blinaprofile.simulate.flow import simulate_cohort

    folder = work / f"cohort_{n}x{events}"
    if (folder / "manifest.csv").is_file():
        return folder / "manifest.csv"
    sim = load_config(SimulationConfig, settings.default_simulation)
    panel = load_config(PanelConfig, settings.default_panel)
    t0 = time.perf_counter()
    res = simulate_cohort(sim, folder, panel=panel, n_patients=n, events_per_sample=events, seed=99)
    print(
        f"simulated {n} samples x {events:,} events in {time.perf_counter() - t0:.0f} s", flush=True
    )
    return res.manifest


def _subset(manifest: Path, k: int, dst: Path) -> Path:
    import pandas as pd

    m = pd.read_csv(manifest)
    m["file"] = [str((manifest.parent / f).resolve()) for f in m["file"]]
    m.iloc[:k].to_csv(dst, index=False)
    return dst


class Sampler(threading.Thread):
    """Records RSS (MB) of a process and its descendants every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, dict[int, float], dict[int, int]]] = []
        self.cpu: dict[int, float] = {}  # pid -> last seen user+system CPU seconds
        self.stop_event = threading.Event()

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        t0 = time.monotonic()
        while not self.stop_event.is_set():
            rss: dict[int, float] = {}
            ppid: dict[int, int] = {}
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    rss[p.pid] = p.memory_info().rss / 2**20
                    ppid[p.pid] = p.ppid()
                    t = p.cpu_times()
                    self.cpu[p.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    continue
            self.samples.append((time.monotonic() - t0, rss, ppid))
            self.stop_event.wait(self.interval)


def _workers(sampler: Sampler, root: int, n_workers: int) -> list[int]:
    """Worker pids: the processes forked by the fork server (a child of the run). With a
    per-sample time limit (the default) even one worker is such a process."""
    parents: dict[int, int] = {}
    for _, _, ppid in sampler.samples:
        parents.update(ppid)
    children = {p for p, pp in parents.items() if pp == root}
    return sorted(p for p, pp in parents.items() if pp in children)


def run_one(manifest: Path, model: str, out: Path, n_workers: int) -> dict[str, float]:
    """Run one batch in a fresh subprocess and watch its memory."""
    cmd = [
        sys.executable,
        __file__,
        "--run-one",
        str(manifest),
        "--model",
        model,
        "--out",
        str(out),
        "--workers",
        str(n_workers),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    sampler.stop_event.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"batch run failed ({proc.returncode}):\n{stdout}")
    res = json.loads(stdout.strip().splitlines()[-1])
    pids = _workers(sampler, proc.pid, n_workers)
    per_worker = {p: [s[1][p] for s in sampler.samples if p in s[1]] for p in pids}
    res["peak_rss_mb_per_worker"] = [round(max(v), 1) for v in per_worker.values() if v]
    # growth: median RSS over the second vs the last quarter of each worker's life (the first
    # quarter holds start-up: imports and loading the model)
    growth = []
    for v in per_worker.values():
        q = len(v) // 4
        if q >= 2:
            second, last = sorted(v[q : 2 * q]), sorted(v[-q:])
            growth.append(float(last[q // 2] - second[q // 2]))
    res["rss_growth_mb_2nd_to_last_quarter"] = [round(g, 1) for g in growth]
    cpu = sum(sampler.cpu.get(p, 0.0) for p in pids)
    res["worker_cpu_s"] = round(cpu, 1)
    # share of the workers' wall time they actually got a CPU (< 1: the machine was busy)
    res["cpu_busy"] = round(cpu / (res["seconds"] * n_workers), 2)
    return res


def _one(args: argparse.Namespace) -> None:
    import pandas as pd

    import blinaprofile

    n = len(pd.read_csv(args.run_one))
    t0 = time.perf_counter()
    df = blinaprofile.score_samples(
        args.run_one, model=args.model, out_dir=args.out, n_jobs=args.workers, progress=False
    )
    secs = time.perf_counter() - t0
    calls = df["call"].value_counts().to_dict()
    print(
        json.dumps(
            {
                "n": n,
                "seconds": secs,
                "samples_per_min": 60 * n / secs,
                "errors": int((df["error"] != "").sum()),
                "calls": calls,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--work", default="/tmp/blinaprofile-bench-batch", help="scratch folder")
    ap.add_argument("--model", default=None)
    ap.add_argument("--run-one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run_one:
        _one(args)
        return
    import shutil

    from blinaprofile.settings import settings

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = args.model or (
        str(settings.default_model) if settings.default_model.is_dir() else _train_model(work)
    )
    manifest = _simulate(work, args.samples, args.events)
    full = _subset(manifest, args.samples, work / "manifest_full.csv")
    quarter = _subset(manifest, max(4, args.samples // 4), work / "manifest_quarter.csv")
    rows = []
    for w in (1, 2):
        out = work / f"out_w{w}"
        shutil.rmtree(out, ignore_errors=True)
        print(f"scoring {args.samples} samples with {w} worker(s)...", flush=True)
        rows.append((w, args.samples, run_one(full, model, out, w)))
    out = work / "out_quarter"
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"scoring {max(4, args.samples // 4)} samples with 2 workers (memory vs batch size)...",
        flush=True,
    )
    small = run_one(quarter, model, out, 2)

    print()
    print(
        f"batch scoring: {args.samples} simulated samples x {args.events:,} events, model {model}"
    )
    print(
        f"{'workers':>7} {'samples':>7} {'seconds':>8} {'samples/min':>12} {'speed-up':>9} "
        f"{'peak RSS/worker (MB)':>22} {'RSS growth 2nd->last quarter (MB)':>34} "
        f"{'worker CPU s':>12} {'CPU busy':>8}"
    )
    base = rows[0][2]["samples_per_min"]
    for w, n, r in rows:
        print(
            f"{w:>7} {n:>7} {r['seconds']:>8.1f} {r['samples_per_min']:>12.1f} "
            f"{r['samples_per_min'] / base:>8.2f}x {r['peak_rss_mb_per_worker']!s:>22} "
            f"{r['rss_growth_mb_2nd_to_last_quarter']!s:>34} "
            f"{r['worker_cpu_s']:>12.1f} {r['cpu_busy']:>8.2f}"
        )
    big = rows[1][2]
    print(
        f"memory vs batch size (2 workers): peak RSS/worker {small['peak_rss_mb_per_worker']} MB for "
        f"{small['n']} samples vs {big['peak_rss_mb_per_worker']} MB for {big['n']} samples"
    )
    ratio = max(big["peak_rss_mb_per_worker"]) / max(small["peak_rss_mb_per_worker"])
    print(f"peak ratio (x{big['n'] / small['n']:.0f} samples): {ratio:.2f}")
    print(f"errors: {[r['errors'] for _, _, r in rows]}; calls (2 workers): {big['calls']}")
    print(
        f"CPU-bound speed-up (worker CPU s per sample, 1 vs 2 workers): "
        f"{rows[0][2]['worker_cpu_s'] / rows[0][1]:.2f} vs {rows[1][2]['worker_cpu_s'] / rows[1][1]:.2f}; "
        f"machine load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
