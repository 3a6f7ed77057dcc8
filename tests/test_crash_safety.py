"""Crash safety and safe model loading.

- A batch killed with SIGKILL mid-run loses no finished result, and rerunning it finishes
  without duplicates (``blinaprofile score-batch``).
- A simulation killed mid-run leaves only complete FCS files; outputs and model exports
  are written under a temporary name and renamed, so a failure never leaves a partial file.
- A batch records a bad sample as an error row naming the file and goes on.
- Models are loaded only through MLflow + skops with explicit trusted types: a model file
  holding an untrusted type is refused with ``ModelError`` (nothing of it is executed), and
  the source never unpickles a file a user hands in.
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from blinaprofile.errors import BlinaprofileError, ModelError, OutputError
from blinaprofile.io.fcs import read_fcs
from blinaprofile.scoring.batch import score_samples

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "blinaprofile"


def _env(cwd: Path) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # compile once into a scratch cache
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "blinaprofile-test-pycache")
    return env


def _cli(args: list[str], cwd: Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blinaprofile", *args],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        **kw,
    )


def _popen(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    # a new session: the command and its worker processes form one group we can kill
    return subprocess.Popen(
        [sys.executable, "-m", "blinaprofile", *args],
        cwd=cwd,
        env=_env(cwd),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen[str]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)


# --------------------------------------------------------------------------- a model
@pytest.fixture(scope="module")
def model_dir(small_cohort: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small model exported to a folder (trained on the simulated cohort)."""
    from blinaprofile.config import ModelSpec, TrainConfig
    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.models.train import train

    root = tmp_path_factory.mktemp("crash_model")
    table = featurize_manifest(small_cohort.manifest, n_jobs=2)
    cfg = TrainConfig(
        models=[ModelSpec(family="logreg_l2")],
        outer_folds=2,
        inner_folds=2,
        repeats=1,
        n_bootstrap=0,
        experiment="crash-safety",
        registered_model="crash-safety-model",
    )
    here = Path.cwd()
    os.chdir(root)  # MLflow artifacts go below the tracking store's folder
    try:
        res = train(
            table,
            config=cfg,
            export_dir=root / "model",
            tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
            trained_on="crash-safety test cohort",
        )
    finally:
        os.chdir(here)
    assert res.export_dir is not None
    return Path(res.export_dir)


# --------------------------------------------------------------------------- kill and resume
N_BATCH = 24


def _batch_manifest(small_cohort: Any, folder: Path, n: int) -> Path:
    files = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))
    rows = [{"sample_id": f"K{i:03d}", "file": str(files[i % len(files)])} for i in range(n)]
    m = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(m, index=False)
    return m


def _finished(parts: Path) -> dict[str, dict[str, Any]]:
    """sample_id -> row of every finished sample (each part file must be whole JSON)."""
    out: dict[str, dict[str, Any]] = {}
    for f in sorted(parts.glob("*.json")):
        rec = json.loads(f.read_text(encoding="utf-8"))  # a torn file would fail here
        row = rec["row"]
        assert row["sample_id"] not in out, f"duplicate part for {row['sample_id']}"
        out[row["sample_id"]] = row
    return out


def test_batch_killed_mid_run_resumes_without_loss_or_duplicates(
    small_cohort: Any, model_dir: Path, tmp_path: Path
) -> None:
    manifest = _batch_manifest(small_cohort, tmp_path, N_BATCH)
    out = tmp_path / "batch"
    args = [
        "score-batch",
        "--manifest",
        str(manifest),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--jobs",
        "2",
        "--no-progress",
    ]
    proc = _popen(args, tmp_path)
    parts = out / "parts"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if parts.is_dir() and len(list(parts.glob("*.json"))) >= 3:
            break
        time.sleep(0.05)
    rc = proc.poll()
    assert rc is None, (
        f"score-batch exited with code {rc} before it could be killed: "
        + proc.communicate()[1][-2000:]
    )
    _kill_group(proc)
    before = _finished(parts)
    n_killed_at = len(before)
    assert 0 < n_killed_at < N_BATCH, n_killed_at
    # the consolidated tables are written only at the end: never a partial one
    for name in ("results.csv", "results.parquet"):
        assert not (out / name).exists(), f"{name} exists after the kill"

    r = _cli(args, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = pd.read_csv(out / "results.csv", keep_default_na=False)
    assert len(res) == N_BATCH
    assert res["sample_id"].is_unique
    assert sorted(res["sample_id"]) == [f"K{i:03d}" for i in range(N_BATCH)]
    assert (res["error"] == "").all(), res.loc[res["error"] != "", "error"].tolist()
    after = _finished(parts)
    assert len(after) == N_BATCH
    kept = [sid for sid, row in before.items() if after[sid] == row]
    assert len(kept) == n_killed_at, "a finished result was lost or redone differently"
    pq = pd.read_parquet(out / "results.parquet")
    assert len(pq) == N_BATCH and pq["sample_id"].is_unique
    m = re.search(r"(\d+) scored now, (\d+) already finished", r.stdout)
    assert m, r.stdout
    scored_now, skipped = int(m.group(1)), int(m.group(2))
    assert skipped == n_killed_at and scored_now == N_BATCH - n_killed_at
    leftovers = sorted(p.name for p in out.rglob("*") if p.name.endswith(".tmp"))
    print(
        f"\nkill-and-resume: SIGKILL after {n_killed_at}/{N_BATCH} samples finished; "
        f"rerun scored {scored_now}, skipped {skipped}; {len(res)} rows, 0 duplicates, "
        f"{len(kept)}/{n_killed_at} pre-kill results kept unchanged; "
        f"temporary files left by the kill: {len(leftovers)}"
    )


def test_batch_records_bad_samples_and_goes_on(
    small_cohort: Any, model_dir: Path, tmp_path: Path
) -> None:
    good = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[:2]
    bad = {
        "B_text": (tmp_path / "export.fcs", b"event,FSC-A\n1,2\n", "not an FCS file"),
        "B_empty": (tmp_path / "empty.fcs", b"", "the file is empty"),
        "B_trunc": (tmp_path / "cut.fcs", good[0].read_bytes()[:5000], "truncated"),
    }
    rows = [{"sample_id": f"G{i}", "file": str(f)} for i, f in enumerate(good)]
    for sid, (path, payload, _) in bad.items():
        path.write_bytes(payload)
        rows.append({"sample_id": sid, "file": str(path)})
    rows.append({"sample_id": "B_missing", "file": str(tmp_path / "gone.fcs")})
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    df = score_samples(
        manifest, model=str(model_dir), n_jobs=1, out_dir=tmp_path / "out", progress=False
    ).set_index("sample_id")
    assert len(df) == len(rows)
    assert set(df.loc[["G0", "G1"], "call"]) <= {
        "responder",
        "nonresponder",
        "uncertain",
        "no call",
    }
    assert (df.loc[["G0", "G1"], "error"] == "").all()
    for sid, (path, _, phrase) in bad.items():
        assert df.loc[sid, "call"] == "error"
        # the row names the sample, never the file (file names often name the patient)
        assert df.loc[sid, "error"].startswith(f"{sid}: ") and phrase in df.loc[sid, "error"]
        assert path.name not in df.loc[sid, "error"]
    assert df.loc["B_missing", "error"] == "B_missing: file not found"
    assert "internal error" not in " ".join(df["error"])
    named = score_samples(
        manifest, model=str(model_dir), n_jobs=1, progress=False, keep_file_names=True
    ).set_index("sample_id")
    for sid, (path, _, phrase) in bad.items():
        assert named.loc[sid, "error"].startswith(f"{path}: ") and phrase in named.loc[sid, "error"]


# --------------------------------------------------------------------------- atomic outputs
def test_simulation_killed_leaves_only_whole_files(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    proc = _popen(
        ["simulate", "--out", str(out), "--n-patients", "40", "--events", "150000", "--seed", "3"],
        tmp_path,
    )
    fcs = out / "fcs"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if fcs.is_dir() and len(list(fcs.glob("*.fcs"))) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "simulation finished before it could be killed"
    _kill_group(proc)
    files = sorted(fcs.glob("*.fcs"))
    assert 2 <= len(files) < 40
    for f in files:
        data = read_fcs(f)  # a partial file would raise FCSFormatError
        assert data.n_events == 150_000
    assert not (out / "manifest.csv").exists()  # written at the end, atomically
    hidden = [p.name for p in fcs.iterdir() if p.name.startswith(".")]
    print(
        f"\nsimulate killed after {len(files)} complete FCS files; "
        f"{len(hidden)} temporary file(s) left under hidden names"
    )


def test_csv_output_is_atomic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from blinaprofile.io.atomic import write_csv as _write_csv_atomic  # what the CLI writes with

    target = tmp_path / "features.csv"
    _write_csv_atomic(pd.DataFrame({"a": [1, 2]}), target)
    original = target.read_bytes()

    def crash(self: pd.DataFrame, path: Any, **kw: Any) -> None:
        Path(path).write_text("a\n1\n")  # half written ...
        raise OSError(28, "No space left on device")  # ... then the disk fills up

    monkeypatch.setattr(pd.DataFrame, "to_csv", crash)
    with pytest.raises(OutputError, match="No space left") as err:
        _write_csv_atomic(pd.DataFrame({"a": [3, 4, 5]}), target)
    assert str(target) in str(err.value)  # the message names the file
    assert err.value.exit_code == 2
    assert target.read_bytes() == original  # the previous output is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["features.csv"]  # no temp file left


def test_model_export_is_atomic(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from blinaprofile.models.packaging import load_model, save_model

    _pyfunc, runtime = load_model(model_dir)
    target = tmp_path / "exported"
    save_model(target, runtime.pipeline, runtime.meta)
    before = sorted(p.relative_to(target) for p in target.rglob("*"))
    real = mlflow.pyfunc.save_model

    def crash(path: str, **kw: Any) -> None:
        real(path=path, **kw)
        (Path(path) / "MLmodel").write_text("truncated")
        raise KeyboardInterrupt  # killed while finishing the export

    monkeypatch.setattr(mlflow.pyfunc, "save_model", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(target, runtime.pipeline, runtime.meta)
    with pytest.raises(KeyboardInterrupt):
        save_model(tmp_path / "new_model", runtime.pipeline, runtime.meta)
    monkeypatch.undo()
    assert sorted(p.relative_to(target) for p in target.rglob("*")) == before
    assert not (tmp_path / "new_model").exists()  # never a half-made model folder
    load_model(target)  # the previous export still loads


# --------------------------------------------------------------------------- model loading
def _copy_model(model_dir: Path, dst: Path) -> tuple[Path, Path, Path]:
    shutil.copytree(model_dir, dst)
    skops = next(dst.rglob("pipeline.skops"))
    meta = next(dst.rglob("meta.json"))
    return dst, skops, meta


class EvilScaler:
    """A type no model may carry; it records any attempt to bring it to life."""

    marker: Path | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state.get("marker", "/nonexistent")).write_text("executed")
        self.__dict__.update(state)


def _evil_pipeline(marker: Path) -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    evil = EvilScaler()
    evil.__dict__["marker"] = str(marker)
    X = np.random.default_rng(0).normal(size=(20, 3))
    y = np.arange(20) % 2
    pipe = Pipeline([("f", FunctionTransformer()), ("clf", LogisticRegression())]).fit(X, y)
    pipe.steps[0][1].evil = evil  # hide it inside a trusted estimator
    return pipe


@pytest.mark.parametrize("meta_lies", [False, True], ids=["meta honest", "meta lists the type"])
def test_untrusted_type_in_model_is_refused(
    model_dir: Path, tmp_path: Path, meta_lies: bool
) -> None:
    import skops.io as sio

    from blinaprofile.models.packaging import load_model

    folder, skops, meta_file = _copy_model(model_dir, tmp_path / "model")
    marker = tmp_path / "executed.txt"
    sio.dump(_evil_pipeline(marker), skops)
    untrusted = sio.get_untrusted_types(file=skops)
    assert any(t.endswith("EvilScaler") for t in untrusted), untrusted
    if meta_lies:  # an attacker who edits the model folder edits meta.json too
        meta = json.loads(meta_file.read_text())
        meta["trusted_types"] = sorted(set(meta["trusted_types"]) | set(untrusted))
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(ModelError) as info:
        load_model(folder)
    assert "EvilScaler" in str(info.value)
    assert not marker.exists(), "the untrusted object was constructed"


def test_untrusted_model_refused_by_cli(model_dir: Path, small_cohort: Any, tmp_path: Path) -> None:
    import skops.io as sio

    folder, skops, _ = _copy_model(model_dir, tmp_path / "model")
    marker = tmp_path / "executed.txt"
    sio.dump(_evil_pipeline(marker), skops)
    sample = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    r = _cli(["score", str(sample), "--model", str(folder), "--no-report"], tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "EvilScaler" in lines[0] and "Traceback" not in r.stderr
    assert not marker.exists()


def test_dangerous_builtin_function_in_model_is_refused(model_dir: Path, tmp_path: Path) -> None:
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from blinaprofile.models.packaging import load_model

    folder, skops, meta_file = _copy_model(model_dir, tmp_path / "model")
    X = np.random.default_rng(0).normal(size=(20, 3))
    pipe = Pipeline([("f", FunctionTransformer()), ("clf", LogisticRegression())])
    pipe.fit(X, np.arange(20) % 2)
    pipe.steps[0][1].func = builtins.eval
    sio.dump(pipe, skops)
    untrusted = sio.get_untrusted_types(file=skops)
    assert "builtins.eval" in untrusted
    meta = json.loads(meta_file.read_text())
    meta["trusted_types"] = sorted(set(meta["trusted_types"]) | set(untrusted))
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ModelError):
        load_model(folder)


def test_model_folder_code_is_not_executed(model_dir: Path, tmp_path: Path) -> None:
    from blinaprofile.models.packaging import load_model

    folder = tmp_path / "model"
    shutil.copytree(model_dir, folder)
    mlmodel = (folder / "MLmodel").read_text()
    code = re.search(r"model_code_path:\s*(\S+)", mlmodel)
    assert code, mlmodel
    code_file = folder / Path(code.group(1)).name
    assert code_file.is_file(), sorted(p.name for p in folder.iterdir())
    marker = tmp_path / "code_ran.txt"
    code_file.write_text(
        code_file.read_text()
        + f"\nfrom pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    )
    with contextlib.suppress(BlinaprofileError):
        load_model(folder)
    assert not marker.exists(), "code from the model folder was executed"


UNSAFE_LOADERS = [
    (r"\bpickle\.loads?\(", "pickle"),
    (r"\bcloudpickle\.loads?\(", "cloudpickle"),
    (r"\bdill\.loads?\(", "dill"),
    (r"\bjoblib\.load\(", "joblib"),
    (r"\btorch\.load\(", "torch"),
    (r"\bread_pickle\(", "pandas read_pickle"),
    (r"allow_pickle\s*=\s*True", "numpy allow_pickle"),
    (r"\bmlflow\.sklearn\.load_model\(", "mlflow.sklearn (pickle)"),
    (r"trusted\s*=\s*True", "skops trusted=True"),
    (
        r"\byaml\.load\((?![^)]*Loader=(?:STRICT_LOADER\)|safe_yaml_loader\(\)))",
        "yaml.load without the safe loader",
    ),
    (r"\byaml\.unsafe_load\(", "yaml.unsafe_load"),
    (r"\beval\(|\bexec\(", "eval/exec"),
]


def test_source_never_unpickles_user_files() -> None:
    hits = []
    files = sorted(SRC.rglob("*.py"))
    for f in files:
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), start=1):
            code = line.split("#", 1)[0]
            for pattern, what in UNSAFE_LOADERS:
                if re.search(pattern, code):
                    hits.append(f"{f.relative_to(ROOT)}:{n}: {what}: {line.strip()}")
    skops_loads = [
        f"{f.relative_to(ROOT)}"
        for f in files
        if re.search(r"\bsio\.load\(|skops\.io\.load\(", f.read_text(encoding="utf-8"))
    ]
    print(f"\nscanned {len(files)} source files; skops loads in {skops_loads}")
    assert hits == [], "\n".join(hits)
    # the one loader yaml.load may use constructs plain YAML types only
    import yaml

    from blinaprofile.config.loading import STRICT_LOADER
    from blinaprofile.models.loading import safe_yaml_loader

    for loader in (STRICT_LOADER, safe_yaml_loader()):
        assert issubclass(loader, yaml.SafeLoader | yaml.CSafeLoader)
    with pytest.raises(yaml.YAMLError):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=STRICT_LOADER)
    with pytest.raises(yaml.YAMLError):
        yaml.load("!!python/object/apply:os.system ['true']", Loader=safe_yaml_loader())
    for rel in skops_loads:  # every skops load passes an explicit trusted list
        calls = [
            node
            for node in ast.walk(ast.parse((ROOT / rel).read_text(encoding="utf-8")))
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "load"
            and ast.unparse(node.func.value) in ("sio", "skops.io")
        ]
        assert calls, rel
        for call in calls:
            trusted = [k.value for k in call.keywords if k.arg == "trusted"]
            where = (rel, call.lineno, ast.unparse(call))
            assert trusted, where
            assert not (isinstance(trusted[0], ast.Constant) and trusted[0].value is True), where


def test_report_helper_job_unpickles_only_listed_globals(tmp_path, small_cohort) -> None:
    """The report's helper process reads its job with an exact allow-list of globals."""
    import io
    import pickle

    from blinaprofile.io.read import current_fcs_read_options
    from blinaprofile.scoring import report
    from blinaprofile.scoring.helper import JOB_GLOBALS, load_job
    from blinaprofile.scoring.score import score_sample

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with pytest.raises(pickle.UnpicklingError, match="not a helper job's global"):
        load_job(pickle.dumps((print, (Evil(),))))
    assert not marker.exists()
    # the real job (the default strategy's gating figure) passes, so the helper is used
    path = sorted(small_cohort.out_dir.rglob("*.fcs"))[0]
    ctx = score_sample(path, keep_gating=True).context
    job = (report._gating_png, (ctx.path, ctx.tree, ctx.gating, current_fcs_read_options()))
    func, args = load_job(pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
    assert func is report._gating_png and len(args) == 4
    named: set[tuple[str, str]] = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(pickle.dumps(job))).load()
    assert named <= JOB_GLOBALS
