"""Classification metrics for small cohorts, with patient-level bootstrap intervals.

Everything here works on out-of-fold (OOF) predictions from repeated cross-validation:
``prob`` and ``call`` arrays are ``repeats x samples``. A point estimate is the mean of
the per-repeat metric; its 95% interval is the percentile interval of that same mean
over bootstrap resamples of *patients* (all samples of a drawn patient come along, so
several timepoints of one patient never count as independent evidence).

The bootstrap is vectorised: a resample is a vector of integer weights (how often each
patient was drawn), and every metric here has a weighted form, so 1,000 resamples of a
100-patient cohort cost milliseconds rather than seconds.
"""

from __future__ import annotations

from math import comb
from typing import Literal

import numpy as np
import pandas as pd

__all__ = [
    "METRIC_NAMES",
    "bootstrap_weights",
    "calibration_table",
    "choose_threshold",
    "expected_calibration_error",
    "permutation_pvalue",
    "roc_auc",
    "shapley_weights",
    "summarize",
    "weighted_auc",
]

#: Metrics :func:`summarize` reports (each with ``_ci_low`` / ``_ci_high``).
METRIC_NAMES: tuple[str, ...] = (
    "roc_auc",
    "balanced_accuracy",
    "sensitivity",
    "specificity",
    "brier",
    "ece",
)

ThresholdRuleName = Literal["max_balanced_accuracy", "min_sensitivity", "fixed"]


# --------------------------------------------------------------------------- point metrics
def roc_auc(y: np.ndarray, prob: np.ndarray) -> float:
    """ROC AUC by the Mann-Whitney statistic (ties count one half); NaN with one class."""
    y = np.asarray(y).astype(int)
    prob = np.asarray(prob, dtype=float)
    ok = np.isfinite(prob)
    y, prob = y[ok], prob[ok]
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = pd.Series(prob).rank().to_numpy()
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def weighted_auc(y: np.ndarray, prob: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC under each row of sample ``weights`` (shape ``B x n``); NaN where a class is empty.

    With integer bootstrap weights this equals the AUC of the resampled data set.
    """
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=float)
    w = np.atleast_2d(np.asarray(weights, dtype=float))
    pp, pn = prob[y], prob[~y]
    cmp = (pp[:, None] > pn[None, :]).astype(float) + 0.5 * (pp[:, None] == pn[None, :])
    wp, wn = w[:, y], w[:, ~y]
    num = np.einsum("bi,ij,bj->b", wp, cmp, wn)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def _weighted_threshold_metrics(
    y: np.ndarray, call: np.ndarray, w: np.ndarray
) -> dict[str, np.ndarray]:
    pos = np.asarray(y).astype(bool)
    call = np.asarray(call).astype(bool)
    wp = w[:, pos].sum(axis=1)
    wn = w[:, ~pos].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = (w[:, pos] * call[pos]).sum(axis=1) / wp
        spec = (w[:, ~pos] * ~call[~pos]).sum(axis=1) / wn
    return {"sensitivity": sens, "specificity": spec, "balanced_accuracy": 0.5 * (sens + spec)}


def _weighted_brier(y: np.ndarray, prob: np.ndarray, w: np.ndarray) -> np.ndarray:
    err = (np.asarray(prob, dtype=float) - np.asarray(y, dtype=float)) ** 2
    return (w * err).sum(axis=1) / w.sum(axis=1)


def _bin_index(prob: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip((np.asarray(prob, dtype=float) * n_bins).astype(int), 0, n_bins - 1)


def _weighted_ece(y: np.ndarray, prob: np.ndarray, w: np.ndarray, n_bins: int) -> np.ndarray:
    b = _bin_index(prob, n_bins)
    onehot = np.eye(n_bins)[b]  # n x bins
    wb = w @ onehot  # B x bins
    sum_p = (w * prob) @ onehot
    sum_y = (w * np.asarray(y, dtype=float)) @ onehot
    gap = np.abs(sum_p - sum_y)  # |n_k (mean_p_k - frac_pos_k)|
    return gap.sum(axis=1) / wb.sum(axis=1)


def expected_calibration_error(y: np.ndarray, prob: np.ndarray, *, n_bins: int = 5) -> float:
    """Expected calibration error with ``n_bins`` equal-width probability bins.

    ``sum_k (n_k / n) |mean predicted_k - observed responder fraction_k|``. Small cohorts
    make this biased upwards (a perfectly calibrated model scores above 0); compare models
    on the same cohort rather than against 0.
    """
    w = np.ones((1, len(y)))
    return float(_weighted_ece(np.asarray(y), np.asarray(prob, dtype=float), w, n_bins)[0])


def calibration_table(y: np.ndarray, prob: np.ndarray, *, n_bins: int = 5) -> pd.DataFrame:
    """Calibration curve: per equal-width bin, mean predicted probability and observed rate."""
    prob = np.asarray(prob, dtype=float)
    y = np.asarray(y, dtype=float)
    b = _bin_index(prob, n_bins)
    rows = []
    for k in range(n_bins):
        m = b == k
        if not m.any():
            continue
        rows.append(
            {
                "bin_low": k / n_bins,
                "bin_high": (k + 1) / n_bins,
                "n": int(m.sum()),
                "mean_predicted": float(prob[m].mean()),
                "observed_fraction": float(y[m].mean()),
            }
        )
    return pd.DataFrame(
        rows, columns=["bin_low", "bin_high", "n", "mean_predicted", "observed_fraction"]
    )


# --------------------------------------------------------------------------- threshold
def choose_threshold(
    y: np.ndarray,
    prob: np.ndarray,
    *,
    rule: ThresholdRuleName | str = "max_balanced_accuracy",
    value: float = 0.5,
) -> float:
    """A decision threshold (call responder when ``prob >= threshold``) by a rule.

    Parameters
    ----------
    y, prob
        Labels (1 responder) and probabilities the rule is fitted on (inside CV: the inner
        out-of-fold probabilities of the outer training split).
    rule
        ``max_balanced_accuracy``: the cut maximising (sensitivity + specificity) / 2, placed
        midway between the two neighbouring observed probabilities;
        ``min_sensitivity``: the highest cut whose sensitivity is at least ``value``;
        ``fixed``: ``value``.
    """
    if rule == "fixed":
        return float(value)
    y = np.asarray(y).astype(bool)
    prob = np.asarray(prob, dtype=float)
    ok = np.isfinite(prob)
    y, prob = y[ok], prob[ok]
    if y.all() or not y.any():
        return 0.5
    uniq = np.unique(prob)
    # candidate cuts: midpoints between neighbouring probabilities, plus the extremes
    cuts = np.concatenate([[uniq[0]], 0.5 * (uniq[1:] + uniq[:-1]), [np.nextafter(uniq[-1], 2.0)]])
    call = prob[None, :] >= cuts[:, None]
    sens = call[:, y].mean(axis=1)
    spec = (~call[:, ~y]).mean(axis=1)
    if rule == "min_sensitivity":
        ok_cut = np.flatnonzero(sens >= value - 1e-12)
        return float(cuts[ok_cut[-1]]) if ok_cut.size else float(cuts[0])
    if rule != "max_balanced_accuracy":
        raise ValueError(f"unknown threshold rule {rule!r}")
    ba = 0.5 * (sens + spec)
    best = np.flatnonzero(ba >= ba.max() - 1e-12)
    # among equally good cuts, take the middle one (least sensitive to the exact data)
    return float(cuts[best[len(best) // 2]])


# --------------------------------------------------------------------------- bootstrap
def bootstrap_weights(groups: np.ndarray, *, n: int, seed: int = 0) -> np.ndarray:
    """Integer sample weights of ``n`` patient-level bootstrap resamples (``n x samples``)."""
    groups = np.asarray(groups)
    uniq, inv = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(uniq), np.full(len(uniq), 1.0 / len(uniq)), size=n)
    return counts[:, inv].astype(float)


def _per_repeat(
    y: np.ndarray, prob: np.ndarray, call: np.ndarray, w: np.ndarray, n_bins: int
) -> dict[str, np.ndarray]:
    out = {"roc_auc": weighted_auc(y, prob, w), "brier": _weighted_brier(y, prob, w)}
    out.update(_weighted_threshold_metrics(y, call, w))
    out["ece"] = _weighted_ece(y, prob, w, n_bins)
    return out


def summarize(
    y: np.ndarray,
    prob: np.ndarray,
    call: np.ndarray,
    groups: np.ndarray,
    *,
    n_bootstrap: int = 500,
    n_bins: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """Point estimates and patient-bootstrap 95% intervals of :data:`METRIC_NAMES`.

    Parameters
    ----------
    y
        Labels (1 responder, 0 nonresponder), one per sample.
    prob, call
        Out-of-fold probabilities and calls, ``repeats x samples`` (or one row).
    groups
        Patient of each sample (the bootstrap resamples patients).
    n_bootstrap
        Resamples; 0 gives NaN intervals.

    Returns
    -------
    dict
        ``metric``, ``metric_ci_low``, ``metric_ci_high`` for each metric.
    """
    y = np.asarray(y).astype(int)
    prob = np.atleast_2d(np.asarray(prob, dtype=float))
    call = np.atleast_2d(np.asarray(call)).astype(bool)
    ones = np.ones((1, len(y)))
    point: dict[str, list[float]] = {m: [] for m in METRIC_NAMES}
    boot: dict[str, list[np.ndarray]] = {m: [] for m in METRIC_NAMES}
    w = bootstrap_weights(groups, n=n_bootstrap, seed=seed) if n_bootstrap > 0 else None
    for r in range(prob.shape[0]):
        for m, v in _per_repeat(y, prob[r], call[r], ones, n_bins).items():
            point[m].append(float(v[0]))
        if w is not None:
            for m, v in _per_repeat(y, prob[r], call[r], w, n_bins).items():
                boot[m].append(v)
    out: dict[str, float] = {}
    for m in METRIC_NAMES:
        out[m] = float(np.mean(point[m]))
        if w is None:
            lo = hi = float("nan")
        else:
            dist = np.mean(np.vstack(boot[m]), axis=0)
            dist = dist[np.isfinite(dist)]
            lo, hi = (
                (float(np.percentile(dist, 2.5)), float(np.percentile(dist, 97.5)))
                if dist.size
                else (float("nan"), float("nan"))
            )
        out[f"{m}_ci_low"], out[f"{m}_ci_high"] = lo, hi
    return out


def permutation_pvalue(observed: float, null: np.ndarray) -> float:
    """One-sided permutation p-value ``(1 + #{null >= observed}) / (1 + n)``.

    The ``+1`` counts the observed labelling as one of the permutations, so the p-value is
    never 0 and is exact (valid) for any number of permutations.
    """
    null = np.asarray(null, dtype=float)
    null = null[np.isfinite(null)]
    if not np.isfinite(observed) or null.size == 0:
        return float("nan")
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + null.size))


def shapley_weights(m: int) -> np.ndarray:
    """``s! (m - s - 1)! / m!`` for ``s = 0 .. m-1`` (coalition-size weights of Shapley values)."""
    return np.array([1.0 / (m * comb(m - 1, s)) for s in range(m)])
