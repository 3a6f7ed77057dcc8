"""The quickstart notebook runs top to bottom with the shipped model, without warnings.

It shows the gating figure as an image and the sample's report inline. The kernel starts
without the MLflow settings the test suite uses (``conftest.py``), so the notebook has to
prevent MLflow's progress bars (tqdm's "IProgress not found" warning) itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest_notebook_helpers import check_outputs, execute, unset_quiet_env

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(monkeypatch):
    pytest.importorskip("nbclient")
    if not (ROOT / "models" / "default" / "MLmodel").is_file():
        pytest.fail("models/default is missing: run scripts/build_default_model.py")
    monkeypatch.chdir(ROOT)
    unset_quiet_env(monkeypatch)
    nb = execute(ROOT / "notebooks" / "quickstart.ipynb", cwd=ROOT, timeout=300)
    out = check_outputs(nb)
    assert "Bayes-optimal AUC" in out.joined
    assert "probability" in out.joined and "call" in out.joined
    assert out.images == 1  # the gating figure
    (frame,) = [h for h in out.html if h.startswith("<iframe srcdoc=")]
    # the whole report, escaped into the frame: headline, plain-language features, reviewer line
    for text in ("id=&quot;call&quot;", "Effector-memory CD8 T cells", "Reviewed by"):
        assert text in frame, text
    print(f"\nquickstart: {out.images} figure, report frame {len(frame) / 1e3:.0f} kB")
