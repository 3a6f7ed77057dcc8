"""Gating one sample: bind a strategy to an FCS file, gate it, and return AnnData."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from blinaprofile.gating.events import fcs_scaling
from blinaprofile.gating.gates import GatingResult
from blinaprofile.gating.strategy import load_strategy
from blinaprofile.gating.tree import GateTree

if TYPE_CHECKING:
    import anndata

    from blinaprofile.io.fcs import FCSData

__all__ = ["gate_events", "gate_sample", "gating_summary", "sample_label"]


# ---------------------------------------------------------------------- samples
def gate_events(
    data: FCSData,
    strategy: GateTree,
    *,
    adaptive: bool = True,
    overrides: Mapping[str, str] | None = None,
) -> tuple[GateTree, GatingResult]:
    """Bind ``strategy`` to an FCS sample and gate it (FCS scaling applied)."""
    bound = strategy.bind(data.channels, data.markers, path=data.path, overrides=overrides)
    res = bound.apply(
        data.events,
        data.channels,
        spillover=data.spillover,
        adaptive=adaptive,
        path=data.path,
        scaling=fcs_scaling(data),
    )
    return bound, res


#: order in which the most specific subset label of an event is decided
_SUBSET_ORDER = (
    "cd8_naive",
    "cd8_cm",
    "cd8_em",
    "cd8_temra",
    "cd4_naive",
    "cd4_cm",
    "cd4_em",
    "cd4_temra",
    "cd8",
    "cd4",
    "cd3",
    "live",
    "singlets",
    "lymphocytes",
)


def gate_sample(
    data: FCSData,
    strategy: GateTree | None = None,
    *,
    adaptive: bool = True,
    sample_id: str | None = None,
    keep_file_names: bool = False,
) -> anndata.AnnData:
    """Gate an FCS sample into an AnnData (events x channels).

    ``X`` holds the raw (uncompensated) event values; ``var`` has ``channel`` and
    ``marker`` (the ``$PnS`` labels as :func:`blinaprofile.io.read.read_flow` let them
    through); ``obs`` one boolean column per gate and ``subset`` (the most specific T-cell
    subset, else the deepest gate reached, else ``'ungated'``); ``uns['gating']`` the
    strategy name, counts, percents, thresholds, confidences and QC flags.

    Parameters
    ----------
    data
        The sample (from :func:`blinaprofile.io.read.read_flow`).
    strategy
        The gating strategy (default: the shipped T-cell strategy).
    adaptive
        Place thresholds per sample from its own populations (default); ``False`` keeps the
        configured thresholds (a shifted sample is flagged either way).
    sample_id
        Stored as ``uns['sample_id']``; default the pseudonym ``S-<first 12 hex of the
        file's SHA-256>`` (:func:`blinaprofile.io.privacy.file_pseudonym`).
    keep_file_names
        Without ``sample_id``, use the file's name (stem) instead of the pseudonym: file
        names often name the patient, so this is an explicit opt-in.

    Returns
    -------
    anndata.AnnData
        The gated events.
    """
    import anndata as ad
    import pandas as pd

    strategy = strategy or load_strategy()
    bound, res = gate_events(data, strategy, adaptive=adaptive)
    obs = pd.DataFrame({gid: m for gid, m in res.masks.items()})
    label = np.full(res.n_events, "ungated", dtype=object)
    for gid in reversed(_SUBSET_ORDER):
        if gid in res.masks:
            label[res.masks[gid]] = gid
    obs["subset"] = pd.Categorical(label)
    obs.index = obs.index.astype(str)
    var = pd.DataFrame(
        {"channel": data.channels, "marker": data.markers}, index=list(data.channels)
    )
    adata = ad.AnnData(X=np.asarray(data.events, dtype=np.float32), obs=obs, var=var)
    adata.uns["gating"] = gating_summary(bound, res, adaptive=adaptive)
    adata.uns["sample_id"] = sample_id or sample_label(data, keep_file_names=keep_file_names)
    return adata


def gating_summary(bound: GateTree, res: GatingResult, *, adaptive: bool) -> dict[str, Any]:
    """What gating one sample found, as ``gate_sample`` stores it in ``uns['gating']``.

    Strategy name and version, placement mode, marker-to-channel map, counts, percent of
    parent, thresholds, confidences and QC flags. Needs neither AnnData nor pandas, so
    ``blinaprofile gate`` without ``--h5ad`` imports neither.
    """
    return {
        "strategy": bound.name,
        "strategy_version": bound.version,
        "adaptive": adaptive,
        "channel_map": bound.channel_map(),
        "counts": res.counts,
        "percent_of_parent": res.parent_percent(bound),
        "thresholds": res.thresholds,
        "confidence": res.confidence,
        "flags": list(res.flags),
    }


def sample_label(data: FCSData, *, keep_file_names: bool = False) -> str:
    """The name a gated sample goes by: the pseudonym ``S-<first 12 hex of its SHA-256>``,
    or the file's stem with ``keep_file_names`` (file names often name the patient)."""
    from blinaprofile.io.privacy import file_pseudonym

    return Path(data.path).stem if keep_file_names else file_pseudonym(data.path)
