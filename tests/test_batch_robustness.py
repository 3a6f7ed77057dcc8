"""Never hang, never keep a stale result; every failure is one line and exit 2 (issue 11).

Each attack is kept as a test, through the CLI (``python -m blinaprofile`` in a subprocess
with its own timeout, so a regression fails instead of hanging CI) and through the API:

- a FIFO, a symbolic link to ``/dev/zero``, a socket or a device given as a sample is
  refused before a byte is read (``FILE: not a regular file (FIFO)``); a batch goes on;
- a sample that never finishes becomes an error row after ``--sample-timeout`` and its
  worker process is killed and replaced;
- a file corrected under the same name is scored again in the same batch folder, an
  unchanged one is skipped (parts are keyed on the file's SHA-256);
- disk full while writing parts, ``run.json``, ``results.csv``/``results.parquet`` or the
  ``score`` outputs: exit 2 naming the file, no temporary file left;
- an unreachable Dask scheduler: exit 2 naming the address, no output folder made;
- an invalid training grid value or ``simulate --n-patients 1``: a configuration error
  naming the key, before anything is fitted or written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from blinaprofile.errors import ConfigError, InputError, OutputError
from blinaprofile.io.files import file_checksum
from conftest_scoring_helpers import scoring_model

CLI_TIMEOUT = 600  # seconds; a hang becomes a failure, never a stuck CI run
SHORT_TIMEOUT = 120

#: Installed in the CLI's processes through ``sitecustomize`` (PYTHONPATH): makes writes of
#: temporary files whose name contains one of ``BPTEST_ENOSPC``'s comma-separated parts
#: fail half-way with ENOSPC (no file name, as a full disk reports it), and makes scoring a
#: file whose name contains ``STUCK`` block forever (a sample stuck in a read that never
#: returns), recording the worker's PID in ``BPTEST_STUCK_PID``.
SITECUSTOMIZE = textwrap.dedent(
    """
    import builtins
    import errno
    import os
    import pathlib

    _FULL = [n for n in os.environ.get("BPTEST_ENOSPC", "").split(",") if n]


    def _full(path):
        text = os.fspath(path)
        return text.endswith(".tmp") and any(n in text for n in _FULL)


    def _enospc():
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


    if _FULL:
        _write_text = pathlib.Path.write_text
        _write_bytes = pathlib.Path.write_bytes
        _open = builtins.open

        def write_text(self, data, *args, **kwargs):
            if _full(self):
                _write_text(self, data[: len(data) // 2], *args, **kwargs)
                raise _enospc()
            return _write_text(self, data, *args, **kwargs)

        def write_bytes(self, data):
            if _full(self):
                _write_bytes(self, bytes(data[: len(data) // 2]))
                raise _enospc()
            return _write_bytes(self, data)

        class _FullFile:
            def __init__(self, fh):
                self._fh = fh

            def write(self, data):
                self._fh.write(data[:1])
                raise _enospc()

            def __getattr__(self, name):
                return getattr(self._fh, name)

            def __iter__(self):
                return iter(self._fh)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self._fh.close()

        def open_(file, mode="r", *args, **kwargs):
            fh = _open(file, mode, *args, **kwargs)
            if isinstance(file, (str, os.PathLike)) and ("w" in mode or "a" in mode) and _full(file):
                return _FullFile(fh)
            return fh

        builtins.open = open_
        pathlib.Path.write_text = write_text
        pathlib.Path.write_bytes = write_bytes

        if any("parquet" in n for n in _FULL):
            import pandas

            def to_parquet(self, path, *args, **kwargs):
                if _full(path):
                    _write_bytes(pathlib.Path(path), b"PAR1")
                    raise _enospc()
                return _to_parquet(self, path, *args, **kwargs)

            _to_parquet = pandas.DataFrame.to_parquet
            pandas.DataFrame.to_parquet = to_parquet

    if os.environ.get("BPTEST_STUCK_PID"):
        import time

        from blinaprofile.scoring import batch

        _score_job = batch.score_job

        def stuck_score_job(job, options):
            if "STUCK" in job.path:
                pathlib.Path(os.environ["BPTEST_STUCK_PID"]).write_text(str(os.getpid()))
                time.sleep(3600)
            return _score_job(job, options)

        batch.score_job = stuck_score_job
    """
)


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "blinaprofile-test-pycache")
    return env


def _with_hooks(tmp: Path, **extra: str) -> dict[str, str]:
    """An environment whose Python processes load :data:`SITECUSTOMIZE`."""
    hooks = tmp / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    env = _env(tmp, **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _cli(
    args: list[str], cwd: Path, *, env: dict[str, str] | None = None, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blinaprofile", *args],
        cwd=cwd,
        env=env or _env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _python(
    code: str, cwd: Path, *, timeout: float = SHORT_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run API code that could hang on a regression in its own process, with a timeout."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _error_lines(r: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ln.strip()]


def _temp_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def sm(tmp_path_factory):
    return scoring_model(tmp_path_factory)


@pytest.fixture(scope="module")
def fcs_files(sm) -> list[Path]:
    return sorted((sm.new_cohort / "fcs").glob("*.fcs"))


@pytest.fixture
def specials(tmp_path: Path) -> dict[str, Path]:
    """A FIFO, a symbolic link to /dev/zero and a socket, each named like a sample."""
    d = tmp_path / "special"
    d.mkdir()
    fifo = d / "pipe.fcs"
    os.mkfifo(fifo)
    zero = d / "zero.fcs"
    zero.symlink_to("/dev/zero")
    sock_path = d / "sock.fcs"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(sock_path))
    sock.close()  # the socket file stays
    return {"FIFO": fifo, "character device": zero, "socket": sock_path}


# --------------------------------------------------------------------------- 1. file types
def test_file_type_is_checked_before_reading_or_hashing(
    specials: dict[str, Path], tmp_path: Path
) -> None:
    """ensure_file / open_regular / file_checksum refuse non-regular files without blocking."""
    r = _python(
        f"""
        import json
        from blinaprofile.errors import InputError
        from blinaprofile.io.files import ensure_file, open_regular
        from blinaprofile.io.files import file_checksum
        out = {{}}
        for name, path in {json.dumps({k: str(v) for k, v in specials.items()})}.items():
            msgs = []
            for fn in (ensure_file, open_regular, file_checksum):
                try:
                    fn(path)
                    msgs.append("accepted")
                except InputError as err:
                    msgs.append(str(err))
            out[name] = msgs
        print(json.dumps(out))
        """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    for kind, path in specials.items():
        assert got[kind] == [f"{path}: not a regular file ({kind})"] * 3
    # folders are allowed where the single-cell path takes one (10x), and can be refused
    from blinaprofile.io.files import ensure_file

    assert ensure_file(tmp_path) == tmp_path
    with pytest.raises(InputError, match=r"not a regular file \(directory\)"):
        ensure_file(tmp_path, allow_dir=False)
    with pytest.raises(InputError, match="file not found"):
        ensure_file(tmp_path / "absent.fcs")
    dangling = tmp_path / "dangling.fcs"
    dangling.symlink_to(tmp_path / "nowhere.fcs")
    with pytest.raises(InputError, match="file not found"):
        file_checksum(dangling)
    # a folder's checksum skips what is not a regular file instead of reading it
    tenx = tmp_path / "tenx"
    tenx.mkdir()
    (tenx / "matrix.mtx").write_text("%%MatrixMarket\n")
    before = file_checksum(tenx)
    os.mkfifo(tenx / "barcodes.tsv")
    assert file_checksum(tenx) == before


@pytest.mark.parametrize("kind", ["FIFO", "character device"])
def test_cli_score_refuses_a_fifo_or_device_at_once(
    sm, specials: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    path = specials[kind]
    r = _cli(["score", str(path), "--model", str(sm.model_dir), "--no-report"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert _error_lines(r) == [f"error: {path}: not a regular file ({kind})"]


def test_cli_score_batch_goes_on_past_a_fifo_and_a_device(
    sm, fcs_files: list[Path], specials: dict[str, Path], tmp_path: Path
) -> None:
    rows = [{"sample_id": f"G{i}", "file": str(f)} for i, f in enumerate(fcs_files[:2])]
    rows += [
        {"sample_id": "PIPE", "file": str(specials["FIFO"])},
        {"sample_id": "ZERO", "file": str(specials["character device"])},
    ]
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    out = tmp_path / "out"
    args = ["score-batch", "--manifest", str(manifest), "--model", str(sm.model_dir)]
    r = _cli([*args, "--out", str(out), "--jobs", "2", "--no-progress"], tmp_path)
    assert r.returncode == 1, r.stderr  # error rows
    assert "4 samples: 4 scored now, 0 already finished" in r.stdout
    res = pd.read_csv(out / "results.csv", keep_default_na=False).set_index("sample_id")
    assert (res.loc[["G0", "G1"], "error"] == "").all()
    assert res.loc["PIPE", "call"] == "error" and res.loc["ZERO", "call"] == "error"
    assert res.loc["PIPE", "error"].endswith("not a regular file (FIFO)")
    assert res.loc["ZERO", "error"].endswith("not a regular file (character device)")
    err = _error_lines(r)
    assert len(err) == 2 and all(ln.startswith("error: ") for ln in err)
    # the same through the API, a folder holding the FIFO (in its own process: no hang)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(fcs_files[0], folder / "a.fcs")
    os.mkfifo(folder / "b.fcs")
    api = _python(
        f"""
        from blinaprofile.scoring.batch import score_samples
        df = score_samples({str(folder)!r}, model={str(sm.model_dir)!r}, n_jobs=1)
        print(sorted(df["error"]))
        """,
        tmp_path,
        timeout=CLI_TIMEOUT,
    )
    assert api.returncode == 0, api.stderr
    assert "not a regular file (FIFO)" in api.stdout and "''" in api.stdout


# --------------------------------------------------------------------------- 1b. time limit
def test_cli_stuck_sample_becomes_an_error_row_and_its_worker_is_killed(
    sm, fcs_files: list[Path], tmp_path: Path
) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(fcs_files[0], folder / "a.fcs")
    shutil.copy(fcs_files[1], folder / "b_STUCK.fcs")
    shutil.copy(fcs_files[2], folder / "c.fcs")
    pid_file = tmp_path / "stuck.pid"
    env = _with_hooks(tmp_path, BPTEST_STUCK_PID=str(pid_file))
    out = tmp_path / "out"
    args = ["score-batch", str(folder), "--model", str(sm.model_dir), "--out", str(out)]
    # --jobs 1: the time limit runs the samples in one worker process that can be killed
    r = _cli([*args, "--jobs", "1", "--sample-timeout", "30", "--no-progress"], tmp_path, env=env)
    assert r.returncode == 1, r.stderr
    assert "3 samples: 3 scored now, 0 already finished" in r.stdout
    res = pd.read_csv(out / "results.csv", keep_default_na=False)
    errors = res.loc[res["error"] != "", "error"].tolist()
    assert len(errors) == 1 and "no result within 30 s; the worker process was stopped" in errors[0]
    assert (res["call"] != "error").sum() == 2  # the sample after the stuck one was scored too
    assert [ln for ln in _error_lines(r) if ln.startswith("error: ")] == [f"error: {errors[0]}"]
    stuck = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(stuck, 0)  # killed, not abandoned


def test_cli_sample_timeout_must_be_positive(tmp_path: Path) -> None:
    r = _cli(["score-batch", "x.fcs", "--out", "o", "--sample-timeout", "0"], tmp_path)
    assert r.returncode == 2 and "not a positive number of seconds" in r.stderr
    assert not (tmp_path / "o").exists()


def test_api_sample_timeout(sm, fcs_files: list[Path], tmp_path: Path) -> None:
    from blinaprofile.scoring.batch import score_samples

    with pytest.raises(ConfigError, match="sample_timeout must be a positive number"):
        score_samples(fcs_files[:1], model=str(sm.model_dir), sample_timeout=0)
    # a stuck sample through score_samples (in its own process: no hang on a regression)
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "stuckjob.py").write_text(
        textwrap.dedent(
            """
            import time
            from blinaprofile.scoring import batch

            real = batch.score_job

            def score_job(job, options):
                if "STUCK" in job.path:
                    time.sleep(3600)
                return real(job, options)
            """
        )
    )
    stuck = tmp_path / "x_STUCK.fcs"
    shutil.copy(fcs_files[1], stuck)
    r = _python(
        f"""
        import sys
        sys.path.insert(0, {str(hooks)!r})
        if __name__ == "__main__":
            import stuckjob
            from blinaprofile.scoring import batch
            batch.score_job = stuckjob.score_job
            df = batch.score_samples(
                [{str(fcs_files[0])!r}, {str(stuck)!r}],
                model={str(sm.model_dir)!r}, n_jobs=1, sample_timeout=30,
            )
            print(list(df["call"]))
            print(df["error"].iloc[1])
        """,
        tmp_path,
        timeout=CLI_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    calls, message = r.stdout.strip().splitlines()[-2:]
    assert calls.endswith("'error']") and "'error'" not in calls.split(",")[0]
    assert "no result within 30 s; the worker process was stopped" in message


RUNNER_FUNCS = """
import os
import time


def work(x):
    if x == "sleep":
        time.sleep(3600)
    if x == "exit":
        os._exit(7)
    if x == "kill":
        os.kill(os.getpid(), 9)
    if x == "raise":
        raise ValueError("bad item")
    return x * 2
"""


def test_run_parallel_kills_and_replaces_stuck_or_dead_workers(tmp_path: Path) -> None:
    (tmp_path / "rpwork.py").write_text(RUNNER_FUNCS)
    r = _python(
        f"""
        import json
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        if __name__ == "__main__":
            import rpwork
            from blinaprofile.parallel import run_parallel
            items = ["a", "sleep", "b", "exit", "c", "kill", "raise", "d"]
            def err(item, e):
                return f"{{type(e).__name__}}: {{e}}"
            for n_jobs in (1, 2):
                got = dict(run_parallel(rpwork.work, items, n_jobs=n_jobs, on_error=err, timeout=5))
                print(json.dumps(got))
        """,
        tmp_path,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        got = json.loads(line)
        assert got["a"] == "aa" and got["b"] == "bb" and got["c"] == "cc" and got["d"] == "dd"
        assert (
            got["sleep"] == "ItemTimeoutError: no result within 5 s; the worker process was stopped"
        )
        assert got["exit"] == "WorkerDiedError: the worker process exited (exit code 7)"
        assert (
            got["kill"]
            == "WorkerDiedError: the worker process was killed (SIGKILL: out of memory?)"
        )
        assert got["raise"] == "ValueError: bad item"


def test_run_parallel_without_main_guard_is_one_clear_error(tmp_path: Path) -> None:
    """Workers that cannot start (a script without the __main__ guard) are reported."""
    script = tmp_path / "noguard.py"
    script.write_text(
        textwrap.dedent(
            """
            from blinaprofile.errors import BlinaprofileError
            from blinaprofile.parallel import run_parallel

            def work(x):  # no __main__ guard below: starting workers re-run this script
                return x
            try:
                list(run_parallel(work, ["a", "b"], n_jobs=2, on_error=lambda i, e: e))
            except BlinaprofileError as err:
                print("ERROR", err)
            """
        )
    )
    r = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=SHORT_TIMEOUT,
        check=False,
    )
    assert "ERROR the worker processes could not start" in r.stdout, r.stderr[-2000:]


# --------------------------------------------------------------------------- 2. stale results
def test_corrected_file_under_the_same_name_is_scored_again(
    sm, fcs_files: list[Path], tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    x, y = data / "x.fcs", data / "y.fcs"
    shutil.copy(fcs_files[0], x)
    shutil.copy(fcs_files[1], y)
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"sample_id": ["X", "Y"], "file": [str(x), str(y)]}).to_csv(manifest, index=False)
    out = tmp_path / "out"
    args = ["score-batch", "--manifest", str(manifest), "--model", str(sm.model_dir)]
    args += ["--out", str(out), "--jobs", "1", "--no-progress"]
    r1 = _cli(args, tmp_path)
    assert r1.returncode == 0, r1.stderr
    assert "2 samples: 2 scored now, 0 already finished" in r1.stdout
    first = pd.read_csv(out / "results.csv").set_index("sample_id")
    shutil.copy(fcs_files[2], x)  # the corrected acquisition, saved under the same name
    r2 = _cli(args, tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert "2 samples: 1 scored now, 1 already finished" in r2.stdout
    second = pd.read_csv(out / "results.csv").set_index("sample_id")
    assert second.loc["X", "input_sha256"] == file_checksum(x) != first.loc["X", "input_sha256"]
    assert second.loc["Y", "input_sha256"] == first.loc["Y", "input_sha256"]
    r3 = _cli(args, tmp_path)
    assert "2 samples: 0 scored now, 2 already finished" in r3.stdout
    # the API, on a folder (keyed on path and content)
    from blinaprofile.scoring.batch import score_samples

    api_out = tmp_path / "api"
    df = score_samples(data, model=str(sm.model_dir), out_dir=api_out, n_jobs=1)
    assert df.attrs["batch"]["n_scored"] == 2
    shutil.copy(fcs_files[3], y)
    df = score_samples(data, model=str(sm.model_dir), out_dir=api_out, n_jobs=1)
    assert (df.attrs["batch"]["n_scored"], df.attrs["batch"]["n_skipped"]) == (1, 1)
    assert sorted(df["input_sha256"]) == sorted([file_checksum(x), file_checksum(y)])
    df = score_samples(data, model=str(sm.model_dir), out_dir=api_out, n_jobs=1)
    assert df.attrs["batch"]["n_scored"] == 0


def test_collected_jobs_are_keyed_on_content(fcs_files: list[Path], tmp_path: Path) -> None:
    from blinaprofile.scoring.batch import collect_jobs

    f = tmp_path / "s.fcs"
    shutil.copy(fcs_files[0], f)
    (job,) = collect_jobs([f])
    assert job.sha256 == file_checksum(f)
    assert collect_jobs([f])[0].key == job.key  # unchanged: same key
    shutil.copy(fcs_files[1], f)
    assert collect_jobs([f])[0].key != job.key  # same name, new content: new key
    os.remove(f)
    os.mkfifo(f)
    (fifo_job,) = collect_jobs([f])  # hashed only after the type check: no hang
    assert fifo_job.sha256 == ""


# --------------------------------------------------------------------------- 3. disk full
def _full_disk(monkeypatch: pytest.MonkeyPatch, match: str) -> None:
    """Writes of temporary files whose name contains ``match`` fail half-way with ENOSPC."""
    real_write_text = Path.write_text
    real_to_csv = pd.DataFrame.to_csv
    real_to_parquet = pd.DataFrame.to_parquet

    def hit(path: Any) -> bool:
        text = os.fspath(path)
        return text.endswith(".tmp") and match in text

    def write_text(self: Path, data: str, *a: Any, **k: Any) -> int:
        if hit(self):
            real_write_text(self, data[: len(data) // 2], *a, **k)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write_text(self, data, *a, **k)

    def to_csv(self: pd.DataFrame, path: Any = None, *a: Any, **k: Any) -> Any:
        if path is not None and hit(path):
            Path(path).write_bytes(b"sample_id,")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_to_csv(self, path, *a, **k)

    def to_parquet(self: pd.DataFrame, path: Any, *a: Any, **k: Any) -> Any:
        if hit(path):
            Path(path).write_bytes(b"PAR1")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_to_parquet(self, path, *a, **k)

    monkeypatch.setattr(Path, "write_text", write_text)
    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    monkeypatch.setattr(pd.DataFrame, "to_parquet", to_parquet)


@pytest.mark.parametrize(
    ("match", "target"),
    [
        ("results.csv", "results.csv"),
        ("results.parquet", "results.parquet"),
        ("/parts/", "parts/"),
        ("run.json", "run.json"),
    ],
)
def test_api_disk_full_names_the_file_and_leaves_no_temporary_file(
    sm,
    fcs_files: list[Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    match: str,
    target: str,
) -> None:
    from blinaprofile.scoring.batch import score_samples

    out = tmp_path / "out"
    _full_disk(monkeypatch, match)
    with pytest.raises(OutputError) as info:
        score_samples(fcs_files[:1], model=str(sm.model_dir), out_dir=out, n_jobs=1)
    msg = str(info.value)
    assert info.value.exit_code == 2
    assert f"{out}/{target}" in msg and msg.endswith("cannot write: No space left on device")
    assert _temp_files(tmp_path) == []
    if target in ("run.json", "parts/"):
        assert not out.exists()  # nothing finished: no half-made output folder
    monkeypatch.undo()
    df = score_samples(fcs_files[:1], model=str(sm.model_dir), out_dir=out, n_jobs=1)
    assert (df["error"] == "").all()  # the same folder works once there is space


@pytest.mark.parametrize("match", ["results.csv", "results.parquet", "/parts/", "run.json"])
def test_cli_score_batch_disk_full_is_exit_2_naming_the_file(
    sm, fcs_files: list[Path], tmp_path: Path, match: str
) -> None:
    out = tmp_path / "out"
    env = _with_hooks(tmp_path, BPTEST_ENOSPC=match)
    args = ["score-batch", str(fcs_files[0]), "--model", str(sm.model_dir), "--out", str(out)]
    r = _cli([*args, "--jobs", "1", "--no-progress"], tmp_path, env=env)
    assert r.returncode == 2, r.stderr
    (line,) = _error_lines(r)
    assert line.startswith(f"error: {out}/") and line.endswith(
        ": cannot write: No space left on device"
    )
    assert f"{out}/{match.strip('/')}" in line
    assert _temp_files(tmp_path) == []
    if match in ("run.json", "/parts/"):
        assert not out.exists()  # nothing finished: no half-made output folder


@pytest.mark.parametrize("match", ["report.html", "score.json", "gating.xml"])
def test_cli_score_disk_full_is_exit_2_naming_the_file(
    sm, fcs_files: list[Path], tmp_path: Path, match: str
) -> None:
    out = tmp_path / "reports"
    env = _with_hooks(tmp_path, BPTEST_ENOSPC=match)
    args = ["score", str(fcs_files[0]), "--model", str(sm.model_dir), "--out-dir", str(out)]
    r = _cli(args, tmp_path, env=env)
    assert r.returncode == 2, r.stderr
    (line,) = _error_lines(r)
    assert line.startswith(f"error: {out}/S-") and line.endswith(
        f".{match}: cannot write: No space left on device"
    )
    assert _temp_files(tmp_path) == []


# --------------------------------------------------------------------------- 4. Dask scheduler
def test_cli_unreachable_scheduler_is_one_line_and_makes_no_folder(
    sm, fcs_files: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = ["score-batch", str(fcs_files[0]), "--model", str(sm.model_dir), "--out", str(out)]
    r = _cli([*args, "--scheduler", "tcp://127.0.0.1:1"], tmp_path, timeout=SHORT_TIMEOUT)
    assert r.returncode == 2, r.stderr
    (line,) = _error_lines(r)
    assert line.startswith(
        "error: cannot reach the Dask scheduler at tcp://127.0.0.1:1 within 10 s"
    )
    assert not out.exists()
    r = _cli([*args, "--scheduler", "bogus://x"], tmp_path, timeout=SHORT_TIMEOUT)
    assert r.returncode == 2 and "not a Dask scheduler address 'bogus://x'" in r.stderr
    assert not out.exists()


def test_api_unreachable_scheduler(sm, fcs_files: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = _python(
        f"""
        from blinaprofile.errors import InputError
        from blinaprofile.scoring.batch import score_samples
        try:
            score_samples([{str(fcs_files[0])!r}], model={str(sm.model_dir)!r},
                          scheduler="tcp://127.0.0.1:1", out_dir={str(out)!r})
        except InputError as err:
            print("InputError:", err)
        """,
        tmp_path,
    )
    assert "InputError: cannot reach the Dask scheduler at tcp://127.0.0.1:1" in r.stdout, r.stderr
    assert not out.exists()


# --------------------------------------------------------------------------- 5. configuration
BAD_GRIDS = [
    ("logreg_l2", "grid: {clf__C: [0.3, -1]}", "models.0.grid.clf__C: -1 is not valid", "'C'"),
    (
        "linear_svm",
        "params: {C: 0}",
        "models.0.params.C: 0 is not valid",
        "'C' parameter of LinearSVC",
    ),
    (
        "random_forest",
        "grid: {clf__max_depth: [2, deep]}",
        "models.0.grid.clf__max_depth: 'deep' is not valid",
        "'max_depth'",
    ),
    (
        "xgboost",
        "grid: {clf__learning_rate: [-1]}",
        "models.0.grid.clf__learning_rate: -1",
        "learning_rate",
    ),
    (
        "logreg_l2",
        "grid: {clf__nonsense: [1]}",
        "models.0.grid.clf__nonsense: 1",
        "Invalid parameter",
    ),
]


@pytest.mark.parametrize(("family", "spec", "key", "reason"), BAD_GRIDS)
def test_invalid_grid_value_is_a_config_error_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str, spec: str, key: str, reason: str
) -> None:
    from blinaprofile.config import TrainConfig, parse_yaml
    from blinaprofile.models import validation

    cfg = tmp_path / "x.yaml"
    cfg.write_text(f"models:\n  - family: {family}\n    {spec}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        validation.load_train_config(cfg)
    assert str(info.value).startswith(f"{cfg}: {key}") and reason in str(info.value)

    def no_fitting(*a: Any, **k: Any) -> Any:
        raise AssertionError("fitted before the grid was checked")

    monkeypatch.setattr(validation, "_run_cv", no_fitting)
    config = TrainConfig.model_validate(parse_yaml(cfg.read_text()))
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        validation.evaluate(pd.DataFrame(), config=config)


def test_cli_train_with_an_invalid_grid_exits_2(sm, tmp_path: Path) -> None:
    cfg = tmp_path / "x.yaml"
    cfg.write_text("models:\n  - family: logreg_l2\n    grid: {clf__C: [-1]}\n", encoding="utf-8")
    r = _cli(["train", "--features", str(sm.features_csv), "--config", str(cfg)], tmp_path)
    assert r.returncode == 2, r.stderr
    (line,) = _error_lines(r)
    assert line.startswith(f"error: {cfg}: models.0.grid.clf__C: -1 is not valid for logreg_l2: ")
    assert "must be a float in the range (0.0, inf]" in line


def test_shipped_training_configs_pass_the_grid_check() -> None:
    from blinaprofile.models.validation import load_train_config
    from blinaprofile.settings import settings

    for f in sorted((settings.config_dir / "train").glob("*.yaml")):
        load_train_config(f)


def test_simulate_with_one_patient_is_a_config_error(tmp_path: Path, sim_config, panel) -> None:
    from blinaprofile.simulate.flow import simulate_cohort

    out = tmp_path / "sim"
    r = _cli(["simulate", "--out", str(out), "--n-patients", "1"], tmp_path, timeout=SHORT_TIMEOUT)
    assert r.returncode == 2, r.stderr
    (line,) = _error_lines(r)
    assert (
        line.startswith("error: ")
        and "n_patients: Input should be greater than or equal to 2" in line
    )
    assert "internal error" not in line and not out.exists()
    with pytest.raises(ConfigError, match="n_patients: Input should be greater than or equal to 2"):
        simulate_cohort(sim_config, out, panel=panel, n_patients=1)
    with pytest.raises(ConfigError, match="events_per_sample: Input should be greater"):
        simulate_cohort(sim_config, out, panel=panel, events_per_sample=10)
    assert not out.exists()
    # the minimum works: one responder and one nonresponder
    res = simulate_cohort(sim_config, out, panel=panel, n_patients=2, events_per_sample=500)
    labels = pd.read_csv(res.manifest)["response"]
    assert sorted(labels) == ["nonresponder", "responder"]
