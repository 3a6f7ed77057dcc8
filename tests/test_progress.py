"""Progress and the light command paths (issue 15): what the speed work must keep doing.

Speed targets live in ``benchmarks/cli_speed.py`` and ``benchmarks/batch.py``; these tests
check behaviour only:

- progress bars appear on a terminal and nowhere else (``--no-progress`` silences them),
  and training reports each family's folds;
- ``gate`` without ``--h5ad`` never imports AnnData, and a ``score`` with its report imports
  neither scikit-learn, XGBoost, skops, MLflow, FlowKit nor SciPy once the model is compiled;
- what replaced the heavy imports gives the same results: the compiled pipelines (exact
  probabilities), the GatingML writer (FlowKit's bytes), the numpy DCT and Brent root, the
  cached cohort figure.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "default"


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three simulated samples (5,000 events each) with a manifest."""
    from blinaprofile.config import PanelConfig, SimulationConfig, load_config
    from blinaprofile.simulate.flow import simulate_cohort

    sim = load_config(SimulationConfig, ROOT / "configs" / "simulation" / "default.yaml")
    panel = load_config(PanelConfig, ROOT / "configs" / "panels" / "post_hct_tcell.yaml")
    out = tmp_path_factory.mktemp("progress_cohort")
    res = simulate_cohort(sim, out, panel=panel, n_patients=3, events_per_sample=5_000, seed=3)
    return Path(res.manifest)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("user_cache")


def _env(cache: Path | None) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    env["BLINAPROFILE_CACHE_DIR"] = str(cache) if cache is not None else "off"
    return env


def _run_on_tty(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, str]:
    """Run ``python -m blinaprofile ARGS`` with stderr on a pseudo-terminal; its output."""
    leader, follower = pty.openpty()
    # a terminal 120 columns wide (a new pseudo-terminal has 0, where tqdm draws nothing)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "blinaprofile", *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=follower,
    )
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the follower side closed
                data = b""
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=600)  # output left in the terminal was read above (select said ready)
    os.close(leader)
    return proc.returncode, b"".join(chunks).decode("utf-8", "replace")


def _run_piped(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "blinaprofile", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


# --------------------------------------------------------------------------- progress
def test_featurize_shows_progress_on_a_terminal_only(cohort: Path, tmp_path: Path) -> None:
    args = ["featurize", "--manifest", str(cohort), "--out", "f.csv", "--jobs", "1"]
    code, tty = _run_on_tty(args, tmp_path, _env(None))
    assert code == 0, tty
    assert "featurizing" in tty and "3/3" in tty
    piped = _run_piped(args, tmp_path, _env(None))
    assert piped.returncode == 0, piped.stderr
    assert "featurizing" not in piped.stderr and "\r" not in piped.stderr


def test_score_batch_progress_on_a_terminal_unless_no_progress(
    cohort: Path, tmp_path: Path, cache_dir: Path
) -> None:
    args = ["score-batch", "--manifest", str(cohort), "--jobs", "1", "--out"]
    code, tty = _run_on_tty([*args, "a"], tmp_path, _env(cache_dir))
    assert code == 0, tty
    # the inputs are counted while they are hashed, then the samples as they finish
    assert "checking inputs" in tty and "scoring" in tty and "3/3" in tty
    code, quiet = _run_on_tty([*args, "b", "--no-progress"], tmp_path, _env(cache_dir))
    assert code == 0, quiet
    assert "scoring" not in quiet and "checking inputs" not in quiet
    piped = _run_piped([*args, "c"], tmp_path, _env(cache_dir))
    assert piped.returncode == 0, piped.stderr
    assert "scoring" not in piped.stderr and "\r" not in piped.stderr


def test_progress_follows_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    from blinaprofile.progress import Progress, wants_progress

    class Stream(io.StringIO):
        def __init__(self, tty: bool) -> None:
            super().__init__()
            self.tty = tty

        def isatty(self) -> bool:
            return self.tty

    piped, terminal = Stream(False), Stream(True)
    monkeypatch.setattr(sys, "stderr", piped)
    assert not wants_progress() and wants_progress(True) and not wants_progress(False)
    bar = Progress(3, desc="x", unit="step")
    bar.update()  # a no-op without a terminal
    assert not bar.shown and piped.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", terminal)
    with Progress(3, desc="counting", unit="step") as bar:
        assert bar.shown
        bar.tick(3, "first")
    assert "counting" in terminal.getvalue() and "1/3" in terminal.getvalue()


def test_training_reports_every_fold_of_every_family() -> None:
    from blinaprofile.config import ModelSpec, TrainConfig
    from blinaprofile.features.schema import MODEL_FEATURES
    from blinaprofile.models.validation import evaluate

    rng = np.random.default_rng(0)
    n = 24
    table = pd.DataFrame(rng.uniform(5, 60, (n, len(MODEL_FEATURES))), columns=MODEL_FEATURES)
    table["response"] = np.arange(n) % 2
    table["patient_id"] = [f"P{i:02d}" for i in range(n)]
    table.loc[table["response"] == 1, MODEL_FEATURES[0]] += 20  # something to learn
    cfg = TrainConfig(
        models=[ModelSpec(family="logreg_l2"), ModelSpec(family="logreg_l1")],
        outer_folds=3,
        inner_folds=2,
        repeats=2,
        n_bootstrap=0,
        n_permutations=0,
    )
    steps: list[tuple[int, str]] = []
    evaluate(table, config=cfg, n_jobs=1, on_step=lambda total, what: steps.append((total, what)))
    assert len(steps) == 2 * 2 * 3 and {t for t, _ in steps} == {12}
    assert steps[0][1] == "logreg_l2 repeat 1/2 fold 1/3"
    assert steps[-1][1] == "logreg_l1 repeat 2/2 fold 3/3"


# --------------------------------------------------------------------------- imports
def _modules_after(code: str, env: dict[str, str], cwd: Path) -> dict[str, bool]:
    """Run ``code`` (which runs a command) in a fresh interpreter; which modules it loaded."""
    watched = ["anndata", "scanpy", "mlflow", "flowkit", "sklearn", "skops", "xgboost", "scipy"]
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps({{m: m in sys.modules for m in {watched!r}}}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gate_without_h5ad_imports_no_anndata(cohort: Path, tmp_path: Path) -> None:
    fcs = sorted((cohort.parent / "fcs").glob("*.fcs"))[0]
    code = f"from blinaprofile.cli import main\nassert main(['gate', {str(fcs)!r}]) == 0"
    loaded = _modules_after(code, _env(None), tmp_path)
    assert not loaded["anndata"] and not loaded["scanpy"]
    assert not loaded["flowkit"] and not loaded["scipy"]  # gating needs neither
    h5ad = tmp_path / "x.h5ad"
    code = f"from blinaprofile.cli import main\nassert main(['gate', {str(fcs)!r}, '--h5ad', {str(h5ad)!r}]) == 0"
    assert _modules_after(code, _env(None), tmp_path)["anndata"] and h5ad.is_file()


def test_score_with_report_imports_no_heavy_library(
    cohort: Path, tmp_path: Path, cache_dir: Path
) -> None:
    fcs = sorted((cohort.parent / "fcs").glob("*.fcs"))[0]
    code = (
        "from blinaprofile.cli import main\n"
        f"assert main(['score', {str(fcs)!r}, '--out-dir', {str(tmp_path)!r}]) == 0"
    )
    _modules_after(code, _env(cache_dir), tmp_path)  # the first use compiles the model
    loaded = _modules_after(code, _env(cache_dir), tmp_path)
    assert not any(loaded.values()), loaded
    written = sorted(p.suffix for p in tmp_path.iterdir() if p.name.startswith("S-"))
    assert written == [".html", ".json", ".xml"]
    xml = next(tmp_path.glob("S-*.gating.xml")).read_text(encoding="utf-8")
    assert xml.startswith("<?xml") and "Gating-ML" in xml


# --------------------------------------------------------------------------- same results
def test_compiled_default_model_gives_the_same_predictions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blinaprofile.models.compiled import CompiledPipeline
    from blinaprofile.models.loading import load_packaged_model

    monkeypatch.setenv("BLINAPROFILE_CACHE_DIR", str(tmp_path / "cache"))
    table = pd.read_csv(DEFAULT_MODEL / "artifacts" / "training_features.csv")
    reference = load_packaged_model(DEFAULT_MODEL)  # scikit-learn and XGBoost objects
    first = load_packaged_model(DEFAULT_MODEL, compiled=True)  # compiles, checks, caches
    again = load_packaged_model(DEFAULT_MODEL, compiled=True)  # from the cache
    assert list((tmp_path / "cache" / "compiled-model").glob("*.npz"))
    X = table[reference.runtime.features]
    rng = np.random.default_rng(1)
    X = pd.concat([X, X * np.exp(rng.normal(0, 0.3, X.shape))], ignore_index=True)
    want = reference.predict(X, params={"threshold": 0.5})
    for model in (first, again):
        assert isinstance(model.runtime.pipeline, CompiledPipeline)
        got = model.predict(X, params={"threshold": 0.5})
        for c in ("probability", "probability_low", "probability_high", "call"):
            assert got[c].tolist() == want[c].tolist(), c
        contrib = [c for c in want.columns if c.startswith("contrib_")]
        np.testing.assert_allclose(got[contrib], want[contrib], rtol=1e-5, atol=1e-5)


def test_without_a_user_cache_the_model_is_not_compiled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sklearn.pipeline import Pipeline

    from blinaprofile.models.loading import load_packaged_model

    monkeypatch.setenv("BLINAPROFILE_CACHE_DIR", "off")
    model = load_packaged_model(DEFAULT_MODEL, compiled=True)
    assert isinstance(model.runtime.pipeline, Pipeline)


def test_gatingml_writer_gives_flowkits_bytes(cohort: Path) -> None:
    import flowkit as fk

    from blinaprofile.gating.gatingml import gatingml_text
    from blinaprofile.gating.interop import rename_gates
    from blinaprofile.gating.strategy import load_strategy
    from blinaprofile.io.read import read_flow

    fcs = sorted((cohort.parent / "fcs").glob("*.fcs"))[0]
    strategies = [load_strategy(p) for p in sorted((ROOT / "configs" / "gating").glob("*.yaml"))]
    # names that need escaping in XML attributes
    strategies.append(rename_gates(load_strategy(), {"cd3": 'CD3 & <T> "cells"\n\u00e9'}))
    compared = 0
    for tree in strategies:
        data = read_flow(fcs, declared_markers=tree.needed_names())
        try:
            bound = tree.bind(data.channels, data.markers)
        except Exception:  # a strategy for another panel
            continue
        buf = io.BytesIO()
        fk.export_gatingml(bound.to_flowkit(), buf)
        assert gatingml_text(bound) == buf.getvalue().decode("utf-8")
        compared += 1
    assert compared >= 2


def test_numpy_dct_and_brent_match_scipy() -> None:
    from scipy.fft import dct
    from scipy.optimize import brentq as scipy_brentq

    from blinaprofile.gating.density import brentq, dct2

    rng = np.random.default_rng(0)
    for m in (8, 64, 257, 1024):
        x = rng.poisson(50, m).astype(float)
        np.testing.assert_allclose(dct2(x), dct(x, type=2), rtol=1e-12, atol=1e-9)

    def f(t: float) -> float:
        return float(np.cos(t) - t)

    for xtol, rtol in ((2e-12, 8.9e-16), (1e-10, 1e-4)):
        assert brentq(f, -1.0, 3.0, xtol=xtol, rtol=rtol) == scipy_brentq(
            f, -1.0, 3.0, xtol=xtol, rtol=rtol
        )
    with pytest.raises(ValueError, match="different signs"):
        brentq(f, 2.0, 3.0)


def test_cohort_figure_background_is_drawn_once(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import base64

    from PIL import Image

    from blinaprofile.scoring import report
    from blinaprofile.scoring.score import load_scoring_model, score_sample

    cache = tmp_path / "cache"
    monkeypatch.setenv("BLINAPROFILE_CACHE_DIR", str(cache))
    # as in a new process: an earlier test may have drawn this cohort's background
    monkeypatch.setattr(report, "_COHORT_BACKGROUNDS", {})
    training = load_scoring_model(str(DEFAULT_MODEL)).training
    assert training is not None
    pngs, entries = [], []
    for fcs in sorted((cohort.parent / "fcs").glob("*.fcs")):
        res = score_sample(fcs, model=str(DEFAULT_MODEL))
        feats = [f for f in res.ood_z if f in training.columns]
        pngs.append(report.cohort_png(res, training, feats))
        full = io.BytesIO()
        report.training_figure(res, training, feats).savefig(full, format="png", dpi=150)
        fast = Image.open(io.BytesIO(base64.b64decode(pngs[-1])))
        assert fast.size == Image.open(full).size and round(fast.info["dpi"][0]) == 150
        entries.append({p: p.stat().st_mtime_ns for p in cache.rglob("report-cohort/*.npz")})
    # one background, drawn for the first sample and never again; each sample on top of it
    assert len(entries[0]) == 1 and entries[0] == entries[-1]
    assert len(set(pngs)) == len(pngs)
    # a new process takes it from the user cache
    code = (
        "import pandas as pd\n"
        "from blinaprofile.scoring.report import cohort_png\n"
        "from blinaprofile.scoring.score import load_scoring_model, score_sample\n"
        f"res = score_sample({str(fcs)!r}, model={str(DEFAULT_MODEL)!r})\n"
        f"tr = load_scoring_model({str(DEFAULT_MODEL)!r}).training\n"
        "print(cohort_png(res, tr, [f for f in res.ood_z if f in tr.columns])[:20])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=_env(cache), capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("report-cohort/*.npz")} == entries[0]


def test_cohort_figure_matches_the_whole_drawing(cohort: Path) -> None:
    """The cached-background cohort figure shows what ``training_figure`` draws, panel by
    panel: the sample's marks drawn without axes, and a panel whose value axis the sample
    extends drawn anew in its place (not hidden under the white it is drawn on)."""
    import base64
    import dataclasses

    from PIL import Image

    from blinaprofile.scoring import report
    from blinaprofile.scoring.score import load_scoring_model, score_sample

    training = load_scoring_model(str(DEFAULT_MODEL)).training
    assert training is not None
    fcs = sorted((cohort.parent / "fcs").glob("*.fcs"))[0]
    res = score_sample(fcs, model=str(DEFAULT_MODEL))
    feats = [f for f in res.ood_z if f in training.columns]
    assert len(feats) >= 6
    # two samples beyond the training range (the axis is extended), one far off it (arrow)
    values = dict(res.features)
    for f, reach in ((feats[1], 0.5), (feats[3], 0.3), (feats[5], 5.0)):
        col = training[f].astype(float)
        values[f] = float(col.max() + reach * (col.max() - col.min()))
    res = dataclasses.replace(res, features=values)
    fast = Image.open(io.BytesIO(base64.b64decode(report.cohort_png(res, training, feats))))
    buf = io.BytesIO()
    report.training_figure(res, training, feats).savefig(buf, format="png", dpi=150)
    full = Image.open(buf)
    assert fast.size == full.size
    a = np.asarray(fast.convert("RGB"), dtype=float)
    b = np.asarray(full.convert("RGB"), dtype=float)
    ncol = min(5, len(feats))
    nrow = -(-len(feats) // ncol)
    h, w = a.shape[0] // nrow, a.shape[1] // ncol
    for k in range(len(feats)):
        r, c = divmod(k, ncol)
        block = (slice(r * h, (r + 1) * h), slice(c * w, (c + 1) * w))
        ink = float((b[block] < 128).mean())  # the panel has dark pixels: boxes, ticks, text
        diff = float(np.abs(a[block] - b[block]).mean())
        assert ink > 0.01 and diff < 12.0, (feats[k], ink, diff)


def test_report_figures_survive_a_failed_helper_process(
    cohort: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gating figure is drawn by a helper process where one could be forked safely;
    should the helper fail, the report process draws it itself (the same pixels)."""
    from blinaprofile.scoring import report
    from blinaprofile.scoring.score import score_sample

    monkeypatch.setenv("BLINAPROFILE_CACHE_DIR", str(tmp_path / "cache"))

    class FailingHelper:
        def __init__(self) -> None:
            self.calls: list[str] = []

        def submit(self, func: object, *args: object) -> None:
            self.calls.append("submit")

        def result(self) -> str | None:
            self.calls.append("result")
            return None  # the helper died

        def close(self) -> None:
            self.calls.append("close")

    fcs = sorted((cohort.parent / "fcs").glob("*.fcs"))[0]
    res = score_sample(fcs, model=str(DEFAULT_MODEL), keep_gating=True)
    helper = FailingHelper()
    out = report.write_report(res, tmp_path / "r.html", helper=helper)  # type: ignore[arg-type]
    html = out.read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 2  # the cohort and the gating figure
    assert helper.calls == ["submit", "result", "close"]
    alone = report.write_report(res, tmp_path / "alone.html").read_text(encoding="utf-8")
    figures = re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", html)
    assert figures == re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", alone)


_HELPER_SCRIPT = """
import os, sys
from blinaprofile.scoring import helper as module
from blinaprofile.scoring.helper import one_thread, start_helper
module.free_core = lambda: True  # whatever else this machine is running
# this test's jobs name builtins, which a real job may not
module.JOB_GLOBALS = module.JOB_GLOBALS | {("builtins", "getattr"), ("builtins", "str")}
assert one_thread()
helper = start_helper(preload=())
assert helper is not None and helper.pid != os.getpid()
helper.submit(str.upper, "drawn aside")
print(helper.result())
failing = start_helper(preload=())
failing.submit(str.upper, 1)  # TypeError in the helper
print(failing.result())
unused = start_helper(preload=("json",))
unused.close()
stuck = start_helper(preload=())
stuck.submit(str.upper, lambda: 0)  # cannot be pickled: nothing is sent
print(stuck.result())
refused = start_helper(preload=())
refused.submit(os.getcwd)  # not on the allow-list: refused by the helper's unpickler
print(refused.result())
import numpy  # starts BLAS threads on a machine with several cores
print(start_helper() is None or one_thread())
"""


def test_helper_process_draws_aside_only_when_forking_is_safe() -> None:
    from blinaprofile.scoring.helper import one_thread, start_helper

    if one_thread():  # pragma: no cover - pytest with numpy imported runs other threads
        pytest.skip("this test process runs a single thread")
    assert start_helper() is None  # never forked from a process running other threads
    out = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", _HELPER_SCRIPT],
        env=_env(None),
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    if (os.cpu_count() or 1) < 2 or sys.platform == "darwin":  # pragma: no cover
        pytest.skip("no helper process on this machine")
    lines = out.stdout.split("\n")[:5]
    assert lines == ["DRAWN ASIDE", "None", "None", "None", "True"], out.stdout


_SCORE_WITH_HELPER = """
import sys
from blinaprofile.scoring import helper
helper.free_core = lambda: True  # as on an idle machine
result = helper.Helper.result
def told(self, *args, **kwargs):
    text = result(self, *args, **kwargs)
    print("helper drew the gating figure:", text is not None, file=sys.stderr)
    return text
helper.Helper.result = told
from blinaprofile.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_score_command_forks_no_threaded_process(cohort: Path, tmp_path: Path) -> None:
    """``blinaprofile score`` draws its report's figures on two cores without forking a
    process that runs threads (Python's DeprecationWarning about fork() stays silent)."""
    fcs = sorted((cohort.parent / "fcs").glob("*.fcs"))[0]
    args = ["score", str(fcs), "--model", str(DEFAULT_MODEL), "--out-dir"]
    htmls = []
    for run, cmd in (("helper", ["-c", _SCORE_WITH_HELPER]), ("cli", ["-m", "blinaprofile"])):
        out = subprocess.run(
            [sys.executable, "-W", "always::DeprecationWarning", *cmd, *args, str(tmp_path / run)],
            env=_env(tmp_path / "cache"),
            capture_output=True,
            text=True,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        assert "fork()" not in out.stderr, out.stderr[-2000:]
        if run == "helper" and (os.cpu_count() or 1) > 1 and sys.platform != "darwin":
            assert "helper drew the gating figure: True" in out.stderr, out.stderr[-2000:]
        (html,) = (tmp_path / run).glob("*.report.html")
        htmls.append(html.read_text(encoding="utf-8"))
    figures = [re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", h) for h in htmls]
    assert len(figures[0]) == 2 and figures[0] == figures[1]  # the same pixels either way


def test_helper_only_with_a_free_core(monkeypatch: pytest.MonkeyPatch) -> None:
    from blinaprofile.scoring.helper import free_core

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.7, 1.0, 1.0))
    assert free_core()
    monkeypatch.setattr(os, "getloadavg", lambda: (2.5, 1.0, 1.0))
    assert not free_core()  # every core busy: the figures are drawn one after the other
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert not free_core()
