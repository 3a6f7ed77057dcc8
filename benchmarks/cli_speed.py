"""Whole-process speed of the command line, against the issue-15 targets.

Every number is the wall time of a fresh ``blinaprofile`` process (interpreter start,
imports, work, output), the median of ``--repeats`` runs, printed with the median CPU time
(user+system of the process and its descendants: ``score-batch``'s fork server and workers,
which nobody waits for, are polled) and the load average. The machine is shared: runs that
are compared (ours and FlowKit's; this tree and ``--against`` another source tree) are
interleaved run by run, so they see the same load.

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
    # before/after: an older checkout's sources, e.g. `git archive HEAD src | tar -x -C /tmp/old`
    .venv/bin/python benchmarks/cli_speed.py --against /tmp/old/src [--only score]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
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


#: user+system CPU seconds of each process ``run`` waited for (children included)
CPU: list[float] = []


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _tree_cpu(proc: subprocess.Popen[str], seen: dict[int, float]) -> None:
    """Poll the user+system CPU of ``proc``'s descendants until it exits (into ``seen``).

    The getrusage count misses processes nobody waits for, such as ``score-batch``'s fork
    server and its workers; polling every 0.1 s catches them (a process younger than that
    may be missed).
    """
    import psutil

    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            kids = root.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for k in kids:
            try:
                t = k.cpu_times()
                seen[k.pid] = t.user + t.system
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.1)


def run(
    cmd: Sequence[str], env: dict[str, str], cwd: Path, *, tree: bool = False
) -> tuple[float, str]:
    """Wall time and stdout of one process; its CPU (and, with ``tree``, its unwaited
    descendants' too) is appended to :data:`CPU`."""
    import threading

    cpu0 = children_cpu()
    seen: dict[int, float] = {}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(cmd), env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    poller = threading.Thread(target=_tree_cpu, args=(proc, seen), daemon=True)
    if tree:
        poller.start()
    stdout, stderr = proc.communicate()
    secs = time.perf_counter() - t0
    if tree:
        poller.join()
    waited = children_cpu() - cpu0  # the process and the descendants it waited for
    # descendants the process did not wait for (seen by polling, not in getrusage)
    CPU.append(waited + (sum(seen.values()) if tree else 0.0))
    out = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return secs, out.stdout


#: ``--against``: the environment running another source tree, alternated with this one
AGAINST: dict[str, str] | None = None


def interleaved(
    jobs: dict[str, tuple[Sequence[str], dict[str, str]]],
    cwd: Path,
    repeats: int,
    *,
    tree: bool = False,
    per: float | None = None,
) -> dict[str, float]:
    """Median wall time of each job over ``repeats`` rounds, the jobs run in turn within
    each round (the order reversed every other round), so that all see the same load.

    Prints each job's runs, median CPU (user+system) and the load average; ``per``: also
    ``per * 60 / seconds``, a rate per minute.
    """
    runs: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in jobs}
    for i in range(repeats):
        for name in list(jobs) if i % 2 == 0 else list(reversed(jobs)):
            cmd, env = jobs[name]
            runs[name][0].append(run(cmd, env, cwd, tree=tree)[0])
            runs[name][1].append(CPU[-1])
    out = {}
    for name, (times, cpus) in runs.items():
        out[name] = med = statistics.median(times)
        rate = f" = {per * 60 / med:6.0f}/min" if per else ""
        print(
            f"  {name:<34} median {med:6.2f} s{rate}  runs {[round(t, 2) for t in times]}  "
            f"CPU user+sys median {statistics.median(cpus):5.2f} s  ({load()})"
        )
    return out


def median_of(
    label: str,
    cmd: Sequence[str],
    env: dict[str, str],
    cwd: Path,
    repeats: int,
    *,
    tree: bool = False,
    per: float | None = None,
    others: dict[str, tuple[Sequence[str], dict[str, str]]] | None = None,
) -> tuple[float, dict[str, float]]:
    """:func:`interleaved` runs of ``cmd`` (and, with ``--against``, of the same command on
    the other source tree, and of ``others``): this tree's median and every job's."""
    jobs = {label: (cmd, env)}
    if AGAINST is not None:
        jobs[f"{label} (--against)"] = (cmd, {**env, **AGAINST})
    jobs.update(others or {})
    meds = interleaved(jobs, cwd, repeats, tree=tree, per=per)
    return meds[label], meds


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
    ap.add_argument(
        "--only",
        choices=["help", "gate", "score", "batch"],
        action="append",
        help="run only these measurements (repeatable; default: all)",
    )
    ap.add_argument(
        "--against",
        metavar="SRC",
        help="a source folder (holding blinaprofile/, e.g. an older checkout's src) run in "
        "alternation with this tree, run for run: a fair before/after on a busy machine",
    )
    a = ap.parse_args(argv)
    global AGAINST
    if a.against:
        AGAINST = {"PYTHONPATH": str(Path(a.against).resolve())}
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

    wanted = set(a.only or ["help", "gate", "score", "batch"])
    if a.skip_batch:
        wanted.discard("batch")
    if "help" in wanted:
        after["--help"], _ = median_of("--help", [*EXE, "--help"], env, work, a.repeats)

    if "gate" in wanted:
        # FlowKit on the same file with the same strategy: the default one bound to the
        # file, with the thresholds placement put on this sample (and, for --fixed-gates,
        # the configured ones); its runs alternate with ours (the same load)
        ratios, same = {}, True
        for mode, flag in (("placement", []), ("fixed", ["--fixed-gates"])):
            xml = work / f"default_strategy_{mode}.xml"
            run([*EXE, "export-gating", str(f1m), "--out", str(xml), *flag], env, work)
            fk_cmd = [sys.executable, "-c", FLOWKIT_GATE, str(f1m), str(xml)]
            label = f"gate 1M ({mode})"
            fk_label = f"FlowKit whole process ({mode})"
            ours, meds = median_of(
                label,
                [*EXE, "gate", str(f1m), *flag],
                env,
                work,
                a.repeats,
                others={fk_label: (fk_cmd, env)},
            )
            ratios[mode] = meds[fk_label] / ours
            if mode == "placement":
                after["gate 1M"] = ours
                after["FlowKit gate 1M"] = meds[fk_label]
            counts = json.loads(run([*EXE, "gate", str(f1m), *flag, "--json"], env, work)[1])
            theirs = json.loads(run(fk_cmd, env, work)[1].strip().splitlines()[-1])
            same = same and all(theirs.get(g) == n for g, n in counts["counts"].items())
        notes["gate 1M"] = (
            f"FlowKit/ours {ratios['placement']:.1f}x with placement, "
            f"{ratios['fixed']:.1f}x with fixed gates; FlowKit's counts identical: {same}"
        )

    if "score" in wanted:
        shutil.rmtree(cache, ignore_errors=True)  # the first score compiles the model
        out_dir = work / "score_out"
        score = [*EXE, "score", str(f50k), "--out-dir", str(out_dir)]
        cold, _ = run(score, env, work)
        print(f"  {'score 50k, empty user cache':<34} {cold:6.2f} s  ({load()})")
        after["score 50k (report)"], _ = median_of(
            "score 50k (report)", score, env, work, a.repeats
        )
        nocache = {**env, "BLINAPROFILE_CACHE_DIR": "off"}
        off, _ = median_of("score 50k, cache off", score, nocache, work, max(3, a.repeats // 2))
        notes["score 50k (report)"] = f"first run (empty cache) {cold:.2f} s; cache off {off:.2f} s"

    if "batch" in wanted:
        manifest = data["batch"] / "manifest.csv"
        n = sum(1 for _ in manifest.open()) - 1
        out = work / "batch_out"
        # a fresh output folder for every run: `score-batch` would resume (skip) otherwise
        cmd = [
            sys.executable,
            "-c",
            "import shutil, sys, runpy; shutil.rmtree(sys.argv[1], ignore_errors=True); "
            "sys.argv = ['blinaprofile', *sys.argv[2:]]; "
            "runpy.run_module('blinaprofile', run_name='__main__')",
            str(out),
            "score-batch",
            "--manifest",
            str(manifest),
            "--out",
            str(out),
            "--jobs",
            "2",
            "--no-progress",
        ]
        secs, _ = median_of(
            f"score-batch {n} x 100k, 2 workers",
            cmd,
            env,
            work,
            max(3, a.repeats // 2),
            tree=True,
            per=n,
        )
        after["score-batch samples/min"] = 60 * n / secs
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
