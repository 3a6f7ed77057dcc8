"""Single-cell cohort commands end to end (issue 13): ``featurize OBJECT``, ``train --h5ad``,
``score`` / ``score-batch`` with the annotator stored in the model, response labels from
``obs``, ``--qc`` for both modalities, tampered annotators, and error messages that point to
the command that works."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from blinaprofile.annotate.estimator import TCellAnnotator
from blinaprofile.cli import main
from blinaprofile.config import SimulationConfig, load_config
from blinaprofile.errors import SingleCellInputError
from blinaprofile.features.schema import feature_names
from blinaprofile.features.singlecell import (
    featurize_single_cell,
    load_qc_file,
    response_code,
    sample_responses,
)
from blinaprofile.models.loading import load_packaged_model
from blinaprofile.simulate.singlecell import simulate_single_cell_cohort

ROOT = Path(__file__).resolve().parents[1]
WU = ROOT.parent / "shared" / "data" / "single-cell" / "wu2020_200_v0_11.h5ad"
FAST_TRAIN = """\
experiment: sc-cli
registered_model: sc-cli-responder
outer_folds: 3
inner_folds: 2
repeats: 1
n_bootstrap: 50
n_permutations: 0
promotion: {min_auc_ci_low: null, max_perm_pvalue: null}
models:
  - family: logreg_l2
    params: {C: 0.3}
"""
ANNOTATOR = Path("artifacts") / "single_cell_annotator.json"


def run(argv: Sequence[object]) -> tuple[int, str, str]:
    """``blinaprofile ARGV``: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 simulated patients x 2 timepoints (24 samples, 700 droplets each), with labels."""
    cfg = load_config(SimulationConfig, ROOT / "configs" / "simulation" / "default.yaml")
    cfg = cfg.model_copy(update={"n_patients": 12, "timepoints": ["D28", "D56"]})
    out = tmp_path_factory.mktemp("sc_cohort")
    return simulate_single_cell_cohort(cfg, out, n_cells_per_sample=700, n_genes=600, seed=3)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sc_cli")
    (d / "train.yaml").write_text(FAST_TRAIN)
    return d


def _train(h5ad: Path, work: Path, export: str, *extra: str) -> tuple[int, str, str]:
    uri = f"sqlite:///{work / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)  # MLflow's artifact store goes under the working folder
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        return run(
            [
                "train",
                "--h5ad",
                h5ad,
                "--label-key",
                "response",
                "--config",
                work / "train.yaml",
                "--tracking-uri",
                uri,
                "--export",
                work / export,
                *extra,
            ]
        )


@pytest.fixture(scope="module")
def trained(cohort: Path, work: Path) -> tuple[Path, str, str]:
    code, out, err = _train(cohort, work, "model", "--sample-key", "sample_id")
    assert code == 0, err
    return work / "model", out, err


@pytest.fixture(scope="module")
def featurized(cohort: Path, work: Path) -> tuple[pd.DataFrame, str, str]:
    code, out, err = run(
        [
            "featurize",
            cohort,
            "--sample-key",
            "sample_id",
            "--label-key",
            "response",
            "--annotator-out",
            work / "annotator.json",
            "--out",
            work / "features.csv",
        ]
    )
    assert code == 0, err
    return pd.read_csv(work / "features.csv"), out, err


def _one_sample(cohort: Path, sample: str, dest: Path) -> Path:
    a = ad.read_h5ad(cohort)
    a[a.obs["sample_id"].astype(str) == sample].copy().write_h5ad(dest)
    return dest


def _max_feature_difference(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Largest |a - b| over every schema feature; NaN must be NaN on both sides."""
    names = feature_names()
    x, y = a[names].to_numpy(dtype=float), b[names].to_numpy(dtype=float)
    assert np.array_equal(np.isnan(x), np.isnan(y))
    finite = ~np.isnan(x)
    assert finite.any()
    return float(np.abs(x - y)[finite].max())


# --------------------------------------------------------------------------- featurize
def test_featurize_cohort_with_labels(
    cohort: Path, work: Path, featurized: tuple[pd.DataFrame, str, str]
) -> None:
    table, out, err = featurized
    obs = pd.DataFrame(ad.read_h5ad(cohort).obs)
    truth = obs.groupby("sample_id", observed=True)["response"].first()
    assert len(table) == 24 and table["sample_id"].tolist() == list(truth.index)
    assert table["response"].tolist() == [int(v == "responder") for v in truth]
    assert int(table["response"].sum()) == 12
    assert table["patient_id"].str.len().eq(4).all()  # P001...: patients from obs, not samples
    assert table.groupby("patient_id")["sample_id"].count().eq(2).all()
    # the fit on the object is said in one line, and kept
    ann_lines = [line for line in out.splitlines() if "fitted on this object" in line]
    assert len(ann_lines) == 1 and "24 samples, 16800 cells" in ann_lines[0]
    assert "labels        obs 'response': 12 responder, 12 nonresponder" in out
    assert TCellAnnotator.from_json(work / "annotator.json").n_samples_fit_ == 24
    # the one sample below the CD4 minimum is reported, not dropped
    assert table["qc_pass"].sum() == 23
    assert "P009_D28: fails QC: only 36 CD4 T cells (< 50)" in err


@pytest.mark.shared
@pytest.mark.skipif(not WU.is_file(), reason=f"{WU} not found (../shared/data)")
def test_featurize_wu2020_without_labels(tmp_path: Path) -> None:
    """200 tumour T cells in 30 samples: every sample is below the default minimums, so a
    ``--qc`` file lowers them to get numbers."""
    code, out, err = run(["featurize", WU, "--out", tmp_path / "wu.csv"])
    assert code == 0, err
    table = pd.read_csv(tmp_path / "wu.csv")
    assert len(table) == 30 and "response" not in table.columns
    assert "samples       30 from obs 'sample'; patients from obs 'patient'" in out
    assert table["patient_id"].nunique() == 14 and table["n_events"].sum() == 200
    assert not table["qc_pass"].any() and "25 more of 30 samples fail QC" in err
    qc = tmp_path / "qc.yaml"
    qc.write_text("single_cell: {min_cells: 0, min_cd3: 0, min_cd4: 0, min_cd8: 0}\n")
    code, out, err = run(["featurize", WU, "--qc", qc, "--out", tmp_path / "wu0.csv"])
    assert code == 0 and "fails QC" not in err
    table = pd.read_csv(tmp_path / "wu0.csv")
    _, sample_qc = load_qc_file(qc)
    api = featurize_single_cell(WU, sample_qc=sample_qc)  # the same model-free fit
    assert _max_feature_difference(table, api) < 1e-9
    assert table["cd8_pct_cd3"].notna().sum() >= 25


def test_featurize_manifest_of_single_cell_rows_points_to_the_object(
    cohort: Path, tmp_path: Path
) -> None:
    code, _, err = run(["featurize", "--manifest", cohort.parent / "manifest.csv", "--out", "x"])
    assert code == 2
    assert f"`blinaprofile featurize {cohort.name} --sample-key KEY`" in err
    assert "not an FCS file" not in err


# --------------------------------------------------------------------------- labels
@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("responder", 1),
        ("Responder", 1),
        ("R", 1),
        ("1", 1),
        (1, 1),
        (1.0, 1),
        (True, 1),
        ("true", 1),
        ("YES", 1),
        ("nonresponder", 0),
        ("Non-responder", 0),
        ("non responder", 0),
        ("NON_RESPONDER", 0),
        ("NR", 0),
        ("0", 0),
        (0, 0),
        (False, 0),
        ("False", 0),
        ("no", 0),
        ("", None),
        (None, None),
        (float("nan"), None),
    ],
)
def test_response_labels_accepted(value: object, code: int | None) -> None:
    assert response_code(value) == code


def test_response_labels_refused_and_mixed() -> None:
    obs = pd.DataFrame(
        {"s": ["a", "a", "b", "b", "c"], "y": ["R", "r", "Non responder", "NR", None]},
        index=[f"c{i}" for i in range(5)],
    )
    a = ad.AnnData(obs=obs)
    assert sample_responses(a, label_key="y", sample_key="s", default_sample="x") == {
        "a": 1,
        "b": 0,
        "c": None,
    }
    a.obs["y"] = ["R", "maybe", "NR", "NR", "PD"]
    with pytest.raises(SingleCellInputError, match=r"\['PD', 'maybe'\]"):
        sample_responses(a, label_key="y", sample_key="s", default_sample="x")
    a.obs["y"] = ["R", "NR", "NR", "NR", "R"]
    with pytest.raises(SingleCellInputError, match="sample 'a' has cells labelled both"):
        sample_responses(a, label_key="y", sample_key="s", default_sample="x")
    with pytest.raises(SingleCellInputError, match="label key 'z' is not an obs column"):
        sample_responses(a, label_key="z", sample_key="s", default_sample="x")


@pytest.mark.shared
@pytest.mark.skipif(not WU.is_file(), reason=f"{WU} not found (../shared/data)")
def test_label_key_with_other_values_names_them(tmp_path: Path) -> None:
    code, _, err = run(["featurize", WU, "--label-key", "cluster_orig", "--out", tmp_path / "x"])
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1
    assert "obs 'cluster_orig' holds value(s) that are not response labels" in lines[0]
    assert "'8.1-Teff'" in lines[0] and "responder/nonresponder" in lines[0]


# --------------------------------------------------------------------------- train
def test_train_stores_the_annotator(trained: tuple[Path, str, str], work: Path) -> None:
    model, out, _ = trained
    meta = json.loads((model / "artifacts" / "meta.json").read_text())
    entry = meta["single_cell_annotator"]
    data = (model / ANNOTATOR).read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["sample_key"] == "sample_id" and entry["patient_key"] == "patient_id"
    assert entry["cv_groups"] == "patient"
    # the CV refitted the annotator inside each of the 3 outer training splits
    assert entry["cv_annotator_per_fold"] is True
    assert entry["cv_annotator_fits"] == {"cv": 3, "permutations": 0}
    assert "inside each outer CV training split" in entry["cv_annotator"]
    assert "whole training cohort" not in entry["cv_annotator"]
    assert "state" not in entry  # the state is the artifact, not a copy in meta.json
    # the stored annotator is the one `featurize --annotator-out` fits on the same object
    if (work / "annotator.json").is_file():
        assert json.loads(data) == json.loads((work / "annotator.json").read_text())
    assert "note: the CV refits the annotator inside each outer training split" in out
    assert "informed them: a known limitation" not in out
    assert "stored with the model (artifacts/single_cell_annotator.json)" in out
    loaded = load_packaged_model(model)
    assert loaded.annotator is not None and loaded.annotator.n_samples_fit_ == 24
    # the registered model carries the same annotator (logged through the same packaging)
    from blinaprofile.settings import settings

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(settings, "tracking_uri", f"sqlite:///{work / 'mlflow.db'}")
        registered = load_packaged_model("models:/sc-cli-responder/1")
    assert registered.annotator is not None
    assert registered.annotator.to_dict() == loaded.annotator.to_dict()
    assert meta["n_samples"] == 23 and meta["n_patients"] == 12  # P009_D28 fails QC


def test_train_permutation_test_refits_the_annotator_per_split(cohort: Path, work: Path) -> None:
    """Permuted labels have outer splits of their own: each new training split gets its own
    annotator (fitted in worker processes), and the p-value comes from those runs."""
    cfg = work / "train_perm.yaml"
    cfg.write_text(FAST_TRAIN.replace("n_permutations: 0", "n_permutations: 3"))
    code, out, err = _train(
        cohort, work, "model_perm", "--sample-key", "sample_id", "--config", cfg, "--no-register"
    )
    assert code == 0, err
    meta = json.loads((work / "model_perm" / "artifacts" / "meta.json").read_text())
    fits = meta["single_cell_annotator"]["cv_annotator_fits"]
    assert fits["cv"] == 3 and 1 <= fits["permutations"] <= 9
    assert meta["cv_metrics"]["n_permutations"] == 3.0
    assert meta["selection_pvalue"] in (0.25, 0.5, 0.75, 1.0)  # (1 + #null >= obs) / 4
    assert "note: the CV refits the annotator inside each outer training split" in out


def test_missing_patient_column_warns_and_is_recorded(cohort: Path, work: Path) -> None:
    a = ad.read_h5ad(cohort)
    a.obs = pd.DataFrame(a.obs).drop(columns="patient_id")
    nopat = work / "no_patient.h5ad"
    a.write_h5ad(nopat)
    code, out, err = run(["featurize", nopat, "--out", work / "np.csv"])
    warning = (
        "no --patient-key: CV groups by sample; samples of one patient may land on both "
        "sides of a split"
    )
    assert code == 0 and warning in err
    assert "no patient column: each sample its own" in out
    table = pd.read_csv(work / "np.csv")
    assert (table["patient_id"] == table["sample_id"]).all()
    code, _, err = _train(nopat, work, "model_np")
    assert code == 0 and warning in err
    meta = json.loads((work / "model_np" / "artifacts" / "meta.json").read_text())
    assert meta["single_cell_annotator"]["cv_groups"] == "sample (no patient column)"
    assert meta["n_patients"] == 23  # every sample its own group: recorded, not hidden


# --------------------------------------------------------------------------- score
def test_sample_scored_alone_has_its_featurize_features(
    cohort: Path, trained: tuple[Path, str, str], work: Path
) -> None:
    model = trained[0]
    code, _, err = run(
        ["featurize", cohort, "--annotator", model / ANNOTATOR, "--out", work / "stored.csv"]
    )
    assert code == 0, err
    ref = pd.read_csv(work / "stored.csv").set_index("sample_id")
    # score: each sample alone, in a file of its own
    diffs = []
    for sid in ("P003_D28", "P010_D56"):
        one = _one_sample(cohort, sid, work / f"{sid}.h5ad")
        code, out, err = run(["score", one, "--model", model, "--json", "--no-report"])
        assert code == 0, err
        res = json.loads(out)
        assert res["input"]["annotator"].startswith("stored with the model (fitted on 24")
        got = pd.DataFrame([res["features"]]).astype(float)
        diffs.append(_max_feature_difference(got, ref.loc[[sid]].reset_index()))
    # score-batch: every sample of the cohort object, each labelled alone
    batch_args = ["--out", work / "batch", "--no-progress", "--jobs", "1"]
    code, out, err = run(
        ["score-batch", cohort, "--sample-key", "sample_id", "--model", model, *batch_args]
    )
    assert code == 0, err
    assert out.startswith("24 samples: 24 scored now")
    batch = pd.read_csv(work / "batch" / "results.csv").set_index("sample_id").loc[ref.index]
    diffs.append(_max_feature_difference(batch.reset_index(), ref.reset_index()))
    print(f"\nmax |score alone - featurize| over all features: {max(diffs):.2e} points")
    assert max(diffs) <= 0.01


def test_circle_of_error_messages_is_gone(
    cohort: Path, trained: tuple[Path, str, str], work: Path
) -> None:
    model = trained[0]
    code, _, err = run(["score", cohort, "--model", model, "--no-report"])
    want = (
        f"holds 24 samples (obs 'sample_id'): use `blinaprofile score-batch {cohort} "
        f"--sample-key sample_id --model {model}`"
    )
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["score", cohort, "--sample-key", "patient_id", "--model", model])
    assert code == 2 and "holds 12 samples (obs 'patient_id')" in err
    assert "score-batch" in err and "--sample-key patient_id" in err
    # the command it points to works (a manifest naming the object's samples works too)
    manifest = cohort.parent / "manifest.csv"
    batch_args = ["--out", work / "by_manifest", "--no-progress", "--jobs", "1"]
    code, _, err = run(["score-batch", "--manifest", manifest, "--model", model, *batch_args])
    assert code == 0, err
    rows = pd.read_csv(work / "by_manifest" / "results.csv")
    assert len(rows) == 24 and (rows["error"].fillna("") == "").all()
    # featurize takes the object instead of calling it a bad FCS file
    code, _, err = run(["featurize", cohort, "--out", work / "f.csv"])
    assert code == 0 and "FCS" not in err


def test_flow_model_scoring_single_cell_says_features_are_not_comparable(
    cohort: Path, work: Path
) -> None:
    one = _one_sample(cohort, "P001_D28", work / "flow_model_one.h5ad")
    code, out, err = run(["score", one, "--allow-other-modality", "--json", "--no-report"])
    assert code == 0, err
    res = json.loads(out)
    assert res["input"]["annotator"] == "fitted on this sample alone (the model stores none)"
    assert any("features are not comparable" in w for w in res["warnings"])


def test_tampered_annotator_is_refused(
    cohort: Path, trained: tuple[Path, str, str], tmp_path: Path
) -> None:
    one = _one_sample(cohort, "P002_D28", tmp_path / "one.h5ad")
    bad = tmp_path / "model"
    shutil.copytree(trained[0], bad)
    ann = bad / ANNOTATOR
    state = json.loads(ann.read_text())
    # 1. the JSON changed, meta.json not: the checksum refuses it
    ann.write_text(json.dumps({**state, "n_cells": state["n_cells"] + 1}))
    code, _, err = run(["score", one, "--model", bad, "--no-report"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "refusing artifacts/single_cell_annotator.json: its SHA-256" in err
    # 2. both changed consistently, with a value no fitted annotator has: validation refuses it
    text = json.dumps({**state, "n_cells": -5})
    ann.write_text(text)
    meta_path = bad / "artifacts" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["single_cell_annotator"]["sha256"] = hashlib.sha256(text.encode()).hexdigest()
    meta_path.write_text(json.dumps(meta))
    code, _, err = run(["score", one, "--model", bad, "--no-report"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "single_cell_annotator.json: invalid AnnotatorState: n_cells" in err
    # 3. an annotator meta.json does not declare is refused too
    del meta["single_cell_annotator"]
    meta_path.write_text(json.dumps(meta))
    code, _, err = run(["score", one, "--model", bad, "--no-report"])
    assert code == 2 and "records no single_cell_annotator.sha256" in err


# --------------------------------------------------------------------------- --qc
def test_qc_file_sets_single_cell_minimums(cohort: Path, tmp_path: Path) -> None:
    qc = tmp_path / "qc.yaml"
    qc.write_text("ood_max_z: 5.0\nsingle_cell:\n  min_cd4: 30\n")
    flow_qc, sc_qc = load_qc_file(qc)
    assert flow_qc.ood_max_z == 5.0 and flow_qc.min_events == 5000
    assert sc_qc is not None and (sc_qc.min_cd4, sc_qc.min_cells) == (30, 200)
    code, _, err = run(["featurize", cohort, "--qc", qc, "--out", tmp_path / "f.csv"])
    assert code == 0 and "fails QC" not in err
    table = pd.read_csv(tmp_path / "f.csv").set_index("sample_id")
    assert bool(table.loc["P009_D28", "qc_pass"]) and table.loc["P009_D28", "n_cd4"] == 36
    qc.write_text("single_cell:\n  min_cd44: 30\n")
    code, _, err = run(["featurize", cohort, "--qc", qc, "--out", tmp_path / "g.csv"])
    assert code == 2 and "single_cell.min_cd44: unknown key; did you mean `min_cd4`?" in err


def test_qc_file_applies_to_flow_featurize(small_cohort, tmp_path: Path) -> None:
    qc = tmp_path / "qc.yaml"
    qc.write_text("min_cd3: 999999\n")
    files = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[:1]
    code, _, err = run(["featurize", *files, "--qc", qc, "--out", tmp_path / "f.csv"])
    assert code == 0, err
    table = pd.read_csv(tmp_path / "f.csv")
    assert not table["qc_pass"].any()
    assert table["qc_reasons"].str.contains(r"CD3\+ T cells \(< 999999\)").all()


def test_qc_on_a_feature_table_points_to_featurize(work: Path) -> None:
    code, _, err = run(["train", "--features", "f.csv", "--qc", "qc.yaml"])
    assert code == 2 and "pass --qc to `blinaprofile featurize`" in err


# --------------------------------------------------------------------------- streamed
def _no_whole_reads(monkeypatch: pytest.MonkeyPatch, *, fit_rows: list[int] | None = None) -> None:
    """Fail the test if the whole object is read: anndata's reader, ``read_single_cell``, or
    the stream reading every row with every gene (``fit_rows`` records subsample reads)."""
    import blinaprofile.features.singlecell_chunked as chunked
    import blinaprofile.io.singlecell as io_sc
    from blinaprofile.io.h5ad_stream import H5adStream

    def whole(*args: object, **kw: object) -> None:
        raise AssertionError("the whole object was read")

    monkeypatch.setattr(ad, "read_h5ad", whole)
    monkeypatch.setattr(io_sc, "read_single_cell", whole)
    monkeypatch.setattr(chunked, "read_single_cell", whole)
    real = H5adStream.read_rows

    def read_rows(self: H5adStream, rows: np.ndarray) -> ad.AnnData:
        if fit_rows is None or len(rows) >= self.n_obs:
            raise AssertionError(f"{len(rows)} of {self.n_obs} rows read with every gene")
        fit_rows.append(len(rows))
        return real(self, rows)

    monkeypatch.setattr(H5adStream, "read_rows", read_rows)


def test_score_batch_streams_the_cohort_once(
    cohort: Path, trained: tuple[Path, str, str], work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import blinaprofile.features.singlecell_chunked as chunked
    import blinaprofile.scoring.batch as batch

    model = trained[0]
    args = ["score-batch", cohort, "--sample-key", "sample_id", "--model", model]
    opts = ["--no-progress", "--jobs", "1"]
    # today's path: every sample scored alone (the object read once per sample)
    with monkeypatch.context() as m:
        m.setattr(batch, "streamed_annotator", lambda jobs, options: None)
        code, out, err = run([*args, "--out", work / "alone", *opts])
    assert code == 0, err
    # streamed: the object never read whole, featurized once
    calls: list[int] = []
    real = chunked.featurize_cohort

    def counted(*a: object, **kw: object) -> object:
        calls.append(1)
        return real(*a, **kw)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        _no_whole_reads(m)
        m.setattr(chunked, "featurize_cohort", counted)
        code, out, err = run([*args, "--out", work / "streamed", *opts])
        assert code == 0, err
        assert out.startswith("24 samples: 24 scored now") and calls == [1]
        # resuming: nothing left to score, nothing read
        code, out, err = run([*args, "--out", work / "streamed", *opts])
        assert code == 0 and out.startswith("24 samples: 0 scored now, 24 already finished")
        assert calls == [1]
    alone = pd.read_csv(work / "alone" / "results.csv")
    streamed = pd.read_csv(work / "streamed" / "results.csv")
    pd.testing.assert_frame_equal(streamed, alone, check_exact=True)
    assert (streamed["error"].fillna("") == "").all() and len(streamed) == 24
    # --jobs 2: worker processes label the groups of samples, the same results
    with monkeypatch.context() as m:
        m.setattr(chunked, "DEFAULT_CHUNK_CELLS", 5000)
        code, _, err = run([*args, "--out", work / "streamed2", "--no-progress", "--jobs", "2"])
    assert code == 0, err
    two = pd.read_csv(work / "streamed2" / "results.csv")
    pd.testing.assert_frame_equal(two, alone, check_exact=True)


def test_streamed_score_batch_keeps_a_bad_sample_to_its_row(
    cohort: Path, trained: tuple[Path, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import blinaprofile.features.singlecell_chunked as chunked
    import blinaprofile.scoring.score as score

    model = trained[0]
    args = ["score-batch", cohort, "--sample-key", "sample_id", "--model", model]
    opts = ["--no-progress", "--jobs", "1"]
    real = score.score_features

    def bad_one(row: dict[str, object], **kw: object) -> object:
        if row["sample_id"] == "P003_D28":
            raise SingleCellInputError("a bad sample")
        return real(row, **kw)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(score, "score_features", bad_one)
        code, _, err = run([*args, "--out", tmp_path / "one_bad", *opts])
    assert code == 1 and "P003_D28" in err and "a bad sample" in err
    rows = pd.read_csv(tmp_path / "one_bad" / "results.csv").set_index("sample_id")
    assert rows.loc["P003_D28", "call"] == "error"
    assert (rows.drop(index="P003_D28")["error"].fillna("") == "").all()

    # the object cannot be featurized as a whole: each sample is scored alone instead
    def broken(*a: object, **kw: object) -> None:
        raise MemoryError("simulated")

    with monkeypatch.context() as m:
        m.setattr(chunked, "featurize_cohort", broken)
        code, out, err = run([*args, "--out", tmp_path / "fallback", *opts])
    assert code == 0, err
    assert out.startswith("24 samples: 24 scored now")


def test_featurize_streams_with_an_annotator(
    cohort: Path, trained: tuple[Path, str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blinaprofile.features.singlecell import featurize_cells
    from blinaprofile.io.singlecell import read_single_cell

    ann_file = trained[0] / ANNOTATOR
    annotator = TCellAnnotator.from_json(ann_file)
    adata = read_single_cell(cohort, sample_key="sample_id")
    want = featurize_cells(adata, annotator=annotator, sample_key="sample_id").table
    want.to_csv(tmp_path / "want.csv", index=False)
    args = ["featurize", cohort, "--sample-key", "sample_id", "--label-key", "response"]
    with monkeypatch.context() as m:
        _no_whole_reads(m)
        code, out, err = run([*args, "--annotator", ann_file, "--out", tmp_path / "f.csv"])
        assert code == 0, err
        got = pd.read_csv(tmp_path / "f.csv")
        assert "12 responder, 12 nonresponder" in out
        pd.testing.assert_frame_equal(
            got.drop(columns="response"), pd.read_csv(tmp_path / "want.csv"), check_exact=True
        )
    # without an annotator: fitted on a subsample read alone, then every cell streamed
    with monkeypatch.context() as m:
        fit_rows: list[int] = []
        _no_whole_reads(m, fit_rows=fit_rows)
        sub = ["--fit-cells-per-sample", "200", "--annotator-out", tmp_path / "a.json"]
        code, out, err = run([*args, *sub, "--jobs", "1", "--out", tmp_path / "g.csv"])
        assert code == 0, err
        assert fit_rows == [24 * 200] and "24 samples, 4800 cells" in out
        assert TCellAnnotator.from_json(tmp_path / "a.json").state_.n_cells == 4800
    code, _, err = run([*args, *sub[:2], "--annotator", ann_file, "--out", tmp_path / "h.csv"])
    assert code == 2 and "--fit-cells-per-sample applies to an annotator fitted here" in err
