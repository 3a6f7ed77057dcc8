"""Mixture models of the annotator.

Two-component Gaussian mixtures on CLR protein (per-sample gates with a cohort fallback), the
two-state negative-binomial mixture on a gene set's raw counts with library size as exposure,
a two-component Gaussian mixture on a log-normalised gene-set score (normalised data), and the
per-sample prior of a state given fixed rates (:func:`sample_log_prior`).

Every model is learned once (``fit_*``) and then applied cell by cell; the only per-sample
quantities estimated when applying are the per-sample gates and priors, which depend on that
sample's cells alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from blinaprofile.annotate.config import ProteinSpec, RNASpec
from blinaprofile.annotate.rna import RNABlock

#: per-sample priors are clipped to this range (as in the EM)
PRIOR_FLOOR = 1e-4


# =========================================================================== helpers
def expit(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64))))


def logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    return np.asarray(np.log(q) - np.log1p(-q))


def otsu(v: np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample (128-bin histogram)."""
    lo, hi = float(np.min(v)), float(np.max(v))
    if hi <= lo:
        return lo
    h, e = np.histogram(v, bins=128, range=(lo, hi))
    c = (e[:-1] + e[1:]) / 2
    w0 = np.cumsum(h).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(h * c)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(e[int(np.argmax(between)) + 1])


# =========================================================================== 1-D Gaussian mixtures
@dataclass
class GMM:
    """A two-component 1-D Gaussian mixture (component 0 low, 1 high) and its threshold."""

    mu: np.ndarray
    sd: np.ndarray
    w: np.ndarray
    n: int
    separation: float
    ok: bool
    threshold: float
    method: str = "mixture"

    def log_ratio(self, v: np.ndarray) -> np.ndarray:
        """log N(v | high) - log N(v | low), made monotone beyond the component means."""

        def lp(k: int, x: np.ndarray) -> np.ndarray:
            return np.asarray(-np.log(self.sd[k]) - 0.5 * ((x - self.mu[k]) / self.sd[k]) ** 2)

        v = np.asarray(v, dtype=np.float64)
        out = lp(1, v) - lp(0, v)
        at = lp(1, self.mu) - lp(0, self.mu)
        out = np.where(v <= self.mu[0], np.minimum(out, at[0]), out)
        return np.asarray(np.where(v >= self.mu[1], np.maximum(out, at[1]), out))

    def prob(self, v: np.ndarray) -> np.ndarray:
        """P(high | v), made monotone in ``v`` and consistent with the threshold."""
        if self.method.startswith("rule"):
            return expit((v - self.threshold) / max(float(self.sd[0]) / 2.0, 1e-3))
        lp = [
            np.log(self.w[k]) - np.log(self.sd[k]) - 0.5 * ((v - self.mu[k]) / self.sd[k]) ** 2
            for k in (0, 1)
        ]
        p = expit(lp[1] - lp[0])
        p = np.where(v <= self.mu[0], np.minimum(p, 0.5), p)
        p = np.where(v >= self.mu[1], np.maximum(p, 0.5), p)
        p = np.where(v < self.threshold, np.minimum(p, 0.5), np.maximum(p, 0.5))
        return np.asarray(p)

    def as_dict(self) -> dict[str, Any]:
        return {
            "threshold": float(self.threshold),
            "method": self.method,
            "separation": float(self.separation),
            "n_cells": int(self.n),
            "mean_low": float(self.mu[0]),
            "mean_high": float(self.mu[1]),
            "sd_low": float(self.sd[0]),
            "sd_high": float(self.sd[1]),
            "weight_high": float(self.w[1]),
        }


def fit_gmm(v: np.ndarray, *, min_separation: float, min_weight: float, max_iter: int) -> GMM:
    """EM for a 1-D two-component Gaussian mixture on a 256-bin histogram.

    EM runs from four starts at once (Otsu's split and splits at the 50th, 75th and 90th
    percentiles) for 25 iterations, then continues from the most likely one. Binning makes a
    fit cost the same for 50 or 50,000 cells; the bin width (1/256 of the range) is far below
    the components' spread. The mixture is ``ok`` when Ashman's D reaches ``min_separation``
    and both weights reach ``min_weight``.
    """
    v = np.asarray(v, dtype=np.float64)
    n = v.size
    spread = float(np.ptp(v)) if n else 0.0
    floor = max(0.05, 0.02 * spread)
    mu0 = float(np.mean(v)) if n else 0.0
    degenerate = GMM(
        np.array([mu0, mu0]), np.array([floor, floor]), np.array([1.0, 1e-12]), n, 0.0, False, mu0
    )
    if n < 4 or spread <= 0:
        return degenerate
    h, e = np.histogram(v, bins=256)
    x = (e[:-1] + e[1:]) / 2
    keep = h > 0
    x, c = x[keep], h[keep].astype(np.float64)
    starts = np.array([otsu(v), *np.quantile(v, [0.5, 0.75, 0.9])])
    r1 = (x[None, :] > starts[:, None]).astype(np.float64)  # (starts, bins)

    def m_step(r1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = np.stack([1.0 - r1, r1], axis=1) * c  # (starts, 2, bins)
        wsum = r.sum(axis=2)
        safe = np.maximum(wsum, 1e-12)
        mu = (r * x).sum(axis=2) / safe
        var = (r * (x[None, None, :] - mu[:, :, None]) ** 2).sum(axis=2) / safe
        return wsum / n, mu, np.maximum(np.sqrt(var), floor)

    w, mu, sd = m_step(r1)
    valid = (w * n >= 2).all(axis=1)
    if not valid.any():
        return degenerate
    w, mu, sd = w[valid], mu[valid], sd[valid]
    prev = np.full(w.shape[0], -np.inf)
    tot = prev
    for it in range(max_iter):
        if it == 25 and w.shape[0] > 1:  # continue only from the best start so far
            keep_best = int(np.argmax(np.where((w > 1e-9).all(axis=1), tot, -np.inf)))
            w, mu, sd = w[[keep_best]], mu[[keep_best]], sd[[keep_best]]
            prev, tot = prev[[keep_best]], tot[[keep_best]]
        wc = np.maximum(w, 1e-300)
        lp = (
            np.log(wc)[:, :, None]
            - np.log(sd)[:, :, None]
            - 0.5 * ((x[None, None, :] - mu[:, :, None]) / sd[:, :, None]) ** 2
        )
        top = lp.max(axis=1)
        ll = top + np.log(np.exp(lp[:, 0] - top) + np.exp(lp[:, 1] - top))
        tot = ll @ c
        r1 = np.exp(lp[:, 1] - ll)
        w, mu, sd = m_step(r1)
        if np.all(np.abs(tot - prev) < 1e-6 * np.abs(tot)):
            break
        prev = tot
    ok_w = (w > 1e-9).all(axis=1)
    if not ok_w.any():
        return degenerate
    best = int(np.argmax(np.where(ok_w, tot, -np.inf)))
    mu, sd, w = mu[best].copy(), sd[best].copy(), w[best].copy()
    if mu[0] > mu[1]:
        mu, sd, w = mu[::-1].copy(), sd[::-1].copy(), w[::-1].copy()
    w = np.clip(w, 1e-12, 1.0)
    sep = float(np.sqrt(2.0) * abs(mu[1] - mu[0]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2))
    ok = bool(sep >= min_separation and w.min() >= min_weight)
    grid = np.linspace(mu[0], mu[1], 512)
    d = (np.log(w[1]) - np.log(sd[1]) - 0.5 * ((grid - mu[1]) / sd[1]) ** 2) - (
        np.log(w[0]) - np.log(sd[0]) - 0.5 * ((grid - mu[0]) / sd[0]) ** 2
    )
    cross = np.flatnonzero(d >= 0)
    thr = float(grid[cross[0]]) if cross.size else float(grid[-1])
    return GMM(mu, sd, w, n, sep, ok, thr)


def _protein_gmm(v: np.ndarray, spec: ProteinSpec) -> GMM:
    return fit_gmm(
        v, min_separation=spec.min_separation, min_weight=spec.min_weight, max_iter=spec.max_iter
    )


def rule_gmm(v: np.ndarray, k: float) -> GMM:
    """Threshold ``median + k * MAD`` for markers whose positives are a small minority."""
    med = float(np.median(v))
    mad = max(float(np.median(np.abs(v - med))) * 1.4826, 0.05)
    thr = med + k * mad
    frac = float(np.mean(v > thr))
    return GMM(
        np.array([med, med + 2 * k * mad]),
        np.array([mad, mad]),
        np.array([1 - frac, frac]),
        int(v.size),
        float("nan"),
        True,
        thr,
        method="rule_rare_positive",
    )


# =========================================================================== protein gates
@dataclass
class GateModel:
    """What a protein gate learns from the training cohort.

    ``pooled`` is the mixture over every training cell of the parent (used for a sample whose
    own mixture is not bimodal or that is too small); ``rule`` is ``median + k MAD`` over the
    same cells (rare-positive markers, for samples too small for their own rule);
    ``available`` says whether the gate was placed in at least one training sample, which
    decides, once and for all, whether the label comes from this protein.
    """

    marker: str
    rare: bool
    available: bool
    pooled: GMM | None
    rule: GMM | None


@dataclass
class MarkerGate:
    """A per-sample protein gate: P(positive) over QC cells (NaN outside the parent)."""

    prob: np.ndarray
    fits: dict[str, dict[str, Any]]
    available: bool


def fit_gate(values: np.ndarray, parent: np.ndarray, marker: str, spec: ProteinSpec) -> GateModel:
    """Learn the cohort-level fallbacks of a gate (see :class:`GateModel`)."""
    rare = marker in spec.rare_positive
    if not parent.any():
        return GateModel(marker, rare, False, None, None)
    v = values[parent]
    rule = rule_gmm(v, spec.rule_k_mad) if rare else None
    return GateModel(marker, rare, False, _protein_gmm(v, spec), rule)


def apply_gate(
    values: np.ndarray,
    parent: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    model: GateModel,
    spec: ProteinSpec,
) -> MarkerGate:
    """Gate each sample on its own cells: its own mixture when bimodal and large enough, else
    the cohort's pooled mixture, else (rare-positive markers) its own ``median + k MAD`` or,
    for a small sample, the cohort's."""
    prob = np.full(values.shape[0], np.nan)
    fits: dict[str, dict[str, Any]] = {}
    pooled = model.pooled
    any_ok = False
    # each sample's parent cells in their original order, found with one stable sort
    cells = np.flatnonzero(parent)
    g = groups[cells]
    order = np.argsort(g, kind="stable")
    cells, g = cells[order], g[order]
    bounds = np.searchsorted(g, np.arange(len(sample_names) + 1))
    for s, name in enumerate(sample_names):
        sel = cells[bounds[s] : bounds[s + 1]]
        if not sel.size:
            continue
        v = values[sel]
        fit: GMM | None = None
        if v.size >= spec.min_cells_per_fit:
            f = _protein_gmm(v, spec)
            fit = f if f.ok else None
        if fit is None and pooled is not None and pooled.ok:
            fit = replace(pooled, ok=True, method="pooled_mixture")
        if fit is None and model.rare:
            own_rule = v.size >= spec.min_cells_per_fit
            fit = rule_gmm(v, spec.rule_k_mad) if own_rule else model.rule
        if fit is None:
            fits[name] = {
                "method": "unavailable",
                "n_cells": int(v.size),
                "threshold": float("nan"),
            }
            continue
        any_ok = True
        prob[sel] = fit.prob(v)
        d = fit.as_dict()
        d["n_cells"] = int(v.size)
        fits[name] = d
    return MarkerGate(prob, fits, any_ok)


# =========================================================================== per-sample priors
def sample_log_prior(
    llr: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    prior: float,
    kappa: float,
    *,
    tol: float = 1e-12,
    max_iter: int = 100,
) -> np.ndarray:
    """logit of each sample's P(high) given the cells' log-likelihood ratios.

    The prior ``pi_s`` solves ``pi_s = (sum_i expit(llr_i + logit pi_s) + kappa * prior) /
    (n_s + kappa)`` over the sample's cells (the EM's prior step with the rates fixed),
    clipped to [1e-4, 1 - 1e-4]; a sample without cells gets ``prior``. It is solved for each
    sample by Newton's method kept inside a bisection bracket, and each sample stops on its
    own, so a sample's prior depends on its own cells only (alone or in a cohort: the same).
    """
    n_groups = max(n_groups, 1)
    cnt = np.bincount(groups, minlength=n_groups).astype(np.float64)
    lo = np.full(n_groups, PRIOR_FLOOR)
    hi = np.full(n_groups, 1.0 - PRIOR_FLOOR)

    def f(pi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = expit(llr + logit(pi)[groups])
        s1 = np.bincount(groups, weights=q, minlength=n_groups)
        d = np.bincount(groups, weights=q * (1.0 - q), minlength=n_groups)
        g = (s1 + kappa * prior) / (cnt + kappa)
        dg = d / (pi * (1.0 - pi)) / np.maximum(cnt + kappa, 1e-12)
        return g - pi, dg - 1.0

    f_lo, _ = f(lo)
    f_hi, _ = f(hi)
    q0 = expit(llr)
    pi = (np.bincount(groups, weights=q0, minlength=n_groups) + kappa * prior) / np.maximum(
        cnt + kappa, 1e-12
    )
    pi = np.clip(pi, PRIOR_FLOOR, 1.0 - PRIOR_FLOOR)
    done = (cnt == 0) | (f_lo <= 0) | (f_hi >= 0)
    pi = np.where(cnt == 0, prior, np.where(f_lo <= 0, lo, np.where(f_hi >= 0, hi, pi)))
    for _ in range(max_iter):
        if done.all():
            break
        fv, dv = f(pi)
        lo = np.where(~done & (fv > 0), pi, lo)
        hi = np.where(~done & (fv < 0), pi, hi)
        with np.errstate(divide="ignore", invalid="ignore"):
            step = pi - fv / dv
        bad = ~np.isfinite(step) | (step <= lo) | (step >= hi)
        new = np.where(bad, 0.5 * (lo + hi), step)
        conv = (np.abs(fv) < tol) | (hi - lo < tol)
        done_now = ~done & conv
        pi = np.where(done | done_now, pi, new)
        done = done | done_now
    return logit(np.clip(pi, PRIOR_FLOOR, 1.0 - PRIOR_FLOOR))


# =========================================================================== count mixtures
def nb_rates(
    X: np.ndarray,
    X2: np.ndarray,
    lib: np.ndarray,
    p: np.ndarray,
    prior_umis: float,
    glob: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-UMI rates of the two states (weights ``p`` / ``1-p``) and a shared NB dispersion.

    Rates are shrunk towards the global rate by ``prior_umis`` pseudo-UMIs; the dispersion
    ``theta`` of each gene is the method-of-moments estimate within states, clipped to
    [0.5, 1000] (1000 is practically Poisson). ``X2`` is ``X**2``. Everything reduces to
    matrix-vector products, so one call costs a few passes over ``X``.
    """
    q = 1.0 - p
    lib2 = lib * lib
    # np.dot, not @: 1-D @ 1-D takes a slow path in some numpy builds
    pl, ql = float(np.dot(p, lib)), float(np.dot(q, lib))
    pl2, ql2 = float(np.dot(p, lib2)), float(np.dot(q, lib2))
    r1 = (p @ X + prior_umis * glob) / (pl + prior_umis)
    r0 = (q @ X + prior_umis * glob) / (ql + prior_umis)
    # sum_i w_i [(x - L r)^2 - L r] = w.x2 - 2 r (w L).x + r^2 w.L^2 - r w.L
    excess = (
        p @ X2
        - 2 * r1 * ((p * lib) @ X)
        + r1**2 * pl2
        - r1 * pl
        + q @ X2
        - 2 * r0 * ((q * lib) @ X)
        + r0**2 * ql2
        - r0 * ql
    )
    second = r1**2 * pl2 + r0**2 * ql2
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(excess > 0, second / excess, 1000.0)
    return r1, r0, np.clip(np.nan_to_num(theta, nan=1000.0), 0.5, 1000.0)


def nb_loglik(X: np.ndarray, lib: np.ndarray, r: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Per-cell NB log-likelihood up to terms that do not depend on the state."""
    mu = lib[:, None] * r[None, :]
    lt = np.log(theta)[None, :]
    lmt = np.log(mu + theta[None, :])
    return np.asarray((X * (np.log(mu) - lmt) + theta[None, :] * (lt - lmt)).sum(axis=1))


@dataclass
class BinFit:
    """A two-state negative-binomial mixture on a gene set, library size as exposure.

    ``prior`` is the pooled P(high) of the training cohort (the shrinkage target of the
    per-sample priors); ``log_prior`` holds the per-sample priors of the cells it was fitted
    on (fit time only, not stored).
    """

    genes: list[str]
    n_up: int
    rate_high: np.ndarray
    rate_low: np.ndarray
    theta: np.ndarray
    log_prior: np.ndarray
    weights: dict[str, float]
    fold: float
    ok: bool
    n_cells: int
    n_iter: int
    note: str = ""
    prior: float = 0.5
    sec_genes: list[str] = field(default_factory=list)
    sec_log_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sec_rate_terms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sec_rate_diff: float = 0.0
    kind: str = "nb"

    def llr(self, X: np.ndarray, lib: np.ndarray, Xs: np.ndarray | None = None) -> np.ndarray:
        """Per-cell log-likelihood ratio high vs low (without the prior)."""
        out = nb_loglik(X, lib, self.rate_high, self.theta) - nb_loglik(
            X, lib, self.rate_low, self.theta
        )
        if Xs is not None and self.sec_genes:
            out = out + Xs @ self.sec_log_ratio - lib * self.sec_rate_diff
        return np.asarray(out)

    def without(self, drop: set[str]) -> BinFit:
        """The model on the other genes (a gene left out is marginalised, which is exact for
        independent per-gene likelihoods given the library size)."""
        keep = [i for i, g in enumerate(self.genes) if g not in drop]
        keep_s = [i for i, g in enumerate(self.sec_genes) if g not in drop]
        if len(keep) == len(self.genes) and len(keep_s) == len(self.sec_genes):
            return self
        terms = self.sec_rate_terms[keep_s]
        return replace(
            self,
            genes=[self.genes[i] for i in keep],
            n_up=sum(1 for i in keep if i < self.n_up),
            rate_high=self.rate_high[keep],
            rate_low=self.rate_low[keep],
            theta=self.theta[keep],
            sec_genes=[self.sec_genes[i] for i in keep_s],
            sec_log_ratio=self.sec_log_ratio[keep_s],
            sec_rate_terms=terms,
            sec_rate_diff=float(terms.sum()),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": "nb",
            "genes": list(self.genes),
            "rate_high_per_10k": np.asarray(self.rate_high * 1e4, dtype=float),
            "rate_low_per_10k": np.asarray(self.rate_low * 1e4, dtype=float),
            "nb_theta": np.asarray(self.theta, dtype=float),
            "secondary_genes": list(self.sec_genes),
            "secondary_log_rate_ratio": np.asarray(self.sec_log_ratio, dtype=float),
            "prior_positive": {k: float(v) for k, v in self.weights.items()},
            "pooled_prior_positive": float(self.prior),
            "fold": float(self.fold),
            "ok": bool(self.ok),
            "n_cells": int(self.n_cells),
            "n_iter": int(self.n_iter),
            "note": self.note,
        }


@dataclass
class GaussFit:
    """A two-component Gaussian mixture on a log-normalised gene-set score (normalised data,
    where counts are not available): up genes minus down genes, each minus its controls."""

    genes: list[str]
    n_up: int
    gmm: GMM
    prior: float
    ok: bool
    n_cells: int
    note: str = ""
    log_prior: np.ndarray = field(default_factory=lambda: np.zeros(0))
    weights: dict[str, float] = field(default_factory=dict)
    kind: str = "gauss"

    def as_dict(self) -> dict[str, Any]:
        d = self.gmm.as_dict()
        d.update(
            {
                "kind": "gauss",
                "genes": list(self.genes),
                "prior_positive": {k: float(v) for k, v in self.weights.items()},
                "pooled_prior_positive": float(self.prior),
                "ok": bool(self.ok),
                "n_cells": int(self.n_cells),
                "note": self.note,
            }
        )
        return d


SetModel = BinFit | GaussFit


def _sample_prior(
    p: np.ndarray, groups: np.ndarray, n_groups: int, kappa: float
) -> tuple[np.ndarray, float]:
    """Per-sample P(high), shrunk towards the pooled value by ``kappa`` pseudo-cells."""
    pooled = float(np.clip(p.mean(), PRIOR_FLOOR, 1 - PRIOR_FLOOR)) if p.size else 0.5
    s1 = np.bincount(groups, weights=p, minlength=n_groups)
    cnt = np.bincount(groups, minlength=n_groups)
    pi = (s1 + kappa * pooled) / np.maximum(cnt + kappa, 1e-12)
    return np.clip(pi, PRIOR_FLOOR, 1 - PRIOR_FLOOR), pooled


def _finish_prior(
    fit: BinFit, p: np.ndarray, groups: np.ndarray, sample_names: Sequence[str], kappa: float
) -> None:
    n_groups = len(sample_names)
    pi, pooled = _sample_prior(p, groups, n_groups, kappa)
    counts = np.bincount(groups, minlength=n_groups)
    fit.prior = pooled
    fit.log_prior = np.where(counts > 0, logit(pi), logit(pooled))
    fit.weights = {str(s): float(pi[i]) for i, s in enumerate(sample_names) if counts[i] > 0}


def _fit_count_mixture(
    X: np.ndarray,
    lib: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    init: np.ndarray,
    orient: np.ndarray,
    genes: list[str],
    spec: RNASpec,
) -> tuple[BinFit, np.ndarray]:
    """EM for a two-state NB mixture; the fit and the per-cell posteriors P(high).

    ``orient`` is +1 for genes marking the high state and -1 for genes marking the low one:
    the mean oriented log fold change names the states and decides whether two states were
    found at all (``rna.min_fold``). Rates and dispersions are fitted on at most
    ``rna.max_fit_cells`` cells (every sample represented in proportion); the per-sample
    priors and posteriors are then computed on all cells.
    """
    n_groups = len(sample_names)
    m = X.shape[0]
    fit_idx = np.arange(m)
    if m > spec.max_fit_cells:
        fit_idx = np.sort(np.random.default_rng(0).choice(m, spec.max_fit_cells, replace=False))
    Xf, libf, gf = X[fit_idx], lib[fit_idx], groups[fit_idx]
    X2f = Xf**2
    glob = (Xf.sum(axis=0) + 1e-3) / max(float(libf.sum()), 1.0)
    p = np.clip(init[fit_idx], 0.02, 0.98)
    prev = -np.inf
    n_iter = 0
    r1 = r0 = glob
    theta = np.full(X.shape[1], 1000.0)
    for it in range(1, spec.max_iter + 1):
        n_iter = it
        r1, r0, theta = nb_rates(Xf, X2f, libf, p, spec.prior_umis, glob)
        pi, _ = _sample_prior(p, gf, n_groups, spec.sample_prior_cells)
        l1 = nb_loglik(Xf, libf, r1, theta) + np.log(pi[gf])
        l0 = nb_loglik(Xf, libf, r0, theta) + np.log1p(-pi[gf])
        top = np.maximum(l0, l1)
        ll = float(np.sum(top + np.log(np.exp(l0 - top) + np.exp(l1 - top))))
        p = expit(l1 - l0)
        if abs(ll - prev) <= spec.tol * Xf.shape[0]:
            break
        prev = ll
    lr = np.log(r1) - np.log(r0)
    if float(np.dot(orient, lr)) < 0:  # "high" is the state the up genes mark
        r1, r0, lr = r0, r1, -lr
    fold = float(np.exp(np.mean(orient * lr)))
    ok = fold >= spec.min_fold
    note = "" if ok else f"states not separable (mean fold {fold:.2f} < {spec.min_fold:g})"
    n_up = int((orient > 0).sum())
    fit = BinFit(
        list(genes), n_up, r1, r0, theta, np.zeros(n_groups), {}, fold, ok, m, n_iter, note
    )
    # per-sample priors and posteriors of all cells with the rates fixed
    llr = fit.llr(X, lib)
    q = expit(llr)
    for _ in range(100):
        pi, _ = _sample_prior(q, groups, n_groups, spec.sample_prior_cells)
        q_new = expit(llr + logit(pi)[groups])
        done = float(np.max(np.abs(q_new - q))) < 1e-6
        q = q_new
        if done:
            break
    _finish_prior(fit, q, groups, sample_names, spec.sample_prior_cells)
    return fit, q


def _add_secondary(
    fit: BinFit,
    p: np.ndarray,
    Xs: np.ndarray,
    lib: np.ndarray,
    base_llr: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    sec_genes: list[str],
    spec: RNASpec,
) -> np.ndarray:
    """Learn secondary-gene rates from anchor cells and return the updated posteriors.

    Secondary genes add Poisson evidence with each gene's log rate ratio capped at
    ``rna.max_secondary_log_ratio``, so they sway uncertain cells but not confident ones.
    """
    hi = p >= spec.anchor_posterior
    lo = p <= 1 - spec.anchor_posterior
    if hi.sum() < 10 or lo.sum() < 10 or Xs.shape[1] == 0:
        return p
    a = spec.prior_umis
    glob = (Xs.sum(axis=0) + 1e-3) / max(float(lib.sum()), 1.0)
    r1 = (Xs[hi].sum(axis=0) + a * glob) / (lib[hi].sum() + a)
    r0 = (Xs[lo].sum(axis=0) + a * glob) / (lib[lo].sum() + a)
    cap = spec.max_secondary_log_ratio
    lr = np.clip(np.log(r1) - np.log(r0), -cap, cap)
    gm = np.sqrt(r1 * r0)
    fit.sec_genes = list(sec_genes)
    fit.sec_log_ratio = lr
    fit.sec_rate_terms = np.asarray(gm * (np.exp(lr / 2) - np.exp(-lr / 2)), dtype=np.float64)
    fit.sec_rate_diff = float(fit.sec_rate_terms.sum())
    data_llr = base_llr + Xs @ lr - lib * fit.sec_rate_diff
    n_groups = len(sample_names)
    q = p
    for _ in range(100):
        pi, _ = _sample_prior(q, groups, n_groups, spec.sample_prior_cells)
        q_new = expit(data_llr + logit(pi)[groups])
        done = float(np.max(np.abs(q_new - q))) < 1e-6
        q = q_new
        if done:
            break
    _finish_prior(fit, q, groups, sample_names, spec.sample_prior_cells)
    return np.asarray(q)


def _start(s: np.ndarray) -> np.ndarray:
    """EM start: Otsu's split of the gene-set score (top 20% if the score is constant)."""
    thr = otsu(s) if np.ptp(s) > 0 else float(np.median(s))
    init = np.where(s >= thr, 0.9, 0.1)
    if init.min() == init.max():
        init = np.where(s > np.quantile(s, 0.8), 0.9, 0.1)
    return init


def fit_signature(
    rna: RNABlock,
    name: str,
    rows: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    spec: RNASpec,
    scores: Mapping[str, np.ndarray],
) -> tuple[SetModel | None, np.ndarray | None]:
    """Fit one signature's mixture on ``rows``; the fit and posteriors for ``rows``.

    Raw counts: a negative-binomial mixture, EM started from Otsu's split of the gene-set
    score, then secondary genes. Normalised data: a Gaussian mixture on the score (the
    per-sample priors are then computed exactly as when the model is applied to new data).
    """
    sig = spec.signatures[name]
    up = rna.genes(sig.up)
    genes = up + [g for g in rna.genes(sig.down) if g not in up]
    if not up or rows.size < spec.min_cells_per_fit:
        return None, None
    g = groups[rows]
    if not rna.is_counts:
        sc = scores.get(name)
        if sc is None:
            return None, None
        s = sc[rows]
        gm = fit_gmm(s, min_separation=spec.gauss_min_separation, min_weight=0.02, max_iter=300)
        note = (
            ""
            if gm.ok
            else (
                f"score not bimodal (Ashman's D {gm.separation:.2f} < {spec.gauss_min_separation:g})"
            )
        )
        gfit = GaussFit(genes, len(up), gm, float(gm.w[1]), gm.ok, int(rows.size), note)
        llr = gm.log_ratio(s)
        gfit.log_prior = sample_log_prior(
            llr, g, len(sample_names), gfit.prior, spec.sample_prior_cells
        )
        q = expit(llr + gfit.log_prior[g])
        gfit.weights = {str(sample_names[i]): float(expit(gfit.log_prior[i])) for i in np.unique(g)}
        return gfit, q
    X = rna.counts(genes, rows)
    lib = rna.lib[rows]
    sc = scores.get(name)
    s = sc[rows] if sc is not None else X[:, : len(up)].sum(axis=1)
    orient = np.array([1.0] * len(up) + [-1.0] * (len(genes) - len(up)))
    fit, p = _fit_count_mixture(X, lib, g, sample_names, _start(s), orient, genes, spec)
    if fit.ok and sig.secondary:
        sec = [x for x in rna.genes(sig.secondary) if x not in genes]
        if sec:
            Xs = rna.counts(sec, rows)
            p = _add_secondary(fit, p, Xs, lib, fit.llr(X, lib), g, sample_names, sec, spec)
    return fit, p


def set_llr(model: SetModel, rna: RNABlock, rows: np.ndarray) -> np.ndarray:
    """Per-cell log-likelihood ratio high vs low of ``rows`` (genes absent here are left out)."""
    if isinstance(model, GaussFit):
        up = [g for g in model.genes[: model.n_up] if g in rna.col]
        down = [g for g in model.genes[model.n_up :] if g in rna.col]
        s = rna.score_of(up, down)
        if s is None:
            return np.zeros(rows.size)
        return model.gmm.log_ratio(s[rows])
    fit = model.without({g for g in (*model.genes, *model.sec_genes) if g not in rna.col})
    X = rna.counts(fit.genes, rows)
    Xs = rna.counts(fit.sec_genes, rows) if fit.sec_genes else None
    return fit.llr(X, rna.lib[rows], Xs)


def predict_fitted(
    rna: RNABlock, fit: SetModel, rows: np.ndarray, groups: np.ndarray, drop: set[str] | None = None
) -> np.ndarray:
    """Posteriors of ``rows`` with the per-sample priors learned when fitting (fit time)."""
    model = fit.without(drop) if drop and isinstance(fit, BinFit) else fit
    return expit(set_llr(model, rna, rows) + fit.log_prior[groups[rows]])


# =========================================================================== protein + RNA
@dataclass
class FuseModel:
    """RNA evidence added to a weak protein gate: the two protein-defined states' RNA rates
    (raw counts) or score distributions (normalised data), learned once."""

    marker: str
    gene_set: str
    kind: str
    genes: list[str]
    cap: float
    n_cells: int
    rate_high: np.ndarray = field(default_factory=lambda: np.zeros(0))
    rate_low: np.ndarray = field(default_factory=lambda: np.zeros(0))
    theta: np.ndarray = field(default_factory=lambda: np.zeros(0))
    n_up: int = 0
    mean_high: float = 0.0
    mean_low: float = 0.0
    sd: float = 1.0

    def llr(self, rna: RNABlock, rows: np.ndarray) -> np.ndarray:
        """Capped per-cell log-likelihood ratio (genes absent here are left out)."""
        if self.kind == "gauss":
            up = [g for g in self.genes[: self.n_up] if g in rna.col]
            down = [g for g in self.genes[self.n_up :] if g in rna.col]
            s = rna.score_of(up, down)
            if s is None:
                return np.zeros(rows.size)
            v = s[rows]
            out = ((v - self.mean_low) ** 2 - (v - self.mean_high) ** 2) / (2 * self.sd**2)
        else:
            keep = [i for i, g in enumerate(self.genes) if g in rna.col]
            X = rna.counts([self.genes[i] for i in keep], rows)
            lib = rna.lib[rows]
            out = nb_loglik(X, lib, self.rate_high[keep], self.theta[keep]) - nb_loglik(
                X, lib, self.rate_low[keep], self.theta[keep]
            )
        return np.asarray(np.clip(out, -self.cap, self.cap))

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "gene_set": self.gene_set,
            "genes": list(self.genes),
            "n_cells": int(self.n_cells),
        }
        if self.kind == "nb":
            d["log_rate_ratio"] = np.log(self.rate_high) - np.log(self.rate_low)
        else:
            d.update(score_mean_high=self.mean_high, score_mean_low=self.mean_low, sd=self.sd)
        return d


def fit_fuse(
    rna: RNABlock,
    *,
    marker: str,
    gene_set: str,
    genes: list[str],
    n_up: int,
    prob: np.ndarray,
    rows: np.ndarray,
    cap: float,
    spec: RNASpec,
) -> FuseModel:
    """Learn the RNA states of the cells weighted by the protein posterior ``prob[rows]``
    (no EM, so the states stay the protein-defined ones)."""
    w = prob[rows]
    if not rna.is_counts:
        s = rna.score_of(genes[:n_up], genes[n_up:])
        v = s[rows] if s is not None else np.zeros(rows.size)
        sw1, sw0 = max(float(w.sum()), 1e-9), max(float((1 - w).sum()), 1e-9)
        m1, m0 = float(w @ v) / sw1, float((1 - w) @ v) / sw0
        var = (float(w @ (v - m1) ** 2) + float((1 - w) @ (v - m0) ** 2)) / max(rows.size, 1)
        return FuseModel(
            marker,
            gene_set,
            "gauss",
            genes,
            cap,
            int(rows.size),
            n_up=n_up,
            mean_high=m1,
            mean_low=m0,
            sd=max(float(np.sqrt(var)), 1e-3),
        )
    X = rna.counts(genes, rows)
    lib = rna.lib[rows]
    glob = (X.sum(axis=0) + 1e-3) / max(float(lib.sum()), 1.0)
    r1, r0, theta = nb_rates(X, X**2, lib, w, spec.prior_umis, glob)
    return FuseModel(marker, gene_set, "nb", genes, cap, int(rows.size), r1, r0, theta, n_up=n_up)
