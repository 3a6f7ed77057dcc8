"""The scoring walkthrough notebook runs top to bottom (nbclient, kernel ``python3``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest_scoring_helpers import scoring_model

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "scoring_walkthrough.ipynb"


def test_scoring_walkthrough_notebook_executes(tmp_path_factory, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sm = scoring_model(tmp_path_factory)
    monkeypatch.setenv("BLINAPROFILE_WALKTHROUGH_MODEL", str(sm.model_dir))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = []
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", out
            text.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    joined = "\n".join(text)
    assert f"model: {sm.model_dir}" in joined
    assert "call " in joined and "probability" in joined
    assert "no call ['only 3000 events (< 5000)'" in joined
    assert "'n_skipped': 3" in joined and "'n_scored': 0" in joined
    reports = list((tmp_path / "walkthrough-output").glob("*.report.html"))
    assert len(reports) == 1 and reports[0].stat().st_size > 50_000
    print(f"\nnotebook executed: {sum(c.cell_type == 'code' for c in nb.cells)} code cells")
