"""A model's pipelines as plain arrays: scoring without scikit-learn, XGBoost or skops.

Loading ``pipeline.skops`` and ``uncertainty.skops`` imports skops, scikit-learn (every
estimator module: skops lists them at import) and XGBoost: about two seconds before a
sample can be scored, in every new process. Prediction itself needs only a few arrays. So
the first time a model is loaded for scoring, :func:`compile_pipelines` reads the fitted
parameters out of the pipelines, :func:`verify` checks that the arrays reproduce the
pipelines' probabilities *bit for bit* (and their contributions to 1e-5) on the training
cohort and on perturbed copies of it, and the result is kept in the user cache
(:mod:`blinaprofile.cache`) under the SHA-256 of the skops files and the versions of
scikit-learn and XGBoost that made it. Later processes build :class:`CompiledPipeline`
objects from that entry with numpy alone.

What compiles: ``SimpleImputer`` -> ``StandardScaler`` -> ``SelectKBest`` (or passthrough)
-> ``LogisticRegression`` (binary) or ``XGBClassifier`` (``binary:logistic``, ``gbtree``,
numerical splits). Anything else (random forests, calibrated linear SVMs, a model whose
arrays do not reproduce it exactly) is not compiled: the model is then scored by its
scikit-learn objects, as before.

Arithmetic is the libraries': logistic probabilities are ``1 / (1 + exp(-(Z @ coef + b)))``
with the C library's ``exp`` (as SciPy's ``expit``); boosted trees compare float32 features
(``x < split``, missing values to the default side), sum leaf values in float32 from the
base margin ``-logf(1/base_score - 1)`` and apply ``1 / (1 + expf(-margin))`` with the C
library's float functions, as XGBoost's CPU predictor does. Contributions are the linear
terms (logistic) or path-dependent TreeSHAP of the margin
(:func:`blinaprofile.models.runtime.path_shap`), computed in float64 where XGBoost uses
float32.
"""

from __future__ import annotations

import ctypes
import functools
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "FORMAT",
    "CompiledPipeline",
    "TreeEnsemble",
    "cache_key",
    "compile_pipeline",
    "compile_pipelines",
    "load_compiled",
    "store_compiled",
    "verify",
]

#: Version of the compiled layout; part of the cache key.
FORMAT = "1"
_KIND = "compiled-model"


# --------------------------------------------------------------------------- C float maths
def _libm() -> Any:
    for name in ("libm.so.6", "libm.dylib", "libSystem.dylib"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.expf.restype = lib.logf.restype = ctypes.c_float
        lib.expf.argtypes = lib.logf.argtypes = [ctypes.c_float]
        return lib
    return None


_LIBM = _libm()


def _expf(x: np.ndarray) -> np.ndarray:
    """The C library's ``expf`` of each float32 value (numpy's own float32 ``exp`` differs
    from it in the last bit for some values)."""
    if _LIBM is None:
        raise RuntimeError("no C maths library to call expf")
    return np.array([_LIBM.expf(float(v)) for v in x.ravel()], dtype=np.float32).reshape(x.shape)


def _logf(x: float | np.floating[Any]) -> np.float32:
    if _LIBM is None:
        raise RuntimeError("no C maths library to call logf")
    return np.float32(_LIBM.logf(float(x)))


# --------------------------------------------------------------------------- model parts
@dataclass(frozen=True)
class TreeEnsemble:
    """Boosted trees in node arrays (all trees concatenated; ``roots`` index each tree).

    ``left``/``right`` are global node indices (``-1`` at a leaf), ``threshold`` holds the
    split value (float32) or, at a leaf, the leaf value, ``cover`` the node's hessian sum.
    """

    left: np.ndarray
    right: np.ndarray
    feature: np.ndarray
    threshold: np.ndarray
    default_left: np.ndarray
    cover: np.ndarray
    roots: np.ndarray
    base_margin: np.float32

    def leaves(self, Z32: np.ndarray) -> np.ndarray:
        """The leaf each sample reaches in each tree (samples x trees)."""
        n = Z32.shape[0]
        node = np.broadcast_to(self.roots, (n, self.roots.size)).copy()
        rows = np.arange(n)[:, None]
        while True:
            inner = self.left[node] >= 0
            if not inner.any():
                return node
            x = Z32[rows, self.feature[node]]
            with np.errstate(invalid="ignore"):
                go_left = np.where(np.isnan(x), self.default_left[node], x < self.threshold[node])
            node = np.where(inner, np.where(go_left, self.left[node], self.right[node]), node)

    def margin(self, Z: np.ndarray) -> np.ndarray:
        """Base margin plus the leaf values, summed in float32 in tree order."""
        Z32 = np.asarray(Z, dtype=np.float32)
        values = self.threshold[self.leaves(Z32)]
        start = np.full((Z32.shape[0], 1), self.base_margin, dtype=np.float32)
        return np.cumsum(np.hstack([start, values]), axis=1, dtype=np.float32)[:, -1]

    def probability(self, Z: np.ndarray) -> np.ndarray:
        m = self.margin(Z)
        return np.float32(1.0) / (_expf(np.minimum(-m, np.float32(88.7))) + np.float32(1.0))

    @functools.cached_property
    def paths(self) -> tuple[np.ndarray, list[dict[int, tuple[float, float, float]]]]:
        """Every leaf's value and path (:func:`blinaprofile.models.runtime.tree_paths`),
        worked out once: they do not depend on the sample."""
        from blinaprofile.models.runtime import tree_paths

        # x < t on float32 values is x <= the float32 just below t
        below = np.nextafter(self.threshold, np.float32(-np.inf)).astype(np.float64)
        vals: list[float] = []
        paths: list[dict[int, tuple[float, float, float]]] = []
        for r in self.roots:
            v, p = tree_paths(
                self.left,
                self.right,
                self.feature,
                below,
                self.cover,
                self.threshold.astype(np.float64),
                root=int(r),
            )
            vals.extend(v)
            paths.extend(p)
        return np.asarray(vals), paths

    def shap(self, Z: np.ndarray) -> np.ndarray:
        """Path-dependent TreeSHAP of the margin (samples x features)."""
        from blinaprofile.models.runtime import path_shap

        phi, _ = path_shap(*self.paths, Z)
        return phi


@dataclass(frozen=True)
class CompiledPipeline:
    """One fitted pipeline as arrays; ``predict_proba`` and ``contributions`` as the
    scikit-learn pipeline and :func:`blinaprofile.models.runtime.contributions` give them.

    Attributes
    ----------
    fill
        The imputer's statistics (a missing value becomes its column's entry).
    mean, scale
        The scaler's centre and scale (``None``: not centred / not scaled).
    support
        Indices of the columns that reach the classifier (the selection step).
    coef, intercept
        Logistic regression (``None`` for trees).
    trees
        Boosted trees (``None`` for a logistic regression).
    """

    fill: np.ndarray
    mean: np.ndarray | None
    scale: np.ndarray | None
    support: np.ndarray
    coef: np.ndarray | None = None
    intercept: float | None = None
    trees: TreeEnsemble | None = None

    def transform(self, X: Any) -> np.ndarray:
        """The matrix the classifier sees."""
        Z = np.array(X, dtype=np.float64)
        missing = np.isnan(Z)
        if missing.any():
            Z[missing] = np.broadcast_to(self.fill, Z.shape)[missing]
        if self.mean is not None:
            Z -= self.mean
        if self.scale is not None:
            Z /= self.scale
        return Z[:, self.support]

    def _positive(self, Z: np.ndarray) -> np.ndarray:
        if self.trees is not None:
            return self.trees.probability(Z)
        assert self.coef is not None and self.intercept is not None
        score = (Z @ self.coef[:, None]).ravel() + self.intercept
        return np.array([1.0 / (1.0 + math.exp(-s)) for s in score], dtype=np.float64)

    def predict_proba(self, X: Any) -> np.ndarray:
        """``(n, 2)``: probability of class 0 and of class 1 (responder)."""
        p = self._positive(self.transform(X))
        return np.stack([1 - p, p], axis=1)

    def contributions(self, X: pd.DataFrame) -> pd.DataFrame:
        """Per-sample, per-feature log-odds contributions (0 for unselected features)."""
        Z = self.transform(X)
        out = np.zeros((len(X), X.shape[1]))
        if self.trees is not None:
            out[:, self.support] = self.trees.shap(Z)
        else:
            assert self.coef is not None
            out[:, self.support] = Z * self.coef[None, :]
        return pd.DataFrame(out, columns=list(X.columns), index=X.index)


# --------------------------------------------------------------------------- compiling
def _trees(clf: Any) -> TreeEnsemble | None:
    booster = clf.get_booster()
    model = json.loads(booster.save_raw("json"))["learner"]
    gb = model["gradient_booster"]
    params = model["learner_model_param"]
    if (
        model["objective"]["name"] != "binary:logistic"
        or gb.get("name") != "gbtree"
        or str(params.get("num_class", "0")) != "0"
        or str(params.get("num_target", "1")) != "1"
        or getattr(clf, "best_iteration", None) is not None
    ):
        return None
    trees = gb["model"]["trees"]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("l", "r", "f", "t", "d", "c")}
    roots, offset = [], 0
    for t in trees:
        if any(int(s) != 0 for s in t.get("split_type", [])):  # categorical splits
            return None
        left, right = np.asarray(t["left_children"]), np.asarray(t["right_children"])
        inner = left >= 0
        parts["l"].append(np.where(inner, left + offset, -1))
        parts["r"].append(np.where(inner, right + offset, -1))
        parts["f"].append(np.asarray(t["split_indices"]))
        parts["t"].append(np.asarray(t["split_conditions"], dtype=np.float32))
        parts["d"].append(np.asarray(t["default_left"], dtype=bool))
        parts["c"].append(np.asarray(t["sum_hessian"], dtype=np.float64))
        roots.append(offset)
        offset += left.size
    base = np.float32(str(params["base_score"]).strip("[]"))
    return TreeEnsemble(
        left=np.concatenate(parts["l"]).astype(np.int64),
        right=np.concatenate(parts["r"]).astype(np.int64),
        feature=np.concatenate(parts["f"]).astype(np.int64),
        threshold=np.concatenate(parts["t"]),
        default_left=np.concatenate(parts["d"]),
        cover=np.concatenate(parts["c"]),
        roots=np.asarray(roots, dtype=np.int64),
        base_margin=np.float32(-_logf(np.float32(1.0) / base - np.float32(1.0))),
    )


def compile_pipeline(pipe: Any) -> CompiledPipeline | None:
    """The arrays of a fitted pipeline, or ``None`` if it has a step this module lacks."""
    steps = dict(pipe.steps)
    names = [name for name, _ in pipe.steps]
    if names[:2] != ["impute", "scale"] or len(names) not in (3, 4):
        return None
    imp, sc, clf = steps["impute"], steps["scale"], pipe.steps[-1][1]
    select: Any = steps.get("select", "passthrough") if len(names) == 4 else "passthrough"
    if type(imp).__name__ != "SimpleImputer" or getattr(imp, "add_indicator", False):
        return None
    if type(sc).__name__ != "StandardScaler":
        return None
    n = int(imp.n_features_in_)
    if np.asarray(imp.statistics_).shape != (n,) or not np.isfinite(imp.statistics_).all():
        return None  # an imputer that drops all-missing columns
    if select in (None, "passthrough"):
        support = np.arange(n)
    elif type(select).__name__ == "SelectKBest":
        support = np.flatnonzero(select.get_support())
    else:
        return None
    fill = np.asarray(imp.statistics_, dtype=np.float64)
    mean = np.asarray(sc.mean_, dtype=np.float64) if sc.with_mean else None
    scale = np.asarray(sc.scale_, dtype=np.float64) if sc.with_std else None
    kind = type(clf).__name__
    if kind == "LogisticRegression" and len(clf.classes_) == 2:
        coef = np.asarray(clf.coef_, dtype=np.float64).ravel()
        b = float(np.ravel(clf.intercept_)[0])
        return CompiledPipeline(fill, mean, scale, support, coef=coef, intercept=b)
    if kind == "XGBClassifier" and getattr(clf, "n_classes_", 2) == 2:
        trees = _trees(clf)
        return None if trees is None else CompiledPipeline(fill, mean, scale, support, trees=trees)
    return None


def compile_pipelines(
    pipe: Any, refits: Sequence[Any] | None
) -> tuple[CompiledPipeline, list[CompiledPipeline] | None] | None:
    """The pipeline and its refits compiled, or ``None`` if any of them cannot be."""
    main = compile_pipeline(pipe)
    rest = [compile_pipeline(m) for m in refits or []]
    if main is None or any(r is None for r in rest):
        return None
    return main, ([r for r in rest if r is not None] if refits is not None else None)


def _probe(
    features: Sequence[str], training: pd.DataFrame | None, fill: np.ndarray
) -> pd.DataFrame:
    """Rows to check a compiled pipeline on: the training cohort (or the imputer's centre)
    and copies of it scaled by log-normal noise of growing spread."""
    if training is not None and set(features) <= set(training.columns):
        base = training[list(features)].to_numpy(dtype=np.float64)
        base = base[np.isfinite(base).all(axis=1)]
    else:
        base = np.empty((0, len(features)))
    if not len(base):
        base = fill[None, :]
    rng = np.random.default_rng(20240917)
    rows = [base]
    for spread in (0.02, 0.1, 0.3, 1.0):
        reps = max(1, 64 // len(base))
        tiled = np.tile(base, (reps, 1))
        rows.append(tiled * np.exp(rng.normal(0.0, spread, tiled.shape)))
    return pd.DataFrame(np.vstack(rows), columns=list(features))


def verify(
    pipelines: Sequence[Any],
    compiled: Sequence[CompiledPipeline],
    features: Sequence[str],
    training: pd.DataFrame | None = None,
) -> bool:
    """Whether every compiled pipeline gives its pipeline's probabilities exactly and its
    contributions to 1e-5 on the probe rows (the training cohort and perturbed copies)."""
    from blinaprofile.models.runtime import contributions

    for pipe, comp in zip(pipelines, compiled, strict=True):
        X = _probe(features, training, comp.fill)
        want = np.asarray(pipe.predict_proba(X)[:, 1])
        got = comp.predict_proba(X)[:, 1]
        if want.shape != got.shape or not np.array_equal(want, got):
            return False
    main_pipe, main = pipelines[0], compiled[0]
    X = _probe(features, training, main.fill)
    want_c = contributions(main_pipe, X).to_numpy()
    got_c = main.contributions(X).to_numpy()
    return bool(np.allclose(got_c, want_c, rtol=1e-5, atol=1e-5))


# --------------------------------------------------------------------------- the cache
def _versions() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = [f"format={FORMAT}", f"numpy={np.__version__}"]
    for dist in ("scikit-learn", "xgboost"):
        try:
            out.append(f"{dist}={version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist}=none")
    return out


def cache_key(files: Sequence[Path], checked: str = "") -> str:
    """The cache key of a model's compiled pipelines: the SHA-256 of its skops files' bytes,
    the versions, and ``checked``: what the files passed before they were loaded (the
    loader's skops allow-list, as text; a changed list misses the cache)."""
    from blinaprofile.cache import file_digest

    return file_digest(files, *_versions(), checked) + ".npz"


def _pack(comp: CompiledPipeline, i: int, arrays: dict[str, Any]) -> dict[str, Any]:
    head: dict[str, Any] = {"support": comp.support.tolist(), "intercept": comp.intercept}
    arrays[f"{i}.fill"] = comp.fill
    for name in ("mean", "scale", "coef"):
        value = getattr(comp, name)
        head[name] = value is not None
        if value is not None:
            arrays[f"{i}.{name}"] = value
    head["trees"] = comp.trees is not None
    if comp.trees is not None:
        t = comp.trees
        for name in ("left", "right", "feature", "threshold", "default_left", "cover", "roots"):
            arrays[f"{i}.t.{name}"] = getattr(t, name)
        arrays[f"{i}.t.base"] = np.asarray([t.base_margin], dtype=np.float32)
    return head


def _unpack(head: dict[str, Any], i: int, z: Any) -> CompiledPipeline:
    trees = None
    if head["trees"]:
        names = ("left", "right", "feature", "threshold", "default_left", "cover", "roots")
        parts = {name: z[f"{i}.t.{name}"] for name in names}
        trees = TreeEnsemble(**parts, base_margin=np.float32(z[f"{i}.t.base"][0]))
    return CompiledPipeline(
        fill=z[f"{i}.fill"],
        mean=z[f"{i}.mean"] if head["mean"] else None,
        scale=z[f"{i}.scale"] if head["scale"] else None,
        support=np.asarray(head["support"], dtype=np.int64),
        coef=z[f"{i}.coef"] if head["coef"] else None,
        intercept=None if head["intercept"] is None else float(head["intercept"]),
        trees=trees,
    )


def store_compiled(
    files: Sequence[Path],
    main: CompiledPipeline,
    refits: list[CompiledPipeline] | None,
    checked: str = "",
) -> Path | None:
    """Keep compiled pipelines in the user cache (best effort; ``checked``: see
    :func:`cache_key`)."""
    from blinaprofile.cache import write_entry

    arrays: dict[str, Any] = {}
    heads = [_pack(c, i, arrays) for i, c in enumerate([main, *(refits or [])])]
    header = {"pipelines": heads, "refits": refits is not None}
    arrays["header"] = np.frombuffer(json.dumps(header).encode("utf-8"), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return write_entry(_KIND, cache_key(files, checked), buf.getvalue())


def load_compiled(
    files: Sequence[Path], checked: str = ""
) -> tuple[CompiledPipeline, list[CompiledPipeline] | None] | None:
    """The compiled pipelines of these skops files from the user cache, or ``None``
    (``checked``: see :func:`cache_key`)."""
    from blinaprofile.cache import read_entry

    if _LIBM is None:
        return None
    data = read_entry(_KIND, cache_key(files, checked))
    if data is None:
        return None
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode("utf-8"))
            comps = [_unpack(h, i, z) for i, h in enumerate(header["pipelines"])]
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError):
        return None  # a damaged entry: compiled again
    return comps[0], (comps[1:] if header["refits"] else None)
