"""Issue 14: calls that say how sure they are.

Every output shows one of four states, decided by one function
(:func:`blinaprofile.models.runtime.call_state`), with the reason:

- ``responder`` / ``nonresponder``: the 95% interval lies on one side of the threshold;
- ``uncertain``: the interval straddles the threshold, or the sample is outside the model's
  training distribution (features far from the training cohort, another modality);
- ``no call``: QC failed, or a model feature is missing.

The states are produced on real outputs of the shipped model (``models/default``, trained on
simulated flow data) for simulated samples: a normal one, a short one (too few events), the
normal one with a threshold inside its interval, one from a shifted scenario, and a single-cell
one; through ``score --json`` (and the summary), the HTML report's badge, ``score-batch``'s
``results.csv`` and the REST predict of the packaged model.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from blinaprofile.cli import main
from blinaprofile.errors import ModelError
from blinaprofile.models.runtime import (
    CALL_STATES,
    NO_CALL,
    NONRESPONDER,
    RESPONDER,
    UNCERTAIN,
    call_state,
)
from conftest_scoring_helpers import scoring_model, write_fcs_like

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"
CONFIGS = ROOT / "configs"
LABELS = {RESPONDER, NONRESPONDER}


# --------------------------------------------------------------------------- the decision
@pytest.mark.parametrize(
    ("args", "kwargs", "state", "reason"),
    [
        ((0.9, 0.8, 0.95, 0.5), {}, RESPONDER, "probability 0.900 >= threshold 0.500; 95%"),
        ((0.1, 0.05, 0.2, 0.5), {}, NONRESPONDER, "probability 0.100 < threshold 0.500; 95%"),
        # the interval holds values on both sides of `probability >= threshold`
        ((0.6, 0.3, 0.8, 0.5), {}, UNCERTAIN, "95% interval 0.300-0.800 straddles the thr"),
        ((0.6, 0.3, 0.5, 0.5), {}, UNCERTAIN, "95% interval 0.300-0.500 straddles"),
        # an interval starting at the threshold is all responder
        ((0.7, 0.5, 0.9, 0.5), {}, RESPONDER, "probability 0.700 >= threshold 0.500"),
        ((0.7, None, None, 0.5), {}, RESPONDER, "probability 0.700 >= threshold 0.500; the"),
        ((0.7, np.nan, np.nan, 0.5), {}, RESPONDER, "probability 0.700 >= threshold 0.500; the"),
        ((0.9, 0.8, 0.95, 0.5), {"ood": ["far away"]}, UNCERTAIN, "far away"),
        ((0.6, 0.3, 0.8, 0.5), {"ood": ["far"]}, UNCERTAIN, "far; 95% interval 0.300-0.800"),
        (
            (0.9, 0.8, 0.95, 0.5),
            {"qc_failures": ["few", "cells"]},
            NO_CALL,
            "QC failed: few; cells",
        ),
        (
            (None, None, None, 0.5),
            {"missing": ["a", "b"]},
            NO_CALL,
            "model feature(s) a, b missing",
        ),
        ((np.nan, np.nan, np.nan, 0.5), {}, NO_CALL, "no probability could be computed"),
        # QC outranks everything else
        ((0.9, 0.8, 0.95, 0.5), {"qc_failures": ["q"], "ood": ["o"]}, NO_CALL, "QC failed: q"),
    ],
)
def test_call_state_decides_every_state(args, kwargs, state, reason):
    got = call_state(*args, **kwargs)
    assert got.state == state and got.state in CALL_STATES
    assert got.reason.startswith(reason), got.reason


# --------------------------------------------------------------------------- samples
@dataclass(frozen=True)
class Samples:
    normal: Path  # labelled by the shipped model at its own threshold
    short: Path  # the normal sample cut to 3,000 events: fails QC
    odd: Path  # a shifted scenario (Treg share far above any training sample)
    single_cell: Path  # one single-cell sample (the model is a flow model)
    straddle: float  # a threshold inside the normal sample's interval


def _score_json(path: Path, out_dir: Path, *extra: str) -> tuple[dict, Path]:
    """``blinaprofile score PATH --json`` with the shipped model: the JSON and the report."""
    sid = path.stem.replace("_", "-")
    args = ["score", str(path), "--model", str(DEFAULT), "--sample-id", sid, "--json"]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*args, "--out-dir", str(out_dir), *extra])
    assert rc == 0, err.getvalue()
    return json.loads(out.getvalue()), out_dir / f"{sid}.report.html"


@pytest.fixture(scope="module")
def samples(tmp_path_factory) -> Samples:
    import anndata as ad

    from blinaprofile.config import PanelConfig, SimulationConfig, load_config
    from blinaprofile.scoring.score import score_sample
    from blinaprofile.simulate.flow import simulate_cohort
    from blinaprofile.simulate.singlecell import simulate_single_cell_cohort

    d = tmp_path_factory.mktemp("call_states")
    sim = load_config(SimulationConfig, CONFIGS / "simulation" / "default.yaml")
    panel = load_config(PanelConfig, CONFIGS / "panels" / "post_hct_tcell.yaml")
    cohort = simulate_cohort(
        sim, d / "sim", panel=panel, n_patients=4, events_per_sample=5000, seed=7
    )
    files = sorted((cohort.out_dir / "fcs").glob("*.fcs"))
    scored = [score_sample(f, model=str(DEFAULT), interval=True) for f in files]
    labelled = [(f, r) for f, r in zip(files, scored, strict=True) if r.call in LABELS]
    assert labelled, [(r.call, r.call_reason) for r in scored]
    normal, res = labelled[0]
    assert res.probability_low is not None and res.probability_high is not None
    assert res.probability_low < res.probability < res.probability_high
    short = write_fcs_like(normal, d / "short.fcs", n_events=3000)
    # Tregs at 70% of CD4 (training: ~6%); the gating still passes QC
    shifted = dict(sim.latent)
    shifted["cd4_treg_pct_cd4"] = shifted["cd4_treg_pct_cd4"].model_copy(
        update={"responder": 0.7, "nonresponder": 0.7, "sd": 0.05}
    )
    odd_cohort = simulate_cohort(
        sim.model_copy(update={"latent": shifted}),
        d / "odd",
        panel=panel,
        n_patients=2,
        events_per_sample=5000,
        seed=3,
    )
    odd = sorted((odd_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    h5 = simulate_single_cell_cohort(
        sim.model_copy(update={"n_patients": 2}),
        d / "sc",
        n_cells_per_sample=3000,
        n_genes=600,
        seed=5,
    )
    a = ad.read_h5ad(h5)
    one = d / "single_cell.h5ad"
    a[a.obs["sample_id"] == a.obs["sample_id"].iloc[0]].copy().write_h5ad(one)
    # a threshold between the interval's low end and the probability: inside the interval
    straddle = round((res.probability_low + res.probability) / 2, 3)
    return Samples(normal, short, odd, one, straddle=straddle)


@pytest.fixture(scope="module")
def scored(samples, tmp_path_factory):
    """``score --json`` (and its report) for each case, through the CLI in this process."""
    out = tmp_path_factory.mktemp("cli_out")
    cases = {
        "normal": (samples.normal, ()),
        "short": (samples.short, ()),
        "straddle": (samples.normal, ("--threshold", repr(samples.straddle))),
        "odd": (samples.odd, ()),
        "single_cell": (samples.single_cell, ("--allow-other-modality",)),
    }
    return {name: _score_json(path, out / name, *extra) for name, (path, extra) in cases.items()}


EXPECTED = {
    "normal": LABELS,
    "short": {NO_CALL},
    "straddle": {UNCERTAIN},
    "odd": {UNCERTAIN},
    "single_cell": {UNCERTAIN},
}


def _badge(html: str) -> tuple[str, str]:
    """The report's headline badge: its class and its text."""
    m = re.search(r'<div class="badge (\w+)" id="call">([^<]*)</div>', html)
    assert m, "no call badge in the report"
    return m.group(1), m.group(2)


# --------------------------------------------------------------------------- CLI + report
def test_cli_json_and_report_show_the_four_states(scored, samples):
    for name, (d, report) in scored.items():
        assert d["call"] in EXPECTED[name], (name, d["call"], d["call_reason"])
        assert d["call_reason"], name
        klass, text = _badge(report.read_text(encoding="utf-8"))
        assert text == d["call"], name
        assert klass == {"no call": "nocall"}.get(d["call"], d["call"]), name
        print(f"\n{name:<12} {d['call']:<13} {d['call_reason']}")
    normal, straddle = scored["normal"][0], scored["straddle"][0]
    t = samples.straddle
    assert straddle["call_reason"] == (
        f"95% interval {normal['probability_low']:.3f}-{normal['probability_high']:.3f} "
        f"straddles the threshold {t:.3f}"
    )
    assert normal["call_reason"].startswith(f"probability {normal['probability']:.3f} ")
    assert scored["short"][0]["call_reason"].startswith("QC failed: only 3000 events (< 5000)")
    odd = scored["odd"][0]
    assert odd["qc_pass"] and odd["call_reason"].startswith("outside the training cohort")
    assert "cd4_treg_pct_cd4" in odd["call_reason"]
    sc = scored["single_cell"][0]
    flow_model = "model default was trained on flow cytometry; this sample is single-cell"
    assert flow_model in sc["call_reason"]


def test_report_headline_states_the_model_evidence_and_simulated_origin(scored):
    d, report = scored["straddle"]
    html = report.read_text(encoding="utf-8")
    visible = re.sub(r"base64,[A-Za-z0-9+/=]+", "", html)
    # the warning comes first on the page, before the research-use banner and the badge
    body = visible.split("<main>", 1)[1]
    assert body.lstrip().startswith('<p id="simulated-warning"')
    assert "Trained on SIMULATED data: not for clinical use" in body.split('id="call"')[0]
    auc = re.search(r'id="model-auc">([^<]*)<', visible).group(1)
    m = d["model"]
    ci = f"{m['cv_roc_auc_ci_low']:.3f}-{m['cv_roc_auc_ci_high']:.3f}"
    assert auc == f"{m['cv_roc_auc']:.3f} [95% CI {ci}]" and m["perm_pvalue"] is None
    assert re.search(r'id="model-perm-p">([^<]*)<', visible).group(1) == "not computed"
    reason = re.search(r'id="call-reason">([^<]*)<', visible).group(1)
    assert reason == d["call_reason"]
    # the model records no modality: flow is assumed, and said so
    assert d["model"]["modality"] == "flow"
    assert d["model"]["modality_note"] == "the model records no modality: assumed flow"


def test_cli_summary_prints_the_state_first_and_no_other_label(samples, capsys):
    t = repr(samples.straddle)
    capsys.readouterr()
    rc = main(
        ["score", str(samples.normal), "--model", str(DEFAULT), "--no-report", "--threshold", t]
    )
    lines = capsys.readouterr().out.splitlines()
    assert rc == 0
    print("\n" + "\n".join(lines[:6]))
    assert lines[0].startswith("call          uncertain (95% interval ")
    assert lines[0].endswith(f" straddles the threshold {samples.straddle:.3f})")
    # the old summary said "probability 0.562 responder [...]": no label but the call's
    prob = next(ln for ln in lines if ln.startswith("probability   "))
    assert "responder" not in prob and f"(threshold {samples.straddle:.3f})" in prob
    for line in lines[1:]:
        assert not any(w in line for w in ("responder", "uncertain", "no call")), line


# --------------------------------------------------------------------------- modality
def test_other_modality_is_refused_unless_allowed(samples, capsys):
    capsys.readouterr()
    rc = main(["score", str(samples.single_cell), "--model", str(DEFAULT), "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert err[0] == (
        "error: model default was trained on flow cytometry; this sample is single-cell: "
        "refusing (use --allow-other-modality to score it as uncertain)"
    )


def test_recorded_modality_is_enforced_both_ways(samples, tmp_path):
    """A model that records single-cell refuses a flow sample; the API flag scores it uncertain."""
    from blinaprofile.scoring.score import score_sample

    model = tmp_path / "sc_model"
    shutil.copytree(DEFAULT, model)
    meta_path = model / "artifacts" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["modality"] = "single_cell"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="trained on single-cell; this sample is flow cytometry"):
        score_sample(samples.normal, model=str(model))
    res = score_sample(samples.normal, model=str(model), allow_other_modality=True)
    assert res.call == UNCERTAIN and res.model["modality_note"] is None
    assert res.call_reason.startswith("model sc_model was trained on single-cell")


def test_training_records_the_modality(tmp_path_factory):
    from blinaprofile.models.packaging import training_modality

    sm = scoring_model(tmp_path_factory)
    meta = json.loads((sm.model_dir / "artifacts" / "meta.json").read_text())
    assert meta["modality"] == "flow"
    assert set(meta["training_stats"]) == set(meta["features"])
    assert training_modality(pd.DataFrame({"modality": ["single_cell"] * 2})) == "single_cell"
    with pytest.raises(ModelError, match="mix modalities"):
        training_modality(pd.DataFrame({"modality": ["flow", "single_cell"]}))


# --------------------------------------------------------------------------- batch
def test_batch_results_csv_has_the_states_and_reasons(samples, scored, tmp_path, capsys):
    rows = [
        ("NORMAL", samples.normal),
        ("SHORT", samples.short),
        ("ODD", samples.odd),
        ("SC", samples.single_cell),
    ]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows, columns=["sample_id", "file"]).to_csv(manifest, index=False)
    common = ["--model", str(DEFAULT), "--jobs", "1", "--no-progress"]
    flag = "--allow-other-modality"
    rc = main(
        ["score-batch", "--manifest", str(manifest), "--out", str(tmp_path / "a"), *common, flag]
    )
    out = capsys.readouterr().out
    assert rc == 0
    df = pd.read_csv(tmp_path / "a" / "results.csv", keep_default_na=False).set_index("sample_id")
    print("\n" + df[["call", "call_reason"]].to_string())
    expected = {"NORMAL": "normal", "SHORT": "short", "ODD": "odd", "SC": "single_cell"}
    for sid, case in expected.items():
        d = scored[case][0]
        assert (df.loc[sid, "call"], df.loc[sid, "call_reason"]) == (d["call"], d["call_reason"])
    counts = df["call"].value_counts()
    line = next(ln for ln in out.splitlines() if ln.startswith("calls"))
    order = [s for s in CALL_STATES if s in counts]
    assert line == "calls         " + ", ".join(f"{s} {counts[s]}" for s in order)
    # without the flag the single-cell sample is an error row saying why; a threshold inside
    # the normal sample's interval makes it uncertain
    files = [str(samples.normal), str(samples.single_cell)]
    t = repr(samples.straddle)
    rc = main(["score-batch", *files, "--out", str(tmp_path / "b"), "--threshold", t, *common])
    assert rc == 1
    df = pd.read_csv(tmp_path / "b" / "results.csv", keep_default_na=False)
    assert list(df["call"]) == [UNCERTAIN, "error"]
    assert df["call_reason"].iloc[0] == scored["straddle"][0]["call_reason"]
    assert df["call_reason"].iloc[1] == ""
    assert "trained on flow cytometry; this sample is single-cell: refusing" in df["error"].iloc[1]


# --------------------------------------------------------------------------- REST
def test_rest_predict_uses_the_same_decision(samples, scored):
    """The packaged model's predict (what ``mlflow models serve`` answers) has no QC or OOD
    check: its call is the interval's, and ``no call`` for a missing feature."""
    from blinaprofile.models.loading import load_packaged_model

    model = load_packaged_model(DEFAULT)
    feats = model.runtime.features
    normal = scored["normal"][0]
    row = {f: normal["features"][f] for f in feats}
    table = pd.DataFrame([row, row, {**row, feats[0]: None}])
    got = model.predict(table, params={"threshold": samples.straddle})
    assert list(got.columns[:5]) == [
        "probability",
        "probability_low",
        "probability_high",
        "call",
        "call_reason",
    ]
    assert got["call"].tolist() == [UNCERTAIN, UNCERTAIN, NO_CALL]
    assert got["call_reason"].iloc[0] == scored["straddle"][0]["call_reason"]
    assert got["call_reason"].iloc[2] == f"model feature(s) {feats[0]} missing"
    at_default = model.predict(table.iloc[:1])
    assert at_default["call"].iloc[0] == normal["call"]
    assert normal["call"] in LABELS
    assert at_default["call_reason"].iloc[0] == normal["call_reason"]
    print("\nREST:", got[["call", "call_reason"]].to_dict("records"))
