"""The built wheel works outside the repository: shipped configs and model are package data.

Builds the wheel with uv, installs it (with the locked dependency versions) into a fresh
virtual environment in a temporary folder, and runs ``simulate`` and ``score`` there with
the defaults, from a working directory that has no ``configs/`` or ``models/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UV = ROOT / ".tools" / "bin" / "uv"


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    uv = str(UV) if UV.exists() else shutil.which("uv")
    if uv is None:  # scripts/setup.sh always bootstraps it; this guards running pytest alone
        pytest.skip("uv not found (run scripts/setup.sh first)")
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    _run([uv, "build", "--wheel", "-q", "-o", str(dist)], cwd=ROOT)
    (whl,) = dist.glob("blinaprofile-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "blinaprofile/_data/configs/gating/default_tcell.yaml" in names
    assert "blinaprofile/_data/models/default/MLmodel" in names
    assert "blinaprofile/scoring/templates/report.html.j2" in names
    reqs = base / "requirements.txt"
    _run(
        [
            uv,
            "export",
            "--frozen",
            "--no-dev",
            "--no-emit-project",
            "--no-hashes",
            "-q",
            "-o",
            str(reqs),
        ],
        cwd=ROOT,
    )
    venv = base / "venv"
    _run([uv, "venv", "-q", str(venv), "--python", sys.executable], cwd=base)
    py = venv / "bin" / "python"
    _run([uv, "pip", "install", "-q", "--python", str(py), "-r", str(reqs), str(whl)], cwd=base)
    return venv


def test_installed_wheel_simulates_and_scores_with_shipped_defaults(installed: Path, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BLINAPROFILE_", "VIRTUAL_ENV", "PYTHONPATH"))
    }
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    exe = str(installed / "bin" / "blinaprofile")
    work = tmp_path / "elsewhere"
    work.mkdir()
    _run(
        [exe, "simulate", "--out", "c", "--n-patients", "2", "--events", "6000", "--seed", "5"],
        cwd=work,
        env=env,
    )
    out = _run([exe, "score", "c/fcs/P001_D28.fcs", "--json", "--out-dir", "o"], cwd=work, env=env)
    import json

    res = json.loads(out)
    assert 0.0 <= res["probability"] <= 1.0
    assert res["call"] in {"responder", "nonresponder", "uncertain", "no call"}
    # the model and strategy came from the installed package, not from this repository
    assert str(installed) in res["model"]["uri"]
    assert str(ROOT) not in out
    assert sorted(p.suffix for p in (work / "o").iterdir()) == [".html", ".json", ".xml"]
    # the installed package imports from site-packages, not from src/
    where = _run(
        [
            str(installed / "bin" / "python"),
            "-c",
            "import blinaprofile, sys; print(blinaprofile.__file__)",
        ],
        cwd=work,
        env=env,
    )
    assert str(installed) in where
