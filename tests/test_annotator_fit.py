"""Fit once, transform the same way: the annotator as an estimator (issue 13).

A sample labelled with a fitted :class:`TCellAnnotator` gets the same features alone as
inside its cohort (simulated protein + RNA and RNA-only cohorts, wu2020 by sample); the
fitted state is plain validated JSON; normalised matrices, gene symbols in ``var`` columns
and cytometry objects are handled; every call reports its evidence; labels follow scverse
conventions.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from blinaprofile.annotate.annotator import annotate
from blinaprofile.annotate.estimator import TCellAnnotator
from blinaprofile.config import SimulationConfig, load_config
from blinaprofile.errors import ConfigError, SingleCellInputError
from blinaprofile.features.schema import feature_names
from blinaprofile.features.singlecell import featurize_cells, featurize_single_cell
from blinaprofile.io.singlecell import cytometry_reason, detect_x_kind, read_single_cell
from blinaprofile.simulate.singlecell import simulate_single_cell_cohort, truth_feature_table

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
WU = SHARED / "single-cell" / "wu2020_200_v0_11.h5ad"
CYTOF = SHARED / "cytof" / "Gates_PTLG021_Unstim_Control_1.fcs"

needs_shared = pytest.mark.skipif(
    not (SHARED / "single-cell").is_dir(), reason=f"shared data not found at {SHARED}"
)
#: sample QC off, so that every feature of every (small) sample is compared
NO_SAMPLE_QC = {"sample_qc": {"min_cells": 0, "min_cd3": 0, "min_cd4": 0, "min_cd8": 0}}
TOL = 0.01  # percentage points (ratio units for cd4_cd8_ratio)


def flag(s: pd.Series) -> pd.Series:
    return s.eq(True)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> ad.AnnData:
    cfg = load_config(SimulationConfig, ROOT / "configs" / "simulation" / "default.yaml")
    cfg = cfg.model_copy(update={"n_patients": 6})
    out = tmp_path_factory.mktemp("sim_fit")
    path = simulate_single_cell_cohort(cfg, out, n_cells_per_sample=1000, n_genes=1000, seed=3)
    return read_single_cell(path)


@pytest.fixture(scope="module")
def rna_cohort(cohort: ad.AnnData) -> ad.AnnData:
    a = cohort.copy()
    del a.obsm["protein"]
    return a


def _roundtrip(ann: TCellAnnotator) -> TCellAnnotator:
    """Through strict JSON text and back, as the model folder stores it."""
    return TCellAnnotator.from_dict(json.loads(json.dumps(ann.to_dict(), allow_nan=False)))


def _alone_vs_cohort(
    adata: ad.AnnData, key: str, ann: TCellAnnotator
) -> tuple[pd.Series, pd.DataFrame]:
    """Max |alone - in cohort| per feature over samples, and the cohort table."""
    coh = featurize_single_cell(adata, sample_key=key, annotator=ann).set_index("sample_id")
    diffs: dict[str, float] = dict.fromkeys(feature_names(), 0.0)
    for s in coh.index:
        sub = adata[(adata.obs[key].astype(str) == s).to_numpy()].copy()
        alone = featurize_single_cell(sub, sample_key=key, annotator=ann).set_index("sample_id")
        assert list(alone.index) == [s]
        a, c = alone.loc[s, feature_names()].astype(float), coh.loc[s, feature_names()]
        assert (a.isna() == c.astype(float).isna()).all(), s
        d = (a - c.astype(float)).abs().fillna(0.0)
        for f in feature_names():
            diffs[f] = max(diffs[f], float(d[f]))
    return pd.Series(diffs), coh


# --------------------------------------------------------------------------- estimator
def test_estimator_contract(rna_cohort: ad.AnnData) -> None:
    est = TCellAnnotator(config=NO_SAMPLE_QC)
    assert est.get_params() == {"config": NO_SAMPLE_QC, "use_protein": True}
    est.set_params(config=None)
    assert est.config is None
    with pytest.raises(NotFittedError):
        est.transform(rna_cohort)
    with pytest.raises(NotFittedError):
        est.to_dict()
    fitted = est.fit(rna_cohort, sample_key="sample_id")
    assert fitted is est
    learned = [k for k in vars(est) if k.endswith("_") and not k.startswith("_")]
    assert {"state_", "fitted_", "config_", "x_kind_", "n_cells_fit_"} <= set(learned)
    assert est.x_kind_ == "counts" and est.n_cells_fit_ == rna_cohort.n_obs
    fresh = clone(est)
    assert not hasattr(fresh, "state_") and fresh.get_params() == est.get_params()
    labels = est.transform(rna_cohort, sample_key="sample_id")
    assert list(labels.index) == list(rna_cohort.obs_names)
    assert "bp_exhausted" in labels and "evidence" in labels.attrs["blinaprofile"]
    assert "bp_lineage" not in rna_cohort.obs  # transform does not modify its input


@pytest.mark.parametrize("modality", ["protein+RNA", "RNA only"])
def test_sample_alone_equals_sample_in_cohort(
    cohort: ad.AnnData, rna_cohort: ad.AnnData, modality: str
) -> None:
    adata = cohort if modality == "protein+RNA" else rna_cohort
    res = featurize_cells(adata, sample_key="sample_id", config=NO_SAMPLE_QC)
    assert res.fitted_on_input
    ann = _roundtrip(res.annotator)
    diffs, coh = _alone_vs_cohort(adata, "sample_id", ann)
    print(f"\n{modality}: max |alone - cohort| per feature (points)\n", diffs.to_string())
    assert diffs.max() <= TOL
    # the fitted annotator reproduces the features of the model-free fit it came from
    mf = res.table.set_index("sample_id")
    d_fit = (coh[feature_names()] - mf[feature_names()]).abs().max()
    print(f"{modality}: max |fitted transform - model-free fit|:", f"{d_fit.max():.2e}")
    assert d_fit.max() <= TOL
    # per cell too: every posterior of a sample is the same alone
    first = str(coh.index[0])
    sel = (adata.obs["sample_id"].astype(str) == first).to_numpy()
    cells_coh = ann.transform(adata, sample_key="sample_id")[sel]
    cells_alone = ann.transform(adata[sel].copy(), sample_key="sample_id")
    probs = [c for c in cells_coh.columns if c.endswith("_prob")]
    np.testing.assert_allclose(cells_alone[probs], cells_coh[probs], atol=1e-9)
    assert cells_alone["bp_memory"].astype(str).equals(cells_coh["bp_memory"].astype(str))


@needs_shared
def test_wu2020_every_sample_alone_equals_cohort() -> None:
    """30 samples of about 7 T cells: before, 29 could not be featurized alone."""
    wu = read_single_cell(WU)
    res = featurize_cells(wu, sample_key="sample", config=NO_SAMPLE_QC)
    diffs, coh = _alone_vs_cohort(wu, "sample", _roundtrip(res.annotator))
    print("\nwu2020 by sample: max |alone - cohort|\n", diffs.to_string())
    assert len(coh) == 30 and diffs.max() <= TOL
    assert coh["n_cd8"].sum() + coh["n_cd4"].sum() >= 180


def test_model_free_fit_is_recorded(rna_cohort: ad.AnnData) -> None:
    res = featurize_cells(rna_cohort)
    assert res.fitted_on_input and res.table.attrs["blinaprofile"]["annotator_fitted_on_input"]
    again = featurize_cells(rna_cohort, annotator=res.annotator)
    assert not again.fitted_on_input
    attrs = again.table.attrs["blinaprofile"]
    assert not attrs["annotator_fitted_on_input"]
    assert attrs["annotator"]["n_cells_fit"] == rna_cohort.n_obs
    ev = next(iter(attrs["evidence"].values()))
    assert ev["annotator"]["fitted_on"] == "a training cohort"
    with pytest.raises(ConfigError, match="either a fitted annotator"):
        featurize_single_cell(rna_cohort, annotator=res.annotator, config=NO_SAMPLE_QC)


# --------------------------------------------------------------------------- storage
def test_state_is_plain_validated_json(cohort: ad.AnnData, rna_cohort: ad.AnnData) -> None:
    ann = TCellAnnotator().fit(cohort, sample_key="sample_id")
    d = ann.to_dict()
    r = TCellAnnotator().fit(rna_cohort, sample_key="sample_id").to_dict()

    def plain(x: Any) -> bool:
        if isinstance(x, dict):
            return all(isinstance(k, str) and plain(v) for k, v in x.items())
        if isinstance(x, list):
            return all(plain(v) for v in x)
        return x is None or isinstance(x, str | int | float | bool)

    assert plain(d)
    text = json.dumps(d, allow_nan=False)
    assert d["format"] == "blinaprofile.TCellAnnotator" and d["format_version"] == 1
    assert {"t_cell", "lineage", "memory", "tim3", "exhausted"} <= set(d["routes"])
    assert d["routes"]["t_cell"]["route"] == "protein"
    assert "CD3" in d["protein"]["gates"] and d["rna"]["controls"]["bins"]
    back = TCellAnnotator.from_dict(json.loads(text))
    assert back.to_dict() == d

    assert d["protein"]["fused"]["CCR7"]["genes"]  # CCR7 protein + RNA evidence
    assert r["routes"]["lineage"]["model"] == "cd8_vs_cd4@T"
    assert TCellAnnotator.from_dict(r).to_dict() == r

    def broken(base: dict[str, Any], edit: Any) -> dict[str, Any]:
        bad = copy.deepcopy(base)
        edit(bad)
        return bad

    model = "cd8_vs_cd4@T"
    cases = [
        (d, lambda b: b.update(format="pickle"), "format"),
        (d, lambda b: b.update(surprise=1), "surprise"),
        (r, lambda b: b["rna"]["models"][model]["rate_high"].pop(), "rate_high"),
        (r, lambda b: b["rna"]["models"][model].update(prior=1.5), "prior"),
        (r, lambda b: b["rna"]["models"][model]["theta"].__setitem__(0, float("nan")), "theta"),
        (r, lambda b: b["routes"]["t_cell"].update(model="nope@all"), "unknown RNA model"),
        (d, lambda b: b["routes"].pop("memory"), "missing"),
        (d, lambda b: b["protein"]["gates"]["CD3"]["pooled"]["sd"].__setitem__(0, -1.0), "sd"),
        (d, lambda b: b["protein"]["fused"]["CCR7"]["rate_low"].append(1.0), "rate_high"),
    ]
    for base, edit, word in cases:
        with pytest.raises(ConfigError, match=word):
            TCellAnnotator.from_dict(broken(base, edit))
    with pytest.raises(ConfigError, match="mapping"):
        TCellAnnotator.from_dict([1, 2])  # type: ignore[arg-type]


def test_json_file_round_trip(rna_cohort: ad.AnnData, tmp_path: Path) -> None:
    ann = TCellAnnotator().fit(rna_cohort)
    path = tmp_path / "annotator.json"
    ann.to_json(path)
    back = TCellAnnotator.from_json(path)
    a = featurize_single_cell(rna_cohort, annotator=ann)
    b = featurize_single_cell(rna_cohort, annotator=back)
    pd.testing.assert_frame_equal(a, b)
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"annotator\.json"):
        TCellAnnotator.from_json(path)


# --------------------------------------------------------------------------- real matrices
def _normalised(a: ad.AnnData, kind: str) -> ad.AnnData:
    import scanpy as sc

    b = ad.AnnData(X=a.X.copy(), obs=a.obs.copy(), var=a.var.copy())
    if kind == "log1p-cp10k":
        sc.pp.normalize_total(b, target_sum=1e4)
        sc.pp.log1p(b)
    elif kind == "log-tpm":
        sc.pp.normalize_total(b, target_sum=1e6)
        b.X.data = np.log2(b.X.data + 1.0)
    else:
        sc.pp.normalize_total(b, target_sum=1e6)
    return b


@pytest.mark.parametrize("kind", ["log1p-cp10k", "log-tpm", "tpm"])
def test_normalised_matrices(rna_cohort: ad.AnnData, kind: str, tmp_path: Path) -> None:
    b = _normalised(rna_cohort, kind)
    info = detect_x_kind(b.X)
    assert info.kind == kind and not info.declared
    path = tmp_path / "norm.h5ad"
    b.write_h5ad(path)
    back = read_single_cell(path)
    assert back.uns["blinaprofile"]["x_kind"] == kind and "counts" not in back.layers
    res = featurize_cells(b, sample_key="sample_id", config=NO_SAMPLE_QC)
    ev = next(iter(res.evidence.values()))
    assert ev["matrix"]["x_kind"] == kind
    assert "normalised data" in ev["matrix"]["rna_models"]
    assert ev["labels"]["lineage"]["source"] == "RNA"
    assert "Gaussian" in ev["labels"]["lineage"]["estimator"]
    assert any("counts rule skipped" in r for r in ev["cell_qc"]["rules"])
    assert res.annotator.x_kind_ == kind
    diffs, coh = _alone_vs_cohort(b, "sample_id", _roundtrip(res.annotator))
    assert diffs.max() <= TOL
    truth = truth_feature_table(rna_cohort.obs).loc[coh.index]
    err = (coh[truth.columns] - truth).abs().mean()
    print(f"\n{kind}: mean |feature - truth|\n", err.round(2).to_string())
    assert err["cd3_pct_lymph"] < 2.0 and err["cd8_pct_cd3"] < 10.0
    # the same cells as raw counts, labelled by the annotator fitted on normalised data
    from_counts = featurize_single_cell(rna_cohort, sample_key="sample_id", annotator=res.annotator)
    assert (from_counts["n_cd3"] - coh["n_cd3"].to_numpy()).abs().max() <= 0.02 * coh["n_cd3"].max()


def test_counts_annotator_refuses_normalised_data(rna_cohort: ad.AnnData) -> None:
    ann = TCellAnnotator().fit(rna_cohort)
    with pytest.raises(SingleCellInputError, match="fitted on raw counts"):
        ann.transform(_normalised(rna_cohort, "log1p-cp10k"))
    with pytest.raises(SingleCellInputError, match="x_kind must be one of"):
        featurize_single_cell(rna_cohort, x_kind="z-score")  # type: ignore[arg-type]


def test_gene_symbols_found_in_var_columns(rna_cohort: ad.AnnData) -> None:
    ref = featurize_single_cell(rna_cohort)
    for col in ("feature_name", "gene_symbols"):
        b = rna_cohort.copy()
        b.var[col] = b.var_names.astype(str)
        b.var_names = [f"ENSG{i:011d}" for i in range(b.n_vars)]
        res = featurize_cells(b)
        pd.testing.assert_frame_equal(res.table[feature_names()], ref[feature_names()])
        ev = next(iter(res.evidence.values()))
        assert ev["matrix"]["gene_symbols"] == f"var[{col!r}]"
    c = rna_cohort.copy()  # not Ensembl, but not symbols either: the column with the genes wins
    c.var["gene_name"] = c.var_names.astype(str)
    c.var_names = [f"feature_{i}" for i in range(c.n_vars)]
    res = featurize_cells(c)
    assert next(iter(res.evidence.values()))["matrix"]["gene_symbols"] == "var['gene_name']"


@pytest.mark.skipif(not CYTOF.is_file(), reason=f"{CYTOF} not found")
def test_cytometry_anndata_points_to_the_flow_path(tmp_path: Path) -> None:
    from blinaprofile.io.read import read_flow

    fcs = read_flow(CYTOF)
    var = pd.DataFrame({"channel": fcs.channels, "marker": fcs.markers}, index=list(fcs.channels))
    cyto = ad.AnnData(X=np.asarray(fcs.events, dtype=np.float32), var=var)
    reason = cytometry_reason(cyto)
    assert reason is not None and "flow path" in reason and "CD3" in reason
    path = tmp_path / "cytof.h5ad"
    cyto.write_h5ad(path)
    with pytest.raises(SingleCellInputError, match=r"cytof\.h5ad: this looks like cytometry"):
        read_single_cell(path)
    with pytest.raises(SingleCellInputError, match="use the flow path"):
        featurize_single_cell(cyto)
    # fluorescence channel names, compensated intensities, no var columns
    rng = np.random.default_rng(0)
    names = ["FSC-A", "SSC-A", "CD3 FITC", "CD4 PE", "CD8 APC", "CCR7 BV421", "CD45RA PE-Cy7"]
    flow = ad.AnnData(X=rng.normal(1000, 300, size=(500, len(names))).astype(np.float32))
    flow.var_names = names
    assert cytometry_reason(flow) is not None


# --------------------------------------------------------------------------- evidence
def test_evidence_per_sample(cohort: ad.AnnData) -> None:
    res = featurize_cells(cohort, sample_key="sample_id")
    attrs = res.table.attrs["blinaprofile"]
    assert set(attrs["evidence"]) == set(res.table["sample_id"])
    ev = attrs["evidence"][str(res.table["sample_id"].iloc[0])]
    labels = ev["labels"]
    assert labels["t_cell"]["source"] == "protein" and labels["t_cell"]["protein_markers"] == [
        "CD3"
    ]
    assert set(labels["t_cell"]["gate_methods"].values()) <= {"mixture", "pooled_mixture"}
    assert labels["treg"]["protein_markers"] == ["CD25", "CD127"]
    assert labels["memory"]["source"] == "protein+RNA"  # CCR7 protein fused with the ccr7 set
    assert "CCR7" in labels["memory"]["genes"]
    assert labels["exhausted"]["protein_markers"] == ["TIM3", "PD1"]
    assert set(ev["from_protein"]) >= {"t_cell", "lineage", "tim3", "pd1", "treg"}
    qc = ev["cell_qc"]
    mito = [r for r in qc["removed_by_rule"] if r.startswith("mitochondrial")]
    assert mito and qc["removed_by_rule"][mito[0]] > 0  # the simulated dying cells
    assert qc["n_removed"] == qc["n_cells"] - qc["n_pass"] > 0
    assert 0 <= ev["states"]["exhausted_pct_cd8"] <= 100
    # RNA-only, with a checkpoint gene missing where the sample is scored
    rna = cohort.copy()
    del rna.obsm["protein"]
    ann = TCellAnnotator().fit(rna, sample_key="sample_id")
    lacking = rna[:, rna.var_names != "LAG3"].copy()
    res2 = featurize_cells(lacking, sample_key="sample_id", annotator=ann)
    ev2 = next(iter(res2.evidence.values()))
    assert ev2["labels"]["tim3"]["source"] == "RNA"
    assert "LAG3" in ev2["labels"]["tim3"]["genes_missing_here"]
    assert ev2["from_protein"] == [] and "lineage" in ev2["from_rna"]


def test_exhausted_cd8_are_not_called_temra(rna_cohort: ad.AnnData) -> None:
    """Exhausted CD8 cells share GZMB/PRF1/GZMH and low IL7R with TEMRA: with those genes
    down-weighted by P(exhausted), exhausted effector-memory cells stay EM."""
    a = rna_cohort.copy()
    X = a.X.tolil()
    rng = np.random.default_rng(0)
    exh = np.flatnonzero(
        (a.obs["truth_tim3"].astype(bool) & (a.obs["truth_lineage"] == "CD8")).to_numpy()
    )
    cols = {g: int(np.flatnonzero(a.var_names == g)[0]) for g in ("GZMB", "PRF1", "GZMH", "IL7R")}
    lib = np.asarray(a.X.sum(axis=1)).ravel()
    for g, rate in (("GZMB", 12e-4), ("PRF1", 8e-4), ("GZMH", 10e-4)):
        X[exh, cols[g]] = rng.poisson(rate * lib[exh])[:, None]
    X[exh, cols["IL7R"]] = 0
    a.X = sp.csr_matrix(X, dtype=np.float32)
    a.layers["counts"] = a.X
    em = (a.obs["truth_memory"] == "EM").to_numpy()
    shares = {}
    for name, confounded in (("adjusted", None), ("not adjusted", [])):
        cfg = None if confounded is None else {"rna": {"exhaustion_confounded": confounded}}
        b = annotate(a, config=cfg, copy=True)
        assert b is not None
        obs = b.obs
        sel = em & flag(obs["bp_exhausted"]).to_numpy() & (obs["bp_lineage"] == "CD8").to_numpy()
        shares[name] = float((obs["bp_memory"][sel] == "TEMRA").mean())
    print("\nTEMRA share among exhausted truly-EM CD8 cells:", shares)
    assert shares["adjusted"] < shares["not adjusted"]
    assert shares["adjusted"] < 0.25


# --------------------------------------------------------------------------- scverse
def test_labels_work_with_scanpy(rna_cohort: ad.AnnData) -> None:
    import scanpy as sc

    a = rna_cohort[rna_cohort.obs["sample_id"] == rna_cohort.obs["sample_id"].iloc[0]].copy()
    assert annotate(a) is None  # in place
    b = annotate(a, copy=True)
    assert b is not None and b is not a
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    b.obsm["X_umap"] = np.random.default_rng(0).normal(size=(b.n_obs, 2))
    for col in ("bp_lineage", "bp_t_cell", "bp_tim3", "bp_memory", "bp_qc_pass", "bp_exhausted"):
        sc.pl.umap(b, color=col, show=False)
    t = b[flag(b.obs["bp_t_cell"]).to_numpy()].copy()
    for col in ("bp_lineage", "bp_tim3", "bp_memory"):
        sc.tl.rank_genes_groups(t, groupby=col, method="wilcoxon")
        assert "names" in t.uns["rank_genes_groups"]
    sc.tl.rank_genes_groups(b, groupby="bp_t_cell", method="t-test")


def test_annotated_object_writes_and_reads(rna_cohort: ad.AnnData, tmp_path: Path) -> None:
    a = annotate(rna_cohort, copy=True)
    assert a is not None
    out = tmp_path / "annotated.h5ad"
    a.write_h5ad(out)
    back = ad.read_h5ad(out)
    assert back.obs["bp_memory"].astype(str).equals(a.obs["bp_memory"].astype(str))
    assert list(back.obs["bp_tim3"].cat.categories) == [False, True]
    assert "sample_evidence" in back.uns["blinaprofile"]


# --------------------------------------------------------------------------- agreement fixes
def _two_samples(cohort: ad.AnnData) -> ad.AnnData:
    """Sample 1 whole, sample 2 only its empty droplets: every label of sample 2 is NaN."""
    sid = cohort.obs["sample_id"].astype(str)
    s1, s2 = pd.unique(sid)[:2]
    keep = (sid == s1) | ((sid == s2) & (cohort.obs["truth_state"] == "empty"))
    return cohort[keep.to_numpy()].copy()


def test_concat_of_samples_equals_joint_transform(cohort: ad.AnnData) -> None:
    """Bug (b): per-sample outputs concatenate into the joint object's, label for label; a
    boolean label that is NaN for a whole sample stays NaN (an empty category list turned
    into True under pd.concat)."""
    ann = TCellAnnotator().fit(cohort, sample_key="sample_id")
    two = _two_samples(cohort)
    joint = ann.transform(two, sample_key="sample_id")
    sid = two.obs["sample_id"].astype(str)
    parts = [
        ann.transform(two[(sid == s).to_numpy()].copy(), sample_key="sample_id")
        for s in pd.unique(sid)
    ]
    assert parts[1]["bp_tim3"].isna().all()  # the sample without QC-passed cells
    both = pd.concat(parts).loc[joint.index]
    assert list(both.columns) == list(joint.columns)
    for col in joint.columns:
        pd.testing.assert_series_equal(both[col], joint[col], check_exact=True, obj=col)
    for col in ("bp_t_cell", "bp_tim3", "bp_pd1", "bp_treg", "bp_exhausted", "bp_qc_pass"):
        assert list(joint[col].cat.categories) == [False, True], col
        assert list(parts[1][col].cat.categories) == [False, True], col
    assert list(parts[1]["bp_memory"].cat.categories) == ["naive", "CM", "EM", "TEMRA"]
    assert list(parts[1]["bp_effector"].cat.categories) == ["EM", "TEMRA"]


def test_evidence_unavailable_when_a_sample_has_no_value(cohort: ad.AnnData) -> None:
    """Bug (c): a label without a value for any cell of a sample is ``unavailable``, with the
    reason, even though its estimator (protein or RNA) exists."""
    ann = TCellAnnotator().fit(cohort, sample_key="sample_id")
    two = _two_samples(cohort)
    ev = ann.transform(two, sample_key="sample_id").attrs["blinaprofile"]["evidence"]
    full, empty = list(ev.values())
    for lab in ("t_cell", "lineage", "memory", "tim3", "pd1", "exhausted", "effector"):
        assert full["labels"][lab]["source"] != "unavailable", lab
        assert full["labels"][lab]["unavailable_reason"] == ""
        assert empty["labels"][lab]["source"] == "unavailable", lab
        assert lab in empty["unavailable"] and lab not in empty["from_protein"]
        assert empty["labels"][lab]["unavailable_reason"] == "no QC-passed cells in this sample"


def _scvi_style(cohort: ad.AnnData, path: Path) -> Path:
    """One sample written as scvi-tools does: protein in obsm['protein_expression'] (an array)
    with names in uns['protein_names']."""
    sid = cohort.obs["sample_id"].astype(str)
    one = cohort[(sid == sid.iloc[0]).to_numpy()]
    prot = one.obsm["protein"]
    raw = ad.AnnData(X=one.layers["counts"].copy(), obs=one.obs.copy(), var=one.var.copy())
    raw.obsm["protein_expression"] = prot.to_numpy()
    raw.uns["protein_names"] = np.array(list(prot.columns))
    raw.write_h5ad(path)
    return path


def test_removing_the_readers_protein_gives_rna_only(cohort: ad.AnnData, tmp_path: Path) -> None:
    """Bug (d): after read_single_cell, deleting obsm['protein'] is an RNA-only run (the
    original obsm['protein_expression'] is no longer read); use_protein=False is the same."""
    a = read_single_cell(_scvi_style(cohort, tmp_path / "scvi.h5ad"))
    assert {"protein", "protein_expression"} <= set(a.obsm)
    deleted = a.copy()
    del deleted.obsm["protein"]
    annotate(deleted)
    off = annotate(a, use_protein=False, copy=True)
    with_protein = annotate(a, copy=True)
    assert off is not None and with_protein is not None
    for b in (deleted, off):
        ev = next(iter(b.uns["blinaprofile"]["sample_evidence"].values()))
        assert list(ev["from_protein"]) == [], ev["from_protein"]
        assert ev["labels"]["t_cell"]["source"] == "RNA"
        assert "bp_protein_clr" not in b.obsm
        assert set(b.obs["bp_evidence"].dropna()) <= {"RNA", "none"}
    ev_off = next(iter(off.uns["blinaprofile"]["sample_evidence"].values()))
    assert ev_off["matrix"]["protein"] == "not used (use_protein=False)"
    cols = [c for c in off.obs.columns if c.startswith("bp_")]
    pd.testing.assert_frame_equal(deleted.obs[cols], off.obs[cols])
    ev_p = next(iter(with_protein.uns["blinaprofile"]["sample_evidence"].values()))
    assert ev_p["matrix"]["protein"] == "obsm['protein']" and "t_cell" in ev_p["from_protein"]
    # the estimator: an RNA-only fit ignores protein when labelling too
    ann = TCellAnnotator(use_protein=False).fit(a)
    assert ann.fitted_.antibodies is None
    lab = ann.transform(a)
    assert list(next(iter(lab.attrs["blinaprofile"]["evidence"].values()))["from_protein"]) == []
    with pytest.raises(ConfigError, match="use_protein"):
        annotate(a, annotator=ann, use_protein=True, copy=True)


def test_effector_is_the_memory_calls_em_temra(cohort: ad.AnnData) -> None:
    """With a memory call, bp_effector is its EM/TEMRA cells (NaN for naive/CM)."""
    sid = cohort.obs["sample_id"].astype(str)
    a = annotate(cohort[(sid == sid.iloc[0]).to_numpy()].copy(), copy=True)
    assert a is not None
    mem = a.obs["bp_memory"].astype(object)
    eff = a.obs["bp_effector"].astype(object)
    em_temra = mem.isin(["EM", "TEMRA"])
    assert em_temra.any() and (eff[em_temra] == mem[em_temra]).all()
    assert eff[~em_temra].isna().all()


@needs_shared
def test_wu2020_effector_call_when_naive_vs_cm_is_not_separable() -> None:
    """Bug (a): on wu2020 naive vs CM does not separate (fold 1.68 < 2) but EM vs TEMRA does
    (temra_vs_em@CD8 fold 4.7): no four-state memory call, but CCR7-low cells get
    bp_effector (EM vs TEMRA-like), which follows the published 8.1-Teff vs 8.2-Tem."""
    a = read_single_cell(WU)
    annotate(a)
    info = a.uns["blinaprofile"]
    assert info["rna"]["models"]["temra_vs_em@CD8"]["ok"]
    assert not info["rna"]["models"]["naive_vs_cm@T"]["ok"]
    assert a.obs["bp_memory"].isna().all()
    ev = next(iter(info["sample_evidence"].values()))["labels"]
    assert ev["memory"]["source"] == "unavailable"
    assert "naive vs CM not separable" in ev["memory"]["unavailable_reason"]
    assert "bp_effector" in ev["memory"]["unavailable_reason"]
    assert info["evidence"]["effector"].startswith("CCR7-low T cells")
    cl = a.obs["cluster_orig"].astype(str)
    cd8 = (a.obs["bp_lineage"] == "CD8").to_numpy()
    eff = a.obs["bp_effector"].astype(object)
    teff = eff[(cl == "8.1-Teff").to_numpy() & cd8].dropna()
    tem = eff[(cl == "8.2-Tem").to_numpy() & cd8].dropna()
    assert len(teff) + len(tem) >= 30  # measured 34 (12/17 Teff TEMRA, 14/17 Tem EM)
    assert (teff == "TEMRA").mean() >= 0.6 and (tem == "EM").mean() >= 0.7
    # the fitted annotator applied to a single sample gives the same calls
    ann = TCellAnnotator().fit(a, sample_key="sample")
    s = a.obs["sample"].astype(str)
    one = a[(s == s.iloc[0]).to_numpy()].copy()
    lab = ann.transform(one, sample_key="sample")
    assert (
        lab["bp_effector"]
        .astype(object)
        .equals(a.obs.loc[one.obs_names, "bp_effector"].astype(object))
    )


def test_rank_genes_groups_with_an_empty_fixed_category(rna_cohort: ad.AnnData) -> None:
    """Fixed categories can have no cells here; scanpy's rank_genes_groups refuses a group
    with fewer than two cells. What a user does: pass the populated groups, or subset the
    object (anndata drops unused categories when subsetting)."""
    import scanpy as sc

    sid = rna_cohort.obs["sample_id"]
    b = annotate(rna_cohort[(sid == sid.iloc[0]).to_numpy()].copy(), copy=True)
    assert b is not None
    sc.pp.normalize_total(b, target_sum=1e4)
    sc.pp.log1p(b)
    t = b[flag(b.obs["bp_t_cell"]).to_numpy()].copy()
    assert list(t.obs["bp_lineage"].cat.categories) != ["CD4", "CD8", "other", "non_T"]
    assert "non_T" not in t.obs["bp_lineage"].cat.categories  # dropped by the subset
    sc.tl.rank_genes_groups(t, groupby="bp_lineage", method="wilcoxon")
    # not subset: the whole object, with a fixed category that has no cells
    u = b.copy()
    u.obs["bp_lineage"] = u.obs["bp_lineage"].where(u.obs["bp_lineage"] != "other")
    assert (u.obs["bp_lineage"] == "other").sum() == 0
    assert "other" in u.obs["bp_lineage"].cat.categories
    with pytest.raises(ValueError, match="only contain one sample"):
        sc.tl.rank_genes_groups(u, groupby="bp_lineage", method="wilcoxon")
    populated = [str(c) for c, n in u.obs["bp_lineage"].value_counts().items() if n >= 2]
    sc.tl.rank_genes_groups(u, groupby="bp_lineage", groups=populated, method="wilcoxon")
    assert set(u.uns["rank_genes_groups"]["names"].dtype.names) == set(populated)
