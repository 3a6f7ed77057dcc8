"""What the annotator writes: ``obs`` columns in scverse conventions, ``uns`` parameters and
the per-sample evidence behind every call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from blinaprofile.annotate.cascade import LABELS, Labels, tim3_estimator
from blinaprofile.annotate.config import (
    CELL_TYPE_LABELS,
    EFFECTOR_LABELS,
    EVIDENCE_LABELS,
    LINEAGE_LABELS,
    MEMORY_LABELS,
    SingleCellConfig,
)
from blinaprofile.annotate.effector import effector_route
from blinaprofile.annotate.inputs import CellInput, CellQC
from blinaprofile.annotate.mixtures import GaussFit
from blinaprofile.annotate.state import Fitted, RouteState
from blinaprofile.features.schema import SCHEMA_VERSION

__all__ = ["obs_frame", "sample_evidence", "uns_params", "uns_safe"]


def _categorical(values: np.ndarray, categories: Sequence[Any]) -> pd.Categorical:
    """A categorical of the given labels (``None``/NaN = missing) with the label's fixed
    categories in their fixed order, whether or not every category has cells here.

    Fixed categories make the outputs of separate samples concatenate into the output of the
    joint object (``pd.concat`` keeps the dtype); categories that depend on the cells present
    do not (an all-missing boolean label would get an empty category list, which
    ``pd.concat`` in pandas 2.3 turns into ``True``)."""
    return pd.Categorical(values, categories=list(categories))


def _bool_categorical(values: np.ndarray, known: np.ndarray) -> pd.Categorical:
    """True/False as a categorical with categories ``[False, True]`` (missing where not
    ``known``): accepted by ``sc.pl.*(color=...)`` and
    ``sc.tl.rank_genes_groups(groupby=...)``."""
    obj = values.astype(bool).astype(object)
    obj[~known] = np.nan
    return _categorical(obj, [False, True])


def obs_frame(
    inp: CellInput, qc: np.ndarray, lab: Labels, index: pd.Index
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The ``obs['bp_*']`` columns and the CLR protein of every cell.

    Labels are categoricals with fixed categories in a fixed order (``[False, True]`` for
    yes/no labels), also when a category has no cells; a missing label (QC-failed cell, not
    applicable, not estimable) is NaN, never a literal ``"NA"``.
    """
    n = inp.n_obs
    rows = np.flatnonzero(qc)

    def full(values: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
        out = np.full(n, fill, dtype=dtype)
        out[rows] = values
        return out

    passed = np.zeros(n, dtype=bool)
    passed[rows] = True
    mem_ok = ~np.isnan(lab.mem_prob).any(axis=1)
    mem_filled = np.nan_to_num(lab.mem_prob, nan=-1.0)
    memory = np.array(MEMORY_LABELS, dtype=object)[np.argmax(mem_filled, axis=1)]
    memory[~mem_ok] = None
    mem_conf = np.where(mem_ok, mem_filled.max(axis=1), np.nan)
    t_conf = np.where(lab.t_call, lab.t_prob, 1 - lab.t_prob)

    obs = pd.DataFrame(index=index)
    obs["bp_qc_pass"] = _bool_categorical(qc.astype(bool), np.ones(n, dtype=bool))
    obs["bp_cell_type"] = _categorical(full(lab.cell_type, None, object), CELL_TYPE_LABELS)
    obs["bp_t_cell"] = _bool_categorical(full(lab.t_call, False, bool), passed)
    obs["bp_lineage"] = _categorical(full(lab.lineage, None, object), LINEAGE_LABELS)
    obs["bp_memory"] = _categorical(full(memory, None, object), MEMORY_LABELS)
    eff = full(lab.effector, np.nan, np.float64)
    eff_lab = np.where(eff >= 0.5, EFFECTOR_LABELS[1], EFFECTOR_LABELS[0]).astype(object)
    eff_lab[np.isnan(eff)] = None
    obs["bp_effector"] = _categorical(eff_lab, EFFECTOR_LABELS)
    obs["bp_effector_prob"] = eff
    confs: dict[str, np.ndarray] = {
        "t_cell": full(t_conf, np.nan, np.float64),
        "lineage": full(lab.lineage_conf, np.nan, np.float64),
        "memory": full(mem_conf, np.nan, np.float64),
    }
    applies: dict[str, np.ndarray] = {
        "t_cell": np.ones(lab.m, dtype=bool),
        "lineage": lab.t_call,
        "memory": mem_ok,
    }
    for name, p in (
        ("tim3", lab.tim3),
        ("pd1", lab.pd1),
        ("treg", lab.treg),
        ("exhausted", lab.exhausted),
    ):
        vals = full(p, np.nan, np.float64)
        known = ~np.isnan(vals)
        obs[f"bp_{name}"] = _bool_categorical(np.nan_to_num(vals) >= 0.5, known)
        obs[f"bp_{name}_prob"] = vals
        if name != "exhausted":
            confs[name] = np.where(known, np.maximum(vals, 1 - vals), np.nan)
            applies[name] = ~np.isnan(p)
    applies["treg"] = applies["treg"] & (lab.lineage == "CD4")
    for name, c in confs.items():
        obs[f"bp_{name}_conf"] = c
    conf_mat = np.column_stack(list(confs.values()))
    some = ~np.isnan(conf_mat).all(axis=1)
    overall = np.full(n, np.nan)
    overall[some] = np.nanmin(conf_mat[some], axis=1)
    obs["bp_confidence"] = overall
    # per cell: the kinds of evidence behind the labels that apply to it
    has_p = np.zeros(lab.m, dtype=bool)
    has_r = np.zeros(lab.m, dtype=bool)
    for name, a in applies.items():
        k = lab.kind.get(name, "")
        if "protein" in k:
            has_p |= a
        if "RNA" in k:
            has_r |= a
    kinds = np.where(
        has_p & has_r, "protein+RNA", np.where(has_p, "protein", np.where(has_r, "RNA", "none"))
    )
    if lab.kind.get("t_cell") == "prefiltered":
        kinds = np.where(kinds == "none", "prefiltered", kinds)
    obs["bp_evidence"] = _categorical(full(kinds.astype(object), None, object), EVIDENCE_LABELS)
    for nm, s in lab.scores.items():
        obs[f"bp_score_{nm}"] = full(s.astype(np.float32), np.nan, np.float32)
    clr_full = None
    if lab.clr is not None:
        arr = np.full((n, lab.clr.shape[1]), np.nan)
        arr[rows] = lab.clr.to_numpy()
        clr_full = pd.DataFrame(arr, index=index, columns=lab.clr.columns)
    return obs, clr_full


# =========================================================================== evidence
def _route_of(fitted: Fitted, label: str) -> RouteState:
    return effector_route(fitted) if label == "effector" else fitted.routes[label]


def _route_parts(fitted: Fitted, label: str) -> list[RouteState]:
    if label in ("memory", "effector"):
        return [fitted.routes["ccr7"], fitted.routes["ra"]]
    if label == "exhausted":
        return (
            [fitted.routes["tim3"], fitted.routes["pd1"]]
            if fitted.routes["exhausted"].route == "protein_product"
            else [fitted.routes["tim3"]]
        )
    return [fitted.routes[label]]


def _label_evidence(
    fitted: Fitted,
    label: str,
    sample: str,
    gates: dict[str, dict[str, Any]],
    present: set[str],
) -> dict[str, Any]:
    route = _route_of(fitted, label)
    parts = _route_parts(fitted, label)
    markers: list[str] = []
    gate_methods: dict[str, str] = {}
    genes: list[str] = []
    sets: list[str] = []
    for r in parts:
        for key in r.gates:
            marker = key.split("@", 1)[0]
            for mk in marker.split("-") if marker == "CD25-CD127" else [marker]:
                if mk not in markers:
                    markers.append(mk)
            fit = gates.get(key, {}).get(sample)
            gate_methods[key] = str(fit["method"]) if fit else "no cells in the parent"
        for mkey in [r.model, *r.plan.values()]:
            if mkey and mkey in fitted.models:
                set_name = mkey.split("@", 1)[0]
                if set_name not in sets:
                    sets.append(set_name)
                genes += [g for g in fitted.models[mkey].genes if g not in genes]
        if r.route == "protein_fused" and "CCR7" in fitted.fused:
            fz = fitted.fused["CCR7"]
            sets.append(fz.gene_set)
            genes += [g for g in fz.genes if g not in genes]
        if r.route == "homogeneous":
            sig = fitted.config.rna.signatures["t_cell"]
            genes += [g.upper() for g in sig.up if g.upper() not in genes]
    if route.route == "none":
        source = "unavailable"
    elif route.kind:
        source = route.kind
    else:
        source = "RNA" if genes else "protein" if markers else "unavailable"
    return {
        "source": source,
        "estimator": route.description,
        "protein_markers": markers,
        "gate_methods": gate_methods,
        "gene_sets": sets,
        "genes": genes,
        "genes_missing_here": [g for g in genes if g not in present],
    }


def _has_value(lab: Labels, label: str) -> np.ndarray:
    """Per QC-passed cell: whether ``label`` has a value (is not NaN)."""
    if label in ("t_cell", "lineage"):
        return np.ones(lab.m, dtype=bool)
    if label == "memory":
        return ~np.isnan(lab.mem_prob).any(axis=1)
    values: np.ndarray = getattr(lab, label)
    return ~np.isnan(values)


def _parent(lab: Labels, label: str) -> tuple[np.ndarray, str]:
    """The cells a label applies to and their name."""
    if label in ("t_cell", "lineage"):
        return np.ones(lab.m, dtype=bool), "QC-passed cells"
    if label == "treg":
        return lab.lineage == "CD4", "CD4 T cells"
    if label == "exhausted":
        return lab.lineage == "CD8", "CD8 T cells"
    return lab.t_call, "T cells"


def _why_no_value(fitted: Fitted, lab: Labels, label: str, sel: np.ndarray) -> str:
    """Why ``label`` has no value for any cell of a sample (``sel``: its QC-passed cells)."""
    if not sel.any():
        return "no QC-passed cells in this sample"
    parent, what = _parent(lab, label)
    if not (parent & sel).any():
        return f"no {what} in this sample"
    route = _route_of(fitted, label)
    if route.route == "none":
        return route.description
    plan_route = fitted.routes["tim3"] if label == "exhausted" else route
    if plan_route.plan:
        lineages = {str(x) for x in lab.lineage[parent & sel]}
        covered = {k.split(":", 1)[0] for k in plan_route.plan}
        models = sorted(set(plan_route.plan.values()))
        if not lineages & covered:
            return (
                f"the RNA model(s) {', '.join(models)} cover {', '.join(sorted(covered))} T cells "
                f"only (no separable states fitted for {', '.join(sorted(lineages))}): none of "
                f"the {what} of this sample has a value"
            )
    return f"none of the {what} of this sample has a value ({route.description})"


def sample_evidence(
    inp: CellInput,
    qc: CellQC,
    lab: Labels,
    fitted: Fitted,
    *,
    fitted_on_input: bool,
) -> dict[str, dict[str, Any]]:
    """Per sample: the evidence behind each label and how many cells each filter removed.

    Returns
    -------
    dict
        ``sample -> {"labels": {label: {source, estimator, protein_markers, gate_methods,
        gene_sets, genes, genes_missing_here}}, "from_protein": [...], "from_rna": [...],
        "unavailable": [...], "cell_qc": {n_cells, n_pass, n_removed, removed_by_rule},
        "matrix": {x_kind, note, gene_symbols}, "annotator": {...}, "notes": [...]}``.
        ``source`` is ``protein``, ``RNA``, ``protein+RNA``, ``prefiltered`` or
        ``unavailable`` (also when the label has no value for any cell of the sample, e.g. no
        CD8 T cells, or an RNA model fitted for another lineage only; ``unavailable_reason``
        then says why, else it is ``""``); ``gate_methods`` gives, per protein gate, the method used for this
        sample (``mixture``: its own; ``pooled_mixture``: the training cohort's;
        ``rule_rare_positive``; ``unavailable``).
    """
    gates = lab.params.get("protein", {}).get("gates", {})
    present = {str(s) for s in inp.symbols}
    per_qc = qc.per_sample(inp)
    gaussian = any(isinstance(m, GaussFit) for m in fitted.models.values())
    matrix = {
        "x_kind": inp.x_kind,
        "note": inp.info.note if inp.info is not None else "no RNA",
        "gene_symbols": inp.symbol_source,
        "protein": inp.protein_source,
        "rna_models": (
            "Gaussian mixtures on log-normalised gene-set scores (calls from normalised data)"
            if gaussian
            else "negative-binomial mixtures on raw counts"
            if fitted.models
            else "none"
        ),
    }
    annot = {
        "fitted_on_input": bool(fitted_on_input),
        "fitted_on": "this object" if fitted_on_input else "a training cohort",
        "n_cells_fit": int(fitted.n_cells),
        "n_samples_fit": int(fitted.n_samples),
        "x_kind_fit": fitted.x_kind,
        "config": f"{fitted.config.name} v{fitted.config.version}",
    }
    out: dict[str, dict[str, Any]] = {}
    qc_sample = inp.sample[np.flatnonzero(qc.passed)]
    has = {k: _has_value(lab, k) for k in LABELS}
    for i, s in enumerate(inp.sample_names):
        sel = qc_sample == i
        labels = {k: _label_evidence(fitted, k, s, gates, present) for k in LABELS}
        for k, ev in labels.items():
            ev["unavailable_reason"] = ""
            if ev["source"] == "unavailable":
                ev["unavailable_reason"] = _route_of(fitted, k).description
            elif not (has[k] & sel).any():
                ev["source"] = "unavailable"
                ev["unavailable_reason"] = _why_no_value(fitted, lab, k, sel)
        out[s] = {
            "labels": labels,
            "from_protein": [k for k, v in labels.items() if "protein" in v["source"]],
            "from_rna": [k for k, v in labels.items() if "RNA" in v["source"]],
            "unavailable": [k for k, v in labels.items() if v["source"] == "unavailable"],
            "cell_qc": {**per_qc[s], "rules": list(qc.rules)},
            "matrix": dict(matrix),
            "annotator": dict(annot),
            "notes": list(lab.notes),
        }
    return out


def uns_params(
    inp: CellInput,
    qc: CellQC,
    lab: Labels,
    cfg: SingleCellConfig,
    evidence: dict[str, dict[str, Any]],
    annotator: dict[str, Any],
) -> dict[str, Any]:
    """``uns['blinaprofile']``: estimators, thresholds, models and per-sample evidence."""
    return uns_safe(
        {
            "schema_version": SCHEMA_VERSION,
            "config_name": cfg.name,
            "config_version": cfg.version,
            "sample_key": inp.sample_key or "",
            "samples": list(inp.sample_names),
            "x_kind": inp.x_kind,
            "cell_qc": {
                "rules": list(qc.rules),
                "n_pass": {
                    s: int(qc.passed[inp.sample == i].sum()) for i, s in enumerate(inp.sample_names)
                },
            },
            "evidence": dict(lab.evidence),
            "sample_evidence": evidence,
            "annotator": annotator,
            "tim3_estimator": tim3_estimator(lab),
            "fraction_estimator": cfg.fraction_estimator,
            "protein": lab.params["protein"],
            "rna": lab.params["rna"],
        }
    )


def uns_safe(obj: Any) -> Any:
    """``obj`` writable to ``.h5ad``: no ``None`` (-> ``""``), tuples as lists, empty lists of
    strings as empty string arrays."""
    if isinstance(obj, dict):
        return {str(k): uns_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        if not obj:
            return np.array([], dtype=str)
        return [uns_safe(v) for v in obj]
    if obj is None:
        return ""
    return obj
