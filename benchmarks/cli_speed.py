"""Whole-process speed of the command line, against the issue-15 targets.

Every number is the wall time of a fresh ``blinaprofile`` process (interpreter start,
imports, work, output), the median of ``--repeats`` runs; the load average is printed with
each measurement (the machine is shared: compare medians taken at similar loads).

Measured (data simulated once into ``--work``):

- ``blinaprofile --help``;
- ``gate`` of a 1,000,000-event file: per-sample placement (the default) and
  ``--fixed-gates``;
- FlowKit, as a whole process too, on the same file with the same strategy: the default
  strategy bound to the file as ``blinaprofile export-gating`` writes it (with the
  thresholds placement put on this sample, and with ``--fixed-gates`` the configured ones);
  FlowKit parses it and gates the sample, and its counts are checked against ``gate
  --json``;
- ``score`` of a 50,000-event file with the default model, report included: the first run
  with an empty user cache (the model is compiled and the cohort background drawn) and the
  median of the following runs;
- ``score-batch`` of 40 samples x 100,000 events with 2 workers, whole process, in samples
  per minute (``benchmarks/batch.py`` measures the Python API, memory and 1 vs 2 workers).

The "before" column is what issue 15 measured on this machine before the work.

Run::

    .venv/bin/python benchmarks/cli_speed.py [--repeats 5] [--work /tmp/blinaprofile-bench-cli]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

EXE = [sys.executable, "-m", "blinaprofile"]
#: issue 15's measurements before the work (whole process, quiet machine)
BEFORE = {
    "--help": None,
    "gate 1M": 2.0,
    "score 50k (report)": 7.3,
    "score-batch samples/min": 400.0,
}
TARGETS = {
    "gate 1M": "<= 0.8 s; >= 8x FlowKit",
    "score 50k (report)": "<= 1.5 s",
    "score-batch samples/min": ">= 1000 /min",
}

FLOWKIT_GATE = """
import sys, json, warnings
warnings.simplefilter("ignore")
import flowkit as fk
sample = fk.Sample(sys.argv[1])
strategy = fk.parse_gating_xml(sys.argv[2])
report = strategy.gate_sample(sample).report
print(json.dumps({str(r.gate_name): int(r.count) for r in report.itertuples()}))
"""


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def run(cmd: Sequence[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = subprocess.run(list(cmd), env=env, cwd=cwd, capture_output=True, text=True, check=False)
    secs = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return secs, out.stdout


def median_of(
    label: str, cmd: Sequence[str], env: dict[str, str], cwd: Path, repeats: int
) -> tuple[float, list[float]]:
    times = [run(cmd, env, cwd)[0] for _ in range(repeats)]
    med = statistics.median(times)
    print(f"  {label:<34} median {med:6.2f} s  runs {[round(t, 2) for t in times]}  ({load()})")
    return med, times


def simulate(work: Path, env: dict[str, str]) -> dict[str, Path]:
    """One 1M-event file, one 50k-event file and 40 x 100k-event samples (made once)."""
    sets = {"1m": (2, 1_000_000, 4), "50k": (2, 50_000, 3), "batch": (40, 100_000, 99)}
    out = {}
    for name, (n, events, seed) in sets.items():
        folder = work / f"sim_{name}"
        if not (folder / "manifest.csv").is_file():
            cmd = [*EXE, "simulate", "--out", str(folder), "--n-patients", str(n)]
            run([*cmd, "--events", str(events), "--seed", str(seed)], env, work)
        out[name] = folder
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--work", default="/tmp/blinaprofile-bench-cli", help="scratch folder")
    ap.add_argument("--skip-batch", action="store_true", help="leave out score-batch")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = work / "user-cache"
    env = {
        **os.environ,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "BLINAPROFILE_CACHE_DIR": str(cache),
    }
    print(f"blinaprofile whole-process timings on {os.cpu_count()} cores ({load()})")
    data = simulate(work, env)
    f1m = sorted((data["1m"] / "fcs").glob("*.fcs"))[0]
    f50k = sorted((data["50k"] / "fcs").glob("*.fcs"))[0]
    after: dict[str, float] = {}
    notes: dict[str, str] = {}

    after["--help"], _ = median_of("--help", [*EXE, "--help"], env, work, a.repeats)

    after["gate 1M"], _ = median_of(
        "gate 1M (placement)", [*EXE, "gate", str(f1m)], env, work, a.repeats
    )
    fixed, _ = median_of(
        "gate 1M --fixed-gates", [*EXE, "gate", str(f1m), "--fixed-gates"], env, work, a.repeats
    )
    # the same strategy for FlowKit: the default one bound to the file, with the thresholds
    # placement put on this sample (and, for --fixed-gates, the configured ones)
    fk_runs = {}
    for mode, flag in (("placed", []), ("fixed", ["--fixed-gates"])):
        xml = work / f"default_strategy_{mode}.xml"
        run([*EXE, "export-gating", str(f1m), "--out", str(xml), *flag], env, work)
        fk_cmd = [sys.executable, "-c", FLOWKIT_GATE, str(f1m), str(xml)]
        secs, _ = median_of(
            f"FlowKit whole process ({mode})", fk_cmd, env, work, max(3, a.repeats // 2)
        )
        ours = json.loads(run([*EXE, "gate", str(f1m), *flag, "--json"], env, work)[1])
        theirs = json.loads(run(fk_cmd, env, work)[1].strip().splitlines()[-1])
        same = all(theirs.get(g) == n for g, n in ours["counts"].items())
        fk_runs[mode] = (secs, same)
    after["FlowKit gate 1M"] = fk_runs["placed"][0]
    notes["gate 1M"] = (
        f"FlowKit/ours {fk_runs['placed'][0] / after['gate 1M']:.1f}x with placement, "
        f"{fk_runs['fixed'][0] / fixed:.1f}x with fixed gates; FlowKit's counts identical: "
        f"{fk_runs['placed'][1] and fk_runs['fixed'][1]}"
    )

    shutil.rmtree(cache, ignore_errors=True)  # the first score compiles the model
    out_dir = work / "score_out"
    score = [*EXE, "score", str(f50k), "--out-dir", str(out_dir)]
    cold, _ = run(score, env, work)
    print(f"  {'score 50k, empty user cache':<34} {cold:6.2f} s  ({load()})")
    after["score 50k (report)"], _ = median_of("score 50k (report)", score, env, work, a.repeats)
    nocache = {**env, "BLINAPROFILE_CACHE_DIR": "off"}
    off, _ = median_of("score 50k, cache off", score, nocache, work, max(3, a.repeats // 2))
    notes["score 50k (report)"] = f"first run (empty cache) {cold:.2f} s; cache off {off:.2f} s"

    if not a.skip_batch:
        manifest = data["batch"] / "manifest.csv"
        n = sum(1 for _ in manifest.open()) - 1
        rates = []
        for i in range(max(3, a.repeats // 2)):
            out = work / f"batch_out_{i}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [*EXE, "score-batch", "--manifest", str(manifest), "--out", str(out)]
            secs, _ = run([*cmd, "--jobs", "2", "--no-progress"], env, work)
            rates.append(60 * n / secs)
            print(
                f"  score-batch {n} x 100k, 2 workers  {secs:6.2f} s = {rates[-1]:6.0f}/min ({load()})"
            )
        after["score-batch samples/min"] = statistics.median(rates)
        notes["score-batch samples/min"] = "whole process incl. start-up and result files"

    print()
    print(f"{'measurement':<26}{'before':>10}{'after':>10}{'ratio':>8}  {'target':<26} notes")
    for key, value in after.items():
        before = BEFORE.get(key)
        unit = "/min" if key.endswith("/min") else " s"
        ratio = ""
        if before:
            ratio = f"{(value / before if unit == '/min' else before / value):.1f}x"
        b = f"{before:.1f}{unit}" if before else "-"
        print(
            f"{key:<26}{b:>10}{f'{value:.2f}{unit}' if unit == ' s' else f'{value:.0f}{unit}':>10}"
            f"{ratio:>8}  {TARGETS.get(key, ''):<26} {notes.get(key, '')}"
        )
    print(f"\n{load()} on {os.cpu_count()} cores at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
