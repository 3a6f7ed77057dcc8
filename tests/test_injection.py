"""CSV formula injection: no CSV the project writes lets a spreadsheet run a cell.

Sample IDs, patient IDs and other text that reach a CSV may start with ``=``, ``+``, ``-``,
``@``, a tab or a carriage return (``=HYPERLINK("http://x","y")``, ``+cmd|' /C calc'!A0``):
a spreadsheet opening the file would run them as formulas. Every CSV is written by
:func:`blinaprofile.io.atomic.write_csv`, which prefixes such text cells with ``'`` and leaves
numbers (negative ones included) numeric; Parquet keeps the exact value.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd
import pytest

from blinaprofile.io.atomic import write_csv
from conftest_scoring_helpers import scoring_model

ROOT = Path(__file__).resolve().parents[1]

#: the attacks of issue 11, each a cell a spreadsheet would run (the leading carriage
#: return is :data:`CR_ATTACKS`: see the strict xfail below)
ATTACKS = (
    '=HYPERLINK("http://x","y")',
    "+cmd|' /C calc'!A0",
    "@SUM(1+1)",
    "-2+3",
    "\tTAB=1+1",
)
#: a carriage return, leading or inside a cell: a CSV reader starts a new row there
CR_ATTACKS = ("\rCR=1+1", "x\r=cmd|' /C calc'!A0")
#: those a manifest accepts as a sample_id (no path separator or control character)
MANIFEST_IDS = ("@SUM(1+1)", "-2+3", "=1+2", "+SUM(A1)")


def _cells(path: Path) -> list[dict[str, str]]:
    """The CSV's cells exactly as written (no type inference, no stripping)."""
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _neutralised(value: str) -> str:
    return "'" + value


@pytest.fixture(scope="module")
def sm(tmp_path_factory: pytest.TempPathFactory):
    return scoring_model(tmp_path_factory)


def test_every_csv_is_written_by_the_one_writer() -> None:
    """No module but io/atomic.py calls DataFrame.to_csv (MLflow CSV artifacts included)."""
    writer = ROOT / "src" / "blinaprofile" / "io" / "atomic.py"
    callers = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in sorted((ROOT / "src").rglob("*.py"))
        if p != writer
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
        if re.search(r"\.to_csv\(", line)
    ]
    assert callers == [], f"CSV written around blinaprofile.io.atomic.write_csv: {callers}"


def test_write_csv_neutralises_text_and_keeps_numbers_numeric(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "sample_id": list(ATTACKS),
            "note": pd.array(list(ATTACKS), dtype="string"),
            "delta": [-2.5, -1.0, 0.0, 3.25, -1e-9],
            "count": [-2, -1, 0, 1, 2],
            "plain": ["S1", "a-b", "x=y", "", "ok"],
        }
    )
    out = write_csv(df, tmp_path / "t.csv")
    rows = _cells(out)
    assert [r["sample_id"] for r in rows] == [_neutralised(a) for a in ATTACKS]
    assert [r["note"] for r in rows] == [_neutralised(a) for a in ATTACKS]
    assert [r["plain"] for r in rows] == ["S1", "a-b", "x=y", "", "ok"]
    # numbers are written as numbers: negative ones are not text to neutralise
    assert [r["count"] for r in rows] == ["-2", "-1", "0", "1", "2"]
    back = pd.read_csv(out, keep_default_na=False)
    assert back["delta"].dtype.kind == "f" and back["count"].dtype.kind == "i"
    assert back["delta"].tolist() == df["delta"].tolist()


def test_a_carriage_return_cannot_start_a_new_row(tmp_path: Path) -> None:
    df = pd.DataFrame({"sample_id": list(CR_ATTACKS), "n": [1, 2]})
    rows = _cells(write_csv(df, tmp_path / "cr.csv"))
    assert [r["sample_id"] for r in rows] == ["'\rCR=1+1", "x\r=cmd|' /C calc'!A0"]


def test_cli_featurize_neutralises_manifest_text(small_cohort, tmp_path: Path) -> None:
    from blinaprofile.cli import main

    src = pd.read_csv(small_cohort.manifest).iloc[:4].copy()
    src["file"] = [str(small_cohort.out_dir / f) for f in src["file"]]
    src["sample_id"] = list(MANIFEST_IDS)
    src["patient_id"] = [ATTACKS[0], ATTACKS[1], "P3", "P4"]
    src["timepoint"] = ["-2+3", "=1+1", "D28", "@A1"]
    manifest = tmp_path / "manifest.csv"
    src.to_csv(manifest, index=False)
    out = tmp_path / "features.csv"
    assert main(["featurize", "--manifest", str(manifest), "--out", str(out), "--jobs", "1"]) == 0
    rows = _cells(out)
    assert [r["sample_id"] for r in rows] == [_neutralised(s) for s in MANIFEST_IDS]
    assert [r["patient_id"] for r in rows[:2]] == [_neutralised(a) for a in ATTACKS[:2]]
    assert [r["timepoint"] for r in rows] == ["'-2+3", "'=1+1", "D28", "'@A1"]
    assert all(r["error"] == "" for r in rows)
    table = pd.read_csv(out, keep_default_na=False)
    assert table["n_events"].dtype.kind == "i" and table["cd3_pct_lymph"].dtype.kind == "f"


def test_featurize_api_keeps_a_negative_number_column_numeric(small_cohort, tmp_path: Path) -> None:
    from blinaprofile.features.flow import featurize_manifest

    m = pd.read_csv(small_cohort.manifest).iloc[:2]
    df = pd.DataFrame(
        {
            "sample_id": ["\tTAB=1", "=1+1"],  # only a table (not a manifest) can hold a tab
            "path": [str(small_cohort.out_dir / f) for f in m["file"]],
            "dose_change": [-2.0, -0.5],
        }
    )
    table = featurize_manifest(df, n_jobs=1, keep_columns=["dose_change"])
    rows = _cells(write_csv(table, tmp_path / "f.csv"))
    assert [r["sample_id"] for r in rows] == ["'\tTAB=1", "'=1+1"]
    assert [r["dose_change"] for r in rows] == ["-2.0", "-0.5"]


def test_score_batch_results_csv_is_neutralised_and_parquet_exact(sm, tmp_path: Path) -> None:
    from blinaprofile.cli import main

    m = pd.read_csv(sm.new_cohort / "manifest.csv").iloc[:4].copy()
    m["file"] = [str(sm.new_cohort / f) for f in m["file"]]
    m["sample_id"] = list(MANIFEST_IDS)
    manifest = tmp_path / "manifest.csv"
    m.to_csv(manifest, index=False)
    out = tmp_path / "batch"
    args = ["score-batch", "--manifest", str(manifest), "--model", str(sm.model_dir)]
    assert main([*args, "--out", str(out), "--jobs", "1", "--no-progress"]) == 0
    rows = _cells(out / "results.csv")
    assert [r["sample_id"] for r in rows] == [_neutralised(s) for s in MANIFEST_IDS]
    exact = pd.read_parquet(out / "results.parquet")
    assert list(exact["sample_id"]) == list(MANIFEST_IDS)
    back = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    assert back["probability"].dtype.kind == "f" and back["threshold"].dtype.kind == "f"


def test_score_samples_table_input_with_every_attack(sm, tmp_path: Path) -> None:
    """A DataFrame input bypasses manifest checks: tab and '/' IDs reach results.csv."""
    from blinaprofile import score_samples

    files = sorted((sm.new_cohort / "fcs").glob("*.fcs"))[: len(ATTACKS)]
    missing = tmp_path / "absent.fcs"  # an error row starts with the sample ID
    table = pd.DataFrame(
        {"sample_id": [*ATTACKS, "=ERR()"], "path": [str(f) for f in files] + [str(missing)]}
    )
    out = tmp_path / "batch"
    df = score_samples(table, model=str(sm.model_dir), out_dir=out, n_jobs=1)
    assert list(df["sample_id"]) == [*ATTACKS, "=ERR()"]
    rows = _cells(out / "results.csv")
    assert [r["sample_id"] for r in rows] == [_neutralised(a) for a in (*ATTACKS, "=ERR()")]
    assert rows[-1]["call"] == "error" and rows[-1]["error"].startswith("'=ERR(): ")
    exact = pd.read_parquet(out / "results.parquet")
    assert list(exact["sample_id"]) == [*ATTACKS, "=ERR()"]
    assert exact["error"].iloc[-1].startswith("=ERR(): ")
