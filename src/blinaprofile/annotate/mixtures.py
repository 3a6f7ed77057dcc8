"""Mixture models shared by the protein and RNA calls: two-component Gaussian mixtures on CLR protein, and the two-state negative-binomial mixture on a gene set's raw counts with library size as exposure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from blinaprofile.annotate.config import ProteinSpec, RNASpec, SignatureSpec


# =========================================================================== mixtures
def expit(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64))))


def logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    return np.asarray(np.log(q) - np.log1p(-q))


def _otsu(v: np.ndarray) -> float:
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


@dataclass
class _GMM:
    """A two-component 1-D Gaussian mixture (component 0 low, 1 high) and its threshold."""

    mu: np.ndarray
    sd: np.ndarray
    w: np.ndarray
    n: int
    separation: float
    ok: bool
    threshold: float
    method: str = "mixture"

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


def _fit_gmm(v: np.ndarray, spec: ProteinSpec) -> _GMM:
    """EM for a 1-D two-component Gaussian mixture on a 256-bin histogram.

    EM runs from four starts at once (Otsu's split and splits at the 50th, 75th and 90th
    percentiles) for 25 iterations, then continues from the most likely one. Binning makes a fit cost the
    same for 50 or 50,000 cells; the bin width (1/256 of the range) is far below the
    components' spread.
    """
    v = np.asarray(v, dtype=np.float64)
    n = v.size
    spread = float(np.ptp(v)) if n else 0.0
    floor = max(0.05, 0.02 * spread)
    mu0 = float(np.mean(v)) if n else 0.0
    degenerate = _GMM(
        np.array([mu0, mu0]), np.array([floor, floor]), np.array([1.0, 1e-12]), n, 0.0, False, mu0
    )
    if n < 4 or spread <= 0:
        return degenerate
    h, e = np.histogram(v, bins=256)
    x = (e[:-1] + e[1:]) / 2
    keep = h > 0
    x, c = x[keep], h[keep].astype(np.float64)
    starts = np.array([_otsu(v), *np.quantile(v, [0.5, 0.75, 0.9])])
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
    for it in range(spec.max_iter):
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
    ok = bool(sep >= spec.min_separation and w.min() >= spec.min_weight)
    grid = np.linspace(mu[0], mu[1], 512)
    d = (np.log(w[1]) - np.log(sd[1]) - 0.5 * ((grid - mu[1]) / sd[1]) ** 2) - (
        np.log(w[0]) - np.log(sd[0]) - 0.5 * ((grid - mu[0]) / sd[0]) ** 2
    )
    cross = np.flatnonzero(d >= 0)
    thr = float(grid[cross[0]]) if cross.size else float(grid[-1])
    return _GMM(mu, sd, w, n, sep, ok, thr)


def _rule_gmm(v: np.ndarray, k: float) -> _GMM:
    """Threshold ``median + k * MAD`` for markers whose positives are a small minority."""
    med = float(np.median(v))
    mad = max(float(np.median(np.abs(v - med))) * 1.4826, 0.05)
    thr = med + k * mad
    frac = float(np.mean(v > thr))
    return _GMM(
        np.array([med, med + 2 * k * mad]),
        np.array([mad, mad]),
        np.array([1 - frac, frac]),
        int(v.size),
        float("nan"),
        True,
        thr,
        method="rule_rare_positive",
    )


@dataclass
class MarkerGate:
    """A per-sample protein gate: P(positive) over QC cells (NaN outside the parent)."""

    prob: np.ndarray
    fits: dict[str, dict[str, Any]]
    available: bool


def protein_gate(
    values: np.ndarray,
    parent: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    marker: str,
    spec: ProteinSpec,
) -> MarkerGate:
    prob = np.full(values.shape[0], np.nan)
    fits: dict[str, dict[str, Any]] = {}
    if not parent.any():
        return MarkerGate(prob, fits, False)
    pooled = _fit_gmm(values[parent], spec)
    rare = marker in spec.rare_positive
    any_ok = False
    for s, name in enumerate(sample_names):
        sel = parent & (groups == s)
        if not sel.any():
            continue
        v = values[sel]
        fit: _GMM | None = None
        if v.size >= spec.min_cells_per_fit:
            f = _fit_gmm(v, spec)
            fit = f if f.ok else None
        if fit is None and pooled.ok:
            fit = _GMM(
                pooled.mu,
                pooled.sd,
                pooled.w,
                pooled.n,
                pooled.separation,
                True,
                pooled.threshold,
                "pooled_mixture",
            )
        if fit is None and rare:
            ref = v if v.size >= spec.min_cells_per_fit else values[parent]
            fit = _rule_gmm(ref, spec.rule_k_mad)
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


# --------------------------------------------------------------------------- count mixtures
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
    """A two-state negative-binomial mixture on a gene set, library size as exposure."""

    genes: list[str]
    rate_high: np.ndarray
    rate_low: np.ndarray
    theta: np.ndarray
    log_prior: np.ndarray  # logit P(high) per sample (pooled for samples without cells)
    weights: dict[str, float]
    fold: float
    ok: bool
    n_cells: int
    n_iter: int
    note: str = ""
    sec_genes: list[str] = field(default_factory=list)
    sec_log_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sec_rate_diff: float = 0.0

    def llr(self, X: np.ndarray, lib: np.ndarray, Xs: np.ndarray | None = None) -> np.ndarray:
        """Per-cell log-likelihood ratio high vs low (without the prior)."""
        out = nb_loglik(X, lib, self.rate_high, self.theta) - nb_loglik(
            X, lib, self.rate_low, self.theta
        )
        if Xs is not None and self.sec_genes:
            out = out + Xs @ self.sec_log_ratio - lib * self.sec_rate_diff
        return np.asarray(out)

    def as_dict(self) -> dict[str, Any]:
        return {
            "genes": list(self.genes),
            "rate_high_per_10k": np.asarray(self.rate_high * 1e4, dtype=float),
            "rate_low_per_10k": np.asarray(self.rate_low * 1e4, dtype=float),
            "nb_theta": np.asarray(self.theta, dtype=float),
            "secondary_genes": list(self.sec_genes),
            "secondary_log_rate_ratio": np.asarray(self.sec_log_ratio, dtype=float),
            "prior_positive": {k: float(v) for k, v in self.weights.items()},
            "fold": float(self.fold),
            "ok": bool(self.ok),
            "n_cells": int(self.n_cells),
            "n_iter": int(self.n_iter),
            "note": self.note,
        }


def _sample_prior(
    p: np.ndarray, groups: np.ndarray, n_groups: int, kappa: float
) -> tuple[np.ndarray, float]:
    """Per-sample P(high), shrunk towards the pooled value by ``kappa`` pseudo-cells."""
    pooled = float(np.clip(p.mean(), 1e-4, 1 - 1e-4)) if p.size else 0.5
    s1 = np.bincount(groups, weights=p, minlength=n_groups)
    cnt = np.bincount(groups, minlength=n_groups)
    pi = (s1 + kappa * pooled) / np.maximum(cnt + kappa, 1e-12)
    return np.clip(pi, 1e-4, 1 - 1e-4), pooled


def _finish_prior(
    fit: BinFit, p: np.ndarray, groups: np.ndarray, sample_names: Sequence[str], kappa: float
) -> None:
    n_groups = len(sample_names)
    pi, pooled = _sample_prior(p, groups, n_groups, kappa)
    counts = np.bincount(groups, minlength=n_groups)
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
    fit = BinFit(list(genes), r1, r0, theta, np.zeros(n_groups), {}, fold, ok, m, n_iter, note)
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
    fit.sec_rate_diff = float((gm * (np.exp(lr / 2) - np.exp(-lr / 2))).sum())
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


# =========================================================================== RNA block
class RNA:
    """Counts of the signature genes (dense, QC-passed cells) and matched-control scores."""

    def __init__(
        self, counts: sp.csr_matrix, rows: np.ndarray, symbols: np.ndarray, spec: RNASpec
    ) -> None:
        self.spec = spec
        lib_all = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        self.lib = lib_all[rows]
        n_all, g = counts.shape
        sym_index: dict[str, int] = {}
        for j, s in enumerate(symbols):
            sym_index.setdefault(str(s), j)
        wanted: list[str] = []
        for sig in spec.signatures.values():
            for gname in (*sig.up, *sig.down, *sig.secondary):
                u = gname.upper()
                if u in sym_index and u not in wanted:
                    wanted.append(u)
        self.present = set(wanted)
        # expression-matched controls: bin all genes by mean normalised expression
        # (an evenly spaced subset of at most 20,000 QC-passed cells ranks genes well enough)
        sub = rows[np.linspace(0, rows.size - 1, min(rows.size, 20_000)).astype(np.int64)]
        w = spec.target_sum / np.maximum(lib_all[sub], 1.0)
        gene_mean = np.asarray(counts[sub].T @ w).ravel() / max(sub.size, 1)
        sig_cols = {sym_index[x] for x in wanted}
        order = np.argsort(gene_mean, kind="stable")
        bins = np.empty(g, dtype=np.int64)
        bins[order] = (np.arange(g) * spec.n_bins) // max(g, 1)
        rng = np.random.default_rng(spec.control_seed)
        ctrl_cols: list[int] = []
        ctrl_bin: list[int] = []
        for b in range(spec.n_bins):
            pool = np.array(
                [j for j in np.flatnonzero(bins == b) if j not in sig_cols], dtype=np.int64
            )
            if pool.size == 0:
                continue
            pick = np.sort(
                rng.choice(pool, size=min(spec.n_ctrl_per_bin, pool.size), replace=False)
            )
            ctrl_cols += [int(x) for x in pick]
            ctrl_bin += [b] * len(pick)
        cols = [sym_index[x] for x in wanted]
        block = counts[:, cols + ctrl_cols]
        if rows.size < n_all:
            block = block[rows]
        dense = np.asarray(block.toarray(), dtype=np.float32)
        self.X = np.ascontiguousarray(dense[:, : len(cols)])
        self.col = {x: i for i, x in enumerate(wanted)}
        self.gene_bin = {x: int(bins[sym_index[x]]) for x in wanted}
        self.scale = (spec.target_sum / np.maximum(self.lib, 1.0)).astype(np.float32)
        ctrl = np.log1p(dense[:, len(cols) :] * self.scale[:, None])
        cb = np.asarray(ctrl_bin, dtype=np.int64)
        self.ctrl_mean = np.zeros((rows.size, spec.n_bins), dtype=np.float32)
        for b in np.unique(cb):
            self.ctrl_mean[:, b] = ctrl[:, cb == b].mean(axis=1)
        self.n_ctrl_genes = len(ctrl_cols)

    def genes(self, names: Sequence[str]) -> list[str]:
        out: list[str] = []
        for g in names:
            u = g.upper()
            if u in self.col and u not in out:
                out.append(u)
        return out

    def counts(self, genes: Sequence[str], rows: np.ndarray | None = None) -> np.ndarray:
        idx = [self.col[g] for g in genes]
        X = self.X[:, idx] if rows is None else self.X[np.ix_(rows, idx)]
        return np.asarray(X, dtype=np.float64)

    def set_score(self, genes: Sequence[str]) -> np.ndarray | None:
        """Mean log-normalised expression of the genes minus that of matched controls."""
        gs = self.genes(genes)
        if not gs:
            return None
        idx = [self.col[g] for g in gs]
        ln = np.log1p(self.X[:, idx] * self.scale[:, None])
        ctrl = self.ctrl_mean[:, [self.gene_bin[g] for g in gs]]
        return np.asarray((ln - ctrl).mean(axis=1), dtype=np.float64)

    def score(self, sig: SignatureSpec) -> np.ndarray | None:
        up = self.set_score(sig.up)
        if up is None:
            return None
        down = self.set_score(sig.down) if sig.down else None
        return up if down is None else up - down


def fit_signature(
    rna: RNA,
    name: str,
    rows: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    spec: RNASpec,
    scores: Mapping[str, np.ndarray],
) -> tuple[BinFit | None, np.ndarray | None]:
    """Fit one signature's count mixture on ``rows``; the fit and posteriors for ``rows``.

    EM starts from Otsu's split of the gene-set score (top 20% if the score is constant).
    """
    sig = spec.signatures[name]
    up = rna.genes(sig.up)
    genes = up + [g for g in rna.genes(sig.down) if g not in up]
    if not up or rows.size < spec.min_cells_per_fit:
        return None, None
    X = rna.counts(genes, rows)
    lib = rna.lib[rows]
    sc = scores.get(name)
    s = sc[rows] if sc is not None else X[:, : len(up)].sum(axis=1)
    thr = _otsu(s) if np.ptp(s) > 0 else float(np.median(s))
    init = np.where(s >= thr, 0.9, 0.1)
    if init.min() == init.max():
        init = np.where(s > np.quantile(s, 0.8), 0.9, 0.1)
    g = groups[rows]
    orient = np.array([1.0] * len(up) + [-1.0] * (len(genes) - len(up)))
    fit, p = _fit_count_mixture(X, lib, g, sample_names, init, orient, genes, spec)
    if fit.ok and sig.secondary:
        sec = [x for x in rna.genes(sig.secondary) if x not in genes]
        if sec:
            Xs = rna.counts(sec, rows)
            p = _add_secondary(fit, p, Xs, lib, fit.llr(X, lib), g, sample_names, sec, spec)
    return fit, p


def predict_signature(rna: RNA, fit: BinFit, rows: np.ndarray, groups: np.ndarray) -> np.ndarray:
    X = rna.counts(fit.genes, rows)
    Xs = rna.counts(fit.sec_genes, rows) if fit.sec_genes else None
    return expit(fit.llr(X, rna.lib[rows], Xs) + fit.log_prior[groups[rows]])
