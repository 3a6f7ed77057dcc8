"""The runtime of a packaged responder model: predictions with a probability interval, per-feature contributions (exact tree SHAP for tree models, linear terms otherwise), out-of-distribution scores.

Prediction
----------
``ResponderModel.predict`` takes a feature table (one row per sample) and returns ``probability``; ``probability_low``/``probability_high`` (a 95% interval from the bootstrap refits stored with the model: ``expit(logit(p) -/+ 1.96 * sd)`` with ``sd`` the SD of the refits' log-odds; NaN without refits); ``call`` and ``call_reason`` from :func:`call_state` (``responder`` when ``probability >= threshold``, else ``nonresponder``; :data:`UNCERTAIN` when the interval straddles the threshold; :data:`NO_CALL` for a row with a missing or non-finite feature, whose numbers are then NaN); and ``contrib_<feature>`` (additive contributions to the log-odds). ``params={"threshold": t}`` overrides the stored threshold; it must be a probability in [0, 1] (:func:`check_threshold`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from blinaprofile.errors import FeatureSchemaError, ModelError

if TYPE_CHECKING:  # pandas is imported where a table is made (not to load the module)
    import pandas as pd

__all__ = [
    "CALL_STATES",
    "MODALITIES",
    "NONRESPONDER",
    "NO_CALL",
    "OUTPUT_COLUMNS",
    "RESPONDER",
    "UNCERTAIN",
    "CallState",
    "ResponderModel",
    "call_state",
    "check_threshold",
    "contributions",
    "global_contributions",
    "path_shap",
    "probability_interval",
    "tree_paths",
    "tree_shap",
]

#: Columns of a prediction before the per-feature ``contrib_<feature>`` columns.
OUTPUT_COLUMNS = ("probability", "probability_low", "probability_high", "call", "call_reason")
#: The probability is at or above the threshold and nothing casts doubt on the label.
RESPONDER = "responder"
#: The probability is below the threshold and nothing casts doubt on the label.
NONRESPONDER = "nonresponder"
#: A probability exists but no label is reliable: the 95% interval straddles the threshold,
#: or the sample lies outside what the model was trained on.
UNCERTAIN = "uncertain"
#: No label at all: the sample failed QC, or a model feature is missing.
NO_CALL = "no call"
#: The four call states, in the order they are listed.
CALL_STATES = (RESPONDER, NONRESPONDER, UNCERTAIN, NO_CALL)
#: The data types a model can be trained on (``meta['modality']``).
MODALITIES = ("flow", "single_cell")
_Z95 = 1.959963984540054


def check_threshold(value: Any) -> float | None:
    """A decision threshold: ``None`` (use the model's) or a probability in [0, 1].

    Parameters
    ----------
    value
        What the caller passed (a number, or e.g. a REST request's ``params.threshold``).

    Returns
    -------
    float or None

    Raises
    ------
    ModelError
        ``value`` is not a finite number in [0, 1] (7, -1 and NaN are refused).
    """
    if value is None:
        return None
    bad = ModelError(f"threshold must be a probability in [0, 1], got {value!r}")
    if isinstance(value, bool | str | bytes):
        raise bad
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise bad from None
    if not (np.isfinite(t) and 0.0 <= t <= 1.0):
        raise bad
    return t


# --------------------------------------------------------------------------- call states
@dataclass(frozen=True)
class CallState:
    """A call and the line that says why.

    Attributes
    ----------
    state
        One of :data:`CALL_STATES`.
    reason
        Why, in words (``"95% interval 0.105-0.938 straddles the threshold 0.787"``).
    """

    state: str
    reason: str


def _finite(x: float | None) -> bool:
    return x is not None and bool(np.isfinite(x))


def call_state(
    probability: float | None,
    low: float | None,
    high: float | None,
    threshold: float,
    *,
    qc_failures: Sequence[str] = (),
    missing: Sequence[str] = (),
    ood: Sequence[str] = (),
) -> CallState:
    """The call of one sample: the one decision behind every label blinaprofile shows.

    In order: :data:`NO_CALL` when QC failed, a model feature is missing or there is no
    probability; :data:`UNCERTAIN` when the 95% interval straddles the threshold
    (``low < threshold <= high``: it holds values on both sides of the responder rule
    ``probability >= threshold``) or the sample is outside the model's training
    distribution; otherwise :data:`RESPONDER` (``probability >= threshold``) or
    :data:`NONRESPONDER`.

    Parameters
    ----------
    probability, low, high
        Responder probability and its 95% interval (``None`` or NaN when unavailable;
        without an interval the straddling test is skipped).
    threshold
        The decision threshold in [0, 1].
    qc_failures
        Why the sample failed QC (empty: it passed).
    missing
        Model features the sample lacks.
    ood
        Why the sample is outside the model's training distribution (features far from
        the training cohort, another modality).

    Returns
    -------
    CallState
        The state and its reason.
    """
    if qc_failures:
        return CallState(NO_CALL, "QC failed: " + "; ".join(qc_failures))
    if missing:
        return CallState(NO_CALL, f"model feature(s) {', '.join(missing)} missing")
    if probability is None or not _finite(probability):
        return CallState(NO_CALL, "no probability could be computed")
    t = float(threshold)
    doubts = list(ood)
    iv = (float(low), float(high)) if _finite(low) and _finite(high) else None  # type: ignore[arg-type]
    if iv is not None and iv[0] < t <= iv[1]:
        doubts.append(f"95% interval {iv[0]:.3f}-{iv[1]:.3f} straddles the threshold {t:.3f}")
    if doubts:
        return CallState(UNCERTAIN, "; ".join(doubts))
    state, sign = (RESPONDER, ">=") if probability >= t else (NONRESPONDER, "<")
    beside = (
        f"95% interval {iv[0]:.3f}-{iv[1]:.3f} clear of it"
        if iv is not None
        else "the model gives no interval"
    )
    return CallState(state, f"probability {probability:.3f} {sign} threshold {t:.3f}; {beside}")


# --------------------------------------------------------------------------- explanations
def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _split_pipeline(pipe: Any, X: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, Any]:
    """Preprocessed matrix, indices of the columns reaching the classifier, classifier."""
    if not hasattr(pipe, "steps"):
        raise ModelError("expected a scikit-learn Pipeline")
    Z = np.asarray(pipe[:-1].transform(X), dtype=float)
    cols = np.arange(X.shape[1])
    if "select" in pipe.named_steps:
        sel = pipe.named_steps["select"]
        if hasattr(sel, "get_support"):
            cols = np.flatnonzero(sel.get_support())
    return Z, cols, pipe.steps[-1][1]


def _tree_paths(tree: Any) -> tuple[list[float], list[dict[int, tuple[float, float, float]]]]:
    """Leaves of a fitted sklearn tree: class-1 fraction and per-feature (low, high, cover)."""
    t = tree.tree_
    values = t.value[:, 0, :]
    values = values / values.sum(axis=1, keepdims=True)
    col = 1 if values.shape[1] > 1 else 0
    return tree_paths(
        t.children_left,
        t.children_right,
        t.feature,
        t.threshold,
        t.weighted_n_node_samples,
        values[:, col],
    )


def tree_paths(
    left: np.ndarray,
    right: np.ndarray,
    feat: np.ndarray,
    thr: np.ndarray,
    wn: np.ndarray,
    values: np.ndarray,
    *,
    root: int = 0,
) -> tuple[list[float], list[dict[int, tuple[float, float, float]]]]:
    """Leaves of one binary tree in node arrays: leaf value and per-feature (low, high, cover).

    A node goes left when ``x <= thr``; ``left`` is ``-1`` at a leaf, whose value is in
    ``values``. For each leaf the splits on its path are merged per feature into one interval
    ``low < x <= high`` and one cover fraction (product of child/parent weights ``wn``).
    """
    leaves: list[float] = []
    paths: list[dict[int, tuple[float, float, float]]] = []
    stack: list[tuple[int, dict[int, tuple[float, float, float]]]] = [(root, {})]
    while stack:
        node, cond = stack.pop()
        if left[node] == -1:
            leaves.append(float(values[node]))
            paths.append(cond)
            continue
        f = int(feat[node])
        lo, hi, cov = cond.get(f, (-np.inf, np.inf, 1.0))
        for child, is_left in ((left[node], True), (right[node], False)):
            frac = wn[child] / wn[node]
            new = dict(cond)
            new[f] = (
                (lo, min(hi, thr[node]), cov * frac)
                if is_left
                else (max(lo, thr[node]), hi, cov * frac)
            )
            stack.append((child, new))
    return leaves, paths


def tree_shap(estimators: list[Any], Z: np.ndarray) -> tuple[np.ndarray, float]:
    """Exact path-dependent TreeSHAP of the averaged class-1 probability of sklearn trees.

    Parameters
    ----------
    estimators
        Fitted :class:`~sklearn.tree.DecisionTreeClassifier` objects (e.g. a random forest's
        ``estimators_``); the explained function is their mean class-1 probability.
    Z
        Samples x features, as the trees see them.

    Returns
    -------
    phi, expected
        SHAP values (samples x features, probability scale) and the expected value; for
        every sample ``expected + phi.sum() == mean tree probability`` (local accuracy).

    Notes
    -----
    Under the path-dependent value function, each leaf ``l`` contributes
    ``v_l * prod_{j in S} o_j(x) * prod_{j not in S} z_j`` to ``f_S(x)``, where for each
    feature ``j`` on the leaf's path ``o_j(x)`` says whether ``x`` satisfies all of its
    splits on ``j`` and ``z_j`` is the share of training samples that follow them. The
    Shapley value of such a product game has a closed form through the coefficients of
    ``prod_{i != j} (z_i + o_i t)``; we build the full polynomial once per leaf and divide
    one factor out per feature, vectorised over samples and leaves. Paths are padded with
    ``z = o = 1`` factors, which are null players and leave the values unchanged.
    """
    vals: list[float] = []
    paths: list[dict[int, tuple[float, float, float]]] = []
    for est in estimators:
        v, p = _tree_paths(est)
        vals.extend(v)
        paths.extend(p)
    return path_shap(np.asarray(vals) / len(estimators), paths, Z)


def path_shap(
    values: np.ndarray, paths: list[dict[int, tuple[float, float, float]]], Z: np.ndarray
) -> tuple[np.ndarray, float]:
    """Exact path-dependent TreeSHAP of a sum of leaf values (see :func:`tree_shap`).

    Parameters
    ----------
    values
        One value per leaf of every tree; the explained function is their sum over the
        leaves each sample reaches.
    paths
        Per leaf, :func:`tree_paths`' ``feature -> (low, high, cover)``.
    Z
        Samples x features, as the trees see them (compared as float32 values).

    Returns
    -------
    phi, expected
        SHAP values (samples x features) and the expected value.
    """
    from blinaprofile.models.metrics import shapley_weights

    Z = np.asarray(Z, dtype=np.float32).astype(float)  # trees compare float32 values
    n, d = Z.shape
    L = len(values)
    D = max(1, max(len(p) for p in paths))
    F = np.zeros((L, D), dtype=int)
    LO = np.full((L, D), -np.inf)
    HI = np.full((L, D), np.inf)
    ZF = np.ones((L, D))
    for li, path in enumerate(paths):
        for k, (f, (lo, hi, cov)) in enumerate(path.items()):
            F[li, k], LO[li, k], HI[li, k], ZF[li, k] = f, lo, hi, cov
    V = np.asarray(values, dtype=float)
    expected = float(np.sum(V * np.prod(ZF, axis=1)))
    w = shapley_weights(D)
    onehot = np.zeros((L * D, d))
    onehot[np.arange(L * D), F.ravel()] = 1.0
    phi = np.zeros((n, d))
    chunk = max(1, int(2e6 // max(1, L * (D + 1))))
    for start in range(0, n, chunk):
        Xc = Z[start : start + chunk]
        xv = Xc[:, F]  # c x L x D
        ind = ((xv > LO) & (xv <= HI)).astype(float)
        # full polynomial prod_k (z_k + o_k t): coefficients c x L x (D + 1)
        P = np.zeros((*ind.shape[:2], D + 1))
        P[..., 0] = 1.0
        for k in range(D):
            z, o = ZF[None, :, k, None], ind[:, :, k, None]
            shifted = np.concatenate([np.zeros_like(P[..., :1]), P[..., :-1]], axis=-1)
            P = P * z + shifted * o
        contrib = np.zeros(ind.shape)
        for k in range(D):
            z = ZF[None, :, k]
            o = ind[:, :, k]
            # divide out (z + o t): o == 1 -> synthetic division from the top; o == 0 -> / z
            Q1 = np.zeros((*ind.shape[:2], D))
            Q1[..., D - 1] = P[..., D]
            for s in range(D - 1, 0, -1):
                Q1[..., s - 1] = P[..., s] - z * Q1[..., s]
            Q0 = P[..., :D] / z[..., None]
            Q = np.where(o[..., None] > 0.5, Q1, Q0)
            contrib[:, :, k] = (Q @ w) * (o - z)
        contrib *= V[None, :, None]
        phi[start : start + chunk] = contrib.reshape(len(Xc), L * D) @ onehot
    return phi, expected


def _to_log_odds(phi: np.ndarray, prob: np.ndarray, base: float) -> np.ndarray:
    """Rescale probability-scale contributions to sum to ``logit(prob) - logit(base)``."""
    prob = np.asarray(prob, dtype=float)
    p = np.clip(prob, 0.01, 0.99)
    b = float(np.clip(base, 0.01, 0.99))
    diff = prob - base  # what the probability-scale values add up to
    far = np.abs(diff) > 1e-9
    slope = np.where(
        far,
        (_logit(p) - _logit(np.array(b))) / np.where(far, diff, 1.0),
        1.0 / (b * (1 - b)),
    )
    return phi * slope[:, None]


def contributions(pipe: Any, X: pd.DataFrame) -> pd.DataFrame:
    """Per-sample, per-feature log-odds contributions of a fitted pipeline.

    Contributions are relative to an average training sample (standardised value 0) and
    add up to the sample's log-odds minus the model's baseline log-odds:

    - logistic regression: coefficient x standardised value (exact);
    - calibrated linear SVM: sigmoid slope x SVM coefficient x standardised value, averaged
      over the calibration folds (exact per fold);
    - XGBoost: TreeSHAP values on the margin, from the booster (exact);
    - random forest: exact path-dependent TreeSHAP of the forest probability
      (:func:`tree_shap`), rescaled to log-odds per sample so they add up to
      ``logit(p) - logit(expected p)`` (probabilities clipped to [0.01, 0.99]);
    - anything else: occlusion (log-odds change when the standardised feature is set to 0).

    Features dropped by a selection step get 0.
    """
    explain = getattr(pipe, "contributions", None)
    if explain is not None:  # a compiled pipeline (blinaprofile.models.compiled) explains itself
        return explain(X)
    names = list(X.columns)
    Z, cols, clf = _split_pipeline(pipe, X)
    out = np.zeros((len(X), len(names)))
    if hasattr(clf, "calibrated_classifiers_"):
        parts = []
        for cc in clf.calibrated_classifiers_:
            coef = np.asarray(cc.estimator.coef_).ravel()
            a = float(cc.calibrators[0].a_)
            parts.append(-a * Z * coef[None, :])
        out[:, cols] = np.mean(parts, axis=0)
    elif hasattr(clf, "coef_"):
        out[:, cols] = Z * np.asarray(clf.coef_).ravel()[None, :]
    elif hasattr(clf, "get_booster"):
        import xgboost as xgb

        contrib = clf.get_booster().predict(xgb.DMatrix(Z), pred_contribs=True)
        out[:, cols] = contrib[:, : Z.shape[1]]
    elif hasattr(clf, "estimators_") and all(hasattr(e, "tree_") for e in clf.estimators_):
        phi, base = tree_shap(list(clf.estimators_), Z)
        prob = clf.predict_proba(Z)[:, 1]
        out[:, cols] = _to_log_odds(phi, prob, base)
    else:
        full = _logit(clf.predict_proba(Z)[:, 1])
        for j in range(Z.shape[1]):
            Zj = Z.copy()
            Zj[:, j] = 0.0
            out[:, cols[j]] = full - _logit(clf.predict_proba(Zj)[:, 1])
    import pandas as pd

    return pd.DataFrame(out, columns=names, index=X.index)


def global_contributions(pipe: Any, X: pd.DataFrame) -> dict[str, float]:
    """Mean absolute contribution of each feature over ``X`` (mean |SHAP| for tree models)."""
    c = contributions(pipe, X.astype(float))
    return {k: float(v) for k, v in c.abs().mean().sort_values(ascending=False).items()}


def probability_interval(
    prob: np.ndarray, refit_probs: np.ndarray, *, z: float = _Z95
) -> tuple[np.ndarray, np.ndarray]:
    """``expit(logit(prob) -/+ z * sd)`` with ``sd`` the SD of refit log-odds per sample.

    ``refit_probs`` is ``models x samples``. Returns NaN where there are fewer than 2 refits.
    """
    prob = np.asarray(prob, dtype=float)
    refit_probs = np.atleast_2d(np.asarray(refit_probs, dtype=float))
    if refit_probs.shape[0] < 2:
        nan = np.full(prob.shape, np.nan)
        return nan, nan
    sd = np.std(_logit(refit_probs), axis=0, ddof=1)
    centre = _logit(prob)
    return 1 / (1 + np.exp(-(centre - z * sd))), 1 / (1 + np.exp(-(centre + z * sd)))


# --------------------------------------------------------------------------- runtime
class ResponderModel:
    """Runtime of a packaged model (used by the MLflow pyfunc wrapper and directly).

    Parameters
    ----------
    pipeline
        Fitted scikit-learn Pipeline from the feature table to probabilities.
    meta
        ``features``, ``schema_version``, ``threshold``, ``training_stats`` ...
    uncertainty
        Bootstrap refits of the pipeline (for ``probability_low/high``), or ``None``.
    """

    def __init__(
        self, pipeline: Any, meta: dict[str, Any], uncertainty: list[Any] | None = None
    ) -> None:
        self.pipeline = pipeline
        self.meta = meta
        self.uncertainty = list(uncertainty) if uncertainty else []

    @property
    def features(self) -> list[str]:
        return list(self.meta["features"])

    @property
    def threshold(self) -> float:
        return float(self.meta["threshold"])

    @property
    def modality_recorded(self) -> bool:
        """Whether ``meta.json`` records the modality (models from before it was recorded don't)."""
        return "modality" in self.meta

    @property
    def modality(self) -> str:
        """The modality the model was trained on (one of :data:`MODALITIES`).

        ``"flow"`` for a model that does not record it (:attr:`modality_recorded`).

        Raises
        ------
        ModelError
            ``meta.json`` records a modality that is not one of :data:`MODALITIES`.
        """
        m = self.meta.get("modality", "flow")
        if m not in MODALITIES:
            raise ModelError(f"meta.json modality must be one of {list(MODALITIES)}, got {m!r}")
        return str(m)

    def check_features(self, table: pd.DataFrame) -> pd.DataFrame:
        """Select the model's features, refusing tables that lack them."""
        missing = [f for f in self.features if f not in table.columns]
        if missing:
            raise FeatureSchemaError(
                f"the model needs feature(s) {missing} (schema {self.meta['schema_version']}); "
                f"the table has {sorted(table.columns)}"
            )
        if "schema_version" in table.columns:
            versions = set(table["schema_version"].dropna().astype(str))
            if versions and versions != {str(self.meta["schema_version"])}:
                raise FeatureSchemaError(
                    f"feature table has schema version(s) {sorted(versions)}, the model was "
                    f"trained on {self.meta['schema_version']}"
                )
        return table[self.features].astype(float)

    def predict_interval(self, table: pd.DataFrame) -> pd.DataFrame:
        """``probability``, ``probability_low``, ``probability_high`` for each row."""
        import pandas as pd

        X = self.check_features(table)
        prob = self.pipeline.predict_proba(X)[:, 1]
        if self.uncertainty:
            refit = np.vstack([m.predict_proba(X)[:, 1] for m in self.uncertainty])
            lo, hi = probability_interval(prob, refit)
        else:
            lo = hi = np.full(len(X), np.nan)
        return pd.DataFrame(
            {"probability": prob, "probability_low": lo, "probability_high": hi}, index=table.index
        )

    def predict(self, table: pd.DataFrame, *, threshold: float | None = None) -> pd.DataFrame:
        """Probability with its interval, call and per-feature contributions for each row.

        Parameters
        ----------
        table
            One row per sample with (at least) the model's features.
        threshold
            Decision threshold in [0, 1] overriding the model's (:func:`check_threshold`).

        Returns
        -------
        pandas.DataFrame
            :data:`OUTPUT_COLUMNS` then ``contrib_<feature>``. ``call`` and ``call_reason``
            come from :func:`call_state` without QC or out-of-distribution input (the
            caller's to add): ``responder``, ``nonresponder``, ``uncertain`` when the
            interval straddles the threshold, or ``no call`` with NaN numbers for a row
            with a missing or non-finite feature.
        """
        import pandas as pd

        checked = check_threshold(threshold)
        t = self.threshold if checked is None else checked
        X = self.check_features(table)
        finite = np.isfinite(X.to_numpy(dtype=float))
        usable = finite.all(axis=1)
        out = pd.DataFrame(np.nan, index=table.index, columns=list(OUTPUT_COLUMNS))
        contrib = pd.DataFrame(np.nan, index=table.index, columns=X.columns)
        if usable.any():
            part = self.predict_interval(table.loc[usable])
            for c in part.columns:
                out.loc[usable, c] = part[c].to_numpy()
            contrib.loc[usable] = contributions(self.pipeline, X.loc[usable]).to_numpy()
        names = np.asarray(X.columns)
        calls = [
            call_state(p, lo, hi, t, missing=list(names[~ok]))
            for p, lo, hi, ok in zip(
                out["probability"],
                out["probability_low"],
                out["probability_high"],
                finite,
                strict=True,
            )
        ]
        out["call"] = [c.state for c in calls]
        out["call_reason"] = [c.reason for c in calls]
        for c in contrib.columns:
            out[f"contrib_{c}"] = contrib[c].to_numpy(dtype=float)
        return out

    def ood_scores(self, table: pd.DataFrame) -> pd.DataFrame:
        """Robust z of each feature against the training cohort (median / scaled MAD).

        Measured on the feature's :func:`~blinaprofile.features.schema.ood_scale` (logit for
        percentages, log for ratios) when the model recorded it.
        """
        import pandas as pd

        from blinaprofile.features.schema import to_ood_scale

        stats = self.meta["training_stats"]
        X = table[self.features].astype(float)
        z = {}
        for f in self.features:
            med = stats[f]["median"]
            scale = max(stats[f]["mad"] * 1.4826, stats[f].get("min_scale", 1e-6))
            x = to_ood_scale(f, X[f]) if stats[f].get("scale", "identity") != "identity" else X[f]
            z[f] = (np.asarray(x, dtype=float) - med) / scale
        return pd.DataFrame(z, index=table.index)
