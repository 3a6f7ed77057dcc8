"""The scoring walkthrough notebook runs top to bottom (nbclient, kernel ``python3``).

It runs the way a new user meets it: no shipped model (``BLINAPROFILE_MODEL_DIR`` is an empty
folder), so the notebook trains its own small model, which is when MLflow downloads artifacts
and would draw tqdm progress bars ("IProgress not found" in a notebook without ipywidgets).
The kernel starts without the MLflow settings the test suite uses: the notebook must prevent
that warning itself. It shows the gating figure as an image and the report inline.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest_notebook_helpers import check_outputs, execute, unset_quiet_env

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "scoring_walkthrough.ipynb"


def test_scoring_walkthrough_notebook_executes(tmp_path, monkeypatch):
    pytest.importorskip("nbclient")
    (tmp_path / "no-models").mkdir()
    monkeypatch.setenv("BLINAPROFILE_MODEL_DIR", str(tmp_path / "no-models"))
    monkeypatch.delenv("BLINAPROFILE_WALKTHROUGH_MODEL", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    unset_quiet_env(monkeypatch)
    work = tmp_path / "nb"
    work.mkdir()
    out = check_outputs(execute(NOTEBOOK, cwd=work, timeout=600))
    joined = out.joined
    assert "model: walkthrough-output/model" in joined  # trained in the notebook
    assert "call " in joined and "probability" in joined
    assert "no call ['only 3000 events (< 5000)" in joined
    assert "'n_skipped': 3" in joined and "'n_scored': 0" in joined
    reports = list((work / "walkthrough-output").glob("*.report.html"))
    assert len(reports) == 1 and reports[0].stat().st_size > 50_000
    assert out.images == 1  # the gating figure of the scored sample
    assert (work / "walkthrough-output" / f"{reports[0].name.split('.')[0]}.gating.png").is_file()
    (frame,) = [h for h in out.html if h.startswith("<iframe srcdoc=")]
    assert "Reviewed by" in frame and "Gate counts" in frame
    print(f"\nnotebook executed: {out.images} figure, stderr lines {len(out.stderr)}")
