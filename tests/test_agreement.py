"""Agreement of the annotator with wu2020's published clusters and with a protein reference on
the CITE-seq test files (``benchmarks/agreement.py`` prints the full tables).

Floors are the values measured with the benchmark minus a margin; the comments give the
measured values. They assert behaviour (calls agree with the reference at least this well),
not the exact tables.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
SC = ROOT.parent / "shared" / "data" / "single-cell"
WU = SC / "wu2020_200_v0_11.h5ad"
CITE = SC / "citeseq_scvi_tests"

pytestmark = [
    pytest.mark.shared,
    pytest.mark.skipif(
        not SC.is_dir(), reason=f"shared single-cell data not found at {SC} (../shared/data)"
    ),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


def _load_benchmark() -> ModuleType:
    """Import ``benchmarks/agreement.py`` (not a package) as a module."""
    name = "bp_benchmark_agreement"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "agreement.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ag() -> ModuleType:
    """The benchmark module."""
    return _load_benchmark()


@pytest.fixture(scope="module")
def wu_runs(ag: ModuleType) -> list[Any]:
    """wu2020 annotated as a user would: cohort, one sample, each sample alone."""
    return ag.run_wu2020(WU, alone=True)


@pytest.fixture(scope="module")
def cite(ag: ModuleType) -> dict[str, Any]:
    """The three CITE-seq objects, each annotated with protein and RNA only."""
    return {
        "5k": ag.run_cite(CITE / "pbmc_5k_protein_v3.h5ad"),
        "10k": ag.run_cite(CITE / "pbmc_10k_protein_v3.h5ad"),
        "mtx": ag.run_cite(CITE / "10x_pbmc10k_protein_v3_mtx"),
    }


# --------------------------------------------------------------------------- statistics
def test_binary_counts_and_kappa(ag: ModuleType) -> None:
    b = ag.binary([True, True, False, False], [True, False, False, False])
    assert (b.tp, b.fp, b.fn, b.tn) == (1, 0, 1, 2)
    assert b.agreement == pytest.approx(0.75)
    assert b.sensitivity == pytest.approx(0.5) and b.precision == pytest.approx(1.0)
    assert b.kappa == pytest.approx(0.5)  # po 0.75, pe 0.5
    perfect = ag.binary([True, False], [True, False])
    assert perfect.kappa == pytest.approx(1.0)


def test_reference_rules_are_the_stated_ones(ag: ModuleType) -> None:
    import pandas as pd

    counts = pd.DataFrame(
        {
            "CD3": [200, 200, 200, 1],
            "CD4": [200, 1, 200, 1],
            "CD8": [1, 200, 200, 1],
            "CD45RA": [100, 1, 1, 1],
            "CD45RO": [1, 100, 1, 1],
            "IgG1_control": [10_000, 10_000, 10_000, 10_000],
        },
        index=list("abcd"),
    )
    clr = ag.protein_clr(counts)
    assert "IgG1_control" not in clr.columns  # isotype controls left out
    ref = ag.reference_calls(clr)
    assert ref["ref_lineage"].tolist() == ["CD4", "CD8", "other", "non_T"]
    assert ref["ref_ra"].tolist()[:2] == [True, False]
    assert pd.isna(ref["ref_ra"].iloc[3])  # not a T cell: no memory reference


# --------------------------------------------------------------------------- wu2020
def test_wu2020_lineage_and_treg_against_published_clusters(
    ag: ModuleType, wu_runs: list[Any]
) -> None:
    s = ag.wu2020_summary(wu_runs[0].obs)
    assert s.lineage.n >= 180  # measured 185 of 191 cells in 4.x/8.x clusters
    assert s.lineage.agreement >= 0.88  # measured 0.930
    assert s.lineage.kappa >= 0.75  # measured 0.860
    assert s.lineage.sensitivity >= 0.92  # measured 0.966 (CD8)
    assert s.lineage.precision >= 0.85  # measured 0.894
    # Treg clusters 4.6a/4.6b: few calls, all right; half the cluster missed
    assert s.treg.precision >= 0.8  # measured 1.000 (7 of 7)
    assert s.treg.sensitivity >= 0.35  # measured 0.500 (7 of 14)
    assert s.treg.kappa >= 0.5  # measured 0.650


def test_wu2020_teff_vs_tem(ag: ModuleType, wu_runs: list[Any]) -> None:
    run = wu_runs[0]
    s = ag.wu2020_summary(run.obs)
    assert s.teff_tem_counts.sum().sum() >= 40  # measured 42 CD8-called cells
    if s.teff_tem is None:
        # measured: memory unavailable on wu2020 (naive vs CM does not separate in 30 CCR7+
        # cells), and the output says so rather than guessing
        assert run.evidence["memory"] == "unavailable"
        assert run.obs["bp_memory"].isna().all()
        # but EM vs TEMRA of CCR7-low cells is estimable (temra_vs_em@CD8) and called
        assert "RNA" in run.evidence["effector"].split("/")  # unavailable: samples w/o QC cells
        assert s.teff_tem_effector is not None
        assert s.teff_tem_effector.n >= 30  # measured 34
        assert s.teff_tem_effector.kappa >= 0.35  # measured 0.529 (12/3/5/14)
    else:  # once memory is called here: Teff should lean TEMRA, Tem EM
        assert s.teff_tem.kappa >= 0.3
    # the temra_vs_em gene-set score itself separates the published clusters
    assert s.teff_tem_score_auc >= 0.75  # measured 0.839
    assert s.teff_tem_score.kappa >= 0.35  # measured 0.571


def test_wu2020_same_calls_alone_one_sample_and_in_cohort(
    ag: ModuleType, wu_runs: list[Any]
) -> None:
    assert len(wu_runs) == 3
    for run in wu_runs[1:]:
        same = ag.same_labels(wu_runs[0].obs, run.obs)
        if run.name.startswith("one sample"):
            # a different fit (one sample prior instead of 30): the borderline CCR7-low
            # cells of the effector split may move; measured 0.980 (4 of 200 cells)
            assert same.pop("effector") >= 0.95, (run.name, same)
        assert min(same.values()) == 1.0, (run.name, same)


# --------------------------------------------------------------------------- CITE-seq
@pytest.mark.parametrize("key", ["5k", "10k"])
def test_citeseq_protein_calls_against_reference(
    ag: ModuleType, cite: dict[str, Any], key: str
) -> None:
    run = cite[key]
    assert run.evidence["t_cell"] == "protein" and run.evidence["lineage"] == "protein"
    assert run.evidence["treg"] == "protein"
    res = ag.cite_vs_reference(run)
    assert res["T cell"].agreement >= 0.97  # measured 1.000 (both)
    assert res["CD8 vs CD4"].agreement >= 0.97  # measured 1.000 (both)
    assert res["CD8 vs CD4"].n >= 90  # measured 101 / 98
    ra = res["CD45RA+ (RA > RO) = naive/TEMRA"]
    assert ra.n >= 90 and ra.kappa >= 0.7  # measured 0.920 / 0.834
    assert res["Treg (CD25+ CD127lo) in CD4"].kappa >= 0.6  # measured 0.774 / 0.799


def test_citeseq_5k_memory_quadrants(ag: ModuleType, cite: dict[str, Any]) -> None:
    run = cite["5k"]
    # CD62L protein: the CCR7-side reference that is bimodal here
    _, k, n = ag.quadrant_kappa(run, "ref_quadrant_cd62l")
    assert n >= 90 and k >= 0.45  # measured 0.611 (agreement 0.725)
    # the CD197 antibody is unimodal: its quadrants agree less, but still above chance
    _, k, _ = ag.quadrant_kappa(run, "ref_quadrant")
    assert k >= 0.2  # measured 0.362


@pytest.mark.parametrize("key", ["5k", "10k"])
def test_citeseq_protein_vs_rna_only(ag: ModuleType, cite: dict[str, Any], key: str) -> None:
    run = cite[key]
    assert run.rna is not None, run.rna_error
    rows = {r[0]: r for r in ag.protein_vs_rna(run)}
    assert rows["t_cell"][5] == "RNA" and rows["lineage"][5] == "RNA"
    assert rows["t_cell"][2] >= 0.9  # measured 0.955 / 0.945
    assert rows["lineage"][2] >= 0.82  # measured 0.885 / 0.900
    assert rows["lineage"][3] >= 0.7  # measured 0.808 / 0.841
    assert rows["memory"][1] >= 90 and rows["memory"][3] >= 0.45  # measured 0.585 / 0.632


def test_citeseq_10x_folder(ag: ModuleType, cite: dict[str, Any]) -> None:
    run = cite["mtx"]
    assert run.n_cells == 1024 and len(run.antibodies) == 17
    res = ag.cite_vs_reference(run)
    assert res["T cell"].agreement >= 0.97  # measured 0.996
    assert res["CD8 vs CD4"].agreement >= 0.97 and res["CD8 vs CD4"].n >= 450  # 1.000, 496
    assert res["Treg (CD25+ CD127lo) in CD4"].kappa >= 0.8  # measured 0.943
    # 100 genes without the CD3 genes: RNA alone cannot call T cells, and says why
    assert run.rna is None and "cannot call T cells" in run.rna_error
