"""The quickstart notebook runs top to bottom with the shipped model."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    if not (ROOT / "models" / "default" / "MLmodel").is_file():
        pytest.fail("models/default is missing: run scripts/build_default_model.py")
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.chdir(ROOT)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "Bayes-optimal AUC" in outputs
    assert "probability" in outputs and "call" in outputs
