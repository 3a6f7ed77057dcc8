"""The packaged responder model: an MLflow pyfunc ("model from code") around skops files.

A model directory (``models/default`` or an MLflow artifact) contains the MLflow
``MLmodel`` file, the model code (``_pyfunc_entry.py``), and as artifacts:

``pipeline.skops``
    The fitted scikit-learn Pipeline (impute -> scale -> [select] -> classifier).
``uncertainty.skops``
    The same pipeline refit on patient-bootstrap resamples of the training cohort (fixed
    hyper-parameters); they give the probability interval. Absent in older models.
``meta.json``
    Feature list, schema version, decision threshold and rule, CV metrics, the modality the
    model was trained on (``flow`` or ``single_cell``; :func:`training_modality`), the
    training cohort's distribution of every feature (``training_stats``: median and MAD on
    the out-of-distribution scale, min and max), global importance.
``training_features.csv``
    The training cohort's features and response (to place a new sample against the cohort).
``single_cell_annotator.json``
    Single-cell models only: the :class:`~blinaprofile.annotate.estimator.TCellAnnotator`
    fitted on the training cohort (plain JSON from ``to_dict``), so that a sample scored later
    is labelled exactly as in training. ``meta.json`` records its SHA-256 under
    ``single_cell_annotator``; the loader checks both and validates the state.

A model gets the annotator artifact when the ``meta`` given to :func:`save_model` /
:func:`log_model` holds ``meta["single_cell_annotator"] = {"state": <to_dict() output>,
...notes}``: the state is validated (``TCellAnnotator.from_dict``), written as the artifact,
and replaced in ``meta.json`` by ``{"file", "sha256", ...notes}``.

Nothing is unpickled and no code from a model folder is run: scoring loads a folder through
:mod:`blinaprofile.models.loading`, which checks the folder's layout and every type in the
skops files against an exact allow-list before anything is built.

The runtime that makes predictions is :mod:`blinaprofile.models.runtime`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blinaprofile.errors import ModelError
from blinaprofile.io.atomic import write_csv
from blinaprofile.models.runtime import MODALITIES, ResponderModel

__all__ = ["ANNOTATOR_KEY", "load_model", "log_model", "save_model", "training_modality"]

#: Key of ``meta`` (and ``meta.json``) for the single-cell annotator; also its artifact name.
ANNOTATOR_KEY = "single_cell_annotator"


def training_modality(table: pd.DataFrame) -> str:
    """The modality of a training table: its rows' ``modality`` (``flow`` without the column).

    Parameters
    ----------
    table
        The feature table a model is trained on.

    Returns
    -------
    str
        One of :data:`blinaprofile.models.runtime.MODALITIES`, recorded as ``meta['modality']``.

    Raises
    ------
    ModelError
        The rows mix modalities, or name an unknown one.
    """
    found = sorted(set(table["modality"].dropna().astype(str))) if "modality" in table else []
    if len(found) > 1:
        raise ModelError(f"the training rows mix modalities {found}: train one model per modality")
    modality = found[0] if found else "flow"
    if modality not in MODALITIES:
        raise ModelError(f"unknown modality {modality!r} (expected one of {list(MODALITIES)})")
    return modality


def _check_meta(meta: dict[str, Any]) -> None:
    """What scoring needs from ``meta`` beyond the loader's checks: a known modality, the
    training distribution of every feature (for the out-of-distribution check) and, for change
    features, the design (the loader checks it again)."""
    if meta.get("modality", "flow") not in MODALITIES:
        raise ModelError(
            f"meta modality must be one of {list(MODALITIES)}, got {meta.get('modality')!r}"
        )
    stats = meta.get("training_stats") or {}
    lacking = [f for f in meta["features"] if f not in stats]
    if lacking:
        raise ModelError(f"meta training_stats lacks the training distribution of {lacking}")
    from blinaprofile.features.change import design_from_meta

    design_from_meta(meta)  # a change-feature model records its two timepoints


def _package(
    staging: Path,
    pipeline: Any,
    meta: dict[str, Any],
    training_table: pd.DataFrame | None,
    uncertainty: list[Any] | None = None,
) -> dict[str, Any]:
    """Write the model's files into ``staging``; return MLflow save/log keyword arguments.

    Each skops file is checked against the loader's allow-list right away, so training never
    exports a model that scoring would refuse.
    """
    import skops.io as sio
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    from blinaprofile.models.loading import check_skops_file

    _check_meta(meta)
    staging.mkdir(parents=True)
    sk = staging / "pipeline.skops"
    sio.dump(pipeline, sk)
    meta = dict(meta)
    trusted = set(check_skops_file(sk, source="the pipeline to export"))
    artifacts = {"pipeline": str(sk), "meta": str(staging / "meta.json")}
    if uncertainty:
        uk = staging / "uncertainty.skops"
        sio.dump(list(uncertainty), uk)
        trusted |= set(check_skops_file(uk, source="the refits to export"))
        artifacts["uncertainty"] = str(uk)
        meta["uncertainty"] = {
            "method": "patient-bootstrap refits with the final hyper-parameters",
            "n_models": len(uncertainty),
            "interval": "95%: expit(logit(p) -/+ 1.96 x SD of refit log-odds)",
        }
    meta["trusted_types"] = sorted(trusted)
    if meta.get(ANNOTATOR_KEY) is not None:
        path, meta[ANNOTATOR_KEY] = _write_annotator(staging, meta[ANNOTATOR_KEY])
        artifacts[ANNOTATOR_KEY] = str(path)
    (staging / "meta.json").write_text(json.dumps(meta, indent=2, default=_json_default))
    if training_table is not None:
        tt = staging / "training_features.csv"
        write_csv(training_table, tt)
        artifacts["training_features"] = str(tt)
    features = list(meta["features"])
    in_cols: list[ColSpec | TensorSpec] = [ColSpec("double", f) for f in features]
    out_names = ["probability", "probability_low", "probability_high"]
    out_cols: list[ColSpec | TensorSpec] = [ColSpec("double", n) for n in out_names]
    out_cols.append(ColSpec("string", "call"))
    out_cols.extend(ColSpec("double", f"contrib_{f}") for f in features)
    signature = ModelSignature(
        inputs=Schema(in_cols),
        outputs=Schema(out_cols),
        params=ParamSchema([ParamSpec("threshold", "double", float(meta["threshold"]))]),
    )
    return {
        "python_model": str(Path(__file__).with_name("_pyfunc_entry.py")),
        "artifacts": artifacts,
        "signature": signature,
        "pip_requirements": _requirements(),
        "metadata": {
            "schema_version": meta["schema_version"],
            "trained_on": meta.get("trained_on", "unknown"),
            "family": meta.get("family", "unknown"),
        },
    }


def _write_annotator(staging: Path, entry: Any) -> tuple[Path, dict[str, Any]]:
    """Validate and write the annotator state; return its file and the ``meta.json`` entry.

    ``entry`` is ``{"state": TCellAnnotator.to_dict() output, **notes}``. The state goes
    through ``TCellAnnotator.from_dict`` first, so training never exports an annotator that
    scoring would refuse.
    """
    import hashlib

    from blinaprofile.annotate.estimator import TCellAnnotator
    from blinaprofile.errors import ConfigError
    from blinaprofile.models.loading import ARTIFACT_FILES

    if not isinstance(entry, dict) or not isinstance(entry.get("state"), dict):
        raise ModelError(f"meta[{ANNOTATOR_KEY!r}] must be a mapping with the annotator 'state'")
    try:
        annotator = TCellAnnotator.from_dict(entry["state"], source="the annotator to export")
    except ConfigError as err:
        raise ModelError(f"cannot export the single-cell annotator: {err}") from None
    path = staging / ARTIFACT_FILES[ANNOTATOR_KEY]
    annotator.to_json(path)
    notes = {k: v for k, v in entry.items() if k != "state"}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, {"file": path.name, "sha256": digest, **notes}


def save_model(
    path: str | os.PathLike[str],
    pipeline: Any,
    meta: dict[str, Any],
    *,
    training_table: pd.DataFrame | None = None,
    uncertainty: list[Any] | None = None,
) -> Path:
    """Save a pipeline as an MLflow pyfunc model directory, atomically.

    The directory is written under a temporary name beside ``path`` and renamed, so a crash
    never leaves a half-written model. Before the rename the folder must pass
    :func:`blinaprofile.models.loading.check_model_folder` (what scoring accepts).
    ``meta["single_cell_annotator"]``, when present, becomes the annotator artifact (see the
    module docstring).
    """
    import mlflow

    from blinaprofile.models.loading import check_model_folder

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.staging"
    tmp = out.parent / f".{out.name}.tmp"
    for p in (staging, tmp):
        if p.exists():
            shutil.rmtree(p)
    kwargs = _package(staging, pipeline, meta, training_table, uncertainty)
    mlflow.pyfunc.save_model(path=str(tmp), input_example=_input_example(meta), **kwargs)
    shutil.rmtree(staging)
    try:  # what MLflow wrote must pass the checks scoring applies
        check_model_folder(tmp, source=str(out))
    except ModelError:
        shutil.rmtree(tmp)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def log_model(
    pipeline: Any,
    meta: dict[str, Any],
    *,
    training_table: pd.DataFrame | None = None,
    uncertainty: list[Any] | None = None,
    registered_model_name: str | None = None,
) -> Any:
    """Log the model to the active MLflow run (and register it); returns ``ModelInfo``."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as d:
        kwargs = _package(Path(d) / "pkg", pipeline, meta, training_table, uncertainty)
        return mlflow.pyfunc.log_model(
            name="model",
            registered_model_name=registered_model_name,
            input_example=_input_example(meta),
            **kwargs,
        )


def _input_example(meta: dict[str, Any]) -> pd.DataFrame:
    """One row of training-cohort medians on the features' own units (the input example)."""
    stats = meta["training_stats"]
    row = []
    for f in meta["features"]:
        med = float(stats[f]["median"])
        scale = stats[f].get("scale", "identity")
        if scale == "logit":
            med = 100.0 / (1.0 + float(np.exp(-med)))
        elif scale == "log":
            med = float(np.exp(med))
        row.append(med)
    return pd.DataFrame([row], columns=meta["features"])


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pkgs = ["scikit-learn", "xgboost-cpu", "skops", "pandas", "numpy", "mlflow"]
    out = []
    for p in pkgs:
        try:
            out.append(f"{p}=={version(p)}")
        except PackageNotFoundError:
            out.append(p)
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def load_model(uri: str | os.PathLike[str] | None = None) -> tuple[Any, ResponderModel]:
    """Load a model by MLflow URI (``models:/NAME@ALIAS``, ``runs:/...``) or folder.

    The folder is checked and loaded by :func:`blinaprofile.models.loading.load_packaged_model`
    (no code from it is run; MLflow only downloads registry and run URIs).

    Returns
    -------
    model, runtime
        The :class:`~blinaprofile.models.loading.PackagedModel` (``predict(table,
        params=...)`` like an MLflow pyfunc) and its :class:`ResponderModel`.
    """
    from blinaprofile.models.loading import load_packaged_model

    model = load_packaged_model(uri)
    return model, model.runtime
