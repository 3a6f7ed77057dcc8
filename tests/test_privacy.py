"""Privacy: identifying FCS keywords never reach any output, and servers stay local.

The end-to-end test writes FCS files whose identifying TEXT keywords ($SRC, $FIL, $SMNO,
$PROJ, $OP, $DATE, PATIENT NAME, MRN, DOB...) hold unique sentinel strings, runs the
pipeline through the CLI (simulate -> featurize -> train with a temporary MLflow SQLite
store -> score with report -> gate -> score-batch) and searches every file it produced
(the SQLite database, MLflow artifacts, zip/skops/Parquet/HDF5 contents, reports,
captured stdout/stderr) for the sentinels.

The ``leaks`` tests keep each leak of issue 11 as an attack: files named like patients,
free-text ``$PnS`` labels ("Johnny Smith CD3"), a value merged into ``$PnS`` by an empty
TEXT keyword name, and ``mrn``/``patient_name`` manifest columns, through ``gate --h5ad``,
``featurize``, ``score --json`` and ``score-batch``, by default (nothing found) and with
``--keep-file-names``/``--keep-column`` (exactly what was asked comes back).
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
from blinaprofile.gating.panel import is_known_marker, marker_label
from blinaprofile.io.fcs import read_fcs
from blinaprofile.io.fcs_write import write_fcs
from blinaprofile.io.privacy import (
    DECLARED_MANIFEST_COLUMNS,
    REDACTED_MARKER,
    file_pseudonym,
    identifying_values,
    is_identifying,
    is_safe_keyword,
    manifest_columns,
    redact_markers,
    safe_metadata,
    scan_for_strings,
    select_keywords,
    withhold_file_name,
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
promotion: {min_auc_ci_low: null, max_perm_pvalue: null}
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


# --------------------------------------------------------------------------- $PnS labels
@pytest.mark.parametrize(
    ("label", "shown"),
    [
        ("", ""),
        ("CD3", "CD3"),
        ("CD197 (CCR7)", "CD197 (CCR7)"),  # the active panel's spelling
        ("Live/Dead Aqua", "Live/Dead Aqua"),  # a synonym
        ("tim-3", "tim-3"),
        ("CD57", "CD57"),  # a CD antigen
        ("CD45RO", "CD45RO"),
        ("FSC-A", "FSC-A"),  # the same as a channel name: nothing new
        ("John Smith CD3", "CD3"),  # contains one known marker: shown as that marker
        ("CD3 Иван Петров", "CD3"),  # non-ASCII letters are never shown
        ("John Smith", "<unrecognised $P2S>"),
        ("MRN 12345678", "<unrecognised $P2S>"),
        ("CD3/PHIvalue", "<unrecognised $P2S>"),  # a value merged into $PnS (see below)
        ("HLA-DR", "<unrecognised $P2S>"),  # not known unless declared
    ],
)
def test_marker_labels_that_may_leave_the_reader(label: str, shown: str) -> None:
    channels = ["FSC-A", "BV421-A"]
    assert redact_markers(channels, ["", label]) == ["", shown]
    # redaction is idempotent
    assert redact_markers(channels, ["", shown]) == ["", shown]


def test_declared_markers_are_kept_verbatim() -> None:
    channels = ["FSC-A", "PE-A"]
    assert redact_markers(channels, ["", "HLA-DR"], declared=["HLA-DR"]) == ["", "HLA-DR"]
    assert is_known_marker("hla dr", declared=["HLA-DR"])
    assert not is_known_marker("Jane Roe")
    assert marker_label("Jane Roe CD8a") == "CD8"
    assert REDACTED_MARKER.format(index=7) == "<unrecognised $P7S>"


def _relabel(src: Path, dst: Path, relabel: dict[str, str]) -> Path:
    """A copy of an FCS file whose ``$PnS`` labels are replaced (by their old value)."""
    d = read_fcs(src)
    write_fcs(
        dst,
        d.events,
        channels=d.channels,
        markers=[relabel.get(m, m) for m in d.markers],
        spillover=d.spillover,
    )
    return dst


def test_redacted_labels_gate_exactly_like_the_original(small_cohort: Any, tmp_path: Path) -> None:
    from blinaprofile.gating.strategy import load_strategy

    src = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    f = _relabel(src, tmp_path / "x.fcs", {"CD3": "Jane Roe CD3", "CD19": "Jane Roe MRN 1"})
    raw, safe = read_fcs(f), read_flow(f)
    assert "Jane Roe CD3" in raw.markers and "Jane Roe MRN 1" in raw.markers
    i, j = raw.markers.index("Jane Roe CD3"), raw.markers.index("Jane Roe MRN 1")
    assert safe.markers[i] == "CD3" and safe.markers[j] == f"<unrecognised $P{j + 1}S>"
    assert safe.keywords[f"$P{i + 1}S"] == "CD3"
    assert "Jane" not in json.dumps(safe.keywords) + json.dumps(safe_metadata(safe, sample_id="S"))
    tree = load_strategy()
    assert (
        tree.bind(raw.channels, raw.markers).channel_map()
        == tree.bind(safe.channels, safe.markers).channel_map()
    )
    # opting in keeps every label; a declared label is kept verbatim
    assert read_flow(f, keep_identifiers=True).markers == raw.markers
    assert read_flow(f, declared_markers=["Jane Roe MRN 1"]).markers[j] == "Jane Roe MRN 1"


def test_panel_mismatch_message_never_quotes_free_text(small_cohort: Any) -> None:
    """Even given raw labels (read_fcs, not read_flow), the message redacts them."""
    from blinaprofile.errors import PanelMismatchError
    from blinaprofile.gating.panel import resolve_markers

    src = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    d = read_fcs(src)
    markers = [
        "Jane Roe CD3" if m == "CD3" else "Jane Roe" if m == "CD19" else m for m in d.markers
    ]
    with pytest.raises(PanelMismatchError) as info:
        resolve_markers(["CD3", "HLADR"], d.channels, markers, path="x.fcs")
    msg = str(info.value)
    assert "missing marker(s) HLADR" in msg and "'CD3'" in msg and "<unrecognised $P" in msg
    assert "Jane" not in msg and "Roe" not in msg


# --------------------------------------------------------------------------- file names
def test_withhold_file_name_and_pseudonym(tmp_path: Path) -> None:
    f = tmp_path / "Roe_Jane_MRN123.fcs"
    f.write_bytes(b"x")
    label = file_pseudonym(f)
    assert re.fullmatch(r"S-[0-9a-f]{12}", label)
    assert file_pseudonym(tmp_path / "absent.fcs") == ""
    msg = f"{f}: not an FCS file (Roe_Jane_MRN123.fcs)"
    assert withhold_file_name(msg, f, label=label) == f"{label}: not an FCS file ({label})"
    assert withhold_file_name("no file here", f, label=label) == "no file here"


def test_manifest_columns_are_declared_or_named() -> None:
    cols = ["sample_id", "file", "mrn", "response", "patient_name", "path", "batch", "site"]
    kept, dropped = manifest_columns(cols)
    assert kept == ["sample_id", "response", "batch"]
    assert dropped == ["mrn", "patient_name", "site"]  # file and path are inputs, not dropped
    kept, dropped = manifest_columns(cols, keep=["Site"], keep_file_names=True)
    assert kept == ["sample_id", "file", "response", "batch", "site"]
    assert dropped == ["mrn", "patient_name"]
    assert set(DECLARED_MANIFEST_COLUMNS) == {
        "sample_id",
        "patient_id",
        "response",
        "timepoint",
        "batch",
    }


# --------------------------------------------------------------------------- leaks end to end
def _merged_text_fcs(src: Path, dst: Path, after_key: str, value: str, sentinel: str) -> Path:
    """A copy of ``src`` whose TEXT has an empty keyword name after ``after_key``'s value.

    ``/KEY/VALUE//SENTINEL/``: the reader undoubles ``//`` and the value after the empty
    keyword name becomes part of ``KEY``'s value (``'VALUE/SENTINEL'``).
    """
    from conftest_fcs_helpers import build_fcs, encode_text

    d = read_fcs(src)
    layout = {"$BEGINDATA", "$ENDDATA", "$BEGINSTEXT", "$ENDSTEXT"}
    kw = {k: v for k, v in d.keywords.items() if k not in layout}
    text = encode_text(kw)
    old = f"/{after_key}/{value}/".encode()
    assert text.count(old) == 1, (after_key, value)
    text = text.replace(old, f"/{after_key}/{value}//{sentinel}/".encode())
    dst.write_bytes(build_fcs(kw, np.ascontiguousarray(d.events, "<f4").tobytes(), text=text))
    return dst


def _cli_logged(args: list[str], logs: Path) -> tuple[int, str, str]:
    """Run the CLI in this process; keep its stdout and stderr as a log file."""
    import contextlib
    import io

    from blinaprofile.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    n = len(list(logs.glob("*.log")))
    # the command line itself (which names the input files) is not part of the log
    (logs / f"{n:02d}_{args[0]}.log").write_text(
        f"--- stdout\n{out.getvalue()}\n--- stderr\n{err.getvalue()}\n"
    )
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def leaks(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Patient-named files and free-text ``$PnS`` through gate/featurize/score/score-batch.

    Inputs: ``A`` (named like a patient; ``$PnS`` of CD3 = ``'Johnny<tok> Smith CD3'``,
    of CD19 = an MRN and a name), ``B`` (named like a patient, TIM-3 dropped: a panel
    mismatch whose reason lists the file's labels; CD3 labelled with a name), ``C`` (an
    empty TEXT keyword name after ``$PnS`` of CD3 merges a sentinel into that label), ``D``
    (named like a patient, not an FCS file: an error row) and a manifest with ``mrn`` and
    ``patient_name`` columns. Every command runs once by default and once with the opt-ins.
    """
    from conftest_scoring_helpers import scoring_model, write_fcs_like

    sm = scoring_model(tmp_path_factory)
    root = tmp_path_factory.mktemp("leaks")
    inputs = root / "inputs"
    inputs.mkdir()
    tok = secrets.token_hex(3)
    files = sorted((sm.new_cohort / "fcs").glob("*.fcs"))
    person = {"A": f"Johnny{tok} Smith", "B": f"Marge{tok} Brown", "A19": f"Ida{tok} Grant"}
    names = {
        "A": f"Roe{tok}_Janet_DOB19700101.fcs",
        "B": f"Doe{tok}_John.fcs",
        "C": f"Kay{tok}_Mary.fcs",
        "D": f"Poe{tok}_Edgar.fcs",
    }
    mrn = {k: f"MRN{tok}{i}" for i, k in enumerate("ABCD")}
    a = _relabel(
        files[0],
        inputs / names["A"],
        {"CD3": f"{person['A']} CD3", "CD19": f"{mrn['A']} {person['A19']}"},
    )
    # no CD8: a required marker (TIM3, CD3... are optional for pre-gated exports)
    no_cd8 = write_fcs_like(files[1], root / "no_cd8.fcs", drop_marker="CD8")
    b = _relabel(no_cd8, inputs / names["B"], {"CD3": f"{person['B']} CD3"})
    merged = f"PHImerged{tok}"
    cd3 = f"$P{read_fcs(files[2]).markers.index('CD3') + 1}S"
    c = _merged_text_fcs(files[2], inputs / names["C"], cd3, "CD3", merged)
    d = inputs / names["D"]
    d.write_bytes(b"this is not a flow cytometry file\n" * 20)
    manifest = inputs / "manifest.csv"
    pd.DataFrame(
        {
            "sample_id": ["A1", "B1", "C1", "D1"],
            "patient_id": ["P1", "P2", "P3", "P4"],
            "file": [names[k] for k in "ABCD"],
            "response": ["responder", "nonresponder", "responder", "nonresponder"],
            "mrn": [mrn[k] for k in "ABCD"],
            "patient_name": [person["A"], person["B"], "Mary Kay", "Edgar Poe"],
        }
    ).to_csv(manifest, index=False)
    model = ["--model", str(sm.model_dir)]
    runs: dict[str, dict[str, Any]] = {}
    for mode, opt in (("default", []), ("optin", ["--keep-file-names"])):
        out, logs = root / mode, root / f"{mode}_logs"
        out.mkdir()
        logs.mkdir()
        keep_col = ["--keep-column", "mrn"] if opt else []
        steps = {
            "gate": ["gate", str(a), "--h5ad", str(out / "gated.h5ad"), *opt],
            "featurize": [
                *("featurize", "--manifest", str(manifest), "--out", str(out / "features.csv")),
                *("--jobs", "1", *opt, *keep_col),
            ],
            "score_b": ["score", str(b), *model, "--json", "--out-dir", str(out), *opt],
            "score_c": ["score", str(c), *model, "--json", "--out-dir", str(out), *opt],
            "batch": [
                *("score-batch", "--manifest", str(manifest), *model, "--out", str(out / "batch")),
                *("--jobs", "1", "--no-progress", *opt),
            ],
        }
        runs[mode] = {k: _cli_logged(args, logs) for k, args in steps.items()}
    return {
        "root": root,
        "inputs": inputs,
        "runs": runs,
        "names": names,
        "person": person,
        "mrn": mrn,
        "merged": merged,
        "files": {"A": a, "B": b, "C": c, "D": d},
    }


def _file_needles(leaks: dict[str, Any]) -> list[str]:
    return [Path(n).stem for n in leaks["names"].values()]


def _content_needles(leaks: dict[str, Any]) -> list[str]:
    """Names in ``$PnS``, manifest MRNs and patient names, the merged TEXT value."""
    return [*leaks["person"].values(), *leaks["mrn"].values(), leaks["merged"]]


def test_patient_names_reach_no_output_by_default(leaks: dict[str, Any]) -> None:
    root = leaks["root"]
    needles = [*_file_needles(leaks), *_content_needles(leaks)]
    # positive control: every needle is in the inputs, and the scanner sees it there
    assert {f.needle for f in scan_for_strings(leaks["inputs"], needles)} == set(needles)
    outputs = [root / "default", root / "default_logs"]
    findings = scan_for_strings(outputs, needles)
    n_files = sum(1 for o in outputs for p in o.rglob("*") if p.is_file())
    print(f"\n{len(needles)} names x {n_files} output files (h5ad, CSV, Parquet, JSON...)")
    assert findings == [], "\n".join(str(f) for f in findings[:20])


def test_each_leak_is_closed_with_the_sample_named_instead(leaks: dict[str, Any]) -> None:
    runs, out, files = leaks["runs"]["default"], leaks["root"] / "default", leaks["files"]
    # gate --h5ad: uns['sample_id'] is the pseudonym; $PnS labels are known markers only
    code, stdout, _ = runs["gate"]
    assert code == 0
    g = ad.read_h5ad(out / "gated.h5ad")
    assert g.uns["sample_id"] == file_pseudonym(files["A"])
    assert stdout.startswith(f"{g.uns['sample_id']}: ")
    markers = dict(zip(g.var["channel"], g.var["marker"], strict=True))
    assert markers["BUV395-A"] == "CD3" and markers["APC-H7-A"].startswith("<unrecognised $P")
    # featurize: no file column, undeclared manifest columns dropped and said so, the error
    # row names the sample
    code, _, stderr = runs["featurize"]
    assert code == 1  # D1 is not an FCS file
    feats = pd.read_csv(out / "features.csv", keep_default_na=False)
    assert {"file", "mrn", "patient_name"}.isdisjoint(feats.columns)
    assert (
        "dropped manifest column(s) not declared: mrn, patient_name (use --keep-column to keep one)"
    ) in stderr
    err = feats.set_index("sample_id")["error"]
    assert err["D1"].startswith("D1: not an FCS file"), err["D1"]
    assert "panel mismatch" not in err["B1"]  # featurize reports it as an error row
    assert "'CD3'" in err["B1"] and "CD8" in err["B1"]
    # C1's CD3 label is unreadable: CD3 is optional, so it is featurized without a CD3 gate
    # and says so; the merged text never appears
    c1 = feats.set_index("sample_id").loc["C1"]
    assert c1["error"] == "" and "no CD3 channel" in c1["warnings"], c1.to_dict()
    # score --json: the panel-mismatch reason lists known markers only
    for key, label in (("score_b", "'CD3'"), ("score_c", "<unrecognised $P")):
        code, stdout, _ = runs[key]
        assert code == 0
        res = json.loads(stdout)
        assert res["call"] == "no call" and res["reasons"][0].startswith("panel mismatch")
        assert label in res["reasons"][0], res["reasons"]
        assert re.fullmatch(r"S-[0-9a-f]{12}", res["sample_id"])
    # score-batch: error rows and stderr name the sample
    code, _, stderr = runs["batch"]
    assert code == 1
    res = pd.read_csv(out / "batch" / "results.csv", keep_default_na=False).set_index("sample_id")
    assert res.loc["D1", "call"] == "error" and res.loc["D1", "error"].startswith("D1: ")
    assert "error: D1: not an FCS file" in stderr
    assert res.loc["B1", "call"] == "no call" and "'CD3'" in res.loc["B1", "reasons"]


def test_opt_ins_bring_back_what_was_asked_and_nothing_else(leaks: dict[str, Any]) -> None:
    runs, out, names = leaks["runs"]["optin"], leaks["root"] / "optin", leaks["names"]
    stem = {k: Path(n).stem for k, n in names.items()}
    g = ad.read_h5ad(out / "gated.h5ad")
    assert g.uns["sample_id"] == stem["A"]
    assert runs["gate"][1].startswith(f"{stem['A']}: ")
    feats = pd.read_csv(out / "features.csv", keep_default_na=False).set_index("sample_id")
    assert list(feats["file"]) == [names[k] for k in "ABCD"]
    assert list(feats["mrn"]) == [leaks["mrn"][k] for k in "ABCD"]
    assert "patient_name" not in feats.columns  # not named: still dropped
    assert names["D"] in feats.loc["D1", "error"]
    assert json.loads(runs["score_b"][1])["sample_id"] == stem["B"]
    res = pd.read_csv(out / "batch" / "results.csv", keep_default_na=False).set_index("sample_id")
    assert names["D"] in res.loc["D1", "error"]
    assert names["D"] in runs["batch"][2]
    # file names and the named column are back; free-text labels are not (no CLI opt-in)
    found = {
        f.needle
        for f in scan_for_strings(
            [out, leaks["root"] / "optin_logs"], [*_file_needles(leaks), *_content_needles(leaks)]
        )
    }
    assert {stem["A"], stem["B"], stem["D"], *[leaks["mrn"][k] for k in "ABCD"]} <= found
    assert found.isdisjoint([*leaks["person"].values(), leaks["merged"]]), found


def test_featurize_files_names_samples_by_pseudonym_unless_opted_in(
    small_cohort: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blinaprofile.cli import main

    srcs = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[:2]
    files = []
    for i, src in enumerate(srcs):
        files.append(tmp_path / f"Roe_Jane_MRN55500{i}.fcs")
        files[-1].write_bytes(src.read_bytes())
    out = tmp_path / "f.csv"
    assert main(["featurize", *map(str, files), "--out", str(out), "--jobs", "1"]) == 0
    table = pd.read_csv(out, keep_default_na=False)
    assert list(table["sample_id"]) == [file_pseudonym(f) for f in files]
    assert list(table["patient_id"]) == list(table["sample_id"])
    assert "Roe_Jane" not in out.read_text() + capsys.readouterr().out
    assert main(["featurize", *map(str, files), "--out", str(out), "--keep-file-names"]) == 0
    assert list(pd.read_csv(out)["sample_id"]) == [f.stem for f in files]
    # the same file twice is one sample: refused rather than merged
    with pytest.raises(SystemExit) as info:  # a usage error
        main(["featurize", str(files[0]), str(files[0]), "--out", str(out)])
    assert info.value.code == 2
    assert "the same sample is given more than once" in capsys.readouterr().err


def test_fcs_errors_do_not_quote_a_value_merged_by_an_empty_keyword(
    small_cohort: Any, tmp_path: Path
) -> None:
    src = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    f = _merged_text_fcs(src, tmp_path / "m.fcs", "$P1B", "32", "PHImergedB")
    with pytest.raises(FCSFormatError) as info:
        read_flow(f)
    assert "PHImergedB" not in str(info.value), str(info.value)


@pytest.mark.xfail(
    strict=True,
    reason="a value merged into $PnN by an empty keyword name is kept as the channel name "
    "(channel names are trusted as technical); io/fcs.py must refuse or flag it",
)
def test_a_value_merged_into_a_channel_name_is_not_listed(
    small_cohort: Any, tmp_path: Path
) -> None:
    from blinaprofile.errors import PanelMismatchError
    from blinaprofile.gating.strategy import load_strategy

    src = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    f = _merged_text_fcs(src, tmp_path / "n.fcs", "$P2N", "FSC-A", "PHImergedN")
    data = read_flow(f)
    with pytest.raises(PanelMismatchError) as info:
        load_strategy().bind(data.channels, data.markers)
    assert "PHImergedN" not in str(info.value)


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
