"""REST: ``mlflow models serve`` on 127.0.0.1 answers one request; the schema is enforced."""

from __future__ import annotations

import json
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


def _post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    req = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.fixture(scope="module")
def server(sm, tmp_path_factory):
    mlflow_exe = Path(sys.executable).with_name("mlflow")
    assert mlflow_exe.is_file(), f"mlflow command not found beside {sys.executable}"
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
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
                str(sm.model_dir),
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
    base = f"http://127.0.0.1:{port}"
    try:
        t_end = time.monotonic() + START_TIMEOUT
        ready = False
        while time.monotonic() < t_end and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    ready = r.status == 200
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                ready = False
            if ready:
                break
            time.sleep(0.5)
        if not ready:
            raise AssertionError(
                f"server not ready in {START_TIMEOUT:.0f} s:\n{log.read_text()[-3000:]}"
            )
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


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


def test_rest_schema_is_enforced(server):
    cols = list(MODEL_FEATURES)[:-1]  # one feature missing
    status, answer = _post(
        f"{server}/invocations", {"dataframe_split": {"columns": cols, "data": [[1.0] * len(cols)]}}
    )
    assert status == 400, answer
    assert MODEL_FEATURES[-1] in json.dumps(answer)
    status, answer = _post(
        f"{server}/invocations",
        {
            "dataframe_split": {
                "columns": list(MODEL_FEATURES),
                "data": [["high"] * len(MODEL_FEATURES)],
            }
        },
    )
    assert status == 400, answer
    print("\nschema errors:", answer.get("error_code"), str(answer.get("message"))[:200])
