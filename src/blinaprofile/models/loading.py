"""Loading a packaged model for scoring without running any code it carries.

A model folder is checked against this project's own layout *before* any of its bytes are
imported or deserialised, then the runtime (:class:`~blinaprofile.models.runtime.ResponderModel`)
is built here from ``artifacts/meta.json`` and the skops files. MLflow's pyfunc import
machinery is never used on the scoring path: for ``models:/`` and ``runs:/`` URIs MLflow only
resolves and downloads the artifact folder, which then gets the same checks. Scoring a local
folder does not import :mod:`mlflow` at all.

What a model folder may hold (:func:`check_model_folder`)
--------------------------------------------------------
- ``MLmodel`` (read with ``yaml.safe_load``) with one flavor, ``python_function``, whose
  ``loader_module`` is :data:`EXPECTED_LOADER`, with ``model_code_path`` naming
  ``_pyfunc_entry.py``, no ``code`` paths (nothing is added to ``sys.path``), no pickled
  ``python_model``, no ``data``/``config``, no keys MLflow does not write for our models, and
  artifacts exactly ``artifacts/meta.json``, ``artifacts/pipeline.skops`` and optionally
  ``artifacts/uncertainty.skops``, ``artifacts/training_features.csv`` and
  ``artifacts/single_cell_annotator.json`` (:func:`load_annotator`: its SHA-256 must be the
  one ``meta.json`` records and its content a valid annotator state; plain JSON, no code);
- ``meta.json`` with ``features``, ``schema_version`` and ``threshold``; a model using change
  features (``delta_...``) must record a valid ``change_features`` design
  (:func:`blinaprofile.features.change.design_from_meta`);
- ``_pyfunc_entry.py`` byte-identical to this installation's
  ``blinaprofile/models/_pyfunc_entry.py`` (it is what ``mlflow models serve`` runs; scoring
  never runs it);
- the environment and example files MLflow writes (:data:`MLFLOW_FILES`), read by nothing here;
- nothing else: no other folder (``code/``), no other file (no ``.py``, no pickle), no
  symbolic link.

What a skops file may hold (:func:`check_skops_file`)
-----------------------------------------------------
Every node of the file's ``schema.json`` (read with :mod:`zipfile` and :mod:`json`, before
skops builds anything) must be one of :data:`SKOPS_ALLOW_LIST`: the exact classes our
pipelines are made of and one function (``f_classif``, the score function of the optional
``SelectKBest`` step). skops' own defaults (every scikit-learn estimator, numpy/scipy ufuncs)
are *not* trusted on their own; only then is ``skops.io.load`` called, trusting exactly the
types found.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from blinaprofile.errors import ModelError, one_line
from blinaprofile.features.change import design_from_meta
from blinaprofile.models.runtime import ResponderModel

__all__ = [
    "ARTIFACT_FILES",
    "ENTRY_FILE",
    "EXPECTED_LOADER",
    "MLFLOW_FILES",
    "SKOPS_ALLOWED_TYPES",
    "SKOPS_ALLOW_LIST",
    "ModelMetadata",
    "PackagedModel",
    "allow_list_text",
    "check_model_folder",
    "check_skops_file",
    "installed_entry_file",
    "load_annotator",
    "load_packaged_model",
    "load_skops",
    "open_model_folder",
    "skops_nodes",
]

#: The loader MLflow uses for a "model from code"; any other ``loader_module`` is refused.
EXPECTED_LOADER = "mlflow.pyfunc.loaders.code_model"
#: The model code file (what ``mlflow models serve`` executes); must equal ours byte for byte.
ENTRY_FILE = "_pyfunc_entry.py"
#: Artifact name in ``MLmodel`` -> file name under ``artifacts/``.
ARTIFACT_FILES: Mapping[str, str] = {
    "meta": "meta.json",
    "pipeline": "pipeline.skops",
    "uncertainty": "uncertainty.skops",
    "training_features": "training_features.csv",
    "single_cell_annotator": "single_cell_annotator.json",
}
REQUIRED_ARTIFACTS = ("meta", "pipeline")
#: Files MLflow writes beside a pyfunc model (environment, examples, registry and uv project
#: metadata). Nothing on the scoring path reads them.
MLFLOW_FILES = frozenset(
    {
        "MLmodel",
        "conda.yaml",
        "python_env.yaml",
        "requirements.txt",
        "constraints.txt",
        "input_example.json",
        "serving_input_example.json",
        "registered_model_meta",
        "environment_variables.txt",
        "pyproject.toml",
        "uv.lock",
        ".python-version",
    }
)
#: Keys MLflow writes in the ``python_function`` flavor of our models.
PYFUNC_KEYS = frozenset(
    {
        "artifacts",
        "cloudpickle_version",
        "code",
        "config",
        "env",
        "loader_module",
        "model_code_path",
        "python_version",
        "streamable",
    }
)

#: The exact skops content of our model files: skops loader -> full dotted type names.
#:
#: Derived from what ``skops.io.dump`` records for fitted pipelines of every family
#: ``validation.build_pipeline`` makes (logreg l2/l1/elasticnet, random forest, xgboost,
#: calibrated linear SVM), with and without the ``SelectKBest(f_classif)`` step, saved by
#: ``packaging.save_model`` as ``pipeline.skops`` (one Pipeline) and ``uncertainty.skops`` (a
#: list of them). ``skops.io.get_untrusted_types`` reports only a subset of these
#: (``numpy.dtype``, ``sklearn.tree._tree.Tree``, the calibration internals, ``f_classif``,
#: the xgboost types) because skops trusts every scikit-learn estimator by default; we do
#: not. ``tests/test_model.py::test_skops_allow_list_is_what_training_produces`` rebuilds the
#: list from every family in ``configs/train/*.yaml`` and requires equality, so a new family
#: is neither refused nor trusted without this constant changing.
SKOPS_ALLOW_LIST: Mapping[str, frozenset[str]] = {
    "ObjectNode": frozenset(
        {
            "sklearn.pipeline.Pipeline",
            "sklearn.impute._base.SimpleImputer",
            "sklearn.preprocessing._data.StandardScaler",
            "sklearn.feature_selection._univariate_selection.SelectKBest",
            "sklearn.linear_model._logistic.LogisticRegression",
            "sklearn.ensemble._forest.RandomForestClassifier",
            "sklearn.tree._classes.DecisionTreeClassifier",
            "sklearn.calibration.CalibratedClassifierCV",
            "sklearn.calibration._CalibratedClassifier",
            "sklearn.calibration._SigmoidCalibration",
            "sklearn.svm._classes.LinearSVC",
            "xgboost.sklearn.XGBClassifier",
            "xgboost.core.Booster",
        }
    ),
    # the fitted tree structure of each DecisionTreeClassifier
    "TreeNode": frozenset({"sklearn.tree._tree.Tree"}),
    # the one function: SelectKBest's ANOVA-F score function
    "FunctionNode": frozenset({"sklearn.feature_selection._univariate_selection.f_classif"}),
    "NdArrayNode": frozenset({"numpy.ndarray", "numpy.float64", "numpy.int64"}),
    "DTypeNode": frozenset({"numpy.dtype"}),
    "DictNode": frozenset({"builtins.dict"}),
    "ListNode": frozenset({"builtins.list"}),
    "TupleNode": frozenset({"builtins.tuple"}),
    "JsonNode": frozenset({"builtins.str"}),
    "TypeNode": frozenset({"builtins.str"}),  # the key type of a dict
    "BytearrayNode": frozenset({"builtins.bytearray"}),
}
#: Every type name of :data:`SKOPS_ALLOW_LIST`.
SKOPS_ALLOWED_TYPES = frozenset(t for types in SKOPS_ALLOW_LIST.values() for t in types)
#: Largest ``schema.json`` / ``MLmodel`` / ``meta.json`` read (bytes).
MAX_SCHEMA_BYTES = 256 * 1024**2
MAX_TEXT_BYTES = 16 * 1024**2


# --------------------------------------------------------------------------- skops files
def skops_nodes(path: str | os.PathLike[str]) -> set[tuple[str, str]]:
    """``(loader, type)`` of every node in a skops file, read from its ``schema.json``.

    Nothing is imported or constructed: the zip member is parsed as JSON and walked.

    Parameters
    ----------
    path
        A ``.skops`` file.

    Returns
    -------
    set of (str, str)
        The skops loader (``ObjectNode``, ``FunctionNode`` ...) and the full dotted name
        (``module.qualname``) of each node.

    Raises
    ------
    ModelError
        The file is not a readable skops archive, or a node is malformed.
    """
    p = Path(path)
    try:
        with zipfile.ZipFile(p) as zf:
            info = zf.getinfo("schema.json")
            if info.file_size > MAX_SCHEMA_BYTES:
                raise ModelError(
                    f"schema.json is {info.file_size} bytes (limit {MAX_SCHEMA_BYTES})", path=p
                )
            schema = json.loads(zf.read(info))
    except (zipfile.BadZipFile, KeyError, OSError, ValueError, RecursionError) as err:
        raise ModelError(
            f"not a readable skops file ({one_line(str(err), limit=200)})", path=p
        ) from None
    found: set[tuple[str, str]] = set()
    for node in _dicts(schema):
        keys = {"__loader__", "__module__", "__class__"} & node.keys()
        if not keys:
            continue
        loader, module, cls = (node.get(k) for k in ("__loader__", "__module__", "__class__"))
        if not all(isinstance(v, str) for v in (loader, module, cls)):
            raise ModelError(f"malformed skops node {sorted(keys)}: {node!r:.200}", path=p)
        found.add((str(loader), f"{module}.{cls}"))
    return found


def _dicts(obj: Any) -> Iterator[dict[str, Any]]:
    """Every dict inside a JSON value (iteratively: no recursion limit)."""
    stack = [obj]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            yield cur
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)


def check_skops_file(path: str | os.PathLike[str], *, source: str | None = None) -> list[str]:
    """Refuse a skops file holding anything outside :data:`SKOPS_ALLOW_LIST`.

    Parameters
    ----------
    path
        The ``.skops`` file.
    source
        What to name in the error (the model URI or folder); default ``path``.

    Returns
    -------
    list of str
        The (allowed) type names in the file, sorted: what ``skops.io.load`` may trust.

    Raises
    ------
    ModelError
        One line naming the model, the file and every foreign ``type (loader)``.
    """
    p = Path(path)
    nodes = skops_nodes(p)
    foreign = sorted(
        f"{name} ({loader})"
        for loader, name in nodes
        if name not in SKOPS_ALLOW_LIST.get(loader, frozenset())
    )
    if foreign:
        raise ModelError(
            f"refusing {p.parent.name}/{p.name}: it holds types outside blinaprofile's "
            f"allow-list: {foreign} (nothing was loaded)",
            path=source or p,
        )
    return sorted({name for _, name in nodes})


def allow_list_text() -> str:
    """:data:`SKOPS_ALLOW_LIST` as canonical text: part of the key of a compiled model in
    the user cache, so that an entry stands for files that passed this very list."""
    return json.dumps({k: sorted(v) for k, v in sorted(SKOPS_ALLOW_LIST.items())})


def load_skops(path: str | os.PathLike[str], *, source: str | None = None) -> Any:
    """Load a skops file after :func:`check_skops_file`, trusting exactly the types found."""
    import skops.io as sio

    trusted = check_skops_file(path, source=source)
    try:
        return sio.load(Path(path), trusted=trusted)
    except (ValueError, TypeError, OSError, KeyError, AttributeError) as err:
        raise ModelError(
            f"cannot load {Path(path).name}: {one_line(str(err), limit=300)}",
            path=source or path,
        ) from None


# --------------------------------------------------------------------------- model folders
def _read_text(path: Path, *, source: str) -> str:
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise ModelError(f"{path.name} is larger than {MAX_TEXT_BYTES} bytes", path=source)
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(f"cannot read {path.name}: {err}", path=source) from None


def safe_yaml_loader() -> type[Any]:
    """PyYAML's safe loader, on libyaml's parser where PyYAML has it (same constructor)."""
    import yaml

    return getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_mlmodel(folder: Path, *, source: str) -> dict[str, Any]:
    import yaml

    mlmodel = folder / "MLmodel"
    if not mlmodel.is_file() or mlmodel.is_symlink():
        raise ModelError("not a blinaprofile model folder (no MLmodel file)", path=source)
    text = _read_text(mlmodel, source=source)
    try:
        spec = yaml.load(text, Loader=safe_yaml_loader())
    except yaml.YAMLError as err:
        raise ModelError(
            f"MLmodel is not valid YAML ({one_line(str(err), limit=200)})", path=source
        ) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("flavors"), dict):
        raise ModelError("MLmodel has no flavors", path=source)
    return spec


def _pyfunc_problems(spec: dict[str, Any]) -> list[str]:
    """What in ``MLmodel`` differs from the layout ``save_model`` writes."""
    problems: list[str] = []
    flavors = spec["flavors"]
    others = sorted(str(f) for f in flavors if f != "python_function")
    if others:
        problems.append(f"MLmodel has foreign flavor(s) {others}")
    conf = flavors.get("python_function")
    if not isinstance(conf, dict):
        return [*problems, "MLmodel has no python_function flavor"]
    extra = sorted(str(k) for k in conf if k not in PYFUNC_KEYS | {"python_model"})
    if "python_model" in conf:
        problems.append(f"MLmodel names a pickled python_model {conf['python_model']!r}")
    if extra:
        problems.append(f"MLmodel python_function has foreign key(s) {extra}")
    loader = conf.get("loader_module")
    if loader != EXPECTED_LOADER:
        problems.append(f"MLmodel loader_module is {loader!r}, expected {EXPECTED_LOADER!r}")
    if conf.get("code") is not None:
        problems.append(f"MLmodel adds code path {conf['code']!r} to sys.path")
    if conf.get("config") is not None:
        problems.append("MLmodel carries a model config")
    code_path = conf.get("model_code_path")
    if not isinstance(code_path, str) or Path(code_path).name != ENTRY_FILE:
        problems.append(f"MLmodel model_code_path is {code_path!r}, expected .../{ENTRY_FILE}")
    problems.extend(_artifact_problems(conf.get("artifacts")))
    return problems


def _artifact_problems(artifacts: Any) -> list[str]:
    if not isinstance(artifacts, dict):
        return ["MLmodel lists no artifacts"]
    problems = []
    for name, info in artifacts.items():
        want = ARTIFACT_FILES.get(str(name))
        path = info.get("path") if isinstance(info, dict) else None
        if want is None:
            problems.append(f"MLmodel lists unknown artifact {name!r} ({path})")
        elif path != f"artifacts/{want}":
            problems.append(f"MLmodel artifact {name!r} is {path!r}, expected 'artifacts/{want}'")
    missing = [a for a in REQUIRED_ARTIFACTS if a not in artifacts]
    if missing:
        problems.append(f"MLmodel lacks artifact(s) {missing}")
    return problems


def _layout_problems(folder: Path, listed: set[str]) -> list[str]:
    """Files and folders that are not part of our layout (``listed``: artifact file names)."""
    problems = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_symlink():
            problems.append(f"symbolic link {name!r}")
        elif entry.is_dir():
            if name != "artifacts":
                problems.append(f"foreign folder '{name}/'")
        elif name not in MLFLOW_FILES and name != ENTRY_FILE:
            problems.append(f"foreign file {name!r}")
    art = folder / "artifacts"
    if art.is_dir() and not art.is_symlink():
        for entry in sorted(art.iterdir()):
            if entry.is_symlink() or not entry.is_file() or entry.name not in listed:
                kind = "folder" if entry.is_dir() else "file"
                problems.append(f"foreign artifact {kind} 'artifacts/{entry.name}'")
        for name in sorted(listed):
            if not (art / name).is_file():
                problems.append(f"missing artifact 'artifacts/{name}'")
    elif listed:
        problems.append("missing folder 'artifacts/'")
    return problems


def installed_entry_file() -> Path:
    """This installation's model code file (``blinaprofile/models/_pyfunc_entry.py``)."""
    return Path(__file__).with_name(ENTRY_FILE)


def check_model_folder(
    folder: str | os.PathLike[str], *, source: str | None = None
) -> dict[str, Any]:
    """Refuse a model folder that is not exactly this project's model layout.

    Reads only ``MLmodel`` (``yaml.safe_load``), the folder listing and ``_pyfunc_entry.py``
    (compared byte for byte); imports and deserialises nothing.

    Parameters
    ----------
    folder
        The model folder (local, or downloaded from ``models:/`` / ``runs:/``).
    source
        What to name in the error (the URI the user gave); default ``folder``.

    Returns
    -------
    dict
        The parsed ``MLmodel``.

    Raises
    ------
    ModelError
        One line naming the model and every foreign part found.
    """
    root = Path(folder)
    src = source or str(root)
    if not root.is_dir():
        raise ModelError("not a model folder", path=src)
    spec = _read_mlmodel(root, source=src)
    problems = _pyfunc_problems(spec)
    conf = spec["flavors"].get("python_function")
    arts = conf.get("artifacts") if isinstance(conf, dict) else None
    listed = {
        ARTIFACT_FILES[str(a)]
        for a in (arts if isinstance(arts, dict) else {})
        if a in ARTIFACT_FILES
    }
    problems.extend(_layout_problems(root, listed))
    entry = root / ENTRY_FILE
    if entry.is_file() and not entry.is_symlink():
        if entry.read_bytes() != installed_entry_file().read_bytes():
            problems.append(f"{ENTRY_FILE} differs from this blinaprofile's model code")
    elif not entry.is_symlink():
        problems.append(f"no {ENTRY_FILE}")
    if problems:
        raise ModelError(
            "refusing a model that is not in blinaprofile's own layout (none of its code was "
            f"run): {'; '.join(problems)}",
            path=src,
        )
    return spec


# --------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class ModelMetadata:
    """Provenance from ``MLmodel`` (the fields MLflow's ``pyfunc.metadata`` offers)."""

    model_uuid: str | None = None
    run_id: str | None = None
    utc_time_created: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


class PackagedModel:
    """A checked model folder loaded without MLflow: the runtime and its provenance.

    ``predict(table, params={"threshold": t})`` behaves like the served MLflow pyfunc.

    Parameters
    ----------
    folder
        The (checked) model folder.
    source
        What it was loaded from (folder, ``models:/...`` or ``runs:/...``).
    runtime
        The :class:`~blinaprofile.models.runtime.ResponderModel`.
    metadata
        Provenance from ``MLmodel``.
    annotator
        The single-cell :class:`~blinaprofile.annotate.estimator.TCellAnnotator` stored with
        the model (:func:`load_annotator`), or ``None`` (flow-trained models, older models).
    """

    def __init__(
        self,
        *,
        folder: Path,
        source: str,
        runtime: ResponderModel,
        metadata: ModelMetadata,
        annotator: Any = None,
    ) -> None:
        self.folder = folder
        self.source = source
        self.runtime = runtime
        self.metadata = metadata
        self.annotator = annotator

    @property
    def training_features_path(self) -> Path | None:
        """``artifacts/training_features.csv`` when the model has it."""
        p = self.folder / "artifacts" / ARTIFACT_FILES["training_features"]
        return p if p.is_file() else None

    def predict(
        self, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Probability, interval, call and contributions (see ``ResponderModel.predict``).

        ``params`` may hold only ``threshold`` (a probability in [0, 1]).
        """
        params = dict(params or {})
        unknown = sorted(k for k in params if k != "threshold")
        if unknown:
            raise ModelError(f"unknown parameter(s) {unknown}; the model takes 'threshold'")
        return self.runtime.predict(model_input, threshold=params.get("threshold"))


def _read_meta(path: Path, *, source: str) -> dict[str, Any]:
    try:
        meta = json.loads(_read_text(path, source=source))
    except ValueError as err:
        raise ModelError(f"meta.json is not valid JSON ({err})", path=source) from None
    if not isinstance(meta, dict):
        raise ModelError("meta.json is not a JSON object", path=source)
    missing = [k for k in ("features", "schema_version", "threshold") if k not in meta]
    if missing:
        raise ModelError(f"meta.json lacks {missing}", path=source)
    feats = meta["features"]
    if not isinstance(feats, list) or not feats or not all(isinstance(f, str) for f in feats):
        raise ModelError("meta.json features must be a list of names", path=source)
    t = meta["threshold"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not 0.0 <= t <= 1.0:
        raise ModelError(f"meta.json threshold must be in [0, 1], got {t!r}", path=source)
    design_from_meta(meta, source=source)  # a change-feature model's two timepoints
    return meta


def open_model_folder(
    folder: str | os.PathLike[str], *, source: str | None = None, compiled: bool = False
) -> PackagedModel:
    """Check a model folder (:func:`check_model_folder`) and build its runtime.

    Parameters
    ----------
    folder
        A local model folder.
    source
        What to name in errors (the URI the user gave); default ``folder``.
    compiled
        Build the runtime on the pipelines' compiled arrays
        (:mod:`blinaprofile.models.compiled`: no scikit-learn, XGBoost or skops import once
        the model has been compiled in the user cache), when they reproduce the pipelines
        exactly; the scoring path asks for it. The runtime's ``pipeline`` is then not a
        scikit-learn object (do not re-export it).

    Returns
    -------
    PackagedModel
    """
    root = Path(folder)
    src = source or str(root)
    spec = check_model_folder(root, source=src)
    art = root / "artifacts"
    arts = spec["flavors"]["python_function"]["artifacts"]
    meta = _read_meta(art / ARTIFACT_FILES["meta"], source=src)
    names = ["pipeline", *(["uncertainty"] if "uncertainty" in arts else [])]
    files = [art / ARTIFACT_FILES[n] for n in names]
    pipe, refits = _compiled_pipelines(files, src) if compiled else (None, None)
    if pipe is None:
        pipe, refits = _skops_pipelines(files, src)
        if compiled:
            pipe, refits = _compile(files, pipe, refits, meta, art)
    annotator = None
    if "single_cell_annotator" in arts or meta.get("single_cell_annotator") is not None:
        annotator = load_annotator(art / ARTIFACT_FILES["single_cell_annotator"], meta, source=src)
    md = spec.get("metadata")
    metadata = ModelMetadata(
        model_uuid=_opt_str(spec.get("model_uuid")),
        run_id=_opt_str(spec.get("run_id")),
        utc_time_created=_opt_str(spec.get("utc_time_created")),
        metadata=dict(md) if isinstance(md, dict) else {},
    )
    return PackagedModel(
        folder=root,
        source=src,
        runtime=ResponderModel(pipe, meta, refits),
        metadata=metadata,
        annotator=annotator,
    )


def _skops_pipelines(files: list[Path], src: str) -> tuple[Any, list[Any] | None]:
    """The pipeline and its bootstrap refits (``None`` without the file), through skops."""
    from sklearn.pipeline import Pipeline

    pipe = load_skops(files[0], source=src)
    if not isinstance(pipe, Pipeline):
        raise ModelError(f"pipeline.skops holds a {type(pipe).__name__}, not a Pipeline", path=src)
    refits = None
    if len(files) > 1:
        refits = load_skops(files[1], source=src)
        if not isinstance(refits, list) or not all(isinstance(m, Pipeline) for m in refits):
            raise ModelError("uncertainty.skops does not hold a list of Pipelines", path=src)
    return pipe, refits


def _compiled_pipelines(files: list[Path], src: str) -> tuple[Any, list[Any] | None]:
    """The compiled pipelines of these skops files from the user cache, else ``(None, None)``.

    An entry is keyed by the SHA-256 of the files' bytes (hashed now, every time) and by
    :data:`SKOPS_ALLOW_LIST` (:func:`allow_list_text`), and is only written after those very
    bytes passed :func:`check_skops_file` against that allow-list and were loaded
    (:func:`_compile`): a hit is a file already checked, and is not walked again. On a miss
    the skops load checks the files (:func:`load_skops`) before anything is loaded.
    """
    from blinaprofile.models.compiled import load_compiled

    hit = load_compiled(files, allow_list_text())
    return hit if hit is not None else (None, None)


def _compile(
    files: list[Path], pipe: Any, refits: list[Any] | None, meta: dict[str, Any], art: Path
) -> tuple[Any, list[Any] | None]:
    """Compile, check and cache the pipelines; the compiled ones if they reproduce the
    originals exactly, else the originals (also when the user cache is off: nothing to
    gain from compiling for one process)."""
    from blinaprofile.cache import cache_dir
    from blinaprofile.models.compiled import compile_pipelines, store_compiled, verify

    if cache_dir() is None:
        return pipe, refits
    made = compile_pipelines(pipe, refits)
    if made is None:
        return pipe, refits
    main, rest = made
    tpath = art / ARTIFACT_FILES["training_features"]
    training = pd.read_csv(tpath) if tpath.is_file() else None
    if not verify([pipe, *(refits or [])], [main, *(rest or [])], meta["features"], training):
        return pipe, refits
    store_compiled(files, main, rest, allow_list_text())
    return main, rest


def load_annotator(path: Path, meta: Mapping[str, Any], *, source: str) -> Any:
    """The single-cell annotator stored with a model, checked before it is used.

    The file must exist, hash to the SHA-256 ``meta.json`` records under
    ``single_cell_annotator``, be strict JSON (no NaN) and pass
    :meth:`TCellAnnotator.from_dict <blinaprofile.annotate.estimator.TCellAnnotator.from_dict>`
    (pydantic validation of every key and number; nothing is imported or unpickled).

    Parameters
    ----------
    path
        ``artifacts/single_cell_annotator.json`` of the model folder.
    meta
        The model's ``meta.json``.
    source
        What to name in errors (the model the user gave).

    Returns
    -------
    TCellAnnotator

    Raises
    ------
    ModelError
        One line: the file is missing or undeclared, its SHA-256 differs from ``meta.json``'s,
        or its content is not a valid annotator state (the message names the key).
    """
    import hashlib

    from blinaprofile.annotate.estimator import TCellAnnotator
    from blinaprofile.errors import ConfigError

    name = f"artifacts/{path.name}"
    entry = meta.get("single_cell_annotator")
    want = entry.get("sha256") if isinstance(entry, Mapping) else None
    if not isinstance(want, str):
        raise ModelError(
            f"refusing {name}: meta.json records no single_cell_annotator.sha256", path=source
        )
    if not path.is_file() or path.is_symlink():
        raise ModelError(
            f"refusing the model: meta.json records {name} but it is missing", path=source
        )
    text = _read_text(path, source=source)
    got = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if got != want:
        raise ModelError(
            f"refusing {name}: its SHA-256 {got[:12]}... differs from the {want[:12]}... "
            "meta.json records (the file was changed after export)",
            path=source,
        )

    def no_constant(c: str) -> Any:
        raise ValueError(f"non-finite number {c}")

    try:
        data = json.loads(text, parse_constant=no_constant)
        return TCellAnnotator.from_dict(data, source=name)
    except ValueError as err:
        raise ModelError(f"refusing {name}: not valid JSON ({err})", path=source) from None
    except ConfigError as err:
        raise ModelError(f"refusing {name}: {err.message}", path=source) from None


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def load_packaged_model(
    uri: str | os.PathLike[str] | None = None, *, compiled: bool = False
) -> PackagedModel:
    """Load a model by folder, ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` or ``runs:/``.

    For registry and run URIs MLflow only downloads the artifact folder (no model code is
    imported); every source then goes through :func:`open_model_folder`.

    Parameters
    ----------
    uri
        Folder or MLflow URI; ``None`` means the shipped default model.
    compiled
        See :func:`open_model_folder` (scoring asks for the compiled pipelines).

    Returns
    -------
    PackagedModel
    """
    from blinaprofile.settings import settings

    target = str(uri) if uri else str(settings.default_model)
    if target.startswith(("models:/", "runs:/")):
        return open_model_folder(_download(target), source=target, compiled=compiled)
    if not Path(target).exists():
        raise ModelError("model not found (train one with 'blinaprofile train')", path=target)
    return open_model_folder(target, source=target, compiled=compiled)


def _download(target: str) -> Path:
    """Resolve and download a registry or run URI to a local folder (files only)."""
    import mlflow

    from blinaprofile.settings import settings

    try:
        mlflow.set_tracking_uri(settings.tracking_uri)
        mlflow.set_registry_uri(settings.tracking_uri)
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=target))
    except mlflow.exceptions.MlflowException as err:
        raise ModelError(f"cannot load model: {one_line(err.message)}", path=target) from None
