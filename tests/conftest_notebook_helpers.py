"""Running a notebook under test and checking what a reader of it would see.

:func:`execute` runs a notebook top to bottom in a ``python3`` kernel (which inherits the
test's environment); :func:`check_outputs` fails on an error, on any stderr output that
mentions a warning (such as tqdm's "IProgress not found" without ipywidgets) and on a notebook
that shows no figure, and returns the text and HTML outputs for the test's own assertions.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Outputs:
    """What an executed notebook shows, by kind."""

    text: list[str] = field(default_factory=list)
    html: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    images: int = 0

    @property
    def joined(self) -> str:
        return "\n".join(self.text)


def execute(path: Path, *, cwd: Path, timeout: int = 600) -> Any:
    """The notebook at ``path`` executed with ``cwd`` as its working folder."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute()
    return nb


def check_outputs(nb: Any) -> Outputs:
    """Every output of an executed notebook, checked for errors, warnings and figures."""
    out = Outputs()
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for o in cell.get("outputs", []):
            kind = o.get("output_type")
            assert kind != "error", f"{o.get('ename')}: {o.get('evalue')}"
            if kind == "stream":
                (out.stderr if o.get("name") == "stderr" else out.text).append(o.get("text", ""))
                continue
            data = o.get("data", {})
            out.text.append(str(data.get("text/plain", "")))
            if "text/html" in data:
                out.html.append(str(data["text/html"]))
            if kind == "display_data" and "image/png" in data:
                out.images += 1
    warned = [s for s in out.stderr if "warn" in s.lower() or "iprogress" in s.lower()]
    assert not warned, f"the notebook printed warnings on stderr: {warned}"
    assert not [s for s in out.stderr if "Downloading artifacts" in s], "MLflow progress bars"
    assert out.images >= 1, "no figure (display_data with image/png) in the notebook"
    return out


#: set by tests/conftest.py for the test process; a notebook must set them itself
MLFLOW_QUIET = ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "MLFLOW_LOGGING_LEVEL")


def unset_quiet_env(monkeypatch) -> None:
    """Remove what quiets MLflow from the environment the kernel inherits."""
    for name in MLFLOW_QUIET:
        monkeypatch.delenv(name, raising=False)
    assert not any(n in os.environ for n in MLFLOW_QUIET)
