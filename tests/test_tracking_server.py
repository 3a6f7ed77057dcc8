"""Integration: scripts/tracking_server.sh starts PostgreSQL + `mlflow server` on 127.0.0.1;
we train, register, promote, compare and score by alias against it.

Skips (with the script's reason) only when PostgreSQL is not installed and cannot be
installed here (exit code 3 of the script); CI installs the Debian package first.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "tracking_server.sh"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server():
    # the state folder must be enterable by the 'postgres' user: not under pytest's 0700 tmp
    state = Path(tempfile.mkdtemp(prefix="blinaprofile-tracking-", dir="/tmp"))
    state.chmod(0o755)
    port, pg_port = _free_port(), _free_port()
    env = {
        **os.environ,
        "BLINAPROFILE_TRACKING_DIR": str(state),
        "BLINAPROFILE_TRACKING_PORT": str(port),
        "BLINAPROFILE_PG_PORT": str(pg_port),
        "BLINAPROFILE_MLFLOW": str(Path(sys.executable).with_name("mlflow")),
    }
    t0 = time.perf_counter()
    start = subprocess.run(
        ["bash", str(SCRIPT), "start"], capture_output=True, text=True, env=env, timeout=900
    )
    try:
        if start.returncode == 3:
            pytest.skip(f"PostgreSQL unavailable: {start.stderr.strip().splitlines()[-1]}")
        assert start.returncode == 0, start.stderr
        print(
            f"\n$ scripts/tracking_server.sh start   ({time.perf_counter() - t0:.0f} s)\n{start.stderr}{start.stdout}"
        )
        uri = start.stdout.strip().splitlines()[-1].split("=", 1)[1]
        assert uri == f"http://127.0.0.1:{port}"
        yield uri, state, env
    finally:
        stop = subprocess.run(
            ["bash", str(SCRIPT), "stop"], capture_output=True, text=True, env=env, timeout=300
        )
        print(f"$ scripts/tracking_server.sh stop\n{stop.stderr}{stop.stdout}")
        shutil.rmtree(state, ignore_errors=True)


def test_servers_listen_on_loopback_only(server):
    uri, state, env = server
    status = subprocess.run(
        ["bash", str(SCRIPT), "status"], capture_output=True, text=True, env=env, timeout=120
    )
    print(status.stdout)
    assert status.returncode == 0
    assert (
        "postgresql  running  127.0.0.1:" in status.stdout
        and f"mlflow      running  {uri}" in status.stdout
    )
    port = int(env["BLINAPROFILE_PG_PORT"])
    conf = subprocess.run(
        [
            "bash",
            "-c",
            f"ss -ltnH '( sport = :{port} or sport = :{env['BLINAPROFILE_TRACKING_PORT']} )'",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if conf.returncode == 0 and conf.stdout.strip():
        addrs = {line.split()[3].rsplit(":", 1)[0] for line in conf.stdout.strip().splitlines()}
        print(f"listening addresses: {sorted(addrs)}")
        assert addrs == {"127.0.0.1"}
    assert oct((state / "pgpass").stat().st_mode)[-3:] == "600"


def test_train_register_promote_compare_against_the_team_server(
    server, sim_config, tmp_path, monkeypatch
):
    import mlflow
    import psycopg2

    from blinaprofile.cli import main
    from blinaprofile.config import ModelSpec, PromotionRule, TrainConfig
    from blinaprofile.features.schema import MODEL_FEATURES
    from blinaprofile.models.packaging import load_model
    from blinaprofile.models.train import train
    from blinaprofile.settings import settings
    from blinaprofile.simulate.cohort import draw_cohort

    uri, state, env = server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(settings, "tracking_uri", uri)
    monkeypatch.setattr(settings, "n_jobs", 1)
    monkeypatch.chdir(tmp_path)
    truth = draw_cohort(sim_config.model_copy(update={"n_patients": 30}), seed=9)
    rng = np.random.default_rng([9, 1])
    table = truth[["sample_id", "patient_id", "response"]].copy()
    for f in MODEL_FEATURES:
        table[f] = (100 * truth[f] if f in truth.columns else 50.0) + rng.normal(0, 0.5, len(truth))
    cfg = TrainConfig(
        experiment="team-server",
        registered_model="team-model",
        models=[
            ModelSpec(family="logreg_l2", grid={"clf__C": [0.1, 1.0]}),
            ModelSpec(family="xgboost", params={"n_estimators": 30}),
        ],
        repeats=1,
        n_bootstrap=200,
        n_permutations=3,
        # fixture models are small and unpermuted: these tests exercise scoring by alias,
        # not the promotion rule (tests/test_promotion.py does)
        promotion=PromotionRule(min_auc_ci_low=None, max_perm_pvalue=None),
    )
    t0 = time.perf_counter()
    res = train(table, config=cfg, tracking_uri=uri, trained_on="tracking-server test")
    res2 = train(
        table,
        config=cfg.model_copy(update={"alias": "challenger"}),
        tracking_uri=uri,
        trained_on="second",
    )
    print(
        f"two training runs against {uri}: {time.perf_counter() - t0:.0f} s; versions {res.version}, {res2.version}"
    )
    client = mlflow.tracking.MlflowClient(uri)
    assert str(client.get_model_version_by_alias("team-model", "champion").version) == res.version
    assert (
        str(client.get_model_version_by_alias("team-model", "challenger").version) == res2.version
    )
    # the backend store is PostgreSQL: the runs are rows there
    pw = (state / "pgpass").read_text().strip().split(":")[-1]
    with (
        psycopg2.connect(
            host="127.0.0.1",
            port=int(env["BLINAPROFILE_PG_PORT"]),
            dbname="mlflow",
            user="mlflow",
            password=pw,
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT count(*) FROM runs")
        n_runs = cur.fetchone()[0]
        cur.execute("SELECT count(*) FROM model_versions WHERE name = 'team-model'")
        n_versions = cur.fetchone()[0]
    print(f"PostgreSQL backend: {n_runs} runs, {n_versions} versions of team-model")
    assert n_runs == 6 and n_versions == 2  # 2 trainings x (1 parent + 2 candidates)
    # artifacts went to the server's artifact destination, not to the client's disk
    stored = {p.name for p in (state / "artifacts").rglob("*") if p.is_file()}
    assert {
        "roc.png",
        "oof_predictions.csv",
        "pipeline.skops",
        "uncertainty.skops",
        "MLmodel",
    } <= stored
    assert not (tmp_path / "mlruns").exists()
    # promote the second version to champion, then score by alias
    assert main(["promote", "team-model", res2.version, "--alias", "champion"]) == 0
    pyfunc, runtime = load_model("models:/team-model@champion")
    assert runtime.meta["trained_on"] == "second"
    out = pyfunc.predict(table[runtime.features].head(3), params={"threshold": 0.5})
    assert out["probability"].between(0, 1).all()
    # the leaderboard from the server
    assert main(["compare", "--experiment", "team-server", "--out", str(tmp_path / "lb")]) == 0
    text = (tmp_path / "lb" / "leaderboard.md").read_text()
    print(text)
    assert text.count("| logreg_l2 |") == 2 and text.count("| xgboost |") == 2
