"""The generative model of a patient cohort, shared by the flow and single-cell simulators.

Each patient has a response label and latent subset fractions; each sample (one per
timepoint) perturbs the patient's fractions. :func:`draw_cohort` returns one row per
sample with the *true* fractions (0-1) under the feature-schema names, and
:func:`bayes_optimal_auc` computes the AUC of the Bayes-optimal classifier of one
sample's latent fractions, analytically and by Monte Carlo.

Model
-----
``round(n * responder_fraction)`` responders, assigned at random;
for each latent ``f`` in ``config.latent``:
``logit f_patient ~ Normal(logit mean_f[response], sd_f)`` and
``logit f_sample = logit f_patient + Normal(0, within_patient_sd)``.
The CD8 non-EM share and the CD4 compartment are split into memory subsets by a
class-independent Dirichlet. Because classes share a diagonal covariance on the logit
scale, the Bayes-optimal AUC is ``Phi(Delta / sqrt(2))`` with ``Delta`` the Mahalanobis
distance between class means.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import erf, sqrt

import numpy as np
import pandas as pd

from blinaprofile.config import SimulationConfig

__all__ = ["BayesAUC", "bayes_optimal_auc", "draw_cohort"]

#: latent fractions that feed the event simulator (keys required in ``config.latent``)
REQUIRED_LATENT = (
    "cd3_pct_lymph",
    "cd8_pct_cd3",
    "cd8_em_pct_cd8",
    "cd8_tim3_pct_cd8",
    "cd8_pd1_pct_cd8",
    "cd4_treg_pct_cd4",
)


def _logit(p: np.ndarray | float) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    return np.log(p) - np.log1p(-p)


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _class_params(config: SimulationConfig) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    names = list(config.latent)
    mu1 = np.array([_logit(config.latent[n].responder) for n in names])
    mu0 = np.array([_logit(config.latent[n].nonresponder) for n in names])
    sd = np.array([config.latent[n].sd for n in names])
    return names, mu0, mu1, sd


def draw_cohort(config: SimulationConfig, *, seed: int | None = None) -> pd.DataFrame:
    """Draw patients, their labels and per-sample true subset fractions.

    Parameters
    ----------
    config
        The scenario.
    seed
        Overrides ``config.seed``.

    Returns
    -------
    DataFrame
        One row per sample: ``sample_id, patient_id, timepoint, response`` (1 responder,
        0 nonresponder), ``response_label``, then every latent fraction (0-1) and the derived
        memory-subset fractions of CD8 and CD4 (``cd8_naive_pct_cd8`` ... as 0-1 shares).
    """
    missing = [k for k in REQUIRED_LATENT if k not in config.latent]
    if missing:
        from blinaprofile.errors import ConfigError

        raise ConfigError(f"latent: missing required fraction(s) {missing}")
    rng = np.random.default_rng(config.seed if seed is None else seed)
    n = config.n_patients
    # exactly round(n * responder_fraction) responders (at least one of each class), shuffled
    n_resp = min(n - 1, max(1, round(n * config.responder_fraction)))
    response = np.zeros(n, dtype=int)
    response[rng.permutation(n)[:n_resp]] = 1
    names, mu0, mu1, sd = _class_params(config)
    mu = np.where(response[:, None] == 1, mu1[None, :], mu0[None, :])
    z_patient = mu + rng.normal(size=(n, len(names))) * sd[None, :]
    cd8_keys = list(config.cd8_memory.mean)
    cd4_keys = list(config.cd4_memory.mean)
    a8 = np.array([config.cd8_memory.mean[k] for k in cd8_keys]) * config.cd8_memory.concentration
    a4 = np.array([config.cd4_memory.mean[k] for k in cd4_keys]) * config.cd4_memory.concentration
    split8 = rng.dirichlet(a8, size=n)
    split4 = rng.dirichlet(a4, size=n)
    rows = []
    for p in range(n):
        pid = f"P{p + 1:03d}"
        for t, tp in enumerate(config.timepoints):
            z = z_patient[p] + rng.normal(size=len(names)) * config.within_patient_sd
            frac = dict(zip(names, _expit(z), strict=True))
            row: dict[str, object] = {
                "sample_id": f"{pid}_{tp}",
                "patient_id": pid,
                "timepoint": tp,
                "response": int(response[p]),
                "response_label": "responder" if response[p] else "nonresponder",
            }
            row.update({k: float(v) for k, v in frac.items()})
            em = float(frac["cd8_em_pct_cd8"])
            # within-patient jitter of the subset splits (small Dirichlet around the patient's)
            s8 = rng.dirichlet(split8[p] * 200.0) if len(config.timepoints) > 1 else split8[p]
            s4 = rng.dirichlet(split4[p] * 200.0) if len(config.timepoints) > 1 else split4[p]
            for k, v in zip(cd8_keys, s8, strict=True):
                if k != "em":
                    row[f"cd8_{k}_pct_cd8"] = float((1.0 - em) * v)
            for k, v in zip(cd4_keys, s4, strict=True):
                row[f"cd4_{k}_pct_cd4"] = float(v)
            rows.append(row)
            del t
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class BayesAUC:
    """Bayes-optimal AUC of one sample's latent fractions under the generative model."""

    analytic: float
    monte_carlo: float
    mahalanobis: float
    n_monte_carlo: int

    def as_dict(self) -> dict[str, float]:
        return {
            "bayes_auc": self.analytic,
            "bayes_auc_monte_carlo": self.monte_carlo,
            "mahalanobis_distance": self.mahalanobis,
            "n_monte_carlo": float(self.n_monte_carlo),
        }


def _auc(scores_pos: np.ndarray, scores_neg: np.ndarray) -> float:
    scores = np.concatenate([scores_pos, scores_neg])
    ranks = pd.Series(scores).rank().to_numpy()
    n1, n0 = len(scores_pos), len(scores_neg)
    return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def bayes_optimal_auc(
    config: SimulationConfig, *, n_monte_carlo: int = 200_000, seed: int = 0
) -> BayesAUC:
    """The AUC of the likelihood-ratio classifier on one sample's latent fractions.

    Computed two ways: the closed form ``Phi(Delta/sqrt 2)`` for two Gaussians with a
    shared diagonal covariance (logit scale, between- plus within-patient variance), and a
    Monte Carlo estimate that draws samples from the model and scores them by the exact
    log-likelihood ratio. Finite event counts and gating error only lower what a real
    classifier can reach, so this is an upper bound for models on observed features.
    """
    _, mu0, mu1, sd = _class_params(config)
    var = sd**2 + config.within_patient_sd**2
    delta = float(np.sqrt(np.sum((mu1 - mu0) ** 2 / var)))
    analytic = 0.5 * (1.0 + erf(delta / sqrt(2.0) / sqrt(2.0)))
    rng = np.random.default_rng(seed)
    half = n_monte_carlo // 2
    x1 = mu1 + rng.normal(size=(half, len(sd))) * np.sqrt(var)
    x0 = mu0 + rng.normal(size=(half, len(sd))) * np.sqrt(var)

    def llr(x: np.ndarray) -> np.ndarray:
        return np.sum(((x - mu0) ** 2 - (x - mu1) ** 2) / (2 * var), axis=1)

    mc = _auc(llr(x1), llr(x0)) if delta > 0 else 0.5
    return BayesAUC(analytic=analytic, monte_carlo=mc, mahalanobis=delta, n_monte_carlo=2 * half)
