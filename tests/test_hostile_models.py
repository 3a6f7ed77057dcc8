"""The hostile-model corpus (issue 11): a model must never run its own code.

Every folder is built in ``tmp_path`` from a copy of the shipped ``models/default`` with one
attack added. Each must be refused by ``blinaprofile score FILE --model X`` with exit code 2
and one line naming the model and the foreign part, and leave no marker file behind:

1. ``MLmodel`` names a ``loader_module`` shipped in a ``code/`` folder (folder, ``models:/``
   and ``runs:/``);
2. ``code/skops/__init__.py`` shadowing the real skops;
3. ``FunctionTransformer(func=sklearn.datasets.dump_svmlight_file, kw_args={"f": marker})``
   inside ``pipeline.skops``;
4. a cloudpickle ``python_model`` payload;
5. a custom class with ``__setstate__`` inside ``pipeline.skops``;
6. a changed ``_pyfunc_entry.py``;
7. unknown extra artifacts / extra ``.py`` files / stray folders.

For 3 and 5 the refusal must come before skops builds anything (``skops.io.load`` is never
called). The good default model must still score, identically to MLflow's own pyfunc loader,
and scoring a folder model must not import mlflow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from blinaprofile.errors import ModelError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "models" / "default"
MARKER_CODE = "from pathlib import Path\nPath({marker!r}).write_text('ran')\n"


# --------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory, sim_config: Any, panel: Any) -> Path:
    """One simulated FCS file the default model can score."""
    from blinaprofile.simulate.flow import simulate_cohort

    out = tmp_path_factory.mktemp("hostile_sample")
    cohort = simulate_cohort(
        sim_config, out, panel=panel, n_patients=2, events_per_sample=20_000, seed=7
    )
    return sorted((cohort.out_dir / "fcs").glob("*.fcs"))[0]


def _copy_default(dst: Path) -> Path:
    shutil.copytree(DEFAULT, dst)
    return dst


def _edit_pyfunc(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "MLmodel"
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    edit(spec["flavors"]["python_function"])
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")


def _trust_in_meta(folder: Path, skops_file: Path) -> None:
    """An attacker who edits a model folder edits meta.json's trusted_types too."""
    import skops.io as sio

    meta_file = folder / "artifacts" / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["trusted_types"] = sorted(
        set(meta["trusted_types"]) | set(sio.get_untrusted_types(file=skops_file))
    )
    meta_file.write_text(json.dumps(meta))


def _default_pipeline() -> Any:
    from blinaprofile.models.loading import load_skops

    return load_skops(DEFAULT / "artifacts" / "pipeline.skops")


def _env(store: Path | None = None, **extra: str) -> dict[str, str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}
    env["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    if store is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    return env


def _score_cli(
    model: str, sample: Path, cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "blinaprofile",
            "score",
            str(sample),
            "--model",
            model,
            "--no-report",
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _assert_refused(
    r: subprocess.CompletedProcess[str], *, model: str, foreign: list[str], marker: Path
) -> str:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith(f"error: {model}: refusing "), line
    for part in foreign:
        assert part in line, (part, line)
    assert "Traceback" not in r.stderr
    assert not marker.exists(), "code from the model was run"
    print(f"\n{line}")
    return line


# --------------------------------------------------------------------------- the attacks
def attack_loader_module(folder: Path, marker: Path) -> list[str]:
    """1: a loader_module in code/ that runs at import, then scores normally."""
    code = folder / "code"
    code.mkdir()
    (code / "evil_loader.py").write_text(
        MARKER_CODE.format(marker=str(marker))
        + "from mlflow.pyfunc.loaders.code_model import _load_pyfunc  # noqa: F401\n"
    )

    def edit(conf: dict[str, Any]) -> None:
        conf["loader_module"] = "evil_loader"
        conf["code"] = "code"

    _edit_pyfunc(folder, edit)
    return ["loader_module is 'evil_loader'", "code path 'code'", "foreign folder 'code/'"]


def attack_shadow_skops(folder: Path, marker: Path) -> list[str]:
    """2: code/skops/__init__.py would shadow the real skops once code/ is on sys.path."""
    pkg = folder / "code" / "skops"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(MARKER_CODE.format(marker=str(marker)))
    _edit_pyfunc(folder, lambda conf: conf.__setitem__("code", "code"))
    return ["code path 'code'", "foreign folder 'code/'"]


def attack_svmlight_writer(folder: Path, marker: Path) -> list[str]:
    """3: an sklearn *function* that writes a file of the attacker's choice at predict time."""
    import skops.io as sio
    from sklearn.datasets import dump_svmlight_file
    from sklearn.preprocessing import FunctionTransformer

    pipe = _default_pipeline()
    n = len(pipe.steps[0][1].feature_names_in_)
    ft = FunctionTransformer(func=dump_svmlight_file, kw_args={"y": [0], "f": str(marker)})
    ft.fit(np.zeros((2, n)))
    pipe.steps.insert(2, ("report", ft))
    skops_file = folder / "artifacts" / "pipeline.skops"
    sio.dump(pipe, skops_file)
    _trust_in_meta(folder, skops_file)
    return [
        "pipeline.skops",
        "sklearn.datasets._svmlight_format_io.dump_svmlight_file (FunctionNode)",
        "sklearn.preprocessing._function_transformer.FunctionTransformer (ObjectNode)",
    ]


class _Payload:
    """Unpickling this calls ``Path.write_text(marker, 'ran')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.write_text, (self.marker, "ran"))


def attack_pickled_python_model(folder: Path, marker: Path) -> list[str]:
    """4: a cloudpickle python_model (MLflow's non-code pyfunc)."""
    import cloudpickle

    (folder / "python_model.pkl").write_bytes(cloudpickle.dumps(_Payload(marker)))

    def edit(conf: dict[str, Any]) -> None:
        conf.pop("model_code_path")
        conf["loader_module"] = "mlflow.pyfunc.model"
        conf["python_model"] = "python_model.pkl"

    _edit_pyfunc(folder, edit)
    return ["pickled python_model 'python_model.pkl'", "foreign file 'python_model.pkl'"]


SETSTATE_MODULE = '''
from pathlib import Path


class Recorder:
    """Writes its marker when skops brings it to life."""

    def __setstate__(self, state):
        Path(state["marker"]).write_text("constructed")
        self.__dict__.update(state)
'''


def attack_setstate_class(folder: Path, marker: Path) -> list[str]:
    """5: a custom class with __setstate__ hidden inside a trusted estimator."""
    import importlib

    import skops.io as sio

    lib = folder.parent / f"{folder.name}_lib"
    lib.mkdir()
    (lib / "hostile_setstate.py").write_text(SETSTATE_MODULE)
    sys.path.insert(0, str(lib))
    try:
        mod = importlib.import_module("hostile_setstate")
        rec = mod.Recorder.__new__(mod.Recorder)
        rec.__dict__["marker"] = str(marker)
        pipe = _default_pipeline()
        pipe.steps[1][1].recorder = rec  # on the StandardScaler
        skops_file = folder / "artifacts" / "pipeline.skops"
        sio.dump(pipe, skops_file)
    finally:
        sys.path.remove(str(lib))
        sys.modules.pop("hostile_setstate", None)
    _trust_in_meta(folder, skops_file)
    return ["pipeline.skops", "hostile_setstate.Recorder (ObjectNode)"]


def attack_changed_entry(folder: Path, marker: Path) -> list[str]:
    """6: the model code file (what mlflow serve would execute) changed."""
    entry = folder / "_pyfunc_entry.py"
    entry.write_text(entry.read_text() + "\n" + MARKER_CODE.format(marker=str(marker)))
    return ["_pyfunc_entry.py differs from this blinaprofile's model code"]


def attack_extra_artifact(folder: Path, marker: Path) -> list[str]:
    """7a: an unknown artifact listed in MLmodel (and its file)."""
    (folder / "artifacts" / "helper.joblib").write_bytes(b"\x80\x04N.")

    def edit(conf: dict[str, Any]) -> None:
        conf["artifacts"]["helper"] = {"path": "artifacts/helper.joblib", "uri": "x"}

    _edit_pyfunc(folder, edit)
    return ["unknown artifact 'helper'"]


def attack_unlisted_artifact(folder: Path, marker: Path) -> list[str]:
    """7b: a file in artifacts/ that MLmodel does not list."""
    (folder / "artifacts" / "extra.pkl").write_bytes(b"\x80\x04N.")
    return ["foreign artifact file 'artifacts/extra.pkl'"]


def attack_extra_python(folder: Path, marker: Path) -> list[str]:
    """7c: an extra .py file beside the entry point (and one in artifacts/)."""
    (folder / "sitecustomize.py").write_text(MARKER_CODE.format(marker=str(marker)))
    (folder / "artifacts" / "meta.py").write_text(MARKER_CODE.format(marker=str(marker)))
    return ["foreign file 'sitecustomize.py'", "foreign artifact file 'artifacts/meta.py'"]


def attack_stray_code_folder(folder: Path, marker: Path) -> list[str]:
    """7d: a code/ folder even though MLmodel says ``code: null``."""
    (folder / "code").mkdir()
    (folder / "code" / "evil.py").write_text(MARKER_CODE.format(marker=str(marker)))
    return ["foreign folder 'code/'"]


ATTACKS = {
    "loader_module+code": attack_loader_module,
    "code/skops shadows skops": attack_shadow_skops,
    "FunctionTransformer(dump_svmlight_file)": attack_svmlight_writer,
    "pickled python_model": attack_pickled_python_model,
    "__setstate__ class in skops": attack_setstate_class,
    "changed _pyfunc_entry.py": attack_changed_entry,
    "unknown listed artifact": attack_extra_artifact,
    "unlisted artifact file": attack_unlisted_artifact,
    "extra .py files": attack_extra_python,
    "stray code/ folder": attack_stray_code_folder,
}


def _register(folder: Path, root: Path) -> tuple[Path, str, str]:
    """Log ``folder`` as a run's ``model`` artifact and register it as ``hostile@champion``."""
    import mlflow

    store = root / "mlflow.db"
    uri = f"sqlite:///{store}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.create_experiment("hostile", artifact_location=(root / "artifacts").as_uri())
    run = client.create_run(exp)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    client.create_registered_model("hostile")
    mv = client.create_model_version(
        "hostile", f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    client.set_registered_model_alias("hostile", "champion", mv.version)
    return store, "models:/hostile@champion", f"runs:/{run.info.run_id}/model"


# --------------------------------------------------------------------------- the corpus
@pytest.mark.parametrize("name", list(ATTACKS))
def test_hostile_folder_is_refused_by_the_cli(name: str, sample: Path, tmp_path: Path) -> None:
    folder = _copy_default(tmp_path / "model")
    marker = tmp_path / "marker.txt"
    foreign = ATTACKS[name](folder, marker)
    env = _env(
        tmp_path / "mlflow.db",
        # a class the skops file names is importable, and MLflow would unpickle if asked
        PYTHONPATH=os.pathsep.join([str(tmp_path / "model_lib"), os.environ.get("PYTHONPATH", "")]),
        MLFLOW_ALLOW_PICKLE_DESERIALIZATION="true",
    )
    r = _score_cli(str(folder), sample, tmp_path, env)
    _assert_refused(r, model=str(folder), foreign=foreign, marker=marker)


@pytest.mark.parametrize("via", ["models:/", "runs:/"])
@pytest.mark.parametrize("name", ["loader_module+code", "FunctionTransformer(dump_svmlight_file)"])
def test_hostile_registry_model_is_refused_by_the_cli(
    name: str, via: str, sample: Path, tmp_path: Path
) -> None:
    folder = _copy_default(tmp_path / "model")
    marker = tmp_path / "marker.txt"
    foreign = ATTACKS[name](folder, marker)
    store, alias_uri, run_uri = _register(folder, tmp_path)
    uri = alias_uri if via == "models:/" else run_uri
    r = _score_cli(uri, sample, tmp_path, _env(store))
    _assert_refused(r, model=uri, foreign=foreign, marker=marker)


@pytest.mark.parametrize("name", list(ATTACKS))
def test_hostile_folder_is_refused_by_the_api_before_skops_builds_anything(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import skops.io as sio

    from blinaprofile.models.packaging import load_model

    folder = _copy_default(tmp_path / "model")
    marker = tmp_path / "marker.txt"
    foreign = ATTACKS[name](folder, marker)
    monkeypatch.syspath_prepend(str(tmp_path / "model_lib"))  # the class could be built
    calls: list[Any] = []
    monkeypatch.setattr(sio, "load", lambda *a, **k: calls.append(a))
    with pytest.raises(ModelError) as info:
        load_model(folder)
    for part in foreign:
        assert part in str(info.value)
    assert calls == [], "skops was asked to build the hostile file"
    assert not marker.exists()
    assert "hostile_setstate" not in sys.modules and "evil_loader" not in sys.modules


def test_rest_loader_refuses_hostile_folders(tmp_path: Path) -> None:
    """The served path (MLflow runs our _pyfunc_entry.py) applies the same checks."""
    import mlflow

    cases = {
        "code": attack_stray_code_folder,
        "python": attack_extra_python,
        "artifact": attack_unlisted_artifact,
        "listed": attack_extra_artifact,
    }
    for name, attack in cases.items():
        folder = _copy_default(tmp_path / name)
        marker = tmp_path / f"{name}.txt"
        foreign = attack(folder, marker)
        with pytest.raises(ModelError) as info:
            mlflow.pyfunc.load_model(str(folder))
        for part in foreign:
            assert part in str(info.value)
        assert not marker.exists()
    # a different loader that still reaches our entry point (mlflow.pyfunc.model loads
    # "model from code" folders too)
    folder = _copy_default(tmp_path / "loader")
    _edit_pyfunc(folder, lambda conf: conf.__setitem__("loader_module", "mlflow.pyfunc.model"))
    with pytest.raises(ModelError, match=r"loader_module is 'mlflow\.pyfunc\.model'"):
        mlflow.pyfunc.load_model(str(folder))


# --------------------------------------------------------------------------- the good model
def test_default_model_scores_like_mlflow_pyfunc() -> None:
    """Our direct loader and MLflow's pyfunc loader (the REST path) agree exactly."""
    import mlflow

    from blinaprofile.models.packaging import load_model

    model, runtime = load_model(DEFAULT)
    table = pd.read_csv(DEFAULT / "artifacts" / "training_features.csv")[runtime.features]
    ours = model.predict(table, params={"threshold": 0.5})
    served = mlflow.pyfunc.load_model(str(DEFAULT)).predict(table, params={"threshold": 0.5})
    pd.testing.assert_frame_equal(ours, served)
    assert (
        model.metadata.model_uuid == yaml.safe_load((DEFAULT / "MLmodel").read_text())["model_uuid"]
    )
    assert len(runtime.uncertainty) >= 2 and {"responder", "nonresponder"} <= set(ours["call"]) <= {
        "responder",
        "nonresponder",
        "uncertain",
    }


def test_default_model_by_alias_scores(sample: Path, tmp_path: Path) -> None:
    """A registry download (with its registered_model_meta file) passes the checks."""
    store, alias_uri, run_uri = _register(_copy_default(tmp_path / "model"), tmp_path)
    for uri in (alias_uri, run_uri):
        r = _score_cli(uri, sample, tmp_path, _env(store))
        assert r.returncode == 0, r.stderr[-3000:]
        assert re.search(r"^call +(responder|nonresponder|uncertain|no call) ", r.stdout, re.M)


def test_scoring_a_folder_model_does_not_import_mlflow(sample: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from blinaprofile.cli import main\n"
        f"rc = main(['score', {str(sample)!r}, '--model', {str(DEFAULT)!r}, '--no-report'])\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow')\n"
        "print('RC', rc, 'MLFLOW', len(loaded), loaded[:5])\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("RC 0 MLFLOW 0 "), (last, r.stderr[-2000:])
