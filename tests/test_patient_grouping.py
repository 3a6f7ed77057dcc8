"""CV grouping when a cohort names no patient (issue 13).

A manifest without ``patient_id`` (or a feature table whose every sample is its own patient
while it holds several timepoints) makes cross-validation group by sample, so one patient's
baseline and later sample can sit on both sides of a split. ``train`` must say so.
"""

from __future__ import annotations

import pandas as pd
import pytest

from blinaprofile.cli.dispatch import main
from blinaprofile.io.read import read_manifest
from test_honesty import cohort_features

CONFIG = """\
experiment: grouping
registered_model: grouping-model
outer_folds: 3
inner_folds: 2
repeats: 1
n_bootstrap: 50
n_permutations: 0
seed: 1
models:
  - family: logreg_l2
    params: {C: 0.3}
"""


def _train(tmp_path, table: pd.DataFrame, capsys) -> tuple[int, str]:
    f = tmp_path / "features.csv"
    table.to_csv(f, index=False)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(CONFIG)
    code = main(["train", "--features", str(f), "--config", str(cfg), "--no-register"])
    return code, capsys.readouterr().err


@pytest.fixture
def paired_table(sim_config) -> pd.DataFrame:
    """24 patients x (baseline, D28), sample IDs unique per sample."""
    base = cohort_features(sim_config, n_patients=24, seed=5)
    later = base.copy()
    base["timepoint"], later["timepoint"] = "baseline", "D28"
    later["sample_id"] = later["sample_id"].astype(str) + "_D28"
    return pd.concat([base, later], ignore_index=True)


def test_every_sample_its_own_patient_over_timepoints_is_warned(
    tmp_path, mlflow_uri, capsys, paired_table
):
    table = paired_table.assign(patient_id=paired_table["sample_id"])
    code, err = _train(tmp_path, table, capsys)
    assert code == 0, err
    line = next(x for x in err.splitlines() if "CV groups by sample" in x)
    assert line.startswith("warning: features.csv: gives every sample its own patient_id")
    assert "2 timepoints (D28, baseline)" in line


def test_patients_named_are_not_warned(tmp_path, mlflow_uri, capsys, paired_table):
    code, err = _train(tmp_path, paired_table, capsys)
    assert code == 0, err
    assert "CV groups by sample" not in err


def test_manifest_without_patient_column_is_flagged(tmp_path):
    (tmp_path / "a.fcs").write_bytes(b"x")
    (tmp_path / "b.fcs").write_bytes(b"x")
    m = tmp_path / "m.csv"
    m.write_text("sample_id,file,response\nA,a.fcs,R\nB,b.fcs,NR\n")
    df = read_manifest(m, require_response=True)
    assert df.attrs.get("patient_id_from_sample") is True
    assert df["patient_id"].tolist() == ["A", "B"]
    m.write_text("sample_id,patient_id,file,response\nA,P1,a.fcs,R\nB,P1,b.fcs,NR\n")
    assert not read_manifest(m, require_response=True).attrs.get("patient_id_from_sample")


def test_train_manifest_without_patient_column_is_warned(
    tmp_path, mlflow_uri, capsys, small_cohort
):
    """`train --manifest` on a manifest lacking patient_id says CV groups by sample."""
    m = pd.read_csv(small_cohort.manifest, dtype=str)
    assert "patient_id" in m.columns
    m = m.drop(columns="patient_id")
    m["file"] = [str(small_cohort.manifest.parent / f) for f in m["file"]]
    manifest = tmp_path / "no_patients.csv"
    m.to_csv(manifest, index=False)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(CONFIG)
    code = main(["train", "--manifest", str(manifest), "--config", str(cfg), "--no-register"])
    err = capsys.readouterr().err
    assert code == 0, err
    said = [x for x in err.splitlines() if "CV groups by sample" in x]
    assert len(said) == 1, err
    assert said[0].startswith("warning: no_patients.csv: has no patient_id column: CV groups")
