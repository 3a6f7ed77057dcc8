"""Paired designs: per-patient change features between two timepoints (issue #14).

- ``add_change_features``: exact ``delta_`` differences, NaN propagation, QC of both samples,
  unpaired patients (warning / error), duplicates (error);
- a paired cohort whose response signal is in the change (constructed directly: the
  simulator's class effect is the same at every timepoint): the change model beats the
  single-timepoint model on CV AUC;
- the model's meta records the design, the loader checks it, the card and run say it;
- the CLI end to end: simulate (two timepoints) -> featurize -> train --timepoint
  --change-from -> score without --baseline (exit 2, one line) and with it -> score-batch
  pairing by patient.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from blinaprofile.cli.dispatch import main
from blinaprofile.config import TrainConfig
from blinaprofile.errors import ManifestError, ModelError
from blinaprofile.features.change import (
    ChangeDesign,
    UnpairedPatientsWarning,
    add_change_features,
    change_training_table,
    check_pairing,
    design_from_meta,
    pairing_problems,
)
from blinaprofile.features.schema import FEATURE_INFO, MODEL_FEATURES, SCHEMA_VERSION
from blinaprofile.models.train import select_timepoint
from blinaprofile.models.validation import evaluate

ROOT = Path(__file__).resolve().parents[1]

#: the response signal of the constructed cohort: logit-scale change D28 - baseline
SIGNAL = {"cd8_em_pct_cd8": 0.6, "cd8_tim3_pct_cd8": -0.5}
FAST_TRAIN = """\
experiment: change-cli
registered_model: change-cli-responder
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


def paired_cohort(n_patients: int = 60, seed: int = 14) -> pd.DataFrame:
    """A feature table, two samples per patient (``baseline``, ``D28``), signal in the change.

    Each patient's baseline level of every feature varies widely between patients (logit SD
    0.8) and is unrelated to response; at D28 every feature moves by a small within-patient
    noise (logit SD 0.15), and responders' effector-memory CD8 share rises and TIM-3+ share
    falls (:data:`SIGNAL`). One D28 sample alone shows the shift only against the wide
    spread of baselines; the change shows it against the small noise.
    """
    rng = np.random.default_rng(seed)
    pct = [f for f in MODEL_FEATURES if FEATURE_INFO[f].unit == "pct_of_parent"]
    rows = []
    for i in range(n_patients):
        response = int(i % 2 == 0)
        base = {f: rng.normal(-1.0, 0.8) for f in pct}
        for tp in ("baseline", "D28"):
            z = dict(base)
            if tp == "D28":
                for f in pct:
                    z[f] += rng.normal(0, 0.15) + (SIGNAL.get(f, 0.0) if response else 0.0)
            row = {f: 100 / (1 + np.exp(-z[f])) for f in pct}
            row["cd4_cd8_ratio"] = row["cd4_pct_cd3"] / row["cd8_pct_cd3"]
            rows.append(
                {
                    "sample_id": f"P{i:03d}_{tp}",
                    "patient_id": f"P{i:03d}",
                    "timepoint": tp,
                    "response": response,
                    "modality": "flow",
                    "schema_version": SCHEMA_VERSION,
                    **row,
                    "qc_pass": True,
                    "qc_reasons": "",
                }
            )
    return pd.DataFrame(rows)


def cv_config() -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "outer_folds": 5,
            "inner_folds": 3,
            "repeats": 3,
            "n_bootstrap": 300,
            "n_permutations": 0,
            "seed": 3,
            "models": [{"family": "logreg_l2", "grid": {"clf__C": [0.03, 0.3, 3.0]}}],
        }
    )


def run(argv: Sequence[object]) -> tuple[int, str, str]:
    """``blinaprofile ARGV``: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- pairing
def test_delta_columns_are_exact_differences_per_patient():
    t = paired_cohort(8)
    out = add_change_features(t, timepoint="D28", baseline="baseline")
    assert len(out) == 8 and out["patient_id"].is_unique
    assert (out["timepoint"] == "D28").all()
    assert list(out["baseline_sample_id"]) == [f"P{i:03d}_baseline" for i in range(8)]
    later = t[t["timepoint"] == "D28"].set_index("patient_id")
    base = t[t["timepoint"] == "baseline"].set_index("patient_id")
    for f in MODEL_FEATURES:
        want = (later[f] - base[f]).loc[out["patient_id"]].to_numpy()
        np.testing.assert_array_equal(out[f"delta_{f}"].to_numpy(), want)
        np.testing.assert_array_equal(out[f].to_numpy(), later[f].loc[out["patient_id"]])
    assert out.attrs["change_features"]["unpaired"] == {}


def test_nan_propagates_and_qc_of_either_sample_fails_the_pair():
    t = paired_cohort(4)
    t.loc[t["sample_id"] == "P000_baseline", "cd8_pd1_pct_cd8"] = np.nan
    t.loc[t["sample_id"] == "P001_baseline", ["qc_pass", "qc_reasons"]] = [False, "CD8+ 40 < 100"]
    t["error"] = ""
    t.loc[t["sample_id"] == "P002_baseline", "error"] = "P002_baseline: not an FCS file"
    out = add_change_features(t, timepoint="D28", baseline="baseline").set_index("patient_id")
    assert np.isnan(out.loc["P000", "delta_cd8_pd1_pct_cd8"])
    assert np.isfinite(out.loc["P000", "delta_cd8_em_pct_cd8"])
    assert list(out["qc_pass"]) == [True, False, True, True]
    assert out.loc["P001", "qc_reasons"] == "baseline P001_baseline: CD8+ 40 < 100"
    assert out.loc["P002", "error"].startswith("baseline P002_baseline: ")
    assert out.loc["P003", "error"] == ""


def test_unpaired_patients_are_dropped_with_one_warning_or_refused():
    t = paired_cohort(6)
    t = t[t["sample_id"] != "P001_baseline"]  # no baseline
    t = t[t["sample_id"] != "P004_D28"]  # only a baseline
    with pytest.warns(UnpairedPatientsWarning) as got:
        out = add_change_features(t, timepoint="D28", baseline="baseline")
    assert len(got) == 1
    msg = str(got[0].message)
    assert "2 patient(s)" in msg and "P001 (no 'baseline' sample)" in msg
    assert "P004 (no 'D28' sample)" in msg
    assert sorted(out["patient_id"]) == ["P000", "P002", "P003", "P005"]
    assert out.attrs["change_features"]["unpaired"] == {
        "P001": "no 'baseline' sample",
        "P004": "no 'D28' sample",
    }
    with pytest.raises(ManifestError, match=r"P001 \(no 'baseline' sample\)"):
        add_change_features(t, timepoint="D28", baseline="baseline", on_unpaired="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        add_change_features(t, timepoint="D28", baseline="baseline", on_unpaired="ignore")


def test_duplicates_and_missing_columns_are_one_clear_error():
    t = paired_cohort(3)
    dup = t[t["sample_id"] == "P002_D28"].assign(sample_id="P002_D28_rerun")
    both = pd.concat([t, dup], ignore_index=True)
    assert pairing_problems(both, timepoint="D28", baseline="baseline") == {
        "P002": "2 samples at 'D28' (P002_D28, P002_D28_rerun)"
    }
    with pytest.raises(ManifestError, match=r"patient P002: 2 samples at 'D28'"):
        add_change_features(both, timepoint="D28", baseline="baseline")
    with pytest.raises(ManifestError, match="no 'timepoint' column"):
        add_change_features(t.drop(columns="timepoint"), timepoint="D28", baseline="baseline")
    with pytest.raises(ManifestError, match="not schema features"):
        add_change_features(t, timepoint="D28", baseline="baseline", features=["cd8"])
    with pytest.raises(ManifestError, match="both 'D28'"):
        add_change_features(t, timepoint="D28", baseline="D28")


def test_schema_labels_change_features_in_plain_language_with_units():
    em = FEATURE_INFO["delta_cd8_em_pct_cd8"]
    assert em.change and em.title == (
        "Change in Effector-memory CD8 T cells, percentage points of CD8 (delta_cd8_em_pct_cd8)"
    )
    assert FEATURE_INFO["delta_cd4_cd8_ratio"].units == "difference in ratio of counts"
    assert FEATURE_INFO["cd8_em_pct_cd8"].units == "% of CD8"  # the schema's own unchanged


def test_change_training_table_and_design():
    t = paired_cohort(6)
    table, design, feats = change_training_table(t, timepoint="D28", baseline="baseline")
    assert design == ChangeDesign("D28", "baseline", tuple(MODEL_FEATURES))
    assert feats == [*MODEL_FEATURES, *(f"delta_{f}" for f in MODEL_FEATURES)]
    assert design.description == "D28 - baseline" and len(table) == 6
    # a configuration naming change features gets exactly those
    _, d2, f2 = change_training_table(
        t, timepoint="D28", baseline="baseline", features=["cd8_em_pct_cd8", "delta_cd8_em_pct_cd8"]
    )
    assert d2.features == ("cd8_em_pct_cd8",) and f2 == ["cd8_em_pct_cd8", "delta_cd8_em_pct_cd8"]


def test_meta_design_is_validated_and_scoring_needs_the_baseline():
    design = ChangeDesign("D28", "baseline", ("cd8_em_pct_cd8",))
    meta = {
        "features": ["cd8_em_pct_cd8", "delta_cd8_em_pct_cd8"],
        "change_features": design.as_meta(),
    }
    assert design_from_meta(meta) == design
    assert design_from_meta({"features": ["cd8_em_pct_cd8"]}) is None
    with pytest.raises(ModelError, match="records no 'change_features'"):
        design_from_meta({"features": ["delta_cd8_em_pct_cd8"]})
    for bad in (
        {**design.as_meta(), "code": "x"},
        {**design.as_meta(), "baseline": "D28"},
        {**design.as_meta(), "features": ["nope"]},
        "D28 - baseline",
    ):
        with pytest.raises(ModelError, match="change_features"):
            design_from_meta({**meta, "change_features": bad})
    with pytest.raises(ModelError, match=r"uses change features \(D28 - baseline\).*--baseline"):
        check_pairing(meta, baseline_given=False, model_name="m")
    with pytest.raises(ModelError, match="does not use change features"):
        check_pairing({"features": ["cd8_em_pct_cd8"]}, baseline_given=True)
    assert check_pairing(meta, baseline_given=True) == design


# --------------------------------------------------------------------------- evidence
def test_change_model_beats_single_timepoint_model_on_cv_auc():
    """The measured numbers of docs/models.md "Paired and longitudinal designs"."""
    t = paired_cohort(60)
    config = cv_config()
    single = evaluate(select_timepoint(t, "D28"), config=config, n_jobs=1)
    table, _, feats = change_training_table(t, timepoint="D28", baseline="baseline")
    change = evaluate(table, config=config.model_copy(update={"features": feats}), n_jobs=1)
    a1 = single.families["logreg_l2"].metrics
    a2 = change.families["logreg_l2"].metrics
    print(
        f"\nsingle D28: AUC {a1['roc_auc']:.3f} [{a1['roc_auc_ci_low']:.3f}, "
        f"{a1['roc_auc_ci_high']:.3f}]; change D28 - baseline: AUC {a2['roc_auc']:.3f} "
        f"[{a2['roc_auc_ci_low']:.3f}, {a2['roc_auc_ci_high']:.3f}]"
    )
    assert a2["roc_auc"] > 0.9
    assert a2["roc_auc"] > a1["roc_auc"] + 0.15
    assert a2["roc_auc_ci_low"] > a1["roc_auc"]


# --------------------------------------------------------------------------- CLI end to end
@dataclass(frozen=True)
class PairedRun:
    """A simulated paired cohort (6 patients x baseline, D28), its features and change model."""

    root: Path
    cohort: Path
    features: Path
    model: Path
    tracking_uri: str
    manifest: pd.DataFrame

    def file(self, sample_id: str) -> Path:
        name = self.manifest.loc[self.manifest["sample_id"] == sample_id, "file"].iloc[0]
        return self.cohort / name


@pytest.fixture(scope="module")
def paired_run(tmp_path_factory) -> Iterator[PairedRun]:
    """simulate (baseline + D28) -> featurize -> train --change-from, once for the module."""
    from blinaprofile.settings import settings

    root = tmp_path_factory.mktemp("paired_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setattr(settings, "tracking_uri", uri)
        mp.chdir(root)
        scenario = (ROOT / "configs" / "simulation" / "default.yaml").read_text()
        scenario = scenario.replace("timepoints: [D28]", "timepoints: [baseline, D28]")
        assert "timepoints: [baseline, D28]" in scenario
        (root / "paired.yaml").write_text(scenario)
        (root / "train.yaml").write_text(FAST_TRAIN)
        cohort, feats, model = root / "cohort", root / "features.csv", root / "model"
        code, _, err = run(
            [
                *("simulate", "--scenario", root / "paired.yaml", "--out", cohort),
                *("--n-patients", 6, "--events", 8000, "--seed", 5),
            ]
        )
        assert code == 0, err
        code, _, err = run(["featurize", "--manifest", cohort / "manifest.csv", "--out", feats])
        assert code == 0, err
        code, _, err = run(
            [
                *("train", "--features", feats, "--timepoint", "D28", "--change-from", "baseline"),
                *("--config", root / "train.yaml", "--export", model, "--no-register"),
            ]
        )
        assert code == 0, err
        manifest = pd.read_csv(cohort / "manifest.csv")
        yield PairedRun(root, cohort, feats, model, uri, manifest)


def test_cli_end_to_end_paired_cohort(tmp_path, paired_run):
    """simulate (baseline + D28) -> featurize -> train --change-from -> score / score-batch."""
    cohort, feats, model = paired_run.cohort, paired_run.features, paired_run.model
    mlflow_uri = paired_run.tracking_uri
    meta = json.loads((model / "artifacts" / "meta.json").read_text())
    assert meta["change_features"]["description"] == "D28 - baseline"
    assert "delta_cd8_em_pct_cd8" in meta["features"] and meta["n_samples"] == 6
    assert "| change features | D28 - baseline:" in meta["model_card"]
    import mlflow

    run_data = mlflow.tracking.MlflowClient(mlflow_uri).get_run(meta["run_id"]).data
    assert run_data.params["change_features"] == "D28 - baseline"
    assert run_data.tags["change_features"] == "D28 - baseline"

    manifest = pd.read_csv(cohort / "manifest.csv")
    files = {r.sample_id: cohort / r.file for r in manifest.itertuples()}
    post, base = files["P001_D28"], files["P001_baseline"]
    # a change-feature model refuses one sample alone: one line, exit 2, naming --baseline
    code, out, err = run(["score", post, "--model", model, "--no-report"])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "--baseline" in err, err
    assert "uses change features (D28 - baseline)" in err
    # ... and scores it with the patient's baseline
    code, out, err = run(
        ["score", post, "--baseline", base, "--model", model, "--out-dir", tmp_path / "rep"]
    )
    assert code == 0, err
    assert "baseline      S-" in out and "(baseline; sha256" in out
    result = json.loads(next((tmp_path / "rep").glob("*.score.json")).read_text())
    assert result["call"] in ("responder", "nonresponder", "uncertain", "no call")
    assert result["probability"] is not None
    d = result["features"]["delta_cd8_em_pct_cd8"]
    assert d == pytest.approx(
        result["features"]["cd8_em_pct_cd8"] - _feature(feats, "P001_baseline")
    )
    html = next((tmp_path / "rep").glob("*.report.html")).read_text()
    assert "Change in Effector-memory CD8 T cells" in html and "percentage points of CD8" in html
    # a baseline given to a model without change features is refused likewise (exit 2)
    code, out, err = run(["score", base, "--baseline", post, "--no-report"])
    assert code == 2 and "does not use change features" in err

    # score-batch pairs by patient; a patient without a baseline is an error row
    batch = manifest[manifest["sample_id"] != "P003_baseline"]
    batch.assign(file=[str(cohort / f) for f in batch["file"]]).to_csv(
        tmp_path / "new.csv", index=False
    )
    code, out, err = run(
        [
            *("score-batch", "--manifest", tmp_path / "new.csv", "--model", model),
            *("--out", tmp_path / "results", "--jobs", 1),
        ]
    )
    assert code == 1, err  # the error row
    assert "6 patients paired for change features (D28 - baseline)" in out
    res = pd.read_parquet(tmp_path / "results" / "results.parquet").set_index("patient_id")
    assert len(res) == 6 and res.loc["P003", "call"] == "error"
    assert "patient P003: no 'baseline' sample" in res.loc["P003", "error"]
    ok = res.drop(index="P003")
    assert ok["call"].isin(["responder", "nonresponder", "uncertain", "no call"]).all()
    assert (ok["error"] == "").all() and ok["probability"].notna().all()
    assert list(ok["baseline_sample_id"]) == [f"{p}_baseline" for p in ok.index]
    assert ok.loc["P001", "probability"] == pytest.approx(result["probability"])
    assert ok.loc["P001", "delta_cd8_em_pct_cd8"] == pytest.approx(d)


def _feature(features_csv: Path, sample_id: str, name: str = "cd8_em_pct_cd8") -> float:
    t = pd.read_csv(features_csv)
    return float(t.loc[t["sample_id"] == sample_id, name].iloc[0])


# --------------------------------------------------------------------------- review fixes
def test_samples_without_patient_id_are_refused_not_paired_with_each_other():
    """NaN IDs used to become the text "nan": two strangers' samples made one "patient"."""
    t = paired_cohort(4).astype({"patient_id": object})
    t.loc[t["sample_id"].isin(["P000_D28", "P001_baseline"]), "patient_id"] = np.nan
    t.loc[t["sample_id"] == "P002_D28", "patient_id"] = "  "
    for call in (add_change_features, pairing_problems):
        with pytest.raises(ManifestError) as got:
            call(t, timepoint="D28", baseline="baseline", source="features.csv")
        msg = str(got.value)
        assert msg.startswith("features.csv: 3 sample(s) at 'D28' or 'baseline' have no patient_id")
        assert "P000_D28, P001_baseline, P002_D28" in msg and "\n" not in msg
    # a sample without patient at a timepoint the design does not use is no problem
    other = paired_cohort(2)
    extra = other.iloc[[0]].assign(sample_id="X_D90", patient_id=np.nan, timepoint="D90")
    out = add_change_features(pd.concat([other, extra]), timepoint="D28", baseline="baseline")
    assert list(out["patient_id"]) == ["P000", "P001"]


def test_numeric_ids_and_timepoints_pair_as_text():
    """Patient 7 and 7.0, timepoint 28 and 28.0 (a numeric column with a blank) are the same."""
    t = paired_cohort(3)
    t["patient_id"] = [7, 7.0, 8, 8.0, 9, 9.0]  # D28 rows int, baseline rows float
    t["timepoint"] = [0.0, 28.0] * 3
    t = t.astype({"patient_id": object})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no patient is unpaired
        out = add_change_features(t, timepoint="28", baseline=0)
    assert list(out["patient_id"]) == ["7", "8", "9"]
    assert list(out["baseline_sample_id"]) == ["P000_baseline", "P001_baseline", "P002_baseline"]
    assert out.attrs["change_features"]["timepoint"] == "28"
    assert list(select_timepoint(t, "28")["sample_id"]) == ["P000_D28", "P001_D28", "P002_D28"]


def test_feature_table_reads_ids_and_timepoints_as_written(tmp_path):
    from blinaprofile.io.read import read_feature_table

    t = paired_cohort(3)
    t["patient_id"] = ["7", "7", "8", "8", "9", "9"]
    t["timepoint"] = ["0", "28"] * 3
    extra = t.iloc[[0]].assign(sample_id="S9", patient_id="10", timepoint="")  # no timepoint
    f = tmp_path / "features.csv"
    pd.concat([t, extra]).to_csv(f, index=False)
    table = read_feature_table(f)
    assert table["patient_id"].tolist()[:2] == ["7", "7"]
    assert table["timepoint"].tolist()[:2] == ["0", "28"] and pd.isna(table["timepoint"].iloc[-1])
    out = add_change_features(table, timepoint="28", baseline="0")
    assert list(out["patient_id"]) == ["7", "8", "9"]
    assert len(select_timepoint(table, "28")) == 3
    # a blank patient cell is missing, and refused by the pairing (named)
    t.loc[t["sample_id"] == "P001_D28", "patient_id"] = ""
    t.to_csv(f, index=False)
    with pytest.raises(ManifestError, match=r"have no patient_id: P001_D28;"):
        add_change_features(read_feature_table(f), timepoint="28", baseline="0", source=f)


def test_qc_of_error_rows_combines_without_pandas_warnings():
    t = paired_cohort(3)
    t["error"] = ""
    t = t.astype({"qc_pass": object})
    t.loc[t["sample_id"] == "P001_baseline", ["qc_pass", "error"]] = [None, "x: not an FCS file"]
    t.loc[t["sample_id"] == "P002_D28", "qc_pass"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a FutureWarning (fillna downcasting) would fail here
        out = add_change_features(t, timepoint="D28", baseline="baseline")
    assert out["qc_pass"].dtype == bool and list(out["qc_pass"]) == [True, False, False]


def test_reasons_of_the_baseline_are_prefixed_once_whole():
    t = paired_cohort(3)
    t["error"] = ""
    mismatch = "panel mismatch: missing marker(s) CCR7; the file has: CD3, CD8"
    t.loc[t["sample_id"] == "P000_baseline", ["qc_pass", "qc_reasons"]] = [False, mismatch]
    t.loc[t["sample_id"] == "P000_D28", ["qc_pass", "qc_reasons"]] = [False, "CD8+ 40 < 100"]
    t.loc[t["sample_id"] == "P001_baseline", "error"] = "P001_baseline: file not found"
    out = add_change_features(t, timepoint="D28", baseline="baseline").set_index("patient_id")
    assert out.loc["P000", "qc_reasons"] == f"CD8+ 40 < 100; baseline P000_baseline: {mismatch}"
    assert out.loc["P001", "error"] == "baseline P001_baseline: file not found"


def test_a_table_paired_already_is_refused():
    t = paired_cohort(3)
    paired = add_change_features(t, timepoint="D28", baseline="baseline")
    with pytest.raises(
        ManifestError, match=r"already has change column\(s\) \['baseline_sample_id'"
    ):
        add_change_features(paired, timepoint="D28", baseline="baseline")
    with pytest.raises(ManifestError, match=r"\['delta_cd8_em_pct_cd8'\]: it was paired already"):
        add_change_features(
            t.assign(delta_cd8_em_pct_cd8=1.0), timepoint="D28", baseline="baseline"
        )


def test_hostile_change_design_in_meta_is_refused_in_one_line():
    design = ChangeDesign("D28", "baseline", ("cd8_em_pct_cd8",))
    meta = {"features": ["delta_cd8_em_pct_cd8"], "change_features": design.as_meta()}
    assert design_from_meta(meta, source="m") == design
    bad = {
        "description": {"description": {"x": 1}},
        "description must be": {"description": "baseline - D28"},
        "listed more than once": {"features": ["cd8_em_pct_cd8", "cd8_em_pct_cd8"]},
        "printable text": {"timepoint": "\x1b[31mD28\x1b[0m"},
        "printable text ": {"baseline": "base\nline"},
        "printable text  ": {"timepoint": "D" * 65},
        "printable text   ": {"timepoint": " D28"},
    }
    for why, change in bad.items():
        entry = {**design.as_meta(), **change}
        with pytest.raises(ModelError) as got:
            design_from_meta({**meta, "change_features": entry}, source="/models/m")
        msg = str(got.value)
        assert msg.startswith("/models/m: meta.json change_features: "), msg
        assert why.strip() in msg, msg
        assert msg.isprintable(), msg  # no escape or line break reaches the terminal
    lacking = {k: v for k, v in design.as_meta().items() if k != "description"}
    with pytest.raises(ModelError, match=r"change_features: lacks \['description'\]"):
        design_from_meta({**meta, "change_features": lacking})


def test_hostile_meta_refuses_the_model_folder(tmp_path, paired_run):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(paired_run.model, model)
    meta_file = model / "artifacts" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["change_features"]["timepoint"] = "\x1b]0;pwned\x07D28"
    meta_file.write_text(json.dumps(meta))
    post, base = paired_run.file("P001_D28"), paired_run.file("P001_baseline")
    code, out, err = run(["score", post, "--baseline", base, "--model", model, "--no-report"])
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "\x1b" not in err and "\x07" not in err
    assert "meta.json change_features: timepoint must be printable text" in err, err


class Calls:
    """Counts the calls of a wrapped function."""

    def __init__(self, func):
        self.func, self.n = func, 0

    def __call__(self, *args, **kwargs):
        self.n += 1
        return self.func(*args, **kwargs)


def test_train_with_equal_timepoints_is_refused_before_featurizing(monkeypatch, paired_run):
    import blinaprofile.features.flow as flow

    calls = Calls(flow.featurize_manifest)
    monkeypatch.setattr(flow, "featurize_manifest", calls)
    code, _, err = run(
        [
            *("train", "--manifest", paired_run.cohort / "manifest.csv"),
            *("--timepoint", "D28", "--change-from", "D28", "--no-register"),
        ]
    )
    assert code == 2 and calls.n == 0
    assert "--timepoint and --change-from are both 'D28'" in err


def test_score_checks_the_baseline_file_before_reading_either_sample(
    monkeypatch, tmp_path, paired_run
):
    import blinaprofile.features.flow as flow
    from blinaprofile.errors import InputError
    from blinaprofile.scoring.score import score_sample
    from conftest_scoring_helpers import write_fcs_like

    post = paired_run.file("P001_D28")
    calls = Calls(flow.featurize_fcs)
    monkeypatch.setattr(flow, "featurize_fcs", calls)
    with pytest.raises(InputError, match="the baseline has the same content"):
        score_sample(post, model=str(paired_run.model), baseline=post)
    assert calls.n == 0  # compared before gating either copy
    # the later sample's panel lacks a marker: still, a missing baseline is an error
    no_ccr7 = write_fcs_like(post, tmp_path / "no_ccr7.fcs", drop_marker="CCR7")
    with pytest.raises(InputError, match="not found"):
        score_sample(no_ccr7, model=str(paired_run.model), baseline=tmp_path / "gone.fcs")


def test_train_cli_says_unpaired_once_and_leaves_warning_filters_alone(tmp_path, mlflow_uri):
    t = paired_cohort(24)
    t = t[t["sample_id"] != "P005_baseline"]
    t.to_csv(tmp_path / "features.csv", index=False)
    (tmp_path / "train.yaml").write_text(FAST_TRAIN)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, _, err = run(
            [
                *("train", "--features", tmp_path / "features.csv", "--timepoint", "D28"),
                *("--change-from", "baseline", "--config", tmp_path / "train.yaml"),
                "--no-register",
            ]
        )
        filters = list(warnings.filters)
    assert code == 0, err
    said = [line for line in err.splitlines() if "patient(s) dropped" in line]
    assert len(said) == 1 and said[0].startswith("warning: ") and "P005 (no 'baseline'" in said[0]
    assert not [w for w in caught if issubclass(w.category, UnpairedPatientsWarning)]
    assert not [f for f in filters if f[2] is UnpairedPatientsWarning]
    # the library still warns its callers
    with pytest.warns(UnpairedPatientsWarning):
        change_training_table(t, timepoint="D28", baseline="baseline")


def _batch_manifest(paired_run: PairedRun, path: Path, **files: Path) -> Path:
    """The cohort's manifest with absolute files, some replaced (``sample_id=file``)."""
    m = paired_run.manifest.copy()
    m["file"] = [
        str(files.get(s, paired_run.cohort / f))
        for s, f in zip(m["sample_id"], m["file"], strict=True)
    ]
    m.to_csv(path, index=False)
    return path


def test_paired_batch_checks_its_output_folder_before_featurizing(
    monkeypatch, tmp_path, paired_run
):
    import blinaprofile.features.flow as flow

    manifest = _batch_manifest(paired_run, tmp_path / "m.csv")
    calls = Calls(flow.featurize_manifest)
    monkeypatch.setattr(flow, "featurize_manifest", calls)
    batch = ["score-batch", "--manifest", manifest, "--model", paired_run.model, "--jobs", 1]
    (tmp_path / "a_file").write_text("x")
    code, _, err = run([*batch, "--out", tmp_path / "a_file"])
    assert code != 0 and "cannot create the output folder" in err and calls.n == 0
    # a folder holding another run's results is refused before any work, and left as it was
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"model": "another", "threshold": 0.3}))
    (other / "results.csv").write_text("sample_id\nS1\n")
    code, _, err = run([*batch, "--out", other])
    assert code == 2 and "holds results made with other settings" in err and calls.n == 0
    assert (other / "results.csv").read_text() == "sample_id\nS1\n"


def test_paired_batch_applies_the_sample_timeout(tmp_path, paired_run):
    manifest = _batch_manifest(paired_run, tmp_path / "m.csv")
    code, _, err = run(
        [
            *("score-batch", "--manifest", manifest, "--model", paired_run.model),
            *("--out", tmp_path / "res", "--jobs", 1, "--sample-timeout", 0.001),
        ]
    )
    assert code == 1, err
    res = pd.read_parquet(tmp_path / "res" / "results.parquet")
    assert len(res) == 6 and (res["call"] == "error").all()
    assert res["error"].str.contains(r"no result within 0\.001 s").all(), res["error"].tolist()
    run_json = json.loads((tmp_path / "res" / "run.json").read_text())
    assert run_json["paired"] == "D28 - baseline"


def test_paired_batch_panel_mismatch_and_unreadable_file(tmp_path, paired_run):
    """A missing marker is "no call, panel mismatch" as `score --baseline` says; an unreadable
    file is its patient's error row and the batch goes on."""
    from blinaprofile.scoring.score import score_sample
    from conftest_scoring_helpers import write_fcs_like

    post = paired_run.file("P001_D28")
    no_ccr7 = write_fcs_like(post, tmp_path / "P001_D28_no_ccr7.fcs", drop_marker="CCR7")
    base_no_ccr7 = write_fcs_like(
        paired_run.file("P004_baseline"), tmp_path / "P004_b.fcs", drop_marker="CCR7"
    )
    garbage = tmp_path / "P002_baseline.fcs"
    garbage.write_bytes(b"not an FCS file at all" * 10)
    manifest = _batch_manifest(
        paired_run,
        tmp_path / "m.csv",
        P001_D28=no_ccr7,
        P004_baseline=base_no_ccr7,
        P002_baseline=garbage,
    )
    code, _, err = run(
        [
            *("score-batch", "--manifest", manifest, "--model", paired_run.model),
            *("--out", tmp_path / "res", "--jobs", 1),
        ]
    )
    assert code == 1, err
    res = pd.read_parquet(tmp_path / "res" / "results.parquet").set_index("patient_id")
    assert len(res) == 6
    single = score_sample(
        no_ccr7, model=str(paired_run.model), baseline=paired_run.file("P001_baseline")
    )
    assert single.call == "no call" and not single.qc_pass
    assert single.reasons[0].startswith("panel mismatch: missing marker(s) CCR7")
    p1 = res.loc["P001"]
    assert p1["call"] == "no call" and not p1["qc_pass"] and p1["error"] == ""
    assert p1["call_reason"] == single.call_reason  # "QC failed: panel mismatch: ..." alike
    assert p1["reasons"].startswith(single.reasons[0]), p1["reasons"]
    p4 = res.loc["P004"]
    assert p4["call"] == "no call" and not p4["qc_pass"]
    assert p4["reasons"].startswith(
        "baseline P004_baseline: panel mismatch: missing marker(s) CCR7"
    )
    p2 = res.loc["P002"]
    assert p2["call"] == "error" and p2["error"].startswith(
        "patient P002: baseline P002_baseline: "
    )
    assert p2["error"].count("P002_baseline") == 1, p2["error"]
    assert str(garbage) not in p2["error"]  # the row names the sample, not its file
    ok = res.drop(index=["P001", "P002", "P004"])
    assert ok["call"].isin(["responder", "nonresponder", "uncertain", "no call"]).all()
    assert ok["probability"].notna().all() and (ok["error"] == "").all()
    assert "error: patient P002: baseline P002_baseline: " in err


def test_paired_and_sample_batches_share_one_result_table():
    from blinaprofile.scoring import batch, paired_batch
    from blinaprofile.scoring.results import error_row, result_frame
    from blinaprofile.scoring.score import RESULT_COLUMNS

    for mod in (batch, paired_batch):
        assert not {"_frame", "_write_results"} & set(vars(mod)), mod.__name__
    assert not hasattr(paired_batch, "_error_row")
    row = error_row("S1", "S1: bad\nfile", patient_id="P1")
    df = result_frame([row], extra_columns=["patient_id"], extra_text_columns=["patient_id"])
    assert list(df.columns) == [*RESULT_COLUMNS, "patient_id"]
    assert df.loc[0, "error"] == "S1: bad file" and df.loc[0, "warnings"] == ""
    assert str(df["qc_pass"].dtype) == "boolean" and str(df["patient_id"].dtype) == "string"
