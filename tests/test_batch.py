"""Batch scoring: columns, error rows, resume after SIGKILL, Dask, progress, privacy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from blinaprofile.errors import InputError
from blinaprofile.io.files import file_checksum
from blinaprofile.scoring.score import CALL_STATES, RESULT_COLUMNS
from conftest_scoring_helpers import scoring_model, write_fcs_like


@pytest.fixture(scope="module")
def sm(tmp_path_factory):
    return scoring_model(tmp_path_factory)


@pytest.fixture(scope="module")
def manifest(sm, tmp_path_factory) -> Path:
    """The new cohort plus a missing file, a non-FCS file and a panel mismatch."""
    d = tmp_path_factory.mktemp("batch_inputs")
    m = pd.read_csv(sm.new_cohort / "manifest.csv")
    m["file"] = [str(sm.new_cohort / f) for f in m["file"]]
    (d / "garbage.fcs").write_bytes(b"this is not a flow cytometry file\n" * 20)
    write_fcs_like(Path(m["file"].iloc[0]), d / "no_tim3.fcs", drop_marker="TIM")
    bad = pd.DataFrame(
        {
            "sample_id": ["MISSING", "GARBAGE", "NOPANEL"],
            "patient_id": ["PX1", "PX2", "PX3"],
            "timepoint": ["D28"] * 3,
            "file": [str(d / "absent.fcs"), str(d / "garbage.fcs"), str(d / "no_tim3.fcs")],
            "response": ["responder"] * 3,
        }
    )
    out = d / "manifest.csv"
    pd.concat([m.iloc[:3], bad, m.iloc[3:]]).to_csv(out, index=False)
    return out


@pytest.fixture(scope="module")
def batch_run(sm, manifest, tmp_path_factory):
    from blinaprofile import score_samples

    out = tmp_path_factory.mktemp("batch_out")
    t0 = time.perf_counter()
    df = score_samples(manifest, model=str(sm.model_dir), out_dir=out, n_jobs=2)
    return df, out, time.perf_counter() - t0


def test_batch_rows_columns_and_error_rows(batch_run, manifest):
    df, out, secs = batch_run
    m = pd.read_csv(manifest)
    assert list(df.columns) == list(RESULT_COLUMNS)
    assert list(df["sample_id"]) == list(m["sample_id"])  # input order
    err = df.set_index("sample_id")
    # error rows name the sample, not the file (keep_file_names=False by default)
    assert err.loc["MISSING", "call"] == "error"
    assert err.loc["MISSING", "error"] == "MISSING: file not found"
    assert err.loc["GARBAGE", "call"] == "error"
    assert err.loc["GARBAGE", "error"].startswith("GARBAGE: ")
    assert "garbage.fcs" not in err.loc["GARBAGE", "error"]
    # a panel mismatch is a QC failure: no call with the reason, not an error
    assert err.loc["NOPANEL", "call"] == "no call" and err.loc["NOPANEL", "error"] == ""
    assert (
        "panel mismatch" in err.loc["NOPANEL", "reasons"]
        and "TIM3" in err.loc["NOPANEL", "reasons"]
    )
    good = df[~df["sample_id"].isin(["MISSING", "GARBAGE", "NOPANEL"])]
    assert (good["error"] == "").all() and len(good) == 6
    assert good["probability"].between(0, 1).all()
    assert (good["probability_low"] <= good["probability"]).all()
    assert (good["probability"] <= good["probability_high"]).all()
    assert set(good["call"]) <= set(CALL_STATES)
    # every call says why; error rows say it in `error`
    assert (df.loc[df["call"] != "error", "call_reason"].str.len() > 0).all()
    assert (df.loc[df["call"] == "error", "call_reason"] == "").all()
    no_call = df.loc[df["call"] == "no call", "call_reason"]
    assert len(no_call) and no_call.str.match(r"QC failed: |model feature\(s\) ").all()
    assert (
        good["model_family"].eq("logreg_l2").all() and good["input_sha256"].str.len().eq(64).all()
    )
    # consolidated outputs equal the returned table
    pq = pd.read_parquet(out / "results.parquet")
    pd.testing.assert_frame_equal(pq, df, check_dtype=False)
    csv = pd.read_csv(out / "results.csv", keep_default_na=False, na_values=[""])
    assert list(csv.columns) == list(RESULT_COLUMNS) and len(csv) == len(df)
    assert df.attrs["batch"]["n_errors"] == 2
    print(f"\nbatch of {len(df)} ({len(good)} good, 2 errors, 1 panel no-call) in {secs:.1f} s")


def test_rerun_skips_finished_and_retries_errors(sm, batch_run, manifest):
    from blinaprofile import score_samples

    df, out, _ = batch_run
    parts = sorted((out / "parts").glob("*.json"))
    before = {p.name: (p.stat().st_mtime_ns, p.read_text()) for p in parts}
    df2 = score_samples(manifest, model=str(sm.model_dir), out_dir=out, n_jobs=2)
    info = df2.attrs["batch"]
    assert info["n_skipped"] == len(df) - 2 and info["n_scored"] == 2  # the two error rows
    pd.testing.assert_frame_equal(df2, df)
    ok = df.loc[df["error"] == "", "sample_id"]
    n_same = sum(
        1
        for p in (out / "parts").glob("*.json")
        if p.name in before and before[p.name][0] == p.stat().st_mtime_ns
    )
    assert n_same == len(ok)
    df3 = score_samples(
        manifest, model=str(sm.model_dir), out_dir=out, n_jobs=1, retry_errors=False
    )
    assert df3.attrs["batch"]["n_scored"] == 0


def test_other_settings_in_the_same_folder_are_refused(sm, batch_run, manifest):
    from blinaprofile import score_samples

    _, out, _ = batch_run
    with pytest.raises(InputError, match=r"other settings.*threshold"):
        score_samples(manifest, model=str(sm.model_dir), out_dir=out, threshold=0.9)


def test_resuming_with_a_changed_model_is_refused(sm, manifest, tmp_path):
    """Re-exporting the model into the same folder must not mix models in one result table."""
    import shutil

    from blinaprofile import score_samples
    from blinaprofile.scoring.score import _MODEL_CACHE

    model = tmp_path / "model"
    shutil.copytree(sm.model_dir, model)
    small = tmp_path / "two.csv"
    pd.read_csv(manifest).iloc[:2].to_csv(small, index=False)
    out = tmp_path / "out"
    first = score_samples(small, model=str(model), out_dir=out, n_jobs=1)
    assert first.attrs["batch"]["n_scored"] == 2
    mlmodel = model / "MLmodel"
    text = mlmodel.read_text()
    assert "model_uuid:" in text
    mlmodel.write_text(
        "\n".join(
            "model_uuid: 00000000000000000000000000000000" if ln.startswith("model_uuid:") else ln
            for ln in text.splitlines()
        )
        + "\n"
    )
    _MODEL_CACHE.clear()  # a new process would see the re-exported model
    with pytest.raises(InputError, match=r"other settings.*model_uuid"):
        score_samples(small, model=str(model), out_dir=out, n_jobs=1)


def test_cli_score_batch_writes_the_same_columns(sm, manifest, batch_run, tmp_path):
    df, _, _ = batch_run
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "blinaprofile",
            "score-batch",
            "--manifest",
            str(manifest),
            "--model",
            str(sm.model_dir),
            "--out",
            str(tmp_path / "cli"),
            "--jobs",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 1, out.stderr  # error rows -> exit 1
    err_lines = [ln for ln in out.stderr.splitlines() if ln.startswith("error: ")]
    assert len(err_lines) == 2 and "error: MISSING: file not found" in err_lines
    assert not any("absent.fcs" in ln or "garbage.fcs" in ln for ln in err_lines)
    assert "9 samples: 9 scored now, 0 already finished" in out.stdout
    cli = pd.read_parquet(tmp_path / "cli" / "results.parquet")
    assert list(cli.columns) == list(df.columns)
    pd.testing.assert_series_equal(cli["probability"], df["probability"])
    pd.testing.assert_series_equal(cli["call"], df["call"])


def test_folder_input_uses_checksum_pseudonyms(sm, tmp_path):
    from blinaprofile import score_samples

    folder = tmp_path / "in"
    folder.mkdir()
    src = sorted((sm.new_cohort / "fcs").glob("*.fcs"))[:2]
    files = [
        write_fcs_like(
            s, folder / f"SMITH_JOHN_{i}.fcs", keywords={"$SRC": "SMITH^JOHN", "$FIL": "x"}
        )
        for i, s in enumerate(src)
    ]
    df = score_samples(folder, model=str(sm.model_dir), out_dir=tmp_path / "out", n_jobs=1)
    assert sorted(df["sample_id"]) == sorted(f"S-{file_checksum(f)[:12]}" for f in files)
    for f in [tmp_path / "out" / "results.csv", *(tmp_path / "out" / "parts").glob("*")]:
        text = f.read_text()
        assert "SMITH" not in text and "JOHN" not in text, f


def test_dask_local_cluster_gives_the_same_results(sm, manifest, batch_run, tmp_path):
    import distributed

    from blinaprofile import score_samples

    df, _, _ = batch_run
    with distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=False,
        host="127.0.0.1",
        dashboard_address=None,
        protocol="tcp",
    ) as cluster:
        addr = cluster.scheduler_address
        assert addr.startswith("tcp://127.0.0.1:")
        t0 = time.perf_counter()
        dk = score_samples(
            manifest, model=str(sm.model_dir), scheduler=addr, out_dir=tmp_path / "dask"
        )
        secs = time.perf_counter() - t0
    pd.testing.assert_frame_equal(dk, df)
    print(
        f"\ndask LocalCluster {addr}: {len(dk)} samples in {secs:.1f} s, identical to local processes"
    )


def test_progress_bar_only_when_asked_or_on_a_terminal(sm, tmp_path, capfd):
    from blinaprofile import score_samples

    f = sorted((sm.new_cohort / "fcs").glob("*.fcs"))[:2]
    score_samples(f, model=str(sm.model_dir), n_jobs=1)  # stderr is not a TTY here
    assert "scoring" not in capfd.readouterr().err
    score_samples(f, model=str(sm.model_dir), n_jobs=1, progress=True)
    err = capfd.readouterr().err
    assert "scoring" in err and "2/2" in err


def _wait_parts(parts: Path, n: int, proc: subprocess.Popen, timeout: float) -> int:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        k = len(list(parts.glob("*.json"))) if parts.is_dir() else 0
        if k >= n or proc.poll() is not None:
            return k
        time.sleep(0.02)
    return len(list(parts.glob("*.json")))


def test_sigkill_mid_run_loses_nothing_and_rerun_has_no_duplicates(sm, tmp_path):
    """Kill the CLI batch (whole process group) after 3 samples; rerun completes it."""
    src = pd.read_csv(sm.new_cohort / "manifest.csv")
    files = [str(sm.new_cohort / f) for f in src["file"]]
    n = 36
    m = pd.DataFrame(
        {
            "sample_id": [f"K{i:03d}" for i in range(n)],
            "file": [files[i % len(files)] for i in range(n)],
        }
    )
    mf = tmp_path / "manifest.csv"
    m.to_csv(mf, index=False)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "blinaprofile",
        "score-batch",
        "--manifest",
        str(mf),
        "--model",
        str(sm.model_dir),
        "--out",
        str(out),
        "--jobs",
        "1",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        _wait_parts(out / "parts", 3, proc, timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the batch finished before it could be killed"
    finished = {p.name: p.read_text() for p in (out / "parts").glob("*.json")}
    assert 3 <= len(finished) < n
    for text in finished.values():
        json.loads(text)  # every stored part is complete
    assert not (out / "results.parquet").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr
    assert (
        f"{n} samples: {n - len(finished)} scored now, {len(finished)} already finished"
        in rerun.stdout
    )
    res = pd.read_parquet(out / "results.parquet")
    assert (
        len(res) == n
        and res["sample_id"].is_unique
        and set(res["sample_id"]) == set(m["sample_id"])
    )
    assert (res["error"] == "").all()
    for name, text in finished.items():
        assert (out / "parts" / name).read_text() == text  # finished results untouched
    assert len(list((out / "parts").glob("*.json"))) == n
    assert not list((out / "parts").glob(".*.tmp"))
    print(
        f"\nSIGKILL after {len(finished)}/{n} samples: all {len(finished)} kept; rerun scored "
        f"{n - len(finished)}, skipped {len(finished)}; {len(res)} rows, no duplicates"
    )


def test_import_is_light_and_score_samples_is_lazy():
    code = (
        "import sys, blinaprofile\n"
        "heavy = [m for m in ('pandas','mlflow','sklearn','matplotlib','distributed') if m in sys.modules]\n"
        "print('HEAVY=' + ','.join(heavy))\n"
        "from blinaprofile import score_samples\n"
        "print(score_samples.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0] == "HEAVY=" and lines[1] == "blinaprofile.scoring.batch"
