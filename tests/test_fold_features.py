"""Features with a learned state are learned inside each CV training split (issue 13).

The hook of :func:`blinaprofile.models.validation.evaluate` (a ``FoldFeaturizer``) is tested
with small synthetic featurizers (which samples inform each state, caching across
permutations, identical results for a stateless one, a leaky whole-cohort threshold giving
another CV AUC), then with the single-cell annotator
(:class:`blinaprofile.features.singlecell.FoldAnnotatorFeatures`): changing a test split's
cells moves no training feature of that split, while it does with one annotator fitted on
the whole cohort.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from blinaprofile.annotate.estimator import TCellAnnotator
from blinaprofile.config import ModelSpec, SimulationConfig, TrainConfig, load_config
from blinaprofile.features.schema import MODEL_FEATURES
from blinaprofile.features.singlecell import FoldAnnotatorFeatures, featurize_cells
from blinaprofile.io.singlecell import read_single_cell
from blinaprofile.models.validation import (
    FoldFeaturizer,
    evaluate,
    fold_feature_matrices,
    outer_training_sets,
)
from blinaprofile.simulate.singlecell import simulate_single_cell_cohort

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ["share_above_median", "share_above_p80"]


# --------------------------------------------------------------------------- synthetic
class ThresholdFeatures:
    """Per sample a set of cell values; the learned state is the pooled median and 80th
    percentile of the cells of the samples it is fitted on; a sample's features are the
    shares of its cells above them. Records every call."""

    def __init__(self, cells: dict[str, np.ndarray]) -> None:
        self.cells = cells
        self.calls: list[tuple[tuple[str, ...], tuple[str, ...]]] = []

    def thresholds(self, fit_ids: Sequence[str]) -> tuple[float, float]:
        pooled = np.concatenate([self.cells[s] for s in fit_ids])
        return float(np.quantile(pooled, 0.5)), float(np.quantile(pooled, 0.8))

    def fold_features(self, train_ids: Sequence[str], sample_ids: Sequence[str]) -> pd.DataFrame:
        self.calls.append((tuple(train_ids), tuple(sample_ids)))
        t50, t80 = self.thresholds(train_ids)
        return pd.DataFrame(
            {
                FEATURES[0]: [100 * np.mean(self.cells[s] > t50) for s in sample_ids],
                FEATURES[1]: [100 * np.mean(self.cells[s] > t80) for s in sample_ids],
            },
            index=list(sample_ids),
        )


class Stateless:
    """A featurizer whose features do not depend on the split: the table's own."""

    def __init__(self, table: pd.DataFrame) -> None:
        self.table = table.set_index("sample_id")

    def fold_features(self, train_ids: Sequence[str], sample_ids: Sequence[str]) -> pd.DataFrame:
        return self.table.loc[list(sample_ids), FEATURES]


def _cohort(seed: int = 0, n_patients: int = 20) -> tuple[pd.DataFrame, ThresholdFeatures]:
    """One sample per patient, half responders; each sample has a batch shift larger than
    the response effect, so the pooled thresholds depend on which samples are pooled."""
    rng = np.random.default_rng(seed)
    y = np.array([1, 0] * (n_patients // 2))
    cells = {
        f"S{i:02d}": rng.normal(0.6 * y[i] + rng.normal(0, 1.0), 1.0, size=150)
        for i in range(n_patients)
    }
    ids = list(cells)
    feat = ThresholdFeatures(cells)
    table = feat.fold_features(ids, ids).reset_index(names="sample_id")
    feat.calls.clear()
    table["patient_id"] = [f"P{i:02d}" for i in range(n_patients)]
    table["response"] = y
    return table, feat


def _config(**kw: object) -> TrainConfig:
    base: dict[str, object] = {
        "features": FEATURES,
        "models": [ModelSpec(family="logreg_l2", params={"C": 1.0})],
        "outer_folds": 4,
        "inner_folds": 2,
        "repeats": 2,
        "n_bootstrap": 0,
        "n_permutations": 0,
        "seed": 11,
    }
    base.update(kw)
    return TrainConfig.model_validate(base)


def test_each_state_is_learned_from_one_outer_training_split_only() -> None:
    table, feat = _cohort()
    assert isinstance(feat, FoldFeaturizer)
    cfg = _config()
    ev = evaluate(table, config=cfg, n_jobs=1, featurizer=feat)
    ids = table["sample_id"].to_numpy()
    expected = {frozenset(ids[tr]) for tr in outer_training_sets([ev.y], ev.groups, cfg)}
    fitted_on = [frozenset(train) for train, _ in feat.calls]
    # one fit per outer training split (2 repeats x 4 folds), each on that split alone
    assert len(expected) == 8 and ev.fold_fits_cv == 8 and ev.fold_fits_permutations == 0
    assert sorted(map(sorted, fitted_on)) == sorted(map(sorted, expected))
    assert all(len(train) == 15 for train in fitted_on)  # 20 patients, 4 folds: 5 held out
    # every call featurized all samples: the held-out ones with the state of the others
    assert all(list(sample_ids) == list(ids) for _, sample_ids in feat.calls)
    assert ev.per_fold_features and not evaluate(table, config=cfg, n_jobs=1).per_fold_features


def test_permuted_runs_refit_per_split_and_reuse_shared_splits() -> None:
    table, feat = _cohort()
    cfg = _config(n_permutations=6, repeats=1)
    ev = evaluate(table, config=cfg, n_jobs=1, featurizer=feat)
    fitted_on = [frozenset(train) for train, _ in feat.calls]
    # each distinct outer training set (real labels or any permutation) is fitted once
    assert len(fitted_on) == len(set(fitted_on)) == ev.fold_fits_cv + ev.fold_fits_permutations
    assert ev.fold_fits_cv == 4 and ev.fold_fits_permutations > 4  # permutations: new splits
    assert ev.families["logreg_l2"].null_auc.shape == (6,)
    assert np.isfinite(ev.families["logreg_l2"].null_auc).all()


def test_a_stateless_featurizer_gives_the_plain_cv_bit_for_bit() -> None:
    table, _ = _cohort(seed=1)
    cfg = _config(n_permutations=5, repeats=2)
    plain = evaluate(table, config=cfg, n_jobs=1)
    hooked = evaluate(table, config=cfg, n_jobs=1, featurizer=Stateless(table))
    a, b = plain.families["logreg_l2"], hooked.families["logreg_l2"]
    assert np.array_equal(a.oof, b.oof) and np.array_equal(a.null_auc, b.null_auc)
    assert a.metrics["roc_auc"] == b.metrics["roc_auc"]
    assert plain.selection_pvalue == hooked.selection_pvalue


def test_leaky_whole_cohort_state_gives_another_cv_auc() -> None:
    """The same data and procedure; only where the thresholds were learned differs."""
    table, feat = _cohort(seed=2, n_patients=24)
    cfg = _config(repeats=3)
    leaky = evaluate(table, config=cfg, n_jobs=1)  # features from thresholds on all samples
    honest = evaluate(table, config=cfg, n_jobs=1, featurizer=feat)
    auc_leaky, auc_honest = leaky.families["logreg_l2"].auc, honest.families["logreg_l2"].auc
    print(f"\nCV AUC: whole-cohort thresholds {auc_leaky:.4f}, per-fold {auc_honest:.4f}")
    assert abs(auc_leaky - auc_honest) > 1e-3
    # a held-out sample's features use the thresholds of its training split only
    ids = table["sample_id"].to_numpy()
    tr = outer_training_sets([honest.y], honest.groups, cfg)[0]
    mat = fold_feature_matrices(feat, ids, FEATURES, [tr])
    te = np.setdiff1d(np.arange(len(ids)), tr)
    t50, _ = feat.thresholds(list(ids[tr]))
    manual = [100 * np.mean(feat.cells[s] > t50) for s in ids[te]]
    np.testing.assert_allclose(next(iter(mat.values()))[te, 0], manual)
    assert not np.allclose(table[FEATURES[0]].to_numpy()[te], manual)


# --------------------------------------------------------------------------- single cell
@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> ad.AnnData:
    """6 simulated patients, one sample each (500 droplets, protein + RNA)."""
    cfg = load_config(SimulationConfig, ROOT / "configs" / "simulation" / "default.yaml")
    cfg = cfg.model_copy(update={"n_patients": 6, "timepoints": ["D28"]})
    out = tmp_path_factory.mktemp("fold_sc")
    path = simulate_single_cell_cohort(cfg, out, n_cells_per_sample=500, n_genes=600, seed=5)
    return read_single_cell(path, sample_key="sample_id")


def _per_fold(adata: ad.AnnData) -> FoldAnnotatorFeatures:
    whole = featurize_cells(adata, sample_key="sample_id", patient_key="patient_id")
    return FoldAnnotatorFeatures(
        adata,
        annotator=whole.annotator,
        sample_key="sample_id",
        patient_key="patient_id",
        x_kind="counts",
    )


def _scaled_test_protein(adata: ad.AnnData, test: list[str]) -> ad.AnnData:
    """A copy whose test samples' antibody counts are rescaled per antibody (x0.2 .. x5)."""
    out = adata.copy()
    rows = out.obs["sample_id"].astype(str).isin(test).to_numpy()
    prot = out.obsm["protein"].copy()
    factors = np.linspace(0.2, 5.0, prot.shape[1])
    prot.iloc[rows, :] = np.round(prot.iloc[rows, :].to_numpy(dtype=float) * factors)
    out.obsm["protein"] = prot
    return out


def _max_change(a: pd.DataFrame, b: pd.DataFrame, rows: list[str]) -> float:
    x = a.loc[rows, list(MODEL_FEATURES)].to_numpy(dtype=float)
    z = b.loc[rows, list(MODEL_FEATURES)].to_numpy(dtype=float)
    assert np.array_equal(np.isnan(x), np.isnan(z))
    return float(np.nanmax(np.abs(x - z)))


def test_test_split_cells_inform_no_training_feature(small: ad.AnnData) -> None:
    ids = list(pd.unique(small.obs["sample_id"].astype(str)))
    train, test = ids[:4], ids[4:]
    changed = _scaled_test_protein(small, test)
    before = _per_fold(small).fold_features(train, ids)
    after = _per_fold(changed).fold_features(train, ids)
    assert list(before.index) == ids
    # per fold: the training samples' features are exactly the same; the test samples' move
    assert _max_change(before, after, train) == 0.0
    assert _max_change(before, after, test) > 1.0
    # one annotator fitted on the whole cohort: the test cells move the training features
    key = {"sample_key": "sample_id", "patient_key": "patient_id"}
    whole_before = featurize_cells(small, **key).table.set_index("sample_id")
    whole_after = featurize_cells(changed, **key).table.set_index("sample_id")
    leak = _max_change(whole_before, whole_after, train)
    print(f"\nmax change of training features from test cells: whole-cohort {leak:.3f} points")
    assert leak > 0.1


def test_fold_annotator_is_the_fit_on_the_training_cells(small: ad.AnnData) -> None:
    ids = list(pd.unique(small.obs["sample_id"].astype(str)))
    per_fold = _per_fold(small)
    fold = per_fold.fit_split(ids[:4])
    rows = small.obs["sample_id"].astype(str).isin(ids[:4]).to_numpy()
    direct = TCellAnnotator(config=per_fold.config).fit(small[rows].copy(), sample_key="sample_id")
    assert fold.n_samples_fit_ == 4 and fold.n_cells_fit_ == int(rows.sum()) < small.n_obs
    assert fold.to_dict() == direct.to_dict()
    whole = featurize_cells(small, sample_key="sample_id").annotator
    learned = ("protein", "rna", "n_cells")
    assert any(fold.to_dict()[k] != whole.to_dict()[k] for k in learned)
    assert fold.to_dict()["protein"] != whole.to_dict()["protein"]
    # featurizing with all samples as the training split reproduces the whole-cohort features
    all_in = per_fold.fold_features(ids, ids)
    ref = featurize_cells(small, sample_key="sample_id", patient_key="patient_id").table
    assert _max_change(all_in, ref.set_index("sample_id"), ids) == 0.0
