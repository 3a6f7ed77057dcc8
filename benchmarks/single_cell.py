"""Benchmark: single-cell cohorts to per-sample features, 100k cells in memory and 1M streamed.

Issue 13 ("Scale"): a 1M-cell x 2,000-gene multi-sample ``.h5ad`` (500 samples, RNA +
CITE-seq protein, or RNA only) featurized with a fitted annotator in <= 30 s wall and <= 4 GB
peak resident memory on a 2-core machine, reading included. Each measured run is a fresh
child process timing, from a cold start of the library, either

- ``in-memory`` (the path before issue 13): ``read_single_cell`` + ``featurize_cells``, the
  annotator fitted on every cell (budget 20 s / 3 GB at 100k cells), or
- ``streamed``: ``featurize_cohort`` (``blinaprofile.features.singlecell_chunked``): the file
  read in blocks of rows, the annotator fitted on a per-sample stratified subsample
  (``--max-cells-per-sample``, seed 0), then every cell labelled with it a group of samples at
  a time, in ``--n-jobs`` processes.

Printed per run: cells, genes, samples, modality, path, wall seconds, CPU seconds (user + sys
of the process and of its worker processes), the load average (the machine is shared: compare
CPU seconds when the load is high), peak resident memory (the process, plus the largest
worker when ``--n-jobs`` > 1) and whether the goal is met; then the phases, the alone-vs-
cohort identity (``--alone`` samples read alone from the file and featurized with the fitted
annotator, against their rows in the cohort table: max |difference| over every feature) and,
at 100k cells, how far the subsample-fitted features are from the full fit.

The simulated files are generated once (not timed) and cached in ``--data-dir`` (default
``$TMPDIR/bp_sc_bench``, outside the repository); 1M cells are simulated in parts of 100k and
concatenated on disk.

Usage::

    python benchmarks/single_cell.py                          # 100k and 1M, both modalities
    python benchmarks/single_cell.py --cohort-cells 0         # 100k only
    python benchmarks/single_cell.py --n-jobs 1 --alone 20 --modes protein
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
#: (wall seconds, peak resident GB) goals: the 100k budget before issue 13, the 1M goal
GOALS = {100_000: (20.0, 3.0), 1_000_000: (30.0, 4.0)}


def _generate(data_dir: Path, n_cells: int, n_genes: int, seed: int) -> Path:
    from blinaprofile.config import SimulationConfig, load_config
    from blinaprofile.simulate.singlecell import simulate_single_cell_cohort

    cells_per_sample = 2000
    n_samples = max(2, n_cells // cells_per_sample)
    cfg = load_config(SimulationConfig, ROOT / "configs" / "simulation" / "default.yaml")
    cfg = cfg.model_copy(update={"n_patients": n_samples})
    return simulate_single_cell_cohort(
        cfg, data_dir, n_cells_per_sample=cells_per_sample, n_genes=n_genes, seed=seed
    )


#: cells simulated per part of a large cohort (each part is simulated, then the parts are
#: concatenated on disk, so generating a 1M-cell file never holds more than one part)
PART_CELLS = 100_000


def _generate_large(data_dir: Path, n_cells: int, n_genes: int, seed: int) -> Path:
    """A cohort of ``n_cells`` simulated in parts of 100k cells (seeds ``seed + k``), the
    samples and patients of part ``k`` prefixed ``bk-``, concatenated on disk."""
    import anndata as ad
    from anndata.experimental import concat_on_disk

    out = data_dir / "default_single_cell.h5ad"
    if n_cells <= PART_CELLS:
        return _generate(data_dir, n_cells, n_genes, seed)
    parts: list[Path] = []
    for k in range((n_cells + PART_CELLS - 1) // PART_CELLS):
        pdir = data_dir / f"part{k:02d}"
        src = _generate(pdir, PART_CELLS, n_genes, seed + k)
        a = ad.read_h5ad(src)
        for col in ("sample_id", "patient_id"):
            a.obs[col] = a.obs[col].cat.rename_categories(lambda c, k=k: f"b{k:02d}-{c}")
        a.obs_names = [f"b{k:02d}-{n}" for n in a.obs_names]
        dst = data_dir / f"part{k:02d}.h5ad"
        a.write_h5ad(dst)
        del a
        src.unlink()
        parts.append(dst)
    concat_on_disk([str(p) for p in parts], str(out), uns_merge="first")
    for p in parts:
        p.unlink()
    return out


def _rna_only(path: Path) -> Path:
    """The same file without ``obsm`` (RNA only), copied once with h5py (cached)."""
    import h5py

    out = path.with_name(path.stem + "_rna.h5ad")
    if out.exists():
        return out
    tmp = out.with_suffix(".partial")
    with h5py.File(path, "r") as src, h5py.File(tmp, "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for name in src:
            if name != "obsm":
                src.copy(src[name], dst, name=name)
        g = dst.create_group("obsm")
        for k, v in src["obsm"].attrs.items():
            g.attrs[k] = v
    tmp.rename(out)
    return out


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _table_json(table: Any) -> dict[str, Any]:
    from blinaprofile.features.schema import feature_names

    t = table.set_index("sample_id")[feature_names()]
    return {
        "index": list(t.index),
        "values": t.to_numpy(float).tolist(),
        "columns": list(t.columns),
    }


def _max_diff(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, str, int]:
    """Max |a - b| over samples and features, the worst feature, NaN-pattern mismatches."""
    x = np.asarray(a["values"], dtype=float)
    pos = {s: i for i, s in enumerate(b["index"])}
    y = np.asarray(b["values"], dtype=float)[[pos[s] for s in a["index"]]]
    nan_mismatch = int((np.isnan(x) != np.isnan(y)).sum())
    d = np.nan_to_num(np.abs(x - y), nan=0.0)
    j = int(np.argmax(d.max(axis=0)))
    return float(d.max()), str(a["columns"][j]), nan_mismatch


def _measure_in_memory(path: Path, mode: str) -> dict[str, Any]:
    """The path before issue 13: read whole, fit on every cell, featurize (fresh process)."""
    t0, c0, l0 = time.perf_counter(), _cpu(), os.getloadavg()[0]
    from blinaprofile.features.singlecell import featurize_cells
    from blinaprofile.io.singlecell import read_single_cell

    t1 = time.perf_counter()
    adata = read_single_cell(path)
    if mode == "rna":
        del adata.obsm["protein"]
    t_read = time.perf_counter() - t1
    res = featurize_cells(adata)
    return {
        "path": "in-memory",
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_samples": len(res.table),
        "wall_s": time.perf_counter() - t0,
        "cpu_s": _cpu() - c0,
        "load": [l0, os.getloadavg()[0]],
        "peak_rss_mb": _peak_mb(),
        "phases": {"import+read_s": t_read + (t1 - t0)},
        "table": _table_json(res.table),
    }


def _alone(path: Path, ann: Any, table: Any, n_alone: int) -> tuple[float, str, int, float]:
    """Each of the first ``n_alone`` samples read alone from the file (every gene) and
    featurized with the fitted annotator, against its row in the cohort table."""
    import pandas as pd

    from blinaprofile.features.singlecell import featurize_single_cell
    from blinaprofile.io.h5ad_stream import H5adStream

    worst, worst_f, nan_mm, t = 0.0, "", 0, time.perf_counter()
    coh = table.set_index("sample_id")
    with H5adStream(path) as st:
        key = st.obs["sample_id"].astype(str).to_numpy()
        for s in list(coh.index[:n_alone]):
            sub = st.read_rows(np.flatnonzero(key == s))
            alone = featurize_single_cell(sub, annotator=ann, sample_key="sample_id")
            d, f, mm = _max_diff(
                _table_json(alone), _table_json(pd.DataFrame(coh.loc[[s]]).reset_index())
            )
            nan_mm += mm
            if d >= worst:
                worst, worst_f = d, f
    return worst, worst_f, nan_mm, (time.perf_counter() - t) / max(n_alone, 1)


def _measure_streamed(
    path: Path, n_jobs: int, max_cells: int, chunk_cells: int, n_alone: int
) -> dict[str, Any]:
    """Read in blocks + subsample fit + label every cell (fresh process)."""
    t0, c0, l0 = time.perf_counter(), _cpu(), os.getloadavg()[0]
    from blinaprofile.features.singlecell_chunked import featurize_cohort

    timings: dict[str, float] = {}
    res = featurize_cohort(
        path,
        sample_key="sample_id",
        max_cells_per_sample=max_cells,
        chunk_cells=chunk_cells,
        n_jobs=n_jobs,
        timings=timings,
    )
    wall = time.perf_counter() - t0
    cpu = _cpu() - c0 + timings.get("label_workers_cpu_s", 0.0)
    out: dict[str, Any] = {
        "path": f"streamed, n_jobs={n_jobs}",
        "n_cells": int(res.table["n_events"].sum()),
        "n_genes": _n_genes(path),
        "n_samples": len(res.table),
        "wall_s": wall,
        "cpu_s": cpu,
        "load": [l0, os.getloadavg()[0]],
        "peak_rss_mb": _peak_mb() + timings.get("workers_peak_rss_mb", 0.0),
        "phases": timings,
        "table": _table_json(res.table),
        "fit_cells": int(res.annotator.n_cells_fit_),
    }
    if n_alone > 0:
        d, f, mm, per = _alone(path, res.annotator, res.table, n_alone)
        out["alone"] = {"max_diff": d, "feature": f, "nan_mismatch": mm, "s_per_sample": per}
        out["n_alone"] = min(n_alone, len(res.table))
    return out


def _measure_cli(path: Path, model: str | None, n_jobs: int, fit_cells: int) -> None:
    """The CLI commands on ``path``, each a fresh process: wall seconds and peak resident
    memory (the command and its worker processes: ``getrusage(RUSAGE_CHILDREN)`` of a
    child that runs one command)."""
    out = Path(tempfile.mkdtemp(prefix="bp_sc_cli_"))
    base = [str(Path(sys.executable).with_name("blinaprofile"))]
    jobs = ["--jobs", str(n_jobs)]
    runs = [
        ["featurize", str(path), "--sample-key", "sample_id", *jobs, "--out", str(out / "f.csv")],
        [
            "featurize",
            str(path),
            "--sample-key",
            "sample_id",
            "--fit-cells-per-sample",
            str(fit_cells),
            *jobs,
            "--annotator-out",
            str(out / "ann.json"),
            "--out",
            str(out / "g.csv"),
        ],
    ]
    if model:
        ann = str(Path(model) / "artifacts" / "single_cell_annotator.json")
        key = ["--sample-key", "sample_id", *jobs]
        runs.append(["featurize", str(path), *key, "--annotator", ann, "--out", str(out / "h.csv")])
        runs.append(
            [
                "score-batch",
                str(path),
                *key,
                "--model",
                model,
                "--no-progress",
                "--out",
                str(out / "b"),
            ]
        )
    print("| command | wall s | peak RSS GB (largest process) | load avg |")
    print("|---|---:|---:|---|")
    for argv in runs:
        code = (
            "import resource, subprocess, sys, time; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
            "w = time.perf_counter() - t; "
            "r = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024 ** 2; "
            "print(rc, w, r)"
        )
        load0 = os.getloadavg()[0]
        res = subprocess.run(
            [sys.executable, "-c", code, *base, *argv], capture_output=True, text=True, check=True
        )
        rc, wall, peak = res.stdout.split()
        shown = " ".join(a if not a.startswith("/") else Path(a).name for a in argv)
        status = "" if rc == "0" else f" (exit {rc})"
        print(
            f"| `blinaprofile {shown}`{status} | {float(wall):.1f} | {float(peak):.2f} | "
            f"{load0:.1f} -> {os.getloadavg()[0]:.1f} |"
        )


def _n_genes(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["X"].attrs["shape"][1])


def _child(args: list[str]) -> dict[str, Any]:
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {' '.join(args)} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dataset(data_dir: Path, n_cells: int, n_genes: int, seed: int) -> Path:
    sub = data_dir / f"cells_{n_cells}_genes_{n_genes}_seed_{seed}"
    path = sub / "default_single_cell.h5ad"
    if not path.exists():
        t0 = time.perf_counter()
        sub.mkdir(parents=True, exist_ok=True)
        args = ["--_generate", "--data-dir", str(sub), "--n-cells", str(n_cells)]
        args += ["--n-genes", str(n_genes), "--seed", str(seed)]
        path = Path(str(_child(args)["path"]))
        print(f"simulated {path} in {time.perf_counter() - t0:.0f} s (cached, not timed)")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n-cells", type=int, default=100_000, help="the in-memory-size cohort")
    ap.add_argument("--cohort-cells", type=int, default=1_000_000, help="0: skip the 1M case")
    ap.add_argument("--n-genes", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "bp_sc_bench",
        help="simulated files are cached here (outside the repository)",
    )
    ap.add_argument("--modes", default="protein,rna", help="comma list of protein, rna")
    ap.add_argument("--n-jobs", type=int, default=2, help="processes labelling sample groups")
    ap.add_argument("--max-cells-per-sample", type=int, default=300, help="subsample of the fit")
    ap.add_argument("--chunk-cells", type=int, default=20_000, help="cells labelled together")
    ap.add_argument("--alone", type=int, default=10, help="samples featurized alone (0: skip)")
    ap.add_argument(
        "--cli",
        type=Path,
        default=None,
        metavar="H5AD",
        help="measure the CLI commands (featurize, score-batch) on this file and stop",
    )
    ap.add_argument(
        "--cli-model", default=None, help="--cli: a model folder storing a single-cell annotator"
    )
    ap.add_argument("--_generate", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_measure", default=None, help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)

    if ns._generate:
        path = _generate_large(ns.data_dir, ns.n_cells, ns.n_genes, ns.seed)
        print(json.dumps({"path": str(path)}))
        return 0
    if ns.cli is not None:
        _measure_cli(ns.cli, ns.cli_model, ns.n_jobs, ns.max_cells_per_sample)
        return 0
    if ns._measure:
        kind, p = ns._measure.split("::", 1)
        if kind.startswith("in-memory:"):
            res = _measure_in_memory(Path(p), kind.split(":", 1)[1])
        else:
            res = _measure_streamed(
                Path(p), ns.n_jobs, ns.max_cells_per_sample, ns.chunk_cells, ns.alone
            )
        print(json.dumps(res))
        return 0

    modes = [m.strip() for m in ns.modes.split(",") if m.strip()]
    sizes = [n for n in (ns.n_cells, ns.cohort_cells) if n > 0]
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")
    opts = ["--n-jobs", str(ns.n_jobs), "--max-cells-per-sample", str(ns.max_cells_per_sample)]
    opts += ["--chunk-cells", str(ns.chunk_cells), "--alone", str(ns.alone)]
    rows: list[tuple[str, dict[str, Any]]] = []
    ok = True
    for n in sizes:
        base = _dataset(ns.data_dir, n, ns.n_genes, ns.seed)
        for mode in modes:
            path = base if mode == "protein" else _rna_only(base)
            runs = []
            if n <= 200_000:  # the whole matrix in memory: the path before issue 13
                runs.append(_child(["--_measure", f"in-memory:{mode}::{base}"]))
            runs.append(_child(["--_measure", f"streamed::{path}", *opts]))
            for r in runs:
                goal = GOALS.get(n, GOALS[1_000_000])
                r["goal_met"] = r["wall_s"] <= goal[0] and r["peak_rss_mb"] / 1024 <= goal[1]
                r["goal"] = goal
                ok &= bool(r["goal_met"]) or r["path"] == "in-memory"
                rows.append((mode, r))
            if len(runs) == 2:
                d, f, mm = _max_diff(runs[1]["table"], runs[0]["table"])
                runs[1]["vs_full_fit"] = {"max_diff": d, "feature": f, "nan_mismatch": mm}
    print(
        "\n| cells | genes | samples | modality | path | wall s | CPU s (user+sys) | load avg "
        "| peak RSS GB | goal | met |"
    )
    print("|---:|---:|---:|---|---|---:|---:|---|---:|---|---|")
    for mode, r in rows:
        print(
            f"| {r['n_cells']:,} | {r['n_genes']:,} | {r['n_samples']} | "
            f"{'protein + RNA' if mode == 'protein' else 'RNA only'} | {r['path']} | "
            f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['load'][0]:.1f} -> {r['load'][1]:.1f} | "
            f"{r['peak_rss_mb'] / 1024:.2f} | <= {r['goal'][0]:.0f} s, <= {r['goal'][1]:.0f} GB | "
            f"{'yes' if r['goal_met'] else 'no'} |"
        )
    print()
    for mode, r in rows:
        what = f"[{r['n_cells']:,} cells, {mode}, {r['path']}]"
        ph = r["phases"]
        print(what + " phases: " + ", ".join(f"{k} {v:.1f}" for k, v in ph.items()))
        if "alone" in r:
            a = r["alone"]
            print(
                f"  alone vs in cohort ({r['n_alone']} samples, {a['s_per_sample']:.2f} s each): "
                f"max |difference| {a['max_diff']:.2e} ({a['feature']}), "
                f"NaN mismatches {a['nan_mismatch']}"
            )
        if "vs_full_fit" in r:
            v = r["vs_full_fit"]
            print(
                f"  annotator fitted on {r['fit_cells']:,} cells (<= {ns.max_cells_per_sample} per "
                f"sample) vs on every cell: max |feature difference| {v['max_diff']:.2f} "
                f"points ({v['feature']}), NaN mismatches {v['nan_mismatch']}"
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
