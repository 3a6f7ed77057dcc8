"""Privacy: identifying FCS keywords never reach any output, and servers stay local.

The end-to-end test writes FCS files whose identifying TEXT keywords ($SRC, $FIL, $SMNO,
$PROJ, $OP, $DATE, PATIENT NAME, MRN, DOB...) hold unique sentinel strings, runs the
pipeline through the CLI (simulate -> featurize -> train with a temporary MLflow SQLite
store -> score with report -> gate -> score-batch) and searches every file it produced
(the SQLite database, MLflow artifacts, zip/skops/Parquet/HDF5 contents, reports,
captured stdout/stderr) for the sentinels.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from blinaprofile.errors import FCSFormatError
from blinaprofile.io.fcs import read_fcs
from blinaprofile.io.fcs_write import write_fcs
from blinaprofile.io.privacy import (
    identifying_values,
    is_identifying,
    is_safe_keyword,
    safe_metadata,
    scan_for_strings,
    select_keywords,
)
from blinaprofile.io.read import read_flow

ROOT = Path(__file__).resolve().parents[1]

#: identifying keywords written into every test file (name -> sentinel stem)
IDENTIFYING = (
    "$SRC",
    "$FIL",
    "$SMNO",
    "$PROJ",
    "$OP",
    "$DATE",
    "$BTIM",
    "$COM",
    "$CELLS",
    "$INST",
    "$EXP",
    "PATIENT NAME",
    "PATIENT_ID",
    "MRN",
    "DOB",
    "SUBJECT",
    "TUBE NAME",
    "SAMPLE ID",
    "EXPERIMENT NAME",
)


# --------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    "name",
    [
        *IDENTIFYING,
        "$src",
        " Patient Name ",
        "DATE OF BIRTH",
        "Donor-ID",
        "$LAST_MODIFIER",
        "CST SETUP DATE",
        "GUID",
    ],
)
def test_identifying_names(name: str) -> None:
    assert is_identifying(name)
    assert not is_safe_keyword(name)


@pytest.mark.parametrize(
    "name",
    [
        "$P1N",
        "$P12S",
        "$P3R",
        "$TOT",
        "$PAR",
        "$CYT",
        "$TIMESTEP",
        "$SPILLOVER",
        "SPILL",
        "$BYTEORD",
        "$DATATYPE",
        "$P4TYPE",
    ],
)
def test_technical_names_are_safe(name: str) -> None:
    assert not is_identifying(name)
    assert is_safe_keyword(name)


def test_select_keywords_default_opt_in_and_extra() -> None:
    kw = {
        "$TOT": "10",
        "$P1N": "FSC-A",
        "$SRC": "Jane Doe",
        "MRN": "12345",
        "CREATOR": "BD FACSDiva",
        "LAB COLOUR": "blue",
    }
    assert select_keywords(kw) == {"$TOT": "10", "$P1N": "FSC-A", "CREATOR": "BD FACSDiva"}
    assert select_keywords(kw, allow_identifying=True) == kw
    # an extra allowed name is kept only if it is not identifying
    assert "LAB COLOUR" in select_keywords(kw, extra_allowed=["lab colour"])
    assert "MRN" not in select_keywords(kw, extra_allowed=["MRN"])
    assert identifying_values(kw) == {"$SRC": "Jane Doe", "MRN": "12345"}


def _sentinels(tag: str) -> dict[str, str]:
    """One unique value per identifying keyword (also findable inside other text)."""
    token = secrets.token_hex(4)
    return {k: f"PHI{tag}x{re.sub(r'[^A-Z]', '', k.upper())}x{token}" for k in IDENTIFYING}


def _rewrite_with_identifiers(src: Path, dst: Path, sentinels: dict[str, str]) -> None:
    data = read_fcs(src)
    keep = {k: v for k, v in data.keywords.items() if k in ("$CYT",)}
    write_fcs(
        dst,
        data.events,
        channels=data.channels,
        markers=data.markers,
        spillover=data.spillover,
        keywords={**keep, **sentinels},
    )


def test_read_flow_drops_identifiers_unless_opted_in(small_cohort: Any, tmp_path: Path) -> None:
    src = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    sent = _sentinels("R")
    f = tmp_path / "x.fcs"
    _rewrite_with_identifiers(src, f, sent)
    assert read_fcs(f).keywords["$SRC"] == sent["$SRC"]  # the raw reader keeps everything
    data = read_flow(f)
    assert not set(sent) & set(data.keywords)
    assert data.keywords["$CYT"] and data.keywords["$TOT"]
    blob = json.dumps(data.keywords) + repr(data) + json.dumps(safe_metadata(data, sample_id="S1"))
    assert not [v for v in sent.values() if v in blob]
    opted = read_flow(f, keep_identifiers=True)
    assert {k: opted.keywords[k] for k in sent} == sent


# --------------------------------------------------------------------------- the scanner
def test_scanner_sees_inside_containers(tmp_path: Path) -> None:
    """The scanner must find a needle in every container format the pipeline writes."""
    needle = "PHIscan" + secrets.token_hex(4)
    (tmp_path / "plain.txt").write_text(f"x {needle} y")
    (tmp_path / "utf16.txt").write_bytes(f"x {needle}".encode("utf-16-le"))
    with zipfile.ZipFile(tmp_path / "model.skops", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("schema.json", json.dumps({"v": needle * 50}))
    (tmp_path / "log.gz").write_bytes(gzip.compress(needle.encode() * 20))
    pd.DataFrame({"a": [needle] * 100}).to_parquet(tmp_path / "t.parquet", compression="zstd")
    con = sqlite3.connect(tmp_path / "db.sqlite")
    con.execute("create table t (v text)")
    con.execute("insert into t values (?)", (needle,))
    con.commit()
    con.close()
    a = ad.AnnData(np.zeros((3, 2), dtype=np.float32))
    a.obs["who"] = [needle, "b", "c"]
    a.write_h5ad(tmp_path / "x.h5ad", compression="gzip")
    (tmp_path / "clean.txt").write_text("nothing here")
    found = {f.path.name for f in scan_for_strings(tmp_path, [needle])}
    assert found == {
        "plain.txt",
        "utf16.txt",
        "model.skops",
        "log.gz",
        "t.parquet",
        "db.sqlite",
        "x.h5ad",
    }
    assert scan_for_strings(tmp_path, [needle], exclude=[tmp_path]) == []


# --------------------------------------------------------------------------- end to end
def _run(
    args: list[str], cwd: Path, logs: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "MLFLOW_DISABLE_TELEMETRY": "true"}
    full.pop("PYTHONDONTWRITEBYTECODE", None)
    full["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "blinaprofile-test-pycache")
    r = subprocess.run(
        [sys.executable, "-m", "blinaprofile", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    n = len(list(logs.glob("*.log")))
    (logs / f"{n:02d}_{args[0]}.log").write_text(
        f"$ blinaprofile {' '.join(args)}\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}\n"
    )
    return r


#: one sample per simulated patient
N_SAMPLES = 10

TRAIN_YAML = """\
experiment: privacy-test
registered_model: privacy-model
alias: champion
outer_folds: 3
inner_folds: 2
repeats: 1
n_bootstrap: 20
threshold: {rule: max_balanced_accuracy}
models:
  - family: logreg_l2
  - family: xgboost
    params: {n_estimators: 20}
"""


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the whole pipeline on files that carry identifiers; return where things are."""
    root = tmp_path_factory.mktemp("privacy")
    work, logs, inputs = root / "work", root / "logs", root / "inputs"
    for d in (work, logs, inputs):
        d.mkdir()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    r = _run(
        [
            "simulate",
            "--out",
            str(root / "sim"),
            "--n-patients",
            str(N_SAMPLES),
            "--events",
            "6000",
            "--seed",
            "11",
        ],
        work,
        logs,
        env,
    )
    assert r.returncode == 0, r.stderr
    sim = pd.read_csv(root / "sim" / "manifest.csv")
    needles: list[str] = []
    rows = []
    for i, rec in enumerate(sim.to_dict("records")):
        sent = _sentinels(f"{i:02d}")
        needles += list(sent.values())
        name = f"acq_{i:03d}.fcs"  # the file name is the lab's choice; here it is neutral
        _rewrite_with_identifiers(root / "sim" / rec["file"], inputs / name, sent)
        rows.append(
            {
                "sample_id": f"S{i:02d}",
                "patient_id": f"P{i:02d}",
                "file": name,
                "response": rec["response"],
            }
        )
    manifest = inputs / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    (inputs / "train.yaml").write_text(TRAIN_YAML)
    one = inputs / "acq_000.fcs"

    steps = [
        ["featurize", "--manifest", str(manifest), "--out", str(work / "features.csv")],
        [
            "train",
            "--manifest",
            str(manifest),
            "--config",
            str(inputs / "train.yaml"),
            "--export",
            str(work / "model"),
        ],
        [
            "score",
            str(one),
            "--model",
            str(work / "model"),
            "--sample-id",
            "S00",
            "--json",
            "--out-dir",
            str(work / "reports"),
        ],
        [
            "score",
            str(inputs / "acq_001.fcs"),
            "--model",
            "models:/privacy-model@champion",
            "--json",
            "--out-dir",
            str(work / "reports"),
        ],
        ["gate", str(one), "--json", "--h5ad", str(work / "gated.h5ad")],
        ["export-gating", str(one), "--out", str(work / "strategy.xml")],
        [
            "score-batch",
            "--manifest",
            str(manifest),
            "--out",
            str(work / "batch"),
            "--model",
            str(work / "model"),
            "--jobs",
            "2",
            "--no-progress",
        ],
    ]
    results = {}
    for args in steps:
        r = _run(args, work, logs, env)
        results[args[0] + (":registry" if "models:/" in " ".join(args) else "")] = r
    return {
        "root": root,
        "work": work,
        "logs": logs,
        "inputs": inputs,
        "needles": needles,
        "results": results,
        "manifest": manifest,
        "sentinels_file": one,
    }


def test_pipeline_ran(pipeline_run: dict[str, Any]) -> None:
    results = pipeline_run["results"]
    assert set(results) == {
        "featurize",
        "train",
        "score",
        "score:registry",
        "gate",
        "export-gating",
        "score-batch",
    }
    for step, r in results.items():
        assert r.returncode == 0, f"{step}: {r.stderr[-2000:]}"
    batch = results["score-batch"]
    n = N_SAMPLES
    assert f"{n} samples: {n} scored now, 0 already finished" in batch.stdout, batch.stdout
    work = pipeline_run["work"]
    assert (work / "model" / "MLmodel").is_file()
    assert (work / "mlflow.db").is_file()
    assert any((work / "mlruns").rglob("MLmodel")), "MLflow artifacts not under the test folder"
    assert any((work / "reports").glob("*.html"))


def test_no_identifier_in_any_output(pipeline_run: dict[str, Any]) -> None:
    root, needles = pipeline_run["root"], pipeline_run["needles"]
    inputs = pipeline_run["inputs"]
    # positive control: the sentinels are in the inputs, and the scanner sees them there
    in_inputs = scan_for_strings(inputs, needles)
    assert {f.needle for f in in_inputs} == set(needles)
    outputs = [p for p in root.rglob("*") if p.is_file() and inputs not in p.parents]
    n_files = len(outputs)
    n_bytes = sum(p.stat().st_size for p in outputs)
    findings = scan_for_strings(root, needles, exclude=[inputs, root / "sim"])
    print(
        f"\nprivacy scan: {len(needles)} sentinels x {n_files} output files "
        f"({n_bytes / 1e6:.1f} MB, incl. mlflow.db, mlruns/, model, reports, batch, logs): "
        f"{len(findings)} found"
    )
    assert findings == [], "\n".join(str(f) for f in findings[:20])


def test_outputs_name_samples_by_sample_id(pipeline_run: dict[str, Any]) -> None:
    work = pipeline_run["work"]
    feats = pd.read_csv(work / "features.csv")
    assert list(feats["sample_id"]) == [f"S{i:02d}" for i in range(len(feats))]
    assert (feats["error"].fillna("") == "").all()
    scored = json.loads(pipeline_run["results"]["score"].stdout)
    assert scored["sample_id"] == "S00"
    assert (work / "reports" / "S00.report.html").is_file()
    # without --sample-id, the sample gets a pseudonym, never the file's $SRC/$FIL
    other = json.loads(pipeline_run["results"]["score:registry"].stdout)
    assert re.fullmatch(r"S-[0-9a-f]{12}", other["sample_id"]), other["sample_id"]
    # score-batch names its rows by the manifest's sample_id too
    batch = pipeline_run["results"]["score-batch"]
    assert batch.returncode == 0, batch.stderr[-2000:]
    res = pd.read_csv(work / "batch" / "results.csv", keep_default_na=False)
    assert sorted(res["sample_id"]) == sorted(feats["sample_id"])
    assert (res["error"] == "").all(), res.loc[res["error"] != "", "error"].tolist()


LEAKY_TEXT = {
    # a repeated identifying keyword: both values are quoted
    "repeated $SRC": b"/$SRC/PHIfirstPatient/$SRC/PHIsecondPatient/",
    # a lost keyword name: the value after it is quoted
    "empty keyword name": b"/ /PHIfirstPatient/",
    # a lost value shifts names and values: the last value is quoted as a 'keyword'
    "odd number of fields": b"/$SRC/PHIfirstPatient/PHIsecondPatient/",
}


@pytest.mark.parametrize("case", sorted(LEAKY_TEXT))
def test_malformed_text_errors_do_not_quote_values(tmp_path: Path, case: str) -> None:
    from conftest_fcs_helpers import build_fcs, encode_text, standard_keywords

    kw = standard_keywords(["FSC-A", "SSC-A"], 2)
    text = encode_text(kw)[:-1] + LEAKY_TEXT[case]
    bad = tmp_path / "broken.fcs"
    bad.write_bytes(build_fcs(kw, np.zeros((2, 2), "<f4").tobytes(), text=text))
    with pytest.raises(FCSFormatError) as info:
        read_flow(bad)
    assert str(bad) in str(info.value)
    assert "PHIfirstPatient" not in str(info.value), str(info.value)
    assert "PHIsecondPatient" not in str(info.value), str(info.value)


# --------------------------------------------------------------------------- servers
_ANY_INTERFACE = "0.0." + "0.0"  # written split so this file does not match itself
_LOCAL = {"127.0.0.1", "localhost", "::1"}


def _project_text_files() -> list[Path]:
    out = []
    for sub in ("src", "scripts", "docs", "notebooks", "configs", "tests", "benchmarks"):
        base = ROOT / sub
        if base.is_dir():
            out += [
                p
                for p in base.rglob("*")
                if p.is_file()
                and p.suffix
                in {".py", ".sh", ".md", ".ipynb", ".yaml", ".yml", ".toml", ".cfg", ".txt"}
            ]
    out += [p for p in (ROOT / "README.md", ROOT / "pyproject.toml") if p.is_file()]
    return out


def test_servers_bind_to_localhost() -> None:
    files = _project_text_files()
    assert len(files) > 10
    wide = [
        str(p.relative_to(ROOT)) for p in files if _ANY_INTERFACE in p.read_text(errors="replace")
    ]
    assert wide == [], f"binds to all interfaces: {wide}"
    hosts: list[tuple[str, str]] = []
    for p in files:
        text = p.read_text(errors="replace")
        for m in re.finditer(r"--host[= ]+[\"']?([^\s\"'\\`;,)]+)", text):
            hosts.append((str(p.relative_to(ROOT)), m.group(1)))
        for m in re.finditer(r"\bhost\s*=\s*[\"']([^\"']*)[\"']", text):
            hosts.append((str(p.relative_to(ROOT)), m.group(1)))
    bad = []
    for where, value in hosts:
        if value in _LOCAL:
            continue
        var = re.fullmatch(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}?", value)
        if var:
            text = (ROOT / where).read_text(errors="replace")
            default = var.group(2)
            assigned = re.findall(rf"^\s*{var.group(1)}=[\"']?([^\s\"']+)", text, re.M)
            if (default in _LOCAL) or (
                assigned and all(a in _LOCAL or a.startswith("${") for a in assigned)
            ):
                continue
        bad.append((where, value))
    print(f"\nhost settings checked: {len(hosts)} ({sorted({h for _, h in hosts})})")
    assert bad == [], bad


def test_default_tracking_store_is_local() -> None:
    from blinaprofile.settings import Settings

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    code = "from blinaprofile.settings import settings; print(settings.tracking_uri)"
    r = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert r.stdout.strip().startswith("sqlite:///")
    assert Settings  # the class is importable for users who build their own
