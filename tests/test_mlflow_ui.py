"""The MLflow UI reads at a glance: scripts/mlflow_screenshots.py trains a small simulated
cohort, serves the store with ``mlflow server`` and captures the pages in headless Chromium;
this test runs its functions, checks the PNGs are real renders and checks, through the
server's REST API, what those pages show: the experiment's kind and saved headline view, run
names, the headline table as run description and headline tags as columns, the dataset
source, the model card as version description and the aliases.

Skips only when no Chromium is installed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import urllib.request
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CI = re.compile(r"^\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]$")

pytestmark = pytest.mark.slow


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "mlflow_screenshots", ROOT / "scripts" / "mlflow_screenshots.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


shots_script = _script()


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """Train the quick plan, serve it, capture the pages; query the REST API meanwhile."""
    import mlflow

    chromium = shots_script.find_chromium()
    if chromium is None:
        pytest.skip("no chromium on PATH: the MLflow UI screenshots need headless Chromium")
    root = tmp_path_factory.mktemp("mlflow-ui")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.chdir(root)
        store = shots_script.init_store(root / "store")
        with shots_script.running_server(store) as (base, proc):
            shots_script.train_plan(store, plan=shots_script.QUICK_PLAN, n_permutations=0)
            shots_script.wait_for_server(base, proc=proc, log=store.root / "mlflow-server.log")
            pages = shots_script.pages(base, store=store)
            pngs = shots_script.screenshots(pages, root / "png", chromium=chromium)
            with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
                health = r.status
            client = mlflow.tracking.MlflowClient(base)  # the REST API of the server
            exp = client.get_experiment_by_name(shots_script.EXPERIMENT)
            assert exp is not None
            runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time"])
            name = shots_script.REGISTERED_MODEL
            model = client.get_registered_model(name)
            versions = client.search_model_versions(f"name = '{name}'")
    return {
        "store": store,
        "pages": pages,
        "pngs": pngs,
        "health": health,
        "experiment": exp,
        "runs": runs,
        "model": model,
        "versions": versions,
    }


def test_pages_are_captured_and_not_blank(ui):
    from PIL import Image

    assert ui["health"] == 200
    assert list(ui["pngs"]) == [
        "01_runs_list",
        "02_run_overview",
        "03_registered_model",
        "04_model_version",
        "05_compare_runs",
    ]
    for name, png in ui["pngs"].items():
        assert png.is_file() and png.name == f"{name}.png"
        with Image.open(png) as im:
            assert im.size == (1600, ui["pages"][name].height)
            px = np.asarray(im.convert("L"), dtype=float)
        # a rendered page: text and lines on a light background, not a blank or error page
        assert px.std() > 10, name
        assert len(np.unique(px)) > 50, name
        assert (px < 100).mean() > 0.002, name  # dark text
    # every page asks for the classic ML layout, the runs list for the headline view
    assert all("workflowType=machine_learning" in p.url for p in ui["pages"].values())
    assert "viewStateShareKey=blinaprofile-headline" in ui["pages"]["01_runs_list"].url


def test_experiment_opens_the_headline_view(ui):
    from blinaprofile.models.tracking import HEADLINE_TAGS

    tags = ui["experiment"].tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags["mlflow.sharedViewState.blinaprofile-headline"])
    assert view["name"] == "Headline metrics" and isinstance(view["createdAt"], int)
    state = json.loads(view["state"])
    assert state["selectedColumns"][:4] == [f"tags.`{t}`" for t in HEADLINE_TAGS]
    assert "tags.`blinaprofile.promotion`" in state["selectedColumns"]
    eid = ui["experiment"].experiment_id
    assert (
        f"(#/experiments/{eid}/runs?viewStateShareKey=blinaprofile-headline"
        "&workflowType=machine_learning)" in tags["mlflow.note.content"]
    )


def test_runs_are_named_and_described(ui):
    from blinaprofile.models.tracking import HEADLINE_TAGS

    by_kind: dict[str, list[Any]] = {}
    for r in ui["runs"]:
        by_kind.setdefault(r.data.tags["blinaprofile.run_kind"], []).append(r)
    (parent,) = by_kind["training"]
    chosen = parent.data.tags["chosen_family"]
    assert parent.info.run_name == f"{chosen} on sim-30"
    assert sorted(r.info.run_name for r in by_kind["candidate"]) == [
        "logreg_l2 on sim-30",
        "xgboost on sim-30",
    ]
    note = parent.data.tags["mlflow.note.content"]
    first, rest = note.split("\n", 1)
    assert first == f"**{chosen} on sim-30**: v1 @candidate (not promoted)"
    table = rest.strip().splitlines()[:4]
    assert table[0].startswith("| family | ROC AUC [95% CI] | balanced accuracy [95% CI]")
    assert f"| {chosen} (chosen) |" in note
    assert note.rstrip().endswith("@champion stays at (none)")
    # the headline numbers as tag columns, on the training run and each family's run
    for r in ui["runs"]:
        for t in HEADLINE_TAGS[:3]:
            assert CI.match(r.data.tags[t]), (r.info.run_name, t, r.data.tags[t])
        assert r.data.tags[HEADLINE_TAGS[3]] == "n/a (no permutations)"
    assert parent.data.tags["AUC 95 CI"].startswith(f"{parent.data.metrics['roc_auc']:.3f} [")
    # the dataset's source is the features file
    (ds,) = parent.inputs.dataset_inputs
    source = json.loads(ds.dataset.source)["uri"]
    assert source == str(ui["store"].root / "sim-30" / "features.csv")


def test_registry_shows_card_and_aliases(ui):
    name = shots_script.REGISTERED_MODEL
    assert {a: str(v) for a, v in ui["model"].aliases.items()} == {"candidate": "1"}
    assert ui["store"].aliases == {"sim-30": "candidate"}
    assert ui["model"].description.startswith(
        "Aliases: @candidate -> v1. Serving alias: @champion.\n\nNo version holds @champion"
    )
    (mv,) = ui["versions"]
    card = mv.description
    assert card.startswith(f"# {name} v1\n")
    assert "| decision at training | not promoted: CV AUC" in card
    assert "| cohort | sim-30: 30 samples, 30 patients" in card
    assert f"| MLflow run | {ui['store'].runs['sim-30']} |" in card
    assert mv.tags["blinaprofile.promotion"] == "candidate"
