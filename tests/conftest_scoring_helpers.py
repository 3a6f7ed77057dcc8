"""A trained model and new samples for the scoring tests, built once per test session.

Every scoring test module calls :func:`scoring_model` from a fixture; the first call
simulates a 30-patient training cohort (10,000 events per sample), featurizes it, trains
a logistic-regression model through :func:`blinaprofile.models.train.train` (MLflow SQLite store,
registered as ``scoring-test-model@champion``, exported to a folder), and later calls
reuse it from the session's base temporary folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REGISTERED = "scoring-test-model"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@dataclass(frozen=True)
class ScoringModel:
    """Where the session's scoring model lives."""

    root: Path
    model_dir: Path
    tracking_uri: str
    registered: str
    features_csv: Path
    new_cohort: Path  # folder of a simulated cohort the model never saw (manifest.csv, fcs/)

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.registered}@champion"


def _configs():
    from blinaprofile.config import PanelConfig, SimulationConfig, load_config

    sim = load_config(SimulationConfig, CONFIGS / "simulation" / "default.yaml")
    panel = load_config(PanelConfig, CONFIGS / "panels" / "post_hct_tcell.yaml")
    return sim, panel


def _build(root: Path) -> None:
    from blinaprofile.config import ModelSpec, PromotionRule, TrainConfig
    from blinaprofile.features.flow import featurize_manifest
    from blinaprofile.models.train import train
    from blinaprofile.simulate.flow import simulate_cohort

    sim, panel = _configs()
    cohort = simulate_cohort(
        sim, root / "train_cohort", panel=panel, n_patients=30, events_per_sample=10_000, seed=11
    )
    table = featurize_manifest(cohort.manifest, n_jobs=1)
    table.to_csv(root / "features.csv", index=False)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = TrainConfig(
        experiment="scoring-tests",
        registered_model=REGISTERED,
        models=[ModelSpec(family="logreg_l2", params={"C": 0.3})],
        outer_folds=3,
        inner_folds=2,
        repeats=1,
        n_bootstrap=0,
        seed=3,
        # fixture models are small and unpermuted: these tests exercise scoring by alias,
        # not the promotion rule (tests/test_promotion.py does)
        promotion=PromotionRule(min_auc_ci_low=None, max_perm_pvalue=None),
    )
    train(
        table,
        config=cfg,
        export_dir=root / "model",
        tracking_uri=uri,
        trained_on="simulated scoring-test cohort (seed 11); NOT patient data",
    )
    simulate_cohort(
        sim, root / "new_cohort", panel=panel, n_patients=6, events_per_sample=20_000, seed=2024
    )
    (root / "done.json").write_text(json.dumps({"tracking_uri": uri}))


def scoring_model(tmp_path_factory) -> ScoringModel:
    """The session's trained model (trained on first use)."""
    root = tmp_path_factory.getbasetemp() / "scoring_model"
    done = root / "done.json"
    if not done.is_file():
        root.mkdir(parents=True, exist_ok=True)
        _build(root)
    uri = json.loads(done.read_text())["tracking_uri"]
    return ScoringModel(
        root=root,
        model_dir=root / "model",
        tracking_uri=uri,
        registered=REGISTERED,
        features_csv=root / "features.csv",
        new_cohort=root / "new_cohort",
    )


def write_fcs_like(
    src: Path,
    dst: Path,
    *,
    keywords: dict[str, str] | None = None,
    drop_marker: str | None = None,
    n_events: int | None = None,
) -> Path:
    """Copy an FCS file's events into a new file, with other keywords or fewer channels/events."""
    from blinaprofile.io.fcs import read_fcs
    from blinaprofile.io.fcs_write import write_fcs

    d = read_fcs(src)
    keep = [i for i, m in enumerate(d.markers) if drop_marker is None or drop_marker not in m]
    events = np.asarray(d.events[:, keep], dtype=np.float32)
    if n_events is not None:
        events = events[:n_events]
    channels = [d.channels[i] for i in keep]
    spill = None
    if d.spillover is not None:
        det, mat = d.spillover
        idx = [j for j, c in enumerate(det) if c in channels]
        spill = ([det[j] for j in idx], np.asarray(mat)[np.ix_(idx, idx)])
    write_fcs(
        dst,
        events,
        channels=channels,
        markers=[d.markers[i] for i in keep],
        spillover=spill,
        keywords=keywords or {},
    )
    return dst


def set_tracking(monkeypatch, uri: str) -> None:
    """Point MLflow (environment and blinaprofile settings) at ``uri`` for one test."""
    from blinaprofile.settings import settings

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(settings, "tracking_uri", uri)


os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
