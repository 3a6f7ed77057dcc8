"""REST: ``mlflow models serve`` on 127.0.0.1 answers one request; the schema is enforced.

Bad requests (a threshold outside [0, 1], NaN) get a 400 whose body is one message, never a
Python stack trace with server paths; rows with missing features get ``"no call"`` with a
null probability, never a confident call. A hostile model folder is refused at start-up.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from blinaprofile.features.schema import MODEL_FEATURES
from conftest_scoring_helpers import scoring_model

START_TIMEOUT = 180.0


@pytest.fixture(scope="module")
def sm(tmp_path_factory):
    return scoring_model(tmp_path_factory)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _post_raw(url: str, body: dict, timeout: float = 60.0) -> tuple[int, str]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),  # NaN is sent as the JSON extension NaN
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, (err.read() or b"{}").decode()


def _post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    status, text = _post_raw(url, body, timeout)
    return status, json.loads(text)


def _assert_clean_400(status: int, text: str) -> dict:
    """A 400 with one JSON message: no stack trace, no server path."""
    assert status == 400, text[:2000]
    for leak in ("Traceback", "/work/", "site-packages", 'File "', "stack_trace"):
        assert leak not in text, (leak, text[:3000])
    answer = json.loads(text)
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
    return answer


def _serve(model_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow models serve`` on a free port; the process and its base URL."""
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    assert mlflow_exe.is_file(), f"mlflow command not found beside {sys.executable}"
    port = _free_port()
    # mlflow starts `uvicorn` by name: the environment's bin folder must be on PATH
    path = os.pathsep.join([str(mlflow_exe.parent), os.environ.get("PATH", "")])
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PATH": path}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [
                str(mlflow_exe),
                "models",
                "serve",
                "-m",
                str(model_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--env-manager",
                "local",
                "--workers",
                "1",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    return proc, f"http://127.0.0.1:{port}"


def _ready(proc: subprocess.Popen, base: str) -> bool:
    """Wait for /ping to answer 200 (False when the server dies or times out)."""
    t_end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < t_end and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                if r.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    return False


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(sm, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, base = _serve(sm.model_dir, log)
    try:
        if not _ready(proc, base):
            raise AssertionError(
                f"server not ready in {START_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}"
            )
        yield base
    finally:
        _stop(proc)


def test_rest_request_and_answer(sm, server):
    from blinaprofile.scoring.score import load_scoring_model

    table = pd.read_csv(sm.features_csv)
    row = table.loc[0, list(MODEL_FEATURES)].astype(float).round(3)
    request = {"dataframe_split": {"columns": list(MODEL_FEATURES), "data": [row.tolist()]}}
    status, answer = _post(f"{server}/invocations", request)
    assert status == 200, answer
    pred = answer["predictions"][0]
    local = load_scoring_model(str(sm.model_dir)).pyfunc.predict(pd.DataFrame([row]))
    assert pred["probability"] == pytest.approx(float(local["probability"].iloc[0]), abs=1e-9)
    assert pred["call"] == local["call"].iloc[0]
    assert {f"contrib_{f}" for f in MODEL_FEATURES} <= set(pred)
    print("\nrequest:", json.dumps(request))
    print("answer: ", json.dumps(answer))
    # the threshold is a declared parameter
    status, hi = _post(f"{server}/invocations", {**request, "params": {"threshold": 0.999}})
    assert status == 200 and hi["predictions"][0]["call"] == "nonresponder"


def test_rest_interval_straddling_the_threshold_is_uncertain(sm, server):
    """REST has no QC, but its call comes from the same decision: a threshold inside the
    row's interval makes it ``uncertain``, with the reason, exactly as the local model says."""
    from blinaprofile.scoring.score import load_scoring_model

    request = _request(sm)
    local = load_scoring_model(str(sm.model_dir)).pyfunc.predict(
        pd.DataFrame(request["dataframe_split"]["data"], columns=list(MODEL_FEATURES))
    )
    p, lo, hi = (
        float(local[c].iloc[0]) for c in ("probability", "probability_low", "probability_high")
    )
    assert lo < p < hi
    status, answer = _post(f"{server}/invocations", {**request, "params": {"threshold": p}})
    assert status == 200, answer
    pred = answer["predictions"][0]
    print("\nstraddling threshold:", pred["call"], "-", pred["call_reason"])
    assert pred["call"] == "uncertain"
    assert pred["call_reason"] == f"95% interval {lo:.3f}-{hi:.3f} straddles the threshold {p:.3f}"
    # a threshold below the whole interval gives a label, and says why
    status, answer = _post(f"{server}/invocations", {**request, "params": {"threshold": lo / 2}})
    pred = answer["predictions"][0]
    assert status == 200 and pred["call"] == "responder"
    assert pred["call_reason"].startswith(f"probability {p:.3f} >= threshold {lo / 2:.3f}")


def test_rest_schema_is_enforced(server):
    cols = list(MODEL_FEATURES)[:-1]  # one feature missing
    status, text = _post_raw(
        f"{server}/invocations", {"dataframe_split": {"columns": cols, "data": [[1.0] * len(cols)]}}
    )
    assert status == 400, text
    assert MODEL_FEATURES[-1] in text
    status, text2 = _post_raw(
        f"{server}/invocations",
        {
            "dataframe_split": {
                "columns": list(MODEL_FEATURES),
                "data": [["high"] * len(MODEL_FEATURES)],
            }
        },
    )
    assert status == 400, text2
    for body in (text, text2):
        assert "Traceback" not in body and "/work/" not in body, body[:3000]
    answer = json.loads(text2)
    print("\nschema errors:", answer.get("error_code"), str(answer.get("message"))[:200])


def _request(sm, rows: list[list[float | None]] | None = None) -> dict:
    table = pd.read_csv(sm.features_csv)
    if rows is None:
        rows = [table.loc[0, list(MODEL_FEATURES)].astype(float).round(3).tolist()]
    return {"dataframe_split": {"columns": list(MODEL_FEATURES), "data": rows}}


@pytest.mark.parametrize("bad", [7, -1, float("nan")], ids=["7", "-1", "NaN"])
def test_rest_threshold_outside_0_1_is_refused(sm, server, bad):
    status, text = _post_raw(
        f"{server}/invocations", {**_request(sm), "params": {"threshold": bad}}
    )
    answer = _assert_clean_400(status, text)
    assert "threshold must be a probability in [0, 1]" in answer["message"], answer
    print(f"\nthreshold {bad}: {status} {answer['message'][-120:]!r}")


def test_rest_missing_features_get_no_call(sm, server):
    table = pd.read_csv(sm.features_csv)
    good = table.loc[0, list(MODEL_FEATURES)].astype(float).round(3).tolist()
    one_null = [None if i == 3 else v for i, v in enumerate(good)]
    one_nan = [float("nan") if i == 0 else v for i, v in enumerate(good)]
    all_null: list[float | None] = [None] * len(good)
    request = _request(sm, [good, one_null, one_nan, all_null])
    # threshold 0 would make every scored row a responder: no row may slip through
    status, text = _post_raw(f"{server}/invocations", {**request, "params": {"threshold": 0.0}})
    assert status == 200, text[:3000]
    preds = json.loads(text)["predictions"]
    print("\nmissing features:", [(p["call"], p["probability"]) for p in preds])
    assert [p["call"] for p in preds] == ["responder", "no call", "no call", "no call"]
    assert preds[1]["call_reason"] == f"model feature(s) {MODEL_FEATURES[3]} missing"
    assert 0.0 <= preds[0]["probability"] <= 1.0
    for p in preds[1:]:  # NaN (MLflow writes the JSON extension NaN) or null: never a number
        numbers = [p["probability"], p["probability_low"], p["probability_high"]]
        numbers += [p[f"contrib_{f}"] for f in MODEL_FEATURES]
        assert all(v is None or math.isnan(v) for v in numbers), p


def test_rest_hostile_folder_is_refused_at_start(sm, tmp_path):
    """A model folder with a stray code/ folder and an extra .py file never serves."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(sm.model_dir, folder)
    marker = tmp_path / "marker.txt"
    (folder / "code").mkdir()
    (folder / "code" / "evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
    )
    (folder / "artifacts" / "extra.pkl").write_bytes(b"\x80\x04N.")
    log = tmp_path / "server.log"
    proc, base = _serve(folder, log)
    try:
        ready = _ready(proc, base)
    finally:
        _stop(proc)
    text = log.read_text()
    assert not ready, text[-3000:]
    assert "foreign folder 'code/'" in text and "'artifacts/extra.pkl'" in text, text[-3000:]
    assert not marker.exists()
