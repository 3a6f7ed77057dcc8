"""The effector split of CCR7-low T cells (``bp_effector``: EM vs TEMRA-like).

The memory label (naive/CM/EM/TEMRA) needs a CCR7 axis and a CD45RA axis in both CCR7
branches. With RNA surrogates the CD45RA axis is a gene set per branch: ``naive_vs_cm`` among
CCR7-high cells and ``temra_vs_em`` among CCR7-low cells. When only ``temra_vs_em`` separates
two states (e.g. few CCR7-high cells), naive cannot be told from CM, so there is no four-state
call; the CCR7-low cells can still be split into EM and TEMRA-like, which is what a
cytometrist reads on CD45RA within the CCR7- gate. ``bp_effector`` carries that split:

- memory available: the memory call's own EM/TEMRA cells (same call, ``P(TEMRA) =
  P(CD45RA+ | CCR7-)``), NaN for naive/CM;
- memory unavailable but the CCR7 axis and the CCR7-low branch of the CD45RA axis estimable:
  T cells with ``P(CCR7+) < 0.5`` split by ``P(CD45RA+ | CCR7-)``;
- otherwise unavailable.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from blinaprofile.annotate.state import Fitted, RouteState

__all__ = ["effector_prob", "effector_route", "memory_unavailable_reason", "partial_ra_plan"]

#: the CD45RA gene set of the CCR7-low branch (its plan entries end with ``:<name>``)
CCR7_LOW_SET = "temra_vs_em"


def partial_ra_plan(plan: dict[str, str]) -> bool:
    """Whether an RNA CD45RA-axis plan covers the CCR7-low branch of some lineage."""
    return any(k.endswith(f":{CCR7_LOW_SET}") for k in plan)


def _kind(*descriptions: str) -> str:
    has_p = any("protein" in d for d in descriptions)
    has_r = any("RNA" in d for d in descriptions)
    return "protein+RNA" if has_p and has_r else "protein" if has_p else "RNA" if has_r else ""


def effector_route(fitted: Fitted) -> RouteState:
    """How ``bp_effector`` is estimated, from the fitted memory, CCR7 and CD45RA routes."""
    mem, ccr7, ra = fitted.routes["memory"], fitted.routes["ccr7"], fitted.routes["ra"]
    gates = [*ccr7.gates, *ra.gates]
    if mem.route != "none":
        return RouteState.model_validate(
            {
                "route": mem.route,
                "description": f"the EM/TEMRA cells of the memory call ({mem.description})",
                "kind": mem.kind,
                "gates": gates,
                "plan": dict(ra.plan),
            }
        )
    if ccr7.route != "none" and ra.route == "rna" and partial_ra_plan(ra.plan):
        lineages = sorted(k.split(":", 1)[0] for k in ra.plan if k.endswith(f":{CCR7_LOW_SET}"))
        desc = (
            f"CCR7-low T cells (P(CCR7+) < 0.5; {ccr7.description}) split by the "
            f"{CCR7_LOW_SET} gene set (RNA, {', '.join(lineages)}): TEMRA-like vs EM; no "
            "naive/CM split (naive_vs_cm not separable)"
        )
        return RouteState.model_validate(
            {
                "route": "rna",
                "description": desc,
                "kind": _kind(ccr7.description, "RNA"),
                "gates": list(ccr7.gates),
                "plan": {k: v for k, v in ra.plan.items() if k.endswith(f":{CCR7_LOW_SET}")},
            }
        )
    return RouteState(
        route="none",
        description="unavailable: no CCR7 axis or no CD45RA axis among CCR7-low cells",
    )


def effector_prob(
    route: RouteState,
    from_memory: bool,
    mem_prob: np.ndarray,
    ccr7: np.ndarray,
    ra_lo: np.ndarray,
    t_call: np.ndarray,
) -> np.ndarray:
    """P(TEMRA-like) of the cells ``bp_effector`` applies to, NaN elsewhere.

    Parameters
    ----------
    route
        :func:`effector_route`.
    from_memory
        The memory label is available: ``bp_effector`` is its EM/TEMRA cells.
    mem_prob
        (m, 4) naive/CM/EM/TEMRA probabilities (NaN where there is no memory call).
    ccr7, ra_lo
        P(CCR7+) and P(CD45RA+) in the CCR7-low branch, per cell (NaN where not estimated).
    t_call
        T-cell calls.
    """
    out = np.full(t_call.shape[0], np.nan)
    if route.route == "none" or not t_call.size:
        return out
    if from_memory:
        ok = ~np.isnan(mem_prob).any(axis=1)
        best = np.argmax(np.nan_to_num(mem_prob, nan=-1.0), axis=1)
        sel = ok & (best >= 2)
    else:
        sel = t_call & (np.nan_to_num(ccr7, nan=1.0) < 0.5) & ~np.isnan(ra_lo)
    out[sel] = ra_lo[sel]
    return out


def memory_unavailable_reason(have: list[str], models: dict[str, Any], partial: bool) -> str:
    """Why there is no memory call, naming the CD45RA gene sets that did not separate."""
    why = "; ".join(
        f"{k}: {v.get('note', '')}"
        for k, v in models.items()
        if k.startswith("naive_vs_cm@") and not v.get("ok", False)
    )
    head = f"unavailable: need a CCR7 axis and a CD45RA axis (have {' and '.join(have)})"
    if partial:
        head = (
            "unavailable: the CD45RA axis is estimable only among CCR7-low cells (naive vs "
            f"CM not separable{': ' + why if why else ''}); EM vs TEMRA-like of CCR7-low "
            "cells is in bp_effector"
        )
    return head
