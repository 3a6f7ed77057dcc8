"""Process-wide settings (scanpy-style settings object).

Values come from environment variables where set, else defaults. Nothing here is
derived from user data locations; ``config_dir`` points at the shipped defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Settings", "settings"]


def _default_config_dir() -> Path:
    env = os.environ.get("BLINAPROFILE_CONFIG_DIR")
    if env:
        return Path(env)
    cwd = Path.cwd() / "configs"
    if (cwd / "gating").is_dir():
        return cwd
    # shipped defaults: the repository's configs/ beside src/ (editable or source installs)
    return Path(__file__).resolve().parents[2] / "configs"


def _default_model_dir() -> Path:
    env = os.environ.get("BLINAPROFILE_MODEL_DIR")
    if env:
        return Path(env)
    cwd = Path.cwd() / "models"
    if (cwd / "default").is_dir():
        return cwd
    return Path(__file__).resolve().parents[2] / "models"


@dataclass
class Settings:
    """Global settings; change attributes at run time (``blinaprofile.settings.n_jobs = 1``).

    Attributes
    ----------
    config_dir
        Folder with ``panels/``, ``gating/``, ``simulation/``, ``train/``, ``qc.yaml``.
    model_dir
        Folder of exported models; ``model_dir / "default"`` is the shipped model.
    tracking_uri
        MLflow tracking URI; ``MLFLOW_TRACKING_URI`` else a local SQLite store.
    n_jobs
        Local worker processes for batch scoring.
    """

    config_dir: Path = field(default_factory=_default_config_dir)
    model_dir: Path = field(default_factory=_default_model_dir)
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
