"""Cohort manifests: what is accepted, what is refused and how the refusal reads."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from blinaprofile.errors import ManifestError
from blinaprofile.features.flow import featurize_manifest
from blinaprofile.features.schema import feature_columns
from blinaprofile.io.read import RESPONSE_CODES, read_manifest


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.fcs", "b.fcs", "c.fcs"):
        (tmp_path / name).write_bytes(b"placeholder")  # only existence is checked here
    return tmp_path


def _write(folder: Path, text: str | bytes, name: str = "manifest.csv") -> Path:
    p = folder / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def _refused(path: Path, **kwargs: bool) -> str:
    with pytest.raises(ManifestError) as info:
        read_manifest(path, **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg
    return msg


def test_minimal_manifest_gets_defaults(folder: Path) -> None:
    df = read_manifest(_write(folder, "sample_id,file\nS1,a.fcs\nS2,b.fcs\n"))
    assert list(df["sample_id"]) == ["S1", "S2"]
    assert list(df["patient_id"]) == ["S1", "S2"]  # defaults to sample_id
    assert list(df["timepoint"]) == ["", ""]
    assert df["response"].isna().all()
    assert [Path(p) for p in df["path"]] == [folder / "a.fcs", folder / "b.fcs"]


def test_response_codes_case_and_spaces(folder: Path) -> None:
    text = (
        "Sample_ID , File , Patient_ID , Response\n"
        "S1 , a.fcs , P1 ,  Responder \n"
        "S2,b.fcs,P1,NR\n"
        "S3,c.fcs,,non-responder\n"
    )
    df = read_manifest(_write(folder, text), require_response=True)
    assert list(df["response"]) == [1, 0, 0]
    assert list(df["patient_id"]) == ["P1", "P1", "S3"]  # blank patient -> sample_id
    assert set(RESPONSE_CODES.values()) == {0, 1}


def test_bom_crlf_and_absolute_paths(folder: Path) -> None:
    absolute = (folder / "c.fcs").resolve()
    text = f"sample_id,file\r\nS1,a.fcs\r\nS2,{absolute}\r\n".encode("utf-8-sig")
    df = read_manifest(_write(folder, text))
    assert list(df["sample_id"]) == ["S1", "S2"]
    assert Path(df["path"].iloc[1]) == absolute


@pytest.mark.parametrize("sep", ["\t", ";"])
def test_tab_and_semicolon_separated(folder: Path, sep: str) -> None:
    text = sep.join(["sample_id", "file", "response"]) + "\n" + sep.join(["S1", "a.fcs", "R"])
    df = read_manifest(_write(folder, text + "\n"))
    assert list(df["sample_id"]) == ["S1"] and list(df["response"]) == [1]


def test_blank_lines_and_trailing_commas(folder: Path) -> None:
    text = "sample_id,file,response,,\n\nS1,a.fcs,R,,\n,,,,\nS2,b.fcs,NR\n"
    df = read_manifest(_write(folder, text.replace("response,,", "response")))
    assert list(df["sample_id"]) == ["S1", "S2"]
    assert list(df["response"]) == [1, 0]


def test_subfolders_resolved_relative_to_manifest(folder: Path) -> None:
    sub = folder / "run1"
    sub.mkdir()
    shutil.copy(folder / "a.fcs", sub / "x.fcs")
    df = read_manifest(_write(folder, "sample_id,file\nS1,run1/x.fcs\n"))
    assert Path(df["path"].iloc[0]) == sub / "x.fcs"


def test_check_files_false_allows_missing(folder: Path) -> None:
    df = read_manifest(_write(folder, "sample_id,file\nS1,later.fcs\n"), check_files=False)
    assert Path(df["path"].iloc[0]) == folder / "later.fcs"


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        (
            "sample_id,file\nS1,a.fcs\nS2,zz.fcs\nS3,yy.fcs\n",
            "file(s) not found: ['zz.fcs', 'yy.fcs']",
        ),
        ("sample_id,file\nS1,a.fcs\nS1,b.fcs\n", "duplicate sample_id(s) ['S1']"),
        ("sample_id,file\nS1,a.fcs\n,b.fcs\n", "empty sample_id on line(s) [3]"),
        ("sample_id,file,response\nS1,a.fcs,maybe\n", "unknown response label(s) ['maybe']"),
        ("id,file\nS1,a.fcs\n", "missing column(s) ['sample_id']"),
        (
            "sample_id,file,SAMPLE_ID\nS1,a.fcs,S9\n",
            "column(s) ['sample_id'] appear more than once",
        ),
        ("sample_id,file\n", "the manifest has a header but no samples"),
        ("   \n\n", "the manifest is empty"),
        ("sample_id,file\nS/1,a.fcs\n", "contain a path separator or control character"),
        ("sample_id,file\n..,a.fcs\n", "contain a path separator or control character"),
        ('sample_id,file\n"S1,a.fcs\n', "not a valid CSV"),
        ("sample_id,file\nS1,a.fcs,extra,fields\n", "line 2 has 4 fields but the header has 2"),
        ("sample_id,,file\nS1,x,a.fcs\n", "column 2 of the header has no name"),
    ],
)
def test_refused(folder: Path, text: str, phrase: str) -> None:
    assert phrase in _refused(_write(folder, text))


@pytest.mark.parametrize(
    ("payload", "phrase"),
    [
        (
            "sample_id,file,site\nS1,a.fcs,Zürich\n".encode("cp1252"),
            "not UTF-8 text (line 2, byte 30)",
        ),
        ("sample_id,file\nS1,a.fcs\n".encode("utf-16"), "it is UTF-16 encoded"),
        ("sample_id,file\nS1,a.fcs\n".encode("utf-16-be"), "contains NUL characters"),
        (b"PK\x03\x04\x14\x00\x06\x00\x08\x00" + bytes(64), "looks like an Excel workbook"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(64), "legacy Excel (.xls)"),
        (b"FCS3.1    " + b"\x00" * 50, "it is an FCS file, not a manifest"),
    ],
)
def test_encodings_and_wrong_files(folder: Path, payload: bytes, phrase: str) -> None:
    assert phrase in _refused(_write(folder, payload))


def test_training_needs_labels_of_both_classes(folder: Path) -> None:
    no_col = _write(folder, "sample_id,file\nS1,a.fcs\n", "m1.csv")
    assert "training needs a 'response' column" in _refused(no_col, require_response=True)
    blank = _write(folder, "sample_id,file,response\nS1,a.fcs,R\nS2,b.fcs,\n", "m2.csv")
    assert "some samples have no response label" in _refused(blank, require_response=True)
    one = _write(folder, "sample_id,file,response\nS1,a.fcs,R\nS2,b.fcs,yes\n", "m3.csv")
    assert "both responders and nonresponders" in _refused(one, require_response=True)
    # without require_response, a blank label is simply unknown
    assert read_manifest(blank)["response"].isna().sum() == 1


def test_not_a_file(folder: Path) -> None:
    assert "manifest not found" in _refused(folder / "nope.csv")
    (folder / "dir.csv").mkdir()
    assert "not a regular file" in _refused(folder / "dir.csv")


def test_file_path_too_long_is_reported_not_crashing(folder: Path) -> None:
    long_name = "x" * 5000 + ".fcs"
    msg = _refused(_write(folder, f"sample_id,file\nS1,{long_name}\n"))
    assert "file(s) not found" in msg or "cannot be used" in msg


def _cohort_manifest(small_cohort, tmp_path: Path, n: int = 3, **extra: list[str]) -> Path:
    """The first ``n`` samples of the small cohort, with extra manifest columns."""
    src = pd.read_csv(small_cohort.manifest).iloc[:n].copy()
    src["file"] = [str(small_cohort.out_dir / f) for f in src["file"]]
    for name, values in extra.items():
        src[name] = values
    m = tmp_path / "m.csv"
    src.to_csv(m, index=False)
    return m


def test_only_declared_manifest_columns_reach_the_feature_table(
    small_cohort, tmp_path: Path
) -> None:
    """An mrn or patient_name column is dropped (and reported); declared ones are kept."""
    m = _cohort_manifest(
        small_cohort,
        tmp_path,
        mrn=["MRN0001", "MRN0002", "MRN0003"],
        patient_name=["Jane Roe", "John Doe", "Ann Poe"],
        batch=["b1", "b1", "b2"],
    )
    table = featurize_manifest(m, n_jobs=1)
    assert list(table["sample_id"]) == list(pd.read_csv(m)["sample_id"])
    assert {"mrn", "patient_name", "file", "path"}.isdisjoint(table.columns)
    assert list(table["batch"]) == ["b1", "b1", "b2"]
    assert {"patient_id", "response", "timepoint"} <= set(table.columns)
    assert table.attrs["dropped_columns"] == ["mrn", "patient_name"]
    assert set(feature_columns()) <= set(table.columns)
    assert (table["error"] == "").all()
    text = table.to_csv()
    assert "MRN0001" not in text and "Jane Roe" not in text


def test_keep_columns_and_file_names_are_explicit_opt_ins(small_cohort, tmp_path: Path) -> None:
    m = _cohort_manifest(small_cohort, tmp_path, site=["site0", "site1", "site0"], mrn=["1"] * 3)
    table = featurize_manifest(m, n_jobs=1, keep_columns=["SITE "], keep_file_names=True)
    assert list(table["site"]) == ["site0", "site1", "site0"]
    assert list(table["file"]) == list(pd.read_csv(m)["file"])
    assert table.attrs["dropped_columns"] == ["mrn"]
    # a column that is not in the manifest, or that would replace a computed one, is refused
    with pytest.raises(ManifestError, match=r"\['nope'\] to keep are not in the manifest"):
        featurize_manifest(m, n_jobs=1, keep_columns=["nope"])
    clash = _cohort_manifest(small_cohort, tmp_path, n_events=["1", "2", "3"])
    with pytest.raises(ManifestError, match=r"\['n_events'\] to keep would replace computed"):
        featurize_manifest(clash, n_jobs=1, keep_columns=["n_events"])


def test_cli_featurize_reports_dropped_columns_and_keeps_named_ones(
    small_cohort, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blinaprofile.cli import main

    m = _cohort_manifest(
        small_cohort, tmp_path, n=2, mrn=["MRN0001", "MRN0002"], patient_name=["A B", "C D"]
    )
    out = tmp_path / "f.csv"
    assert main(["featurize", "--manifest", str(m), "--out", str(out), "--jobs", "1"]) == 0
    err = capsys.readouterr().err
    assert (
        "dropped manifest column(s) not declared: mrn, patient_name (use --keep-column to keep one)"
    ) in err
    assert {"mrn", "patient_name", "file"}.isdisjoint(pd.read_csv(out).columns)
    args = ["featurize", "--manifest", str(m), "--out", str(out), "--jobs", "1"]
    assert main([*args, "--keep-column", "mrn"]) == 0
    err = capsys.readouterr().err
    assert "not declared: patient_name (use --keep-column" in err
    assert list(pd.read_csv(out)["mrn"]) == ["MRN0001", "MRN0002"]
    # an unknown column is one line naming the manifest, before any file is read
    assert main([*args, "--keep-column", "nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {m}: ") and "'nope'" in err[0]


def test_featurize_manifest_without_good_samples_keeps_all_columns(tmp_path: Path) -> None:
    (tmp_path / "Roe_Jane_MRN123.fcs").write_bytes(b"not an fcs file at all")
    m = _write(tmp_path, "sample_id,file,response\nS1,Roe_Jane_MRN123.fcs,R\n")
    table = featurize_manifest(m, n_jobs=1)
    assert set(feature_columns()) <= set(table.columns)
    # the error names the sample, not its file (file names often name the patient)
    assert table["error"].iloc[0].startswith("S1: ")
    assert "not an FCS file" in table["error"].iloc[0]
    assert "Roe_Jane" not in table["error"].iloc[0] and str(tmp_path) not in table["error"].iloc[0]
    assert table["response"].iloc[0] == 1
    named = featurize_manifest(m, n_jobs=1, keep_file_names=True)
    assert named["error"].iloc[0].startswith(str(tmp_path / "Roe_Jane_MRN123.fcs"))
