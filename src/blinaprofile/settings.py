"""Process-wide settings (scanpy-style settings object).

The shipped configs and the shipped default model are package data: an installed wheel
carries them under ``blinaprofile/_data`` (``importlib.resources``); a repository checkout
(editable install) uses the repository's ``configs/`` and ``models/`` beside ``src/``.
Overrides are explicit only: the ``BLINAPROFILE_CONFIG_DIR`` / ``BLINAPROFILE_MODEL_DIR``
environment variables or assigning ``settings.config_dir`` / ``settings.model_dir``. Nothing
is picked up from the current working directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

__all__ = ["Settings", "settings", "shipped_dir"]


def shipped_dir(kind: str) -> Path:
    """The shipped ``configs`` or ``models`` folder (package data, else the checkout's)."""
    packaged = Path(str(files("blinaprofile"))) / "_data" / kind
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / kind


def _from_env(var: str, kind: str) -> Path:
    env = os.environ.get(var)
    return Path(env) if env else shipped_dir(kind)


@dataclass
class Settings:
    """Global settings; change attributes at run time (``blinaprofile.settings.n_jobs = 1``).

    Attributes
    ----------
    config_dir
        Folder with ``panels/``, ``gating/``, ``simulation/``, ``train/``, ``qc.yaml``
        (default: the shipped configs; ``BLINAPROFILE_CONFIG_DIR`` overrides).
    model_dir
        Folder of exported models; ``model_dir / "default"`` is the shipped model
        (``BLINAPROFILE_MODEL_DIR`` overrides).
    tracking_uri
        MLflow tracking URI; ``MLFLOW_TRACKING_URI`` else a local SQLite store.
    n_jobs
        Local worker processes for batch scoring.
    """

    config_dir: Path = field(
        default_factory=lambda: _from_env("BLINAPROFILE_CONFIG_DIR", "configs")
    )
    model_dir: Path = field(default_factory=lambda: _from_env("BLINAPROFILE_MODEL_DIR", "models"))
    tracking_uri: str = field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    )
    n_jobs: int = field(default_factory=lambda: int(os.environ.get("BLINAPROFILE_N_JOBS", "2")))

    @property
    def default_panel(self) -> Path:
        return self.config_dir / "panels" / "post_hct_tcell.yaml"

    @property
    def default_gating(self) -> Path:
        return self.config_dir / "gating" / "default_tcell.yaml"

    @property
    def default_simulation(self) -> Path:
        return self.config_dir / "simulation" / "default.yaml"

    @property
    def default_train(self) -> Path:
        return self.config_dir / "train" / "default.yaml"

    @property
    def default_qc(self) -> Path:
        return self.config_dir / "qc.yaml"

    @property
    def default_model(self) -> Path:
        return self.model_dir / "default"


settings = Settings()
