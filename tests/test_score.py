"""Scoring one sample: result, uncertainty interval, abstention, provenance, privacy, CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from blinaprofile.config import QCConfig
from blinaprofile.errors import ModelError
from blinaprofile.io.files import file_checksum
from blinaprofile.models.runtime import call_state
from blinaprofile.scoring.score import (
    CALL_STATES,
    NO_CALL,
    RESULT_COLUMNS,
    UNCERTAIN,
    score_features,
    score_sample,
)
from conftest_scoring_helpers import scoring_model, set_tracking, write_fcs_like

IDENTIFYING = {
    "$SRC": "DOE^JANE",
    "$OP": "Operator Smith",
    "$DATE": "02-MAR-2026",
    "$FIL": "MRN1234567_DOE_JANE.fcs",
    "PATIENT_NAME": "Jane Doe",
}


@pytest.fixture(scope="module")
def sm(tmp_path_factory):
    return scoring_model(tmp_path_factory)


@pytest.fixture(scope="module")
def new_files(sm) -> list[Path]:
    return sorted((sm.new_cohort / "fcs").glob("*.fcs"))


@pytest.fixture(scope="module")
def identifying_file(sm, new_files, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ident")
    return write_fcs_like(new_files[0], d / "MRN1234567_DOE_JANE.fcs", keywords=IDENTIFYING)


def _strings_in(obj) -> str:
    return json.dumps(obj)


def visible_text(html: str) -> str:
    """The report without its base64 images (random letters there could match anything)."""
    return re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,", html)


def test_score_result_is_complete_and_pseudonymous(sm, identifying_file):
    res = score_sample(identifying_file, model=str(sm.model_dir))
    sha = file_checksum(identifying_file)
    assert res.sample_id == f"S-{sha[:12]}"
    assert res.input["sha256"] == sha and res.input["sample_id_source"] == "checksum"
    assert res.input["gating_strategy"] == "default-tcell" and res.input["panel"]
    assert 0.0 <= res.probability <= 1.0
    assert res.probability_low is not None and res.probability_high is not None
    assert res.probability_low <= res.probability <= res.probability_high
    assert res.qc_pass and res.qc["verdict"] == "PASS"
    assert {c["metric"] for c in res.qc["counts"]} == {
        "n_events",
        "n_live",
        "n_cd3",
        "n_cd4",
        "n_cd8",
    }
    assert res.qc["thresholds"]["ood_max_z"] == res.qc["ood_max_z"] > 0
    assert len(res.top_features) == 5
    contribs = [abs(float(t["contribution"])) for t in res.top_features]
    assert contribs == sorted(contribs, reverse=True)
    # an exported folder remembers its registry entry
    assert res.model["family"] == "logreg_l2" and res.model["version"].isdigit()
    assert res.model["name"] == "scoring-test-model"
    # an exported folder names the version it holds, never an alias that may have moved
    assert res.model["alias"] is None
    assert res.gating["counts"]["cd8"] > 0 and "cd8" in res.gating["percent_of_parent"]
    # nothing identifying reaches the result
    text = _strings_in(res.as_dict()) + res.summary() + json.dumps(res.to_row(), default=str)
    for value in [*IDENTIFYING.values(), identifying_file.name, identifying_file.stem, "MRN"]:
        assert value not in text, value
    print(f"\n{res.summary()}")


def test_interval_comes_from_model_refits_and_is_stable(sm, new_files):
    a = score_sample(new_files[1], model=str(sm.model_dir), sample_id="X1")
    b = score_sample(new_files[1], model=str(sm.model_dir), sample_id="X1")
    assert a.interval["method"] == "model"
    assert (a.probability_low, a.probability_high) == (b.probability_low, b.probability_high)
    assert a.probability_high - a.probability_low > 0.0
    assert a.interval["description"]
    print(
        f"\ninterval ({a.interval['method']}): p={a.probability:.3f} [{a.probability_low:.3f}, {a.probability_high:.3f}]"
    )


def test_new_cohort_mostly_called_and_every_call_says_why(sm, new_files):
    results = [score_sample(f, model=str(sm.model_dir)) for f in new_files]
    called = [r for r in results if r.call != NO_CALL]
    for r in results:
        assert r.call in CALL_STATES and r.call_reason, r
        if r.call == NO_CALL:
            assert r.reasons, r
        elif r.call != UNCERTAIN:
            assert r.call == ("responder" if r.probability >= r.threshold else "nonresponder")
            assert not r.reasons and r.qc_pass
            # a label only when the interval lies on one side of the threshold
            assert not r.probability_low < r.threshold <= r.probability_high
    print(
        f"\n{len(called)}/{len(results)} new samples scored: "
        f"{[(r.call, r.call_reason) for r in results]}"
    )
    assert len(called) >= len(results) // 2


def test_too_few_events_is_no_call(sm, new_files, tmp_path):
    f = write_fcs_like(new_files[0], tmp_path / "short.fcs", n_events=3000)
    res = score_sample(f, model=str(sm.model_dir), sample_id="short")
    assert res.call == NO_CALL and not res.qc_pass
    assert any("events" in r and "< 5000" in r for r in res.reasons), res.reasons
    failing = [c for c in res.qc["counts"] if not c["pass"]]
    assert failing and failing[0]["metric"] == "n_events" and failing[0]["value"] == 3000


def test_panel_mismatch_is_no_call_not_a_crash(sm, new_files, tmp_path):
    f = write_fcs_like(new_files[0], tmp_path / "no_ccr7.fcs", drop_marker="CCR7")
    res = score_sample(f, model=str(sm.model_dir), sample_id="nopanel")
    assert res.call == NO_CALL and res.probability is None and not res.qc_pass
    assert len(res.reasons) == 1 and res.reasons[0].startswith(
        "panel mismatch: missing marker(s) CCR7"
    )
    assert str(tmp_path) not in res.reasons[0]


def test_out_of_distribution_is_uncertain_with_threshold_reported(sm):
    table = pd.read_csv(sm.features_csv)
    row = table.iloc[0].to_dict()
    row.update(sample_id="ood", qc_pass=True, qc_reasons="")
    base = score_features(row, model=str(sm.model_dir))
    weird = dict(row, cd8_em_pct_cd8=99.0, cd4_treg_pct_cd4=60.0)
    res = score_features(weird, model=str(sm.model_dir))
    assert res.call == UNCERTAIN and res.qc_pass
    assert (
        len(res.reasons) == 1 and "outside the training cohort (|robust z| > 4)" in res.reasons[0]
    )
    assert res.call_reason.startswith(res.reasons[0])
    assert "cd8_em_pct_cd8" in res.reasons[0] and abs(res.ood_z["cd8_em_pct_cd8"]) > 4
    assert res.probability is not None  # computed, but no label is given
    # the limit is configurable: a looser one leaves only the interval to decide
    loose = score_features(weird, model=str(sm.model_dir), qc=QCConfig(ood_max_z=1e6))
    assert loose.qc["ood_max_z"] == 1e6 and not loose.reasons
    expected = call_state(
        loose.probability, loose.probability_low, loose.probability_high, loose.threshold
    )
    assert (loose.call, loose.call_reason) == (expected.state, expected.reason)
    print(
        f"\nOOD: in-cohort max|z| {max(abs(v) for v in base.ood_z.values()):.1f}; "
        f"shifted sample {res.reasons[0]}"
    )


def test_gate_flag_is_no_call(sm):
    table = pd.read_csv(sm.features_csv)
    row = table.iloc[1].to_dict()
    row.update(
        sample_id="flag",
        qc_pass=False,
        qc_reasons="adaptive gate cd8:CD8:min could not be placed (confidence 0.21 < 0.5)",
    )
    res = score_features(row, model=str(sm.model_dir))
    assert res.call == NO_CALL and not res.qc_pass
    assert res.reasons == ["adaptive gate cd8:CD8:min could not be placed (confidence 0.21 < 0.5)"]


def test_registry_alias_gives_name_version_alias(sm, new_files, monkeypatch):
    set_tracking(monkeypatch, sm.tracking_uri)
    a = score_sample(new_files[2], model=sm.alias_uri, sample_id="reg")
    b = score_sample(new_files[2], model=str(sm.model_dir), sample_id="reg")
    assert a.model["name"] == sm.registered and a.model["alias"] == "champion"
    assert a.model["version"] == "1"
    assert a.probability == pytest.approx(b.probability)
    row = a.to_row()
    assert list(row) == list(RESULT_COLUMNS)
    assert (row["model_name"], row["model_version"], row["model_alias"]) == (
        sm.registered,
        "1",
        "champion",
    )


def test_cli_score_writes_report_json_and_summary(sm, identifying_file, tmp_path, capsys):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "blinaprofile",
            "score",
            str(identifying_file),
            "--model",
            str(sm.model_dir),
            "--out-dir",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    sid = f"S-{file_checksum(identifying_file)[:12]}"
    html = tmp_path / "out" / f"{sid}.report.html"
    js = tmp_path / "out" / f"{sid}.score.json"
    assert html.is_file() and js.is_file()
    d = json.loads(js.read_text())
    assert d["sample_id"] == sid and d["call"] in CALL_STATES and d["call_reason"]
    assert out.stdout.startswith(f"call          {d['call']} ({d['call_reason']})\n")
    assert "probability" in out.stdout and sid in out.stdout
    for text in (out.stdout, js.read_text(), visible_text(html.read_text())):
        for value in [*IDENTIFYING.values(), identifying_file.name, "MRN"]:
            assert value not in text
    # --json prints the same result on stdout (in-process, to spare a second start-up)
    from blinaprofile.cli import main

    capsys.readouterr()
    assert (
        main(
            ["score", str(identifying_file), "--model", str(sm.model_dir), "--json", "--no-report"]
        )
        == 0
    )
    d2 = json.loads(capsys.readouterr().out)
    assert d2["probability"] == pytest.approx(d["probability"])
    assert d2["probability_low"] == pytest.approx(d["probability_low"])


def test_cli_score_unreadable_file_is_one_line_error(sm, tmp_path):
    bad = tmp_path / "broken.fcs"
    bad.write_bytes(b"FCS3.1    garbage")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "blinaprofile",
            "score",
            str(bad),
            "--model",
            str(sm.model_dir),
            "--no-report",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.fcs" in lines[0]


def test_single_cell_sample_is_scored_with_its_own_qc(sm, tmp_path):
    import anndata as ad

    from blinaprofile.config import SimulationConfig, load_config
    from blinaprofile.scoring.report import write_report
    from blinaprofile.simulate.singlecell import simulate_single_cell_cohort

    sim = load_config(
        SimulationConfig, Path(__file__).parents[1] / "configs/simulation/default.yaml"
    )
    h5 = simulate_single_cell_cohort(
        sim.model_copy(update={"n_patients": 2}),
        tmp_path,
        n_cells_per_sample=3000,
        n_genes=600,
        seed=5,
    )
    a = ad.read_h5ad(h5)
    first = a.obs["sample_id"].iloc[0]
    one = tmp_path / "one.h5ad"
    a[a.obs["sample_id"] == first].copy().write_h5ad(one)
    # the model was trained on flow cytometry: refused unless asked for, then uncertain at best
    with pytest.raises(ModelError, match="trained on flow cytometry; this sample is single-cell"):
        score_sample(one, model=str(sm.model_dir))
    res = score_sample(one, model=str(sm.model_dir), keep_gating=True, allow_other_modality=True)
    assert res.modality == "single_cell" and res.sample_id == f"S-{file_checksum(one)[:12]}"
    assert res.probability is not None and res.call in {UNCERTAIN, NO_CALL}
    assert all(c["minimum"] is None and c["pass"] is None for c in res.qc["counts"])
    assert res.qc_pass == (res.qc["verdict"] == "PASS")
    html = write_report(res, tmp_path / "sc.html").read_text()
    assert "single-cell QC" in html and "annotated, not gated" in html
    print(f"\nsingle-cell sample: {res.call}, p={res.probability:.3f}, reasons {res.reasons}")
