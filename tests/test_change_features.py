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
from collections.abc import Sequence
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
def test_cli_end_to_end_paired_cohort(tmp_path, mlflow_uri):
    """simulate (baseline + D28) -> featurize -> train --change-from -> score / score-batch."""
    scenario = (ROOT / "configs" / "simulation" / "default.yaml").read_text()
    scenario = scenario.replace("timepoints: [D28]", "timepoints: [baseline, D28]")
    assert "timepoints: [baseline, D28]" in scenario
    (tmp_path / "paired.yaml").write_text(scenario)
    (tmp_path / "train.yaml").write_text(FAST_TRAIN)
    cohort, feats, model = tmp_path / "cohort", tmp_path / "features.csv", tmp_path / "model"
    code, out, err = run(
        [
            *("simulate", "--scenario", tmp_path / "paired.yaml", "--out", cohort),
            *("--n-patients", 6, "--events", 8000, "--seed", 5),
        ]
    )
    assert code == 0, err
    code, out, err = run(["featurize", "--manifest", cohort / "manifest.csv", "--out", feats])
    assert code == 0, err
    code, out, err = run(
        [
            *("train", "--features", feats, "--timepoint", "D28", "--change-from", "baseline"),
            *("--config", tmp_path / "train.yaml", "--export", model, "--no-register"),
        ]
    )
    assert code == 0, err
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
