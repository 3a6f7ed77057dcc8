"""Shared pytest fixtures.

- ``shared_data``: ``../shared/data`` (skips the test with a reason when absent).
- ``panel``, ``sim_config``, ``null_config``: the shipped configs.
- ``small_cohort``: a simulated cohort (8 patients x 20,000 events), made once per session.
- ``mlflow_uri``: a fresh SQLite MLflow store per test (and ``MLFLOW_TRACKING_URI`` set to it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CONFIGS = ROOT / "configs"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip(
            f"shared conformance data not found at {SHARED} (clone with ../shared beside it)"
        )
    return SHARED


@pytest.fixture(scope="session")
def panel():
    from blinaprofile.config import PanelConfig, load_config

    return load_config(PanelConfig, CONFIGS / "panels" / "post_hct_tcell.yaml")


@pytest.fixture(scope="session")
def sim_config():
    from blinaprofile.config import SimulationConfig, load_config

    return load_config(SimulationConfig, CONFIGS / "simulation" / "default.yaml")


@pytest.fixture(scope="session")
def null_config():
    from blinaprofile.config import SimulationConfig, load_config

    return load_config(SimulationConfig, CONFIGS / "simulation" / "null.yaml")


@pytest.fixture(scope="session")
def small_cohort(tmp_path_factory, sim_config, panel):
    """8 simulated patients, one FCS file each (20,000 events), with truth and manifest."""
    from blinaprofile.simulate.flow import simulate_cohort

    out = tmp_path_factory.mktemp("small_cohort")
    return simulate_cohort(sim_config, out, panel=panel, n_patients=8, events_per_sample=20_000)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    from blinaprofile.settings import settings

    monkeypatch.setattr(settings, "tracking_uri", uri)
    monkeypatch.chdir(tmp_path)
    return uri
