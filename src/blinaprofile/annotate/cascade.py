"""The label cascade: T cells -> CD4/CD8 -> states (TIM3/checkpoint, PD-1, Treg, exhausted)
-> memory, from protein where present and RNA gene sets otherwise.

The same code fits and applies. Fitting (``fitting=True``) runs the cascade on a training
cohort, decides each label's route (protein gate, RNA model, pooled fallback...) and learns
every threshold, mixture and rate into a :class:`~blinaprofile.annotate.state.Fitted`.
Applying (``fitting=False``) follows the stored routes with the stored models; the only
quantities estimated from the data at hand are per-sample protein gates and per-sample state
priors, which depend on that sample's cells alone, so a sample gets the same labels alone or
inside any cohort.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from blinaprofile.annotate.effector import (
    effector_prob,
    effector_route,
    memory_unavailable_reason,
    partial_ra_plan,
)
from blinaprofile.annotate.inputs import CellInput
from blinaprofile.annotate.mixtures import (
    BinFit,
    MarkerGate,
    SetModel,
    apply_gate,
    expit,
    fit_fuse,
    fit_gate,
    fit_signature,
    logit,
    predict_fitted,
    sample_log_prior,
    set_llr,
)
from blinaprofile.annotate.rna import RNABlock
from blinaprofile.annotate.state import ROUTE_KEYS, Fitted, RouteState
from blinaprofile.errors import SingleCellInputError

__all__ = ["Labels", "run_cascade", "tim3_estimator"]

LABELS: tuple[str, ...] = (
    "t_cell",
    "lineage",
    "memory",
    "effector",
    "tim3",
    "pd1",
    "treg",
    "exhausted",
)


@dataclass
class Labels:
    """Per-cell results over the QC-passed cells (length ``m``)."""

    m: int
    t_prob: np.ndarray
    t_call: np.ndarray
    cell_type: np.ndarray
    lineage: np.ndarray
    lineage_conf: np.ndarray
    mem_prob: np.ndarray  # (m, 4): naive, CM, EM, TEMRA
    tim3: np.ndarray  # P(positive); NaN where not applicable or not estimable
    pd1: np.ndarray
    treg: np.ndarray
    exhausted: np.ndarray  # P(exhausted / checkpoint-high) of CD8 T cells
    effector: np.ndarray  # P(TEMRA-like) of CCR7-low T cells (bp_effector); NaN elsewhere
    evidence: dict[str, str]  # label -> description of the estimator
    kind: dict[str, str]  # label -> "protein" / "RNA" / "protein+RNA" / "prefiltered"
    scores: dict[str, np.ndarray]
    clr: pd.DataFrame | None
    params: dict[str, Any]
    notes: list[str]  # object-level notes (genes or controls missing here...)


def _kind(*sources: str) -> str:
    has_p = any("protein" in s for s in sources)
    has_r = any("RNA" in s for s in sources)
    return "protein+RNA" if has_p and has_r else "protein" if has_p else "RNA" if has_r else ""


def _route(route: str, description: str, **kw: Any) -> RouteState:
    kind = kw.pop("kind", None)
    return RouteState.model_validate(
        {
            "route": route,
            "description": description,
            "kind": _kind(description) if kind is None else kind,
            **kw,
        }
    )


def clr_frame(
    prot: pd.DataFrame, axis: str, pseudocount: float, center: np.ndarray | None
) -> tuple[pd.DataFrame, np.ndarray | None]:
    """CLR of antibody counts: ``log(x + pseudocount)`` minus the cell's mean over antibodies
    (``axis="cell"``) or minus each antibody's mean over the training cells (``"feature"``)."""
    lg = np.log(np.clip(prot.to_numpy(dtype=np.float64), 0.0, None) + pseudocount)
    if axis == "cell":
        lg = lg - lg.mean(axis=1, keepdims=True)
    else:
        if center is None:
            center = lg.mean(axis=0)
        lg = lg - center[None, :]
    return pd.DataFrame(lg, index=prot.index, columns=prot.columns), center


class _Cascade:
    """Runs the label cascade over the QC-passed cells of one object (fitting or applying)."""

    def __init__(self, inp: CellInput, qc: np.ndarray, fitted: Fitted, *, fitting: bool) -> None:
        cfg = fitted.config
        self.inp = inp
        self.cfg = cfg
        self.f = fitted
        self.fitting = fitting
        self.rows = np.flatnonzero(qc)
        self.m = self.rows.size
        self.groups = inp.sample[self.rows]
        self.names = inp.sample_names
        self.params: dict[str, Any] = {"protein": {}, "rna": {"models": {}}}
        self.cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.notes: list[str] = []
        self.rna: RNABlock | None = None
        self.scores: dict[str, np.ndarray] = {}
        self.axes: tuple[np.ndarray, np.ndarray] = (np.zeros(0), np.zeros(0))  # CCR7+, RA|CCR7-
        if fitting:
            fitted.x_kind = inp.x_kind
        elif (
            inp.matrix is not None
            and fitted.controls is not None
            and fitted.x_kind == "counts"
            and inp.x_kind != "counts"
        ):
            raise SingleCellInputError(
                f"the annotator was fitted on raw counts (negative-binomial mixtures) and "
                f"cannot label {inp.x_kind} data; fit an annotator on normalised data or "
                "provide raw counts",
                path=inp.source,
            )
        if (
            inp.matrix is not None
            and inp.info is not None
            and self.m
            and (fitting or fitted.controls is not None)
        ):
            if fitting and inp.panel is not None:
                raise SingleCellInputError(
                    "cannot fit an annotator on a gene panel (the control genes are chosen "
                    "among every gene): fit on the whole matrix or a subsample of its cells",
                    path=inp.source,
                )
            rna = RNABlock(
                inp.matrix,
                inp.info,
                self.rows,
                inp.symbols,
                cfg.rna,
                None if fitting else fitted.controls,
                None if inp.panel is None else inp.panel.total,
            )
            if rna.present:
                self.rna = rna
                if fitting:
                    fitted.controls = rna.controls
                for nm, sig in cfg.rna.signatures.items():
                    s = rna.score(sig)
                    if s is not None:
                        self.scores[nm] = s
                self.params["rna"]["missing_genes"] = {
                    nm: [g for g in (*sig.up, *sig.down) if g.upper() not in rna.present]
                    for nm, sig in cfg.rna.signatures.items()
                    if any(g.upper() not in rna.present for g in (*sig.up, *sig.down))
                }
                self.params["rna"]["n_control_genes"] = int(rna.n_ctrl_genes)
                if rna.n_ctrl_genes < rna.n_ctrl_wanted:
                    self.notes.append(
                        f"{rna.n_ctrl_wanted - rna.n_ctrl_genes} of {rna.n_ctrl_wanted} control "
                        "genes of the fitted annotator are absent here"
                    )
        elif inp.matrix is not None and not fitting and fitted.controls is None:
            self.notes.append("RNA present but the annotator was fitted without RNA: not used")
        self.clr: pd.DataFrame | None = None
        if inp.protein is not None and self.m:
            prot = inp.protein
            if not fitting:
                if fitted.antibodies is None:
                    self.notes.append(
                        "protein present but the annotator was fitted without protein: not used"
                    )
                    prot = None
                else:
                    missing = [a for a in fitted.antibodies if a not in prot.columns]
                    if missing:
                        raise SingleCellInputError(
                            f"the annotator was fitted with antibodies {missing} that this object "
                            "lacks (the CLR needs the same antibody panel)",
                            path=inp.source,
                        )
                    prot = prot[fitted.antibodies]
            if prot is not None:
                pc = cfg.protein
                self.clr, center = clr_frame(
                    prot.iloc[self.rows],
                    pc.clr_axis,
                    pc.pseudocount,
                    None if fitting else fitted.clr_center,
                )
                if fitting:
                    fitted.antibodies = [str(c) for c in prot.columns]
                    fitted.clr_center = center if pc.clr_axis == "feature" else None
                self.params["protein"] = {
                    "clr_axis": pc.clr_axis,
                    "markers": [str(c) for c in self.clr.columns],
                    "gates": {},
                }
        elif fitting:
            fitted.antibodies = None

    # ------------------------------------------------------------------ primitives
    def route(self, key: str, value: RouteState | None = None) -> RouteState:
        """Store (fitting) or read (applying) a label's route."""
        if self.fitting:
            assert value is not None
            self.f.routes[key] = value
            return value
        return self.f.routes[key]

    def gate(self, marker: str, parent: np.ndarray, scope: str = "") -> MarkerGate | None:
        """Per-sample gate of ``marker`` within ``parent``; None if absent or never placed."""
        if self.clr is None or marker not in self.clr.columns:
            return None
        key = f"{marker}@{scope}" if scope else marker
        values = self.clr[marker].to_numpy()
        if self.fitting:
            model = fit_gate(values, parent, marker, self.cfg.protein)
        elif (stored := self.f.gates.get(key)) is not None:
            model = stored
        else:
            return None
        g = apply_gate(values, parent, self.groups, self.names, model, self.cfg.protein)
        if self.fitting:
            model.available = g.available
            self.f.gates[key] = model
        self.params["protein"]["gates"][key] = g.fits
        return g if model.available else None

    def fit_model(
        self, name: str, rows: np.ndarray, scope: str
    ) -> tuple[SetModel | None, np.ndarray | None]:
        """Fit a gene set's mixture on ``rows`` (fitting only); keeps it when it separates."""
        key = f"{name}@{scope}"
        if self.rna is None:
            return None, None
        fit, p = fit_signature(
            self.rna, name, rows, self.groups, self.names, self.cfg.rna, self.scores
        )
        if fit is None or p is None:
            self.params["rna"]["models"][key] = {
                "ok": False,
                "note": "no genes of the set present or too few cells",
                "n_cells": int(rows.size),
            }
            return None, None
        self.params["rna"]["models"][key] = fit.as_dict()
        if fit.ok:
            self.f.models[key] = fit
            self.cache[key] = (rows, p)
        return fit, p

    def posterior_of(
        self,
        key: str,
        pred: np.ndarray,
        est: np.ndarray,
        *,
        drop: set[str] | None = None,
        cached: bool = False,
    ) -> np.ndarray:
        """P(high) of the ``pred`` cells under model ``key``, with per-sample priors estimated
        on the ``est`` cells (fitting: the priors learned with the model, and with ``cached``
        the posteriors of the fit itself when ``pred`` are the cells it was fitted on).
        ``drop``: genes whose evidence is left out."""
        model = self.f.models[key]
        assert self.rna is not None
        if self.fitting:
            hit = self.cache.get(key)
            if cached and not drop and hit is not None and np.array_equal(hit[0], pred):
                return hit[1]
            return predict_fitted(self.rna, model, pred, self.groups, drop)
        if key not in self.params["rna"]["models"]:
            self.params["rna"]["models"][key] = model.as_dict()
        n_groups = len(self.names)
        llr_est = set_llr(model, self.rna, est)
        log_prior = sample_log_prior(
            llr_est, self.groups[est], n_groups, model.prior, self.cfg.rna.sample_prior_cells
        )
        if drop and isinstance(model, BinFit):
            llr_pred = set_llr(model.without(drop), self.rna, pred)
        elif np.array_equal(pred, est):
            llr_pred = llr_est
        else:
            llr_pred = set_llr(model, self.rna, pred)
        return expit(llr_pred + log_prior[self.groups[pred]])

    def fuse(self, marker: str, prob: np.ndarray, t_rows: np.ndarray) -> bool:
        """Add RNA evidence to a weak protein gate (``protein.fuse_rna``), in place.

        Each cell's log-likelihood ratio of the two protein-defined RNA states, capped at
        ``protein.fuse_max_log_ratio``, is added to the logit of its protein posterior.
        """
        if self.rna is None:
            return False
        rows = t_rows[~np.isnan(prob[t_rows])]
        if self.fitting:
            sig_name = self.cfg.protein.fuse_rna.get(marker)
            if sig_name is None or sig_name not in self.cfg.rna.signatures:
                return False
            sig = self.cfg.rna.signatures[sig_name]
            genes = self.rna.genes([*sig.up, *sig.down])
            if not genes or rows.size < self.cfg.rna.min_cells_per_fit:
                return False
            n_up = len(self.rna.genes(sig.up))
            model = fit_fuse(
                self.rna,
                marker=marker,
                gene_set=sig_name,
                genes=genes,
                n_up=n_up,
                prob=prob,
                rows=rows,
                cap=self.cfg.protein.fuse_max_log_ratio,
                spec=self.cfg.rna,
            )
            self.f.fused[marker] = model
        elif (stored := self.f.fused.get(marker)) is not None:
            model = stored
        else:
            return False
        w = prob[rows]
        prob[rows] = expit(logit(w) + model.llr(self.rna, rows))
        d = model.as_dict()
        d["n_cells"] = int(rows.size)
        self.params["protein"].setdefault("fused_rna", {})[marker] = d
        return True

    def by_lineage(
        self, name: str, scopes: dict[str, np.ndarray], plan: dict[str, str] | None
    ) -> tuple[np.ndarray, dict[str, str]]:
        """A gene set per lineage; a lineage with too few cells or no separable states uses
        one fit over all lineages together. P(high) over QC cells and the plan (lineage ->
        model key). ``plan``: the stored plan when applying."""
        out = np.full(self.m, np.nan)
        nonempty = [k for k, r in scopes.items() if r.size]
        pooled_scope = "+".join(nonempty)
        if plan is None:
            plan = {}
            pooled: SetModel | None = None
            tried = False
            for scope, rows in scopes.items():
                if not rows.size:
                    continue
                if rows.size >= self.cfg.rna.min_cells_per_fit:
                    fit, _ = self.fit_model(name, rows, scope)
                    if fit is not None and fit.ok:
                        plan[scope] = f"{name}@{scope}"
                        continue
                if not tried:
                    tried = True
                    both = np.sort(np.concatenate([scopes[k] for k in nonempty]))
                    pooled, _ = self.fit_model(name, both, pooled_scope)
                if pooled is not None and pooled.ok:
                    plan[scope] = f"{name}@{pooled_scope}"
        for scope, key in plan.items():
            rows = scopes.get(scope, np.zeros(0, dtype=np.int64))
            if not rows.size or self.rna is None:
                continue
            own = key == f"{name}@{scope}"
            if own:
                est = rows
            else:
                parts = key.split("@", 1)[1].split("+")
                est = np.sort(np.concatenate([scopes.get(k, rows[:0]) for k in parts]))
            out[rows] = self.posterior_of(key, rows, est, cached=own)
        return out, plan

    def genes_of(self, name: str) -> list[str]:
        sig = self.cfg.rna.signatures[name]
        return self.rna.genes([*sig.up, *sig.down]) if self.rna is not None else []

    # ------------------------------------------------------------------ cascade
    def run(self) -> Labels:
        m = self.m
        if m == 0:  # nothing passed cell QC: every sample fails QC, nothing to annotate
            return self._empty()
        everyone = np.ones(m, dtype=bool)
        t_prob, t_route = self._t_cells(everyone)
        t_call = t_prob >= 0.5
        tix = np.flatnonzero(t_call)
        cell_type = self._cell_type(t_call)
        lineage, lin_conf = self._lineage(t_call, t_prob, tix)
        is8, is4 = lineage == "CD8", lineage == "CD4"
        scopes = {"CD8": np.flatnonzero(is8), "CD4": np.flatnonzero(is4)}
        evidence = {"t_cell": t_route.description, "lineage": self.f.routes["lineage"].description}
        tim3, evidence["tim3"] = self._state("tim3", "TIM3", "checkpoint", scopes)
        pd1, evidence["pd1"] = self._state("pd1", "PD1", "pd1", scopes)
        treg, evidence["treg"] = self._treg(is4, scopes)
        treg[is8] = 0.0
        exhausted, evidence["exhausted"] = self._exhausted(tim3, pd1, is8)
        mem, evidence["memory"] = self._memory(t_call, scopes, exhausted)
        er = effector_route(self.f)
        from_mem = self.f.routes["memory"].route != "none"
        effector = effector_prob(er, from_mem, mem, *self.axes, t_call)
        evidence["effector"] = er.description
        kind = {k: _kind(v) for k, v in evidence.items()}
        if t_route.route == "prefiltered":
            kind["t_cell"] = "prefiltered"
        return Labels(
            m=m,
            t_prob=t_prob,
            t_call=t_call,
            cell_type=cell_type,
            lineage=lineage,
            lineage_conf=lin_conf,
            mem_prob=mem,
            tim3=tim3,
            pd1=pd1,
            treg=treg,
            exhausted=exhausted,
            effector=effector,
            evidence=evidence,
            kind=kind,
            scores=self.scores,
            clr=self.clr,
            params=self.params,
            notes=self.notes,
        )

    def _empty(self) -> Labels:
        none = "no QC-passed cells"
        if self.fitting:
            for k in ROUTE_KEYS:
                self.route(k, _route("none", none))
        evidence = {k: self.f.routes[k].description for k in LABELS if k != "effector"}
        evidence["effector"] = effector_route(self.f).description
        empty = np.zeros(0)
        return Labels(
            m=0,
            t_prob=empty,
            t_call=np.zeros(0, dtype=bool),
            cell_type=np.zeros(0, dtype=object),
            lineage=np.zeros(0, dtype=object),
            lineage_conf=empty,
            mem_prob=np.zeros((0, 4)),
            tim3=empty,
            pd1=empty,
            treg=empty,
            exhausted=empty,
            effector=empty,
            evidence=evidence,
            kind={},
            scores={},
            clr=None,
            params=self.params,
            notes=self.notes,
        )

    def _t_cells(self, everyone: np.ndarray) -> tuple[np.ndarray, RouteState]:
        m, cfg = self.m, self.cfg
        g3: MarkerGate | None = None
        if self.fitting:
            if cfg.t_cells_prefiltered:
                r = _route(
                    "prefiltered",
                    "prefiltered (config t_cells_prefiltered: every QC-passed cell)",
                    kind="prefiltered",
                )
            elif (g3 := self.gate("CD3", everyone)) is not None:
                r = _route("protein", "protein: CD3 (CLR, per-sample mixture)", gates=["CD3"])
            else:
                r = self._fit_rna_t_cells()
            self.route("t_cell", r)
        r = self.f.routes["t_cell"]
        t_prob = np.full(m, np.nan)
        if r.route == "prefiltered":
            t_prob[:] = 1.0
        elif r.route == "protein":
            if g3 is None:
                g3 = self.gate("CD3", everyone)
            t_prob = np.nan_to_num(g3.prob if g3 is not None else t_prob, nan=0.0)
        elif r.route == "rna" and self.rna is not None:
            rows = np.arange(m)
            t_prob = self.posterior_of(r.model, rows, rows, cached=True)
        elif r.route == "homogeneous" and self.rna is not None:
            detected = self.rna.detected(self.genes_of("t_cell"))
            t_prob = np.where(detected, 1.0, float(r.share or 0.0))
        else:
            raise SingleCellInputError(
                f"cannot call T cells here: the annotator calls them by {r.route} ({r.description})"
                " and this object lacks what that needs",
                path=self.inp.source,
            )
        return t_prob, r

    def _fit_rna_t_cells(self) -> RouteState:
        """T cells from the t_cell gene set: a two-state mixture, or, when the set does not
        separate two populations but is detected in most cells, a homogeneous T population
        (T-cell-sorted data)."""
        cfg, m = self.cfg, self.m
        genes = self.genes_of("t_cell")
        fit, p = self.fit_model("t_cell", np.arange(m), "all")
        if fit is not None and p is not None and fit.ok:
            how = (
                "NB mixture"
                if isinstance(fit, BinFit)
                else ("Gaussian mixture on the log-normalised score")
            )
            return _route(
                "rna", f"RNA: t_cell gene set [{', '.join(genes)}] ({how})", model="t_cell@all"
            )
        detected = self.rna.detected(genes) if self.rna is not None and genes else None
        if detected is not None and detected.mean() >= cfg.rna.homogeneous_min_detected:
            share = float(detected.mean())
            return _route(
                "homogeneous",
                f"RNA: homogeneous T-cell population (t_cell set [{', '.join(genes)}] detected "
                f"in {100 * share:.0f}% of cells, no second population)",
                share=share,
            )
        have = f"{len(self.inp.symbols)} genes" if self.inp.matrix is not None else "no RNA"
        prot = list(self.inp.protein.columns) if self.inp.protein is not None else "none"
        why = (
            f"the genes {genes} do not separate T cells from other cells and are detected in "
            f"only {100 * float(detected.mean()):.0f}% of cells"
            if detected is not None
            else f"none of the T-cell genes {cfg.rna.signatures['t_cell'].up} is present"
        )
        raise SingleCellInputError(
            f"cannot call T cells: no usable CD3 protein and {why} ({have}; protein: {prot})",
            path=self.inp.source,
        )

    def _cell_type(self, t_call: np.ndarray) -> np.ndarray:
        """Coarse type of the other cells: the highest of the B, NK and myeloid scores."""
        sets = ("b_cell", "nk", "myeloid")
        if self.fitting:
            ok = all(k in self.scores for k in sets)
            self.f.scored_sets = [k for k in sets if k in self.scores]
            self.route(
                "cell_type",
                _route("rna", "RNA: highest of the b_cell, nk, myeloid scores", kind="RNA")
                if ok
                else _route("none", "unavailable: no b_cell, nk and myeloid scores"),
            )
        cell_type = np.where(t_call, "T", "non_T").astype(object)
        if self.f.routes["cell_type"].route == "rna":
            if all(k in self.scores for k in sets):
                st = np.column_stack([self.scores[k] for k in sets])
                best = np.array(["B", "NK", "myeloid"], dtype=object)[np.argmax(st, axis=1)]
                best = np.where(st.max(axis=1) > 0, best, "other")
                cell_type = np.where(t_call, "T", best).astype(object)
            else:
                self.notes.append("cell types: B/NK/myeloid gene sets absent here")
        return cell_type

    def _lineage(
        self, t_call: np.ndarray, t_prob: np.ndarray, tix: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        lineage = np.where(t_call, "other", "non_T").astype(object)
        lin_conf = np.where(t_call, np.nan, 1.0 - t_prob)
        g4: MarkerGate | None = None
        g8: MarkerGate | None = None
        if self.fitting:
            g4 = self.gate("CD4", t_call)
            g8 = self.gate("CD8", t_call) if g4 is not None else None
            if g4 is not None and g8 is not None:
                r = _route(
                    "protein",
                    "protein: CD4, CD8 (CLR, per-sample mixtures within T cells)",
                    gates=["CD4", "CD8"],
                )
            elif (fit := self.fit_model("cd8_vs_cd4", tix, "T")[0]) is not None and fit.ok:
                how = (
                    "NB mixture + secondary genes"
                    if isinstance(fit, BinFit)
                    else ("Gaussian mixture on the log-normalised score")
                )
                r = _route(
                    "rna",
                    f"RNA: cd8_vs_cd4 gene sets [{', '.join(self.genes_of('cd8_vs_cd4'))}] ({how})",
                    model="cd8_vs_cd4@T",
                )
            elif tix.size:
                sig = cfg.rna.signatures["cd8_vs_cd4"]
                raise SingleCellInputError(
                    "cannot call CD4/CD8 T cells: no usable CD4 and CD8 protein and the genes "
                    f"{sig.up + sig.down} are absent or do not separate two states",
                    path=self.inp.source,
                )
            else:
                r = _route("none", "no T cells")
            self.route("lineage", r)
        r = self.f.routes["lineage"]
        if r.route == "protein":
            if g4 is None or g8 is None:
                g4, g8 = self.gate("CD4", t_call), self.gate("CD8", t_call)
            if g4 is not None and g8 is not None:
                p4, p8 = g4.prob[tix], g8.prob[tix]
                probs = np.column_stack(
                    [p4 * (1 - p8), p8 * (1 - p4), p4 * p8 + (1 - p4) * (1 - p8)]
                )
                lineage[tix] = np.array(["CD4", "CD8", "other"], dtype=object)[
                    np.argmax(probs, axis=1)
                ]
                lin_conf[tix] = probs.max(axis=1)
        elif r.route == "rna" and self.rna is not None and tix.size:
            pp = self.posterior_of(r.model, tix, tix, cached=True)
            lineage[tix] = np.where(pp >= 0.5, "CD8", "CD4")
            lin_conf[tix] = np.maximum(pp, 1 - pp)
        elif r.route != "none" and tix.size:
            raise SingleCellInputError(
                f"cannot call CD4/CD8 here: the annotator calls them by {r.description} and this "
                "object lacks what that needs",
                path=self.inp.source,
            )
        return lineage, lin_conf

    def _state(
        self, label: str, marker: str, sig_name: str, scopes: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, str]:
        """A T-cell state per lineage: protein gate if the marker is present, else gene set."""
        out = np.full(self.m, np.nan)
        if self.fitting:
            placed: list[str] = []
            if self.clr is not None and marker in self.clr.columns:
                for scope, rows in scopes.items():
                    sub = np.zeros(self.m, dtype=bool)
                    sub[rows] = True
                    if rows.size and (g := self.gate(marker, sub, scope)) is not None:
                        out[rows] = g.prob[rows]
                        placed.append(scope)
            if placed:
                self.route(
                    label,
                    _route(
                        "protein",
                        f"protein: {marker} (CLR, per-sample threshold within "
                        f"{' and '.join(placed)} T cells)",
                        gates=[f"{marker}@{s}" for s in placed],
                    ),
                )
                return out, self.f.routes[label].description
            est, plan = self.by_lineage(sig_name, scopes, None)
            if plan:
                used = [
                    s if k == f"{sig_name}@{s}" else f"{s} (fit pooled over lineages)"
                    for s, k in plan.items()
                ]
                how = (
                    "NB"
                    if isinstance(self.f.models[next(iter(plan.values()))], BinFit)
                    else ("Gaussian, normalised data,")
                )
                r = _route(
                    "rna",
                    f"RNA: {sig_name} gene set [{', '.join(self.genes_of(sig_name))}] ({how} "
                    f"mixture per lineage: {', '.join(used)}; fraction = mean posterior)",
                    plan=plan,
                )
                self.route(label, r)
                return est, r.description
            r = _route(
                "none", f"unavailable: no {marker} protein and no separable {sig_name} gene set"
            )
            self.route(label, r)
            return out, r.description
        r = self.f.routes[label]
        if r.route == "protein":
            for key in r.gates:
                scope = key.split("@", 1)[1]
                rows = scopes.get(scope, np.zeros(0, dtype=np.int64))
                sub = np.zeros(self.m, dtype=bool)
                sub[rows] = True
                if rows.size and (g := self.gate(marker, sub, scope)) is not None:
                    out[rows] = g.prob[rows]
        elif r.route == "rna":
            out, _ = self.by_lineage(sig_name, scopes, r.plan)
        return out, r.description

    def _treg(self, is4: np.ndarray, scopes: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
        """CD25+ CD127lo within CD4: one gate on CLR(CD25) - CLR(CD127), the diagonal a flow
        gater draws on CD25 vs CD127 (rare positive); CD25 alone without CD127 protein."""
        out = np.full(self.m, np.nan)
        clr = self.clr
        stored = None if self.fitting else self.f.routes["treg"]
        if (
            clr is not None
            and "CD25" in clr.columns
            and (stored is None or stored.route in ("protein", "protein_diagonal"))
        ):
            if "CD127" in clr.columns and (stored is None or stored.route == "protein_diagonal"):
                clr["CD25-CD127"] = clr["CD25"] - clr["CD127"]
                g = self.gate("CD25-CD127", is4)
                del clr["CD25-CD127"]
                what, key, route = (
                    "CD25+ CD127lo (gate on CLR CD25 - CLR CD127)",
                    "CD25-CD127",
                    "protein_diagonal",
                )
            else:
                g = self.gate("CD25", is4)
                what, key, route = "CD25+ (no CD127 protein)", "CD25", "protein"
            if g is not None:
                out[is4] = g.prob[is4]
                if self.fitting:
                    self.route(
                        "treg",
                        _route(
                            route, f"protein: {what} within CD4, per-sample threshold", gates=[key]
                        ),
                    )
                return out, self.f.routes["treg"].description
        rows = scopes["CD4"]
        if self.fitting:
            fit = self.fit_model("treg", rows, "CD4")[0] if rows.size else None
            if fit is not None and fit.ok:
                how = "NB" if isinstance(fit, BinFit) else "Gaussian, normalised data,"
                self.route(
                    "treg",
                    _route(
                        "rna",
                        f"RNA: treg gene set [{', '.join(self.genes_of('treg'))}] ({how} "
                        "mixture; fraction = mean posterior)",
                        model="treg@CD4",
                    ),
                )
            else:
                self.route(
                    "treg",
                    _route("none", "unavailable: no CD25 protein and no separable treg gene set"),
                )
        r = self.f.routes["treg"]
        if r.route == "rna" and rows.size and self.rna is not None:
            out[rows] = self.posterior_of(r.model, rows, rows, cached=True)
        return out, r.description

    def _exhausted(
        self, tim3: np.ndarray, pd1: np.ndarray, is8: np.ndarray
    ) -> tuple[np.ndarray, str]:
        """Exhausted (checkpoint-high) CD8 T cells: P(TIM3+) x P(PD-1+) from protein, TIM3
        protein alone without PD-1 protein, else the RNA checkpoint set (HAVCR2, PDCD1, LAG3,
        TIGIT, CTLA4, TOX, ENTPD1, LAYN)."""
        rt, rp = self.f.routes["tim3"], self.f.routes["pd1"]
        if self.fitting:
            if rt.route == "protein" and rp.route == "protein":
                r = _route(
                    "protein_product",
                    "protein: TIM3+ PD-1+ (product of the two "
                    "per-sample gate posteriors) within CD8",
                )
            elif rt.route == "protein":
                r = _route("protein", "protein: TIM3+ within CD8 (no PD-1 protein)")
            elif rt.route == "rna":
                r = _route(
                    "rna",
                    "RNA: checkpoint-high state of the checkpoint gene set "
                    "(posterior of the tim3 label) within CD8",
                )
            else:
                r = _route("none", "unavailable: no TIM3 protein and no checkpoint gene set")
            self.route("exhausted", r)
        r = self.f.routes["exhausted"]
        out = np.full(self.m, np.nan)
        if r.route == "protein_product":
            out[is8] = tim3[is8] * pd1[is8]
        elif r.route in ("protein", "rna"):
            out[is8] = tim3[is8]
        return out, r.description

    def _memory(
        self, t_call: np.ndarray, scopes: dict[str, np.ndarray], exhausted: np.ndarray
    ) -> tuple[np.ndarray, str]:
        """Quadrants of a CCR7 axis and a CD45RA axis (protein, else RNA surrogates)."""
        m = self.m
        rc = None if self.fitting else self.f.routes["ccr7"]
        rr = None if self.fitting else self.f.routes["ra"]
        ra_name = "CD45RA"
        ra_route = "protein"
        g_ccr7 = (
            self.gate("CCR7", t_call)
            if rc is None or rc.route in ("protein", "protein_fused")
            else None
        )
        g_ra = self.gate("CD45RA", t_call) if rr is None or rr.route == "protein" else None
        if (
            g_ra is None
            and (rr is None or rr.route == "protein_inverted")
            and (g_ro := self.gate("CD45RO", t_call)) is not None
        ):
            g_ra = MarkerGate(1.0 - g_ro.prob, g_ro.fits, True)
            ra_name, ra_route = "CD45RO (inverted)", "protein_inverted"
        ccr7 = np.full(m, np.nan)
        ra_hi = np.full(m, np.nan)  # P(CD45RA+) in the CCR7+ branch (naive vs CM)
        ra_lo = np.full(m, np.nan)  # P(CD45RA+) in the CCR7- branch (TEMRA vs EM)
        src_c: set[str] = set()
        src_r: set[str] = set()
        c_plan: dict[str, str] = {}
        r_plan: dict[str, str] = {}
        fused = False
        if g_ccr7 is not None:
            ccr7 = g_ccr7.prob.copy()
            if (rc is None or rc.route == "protein_fused") and self.fuse(
                "CCR7", ccr7, np.flatnonzero(t_call)
            ):
                src_c.add("protein CCR7 + RNA ccr7 set (fused)")
                fused = True
            else:
                src_c.add("protein CCR7")
        if g_ra is not None:
            ra_hi, ra_lo = g_ra.prob.copy(), g_ra.prob.copy()
            src_r.add(f"protein {ra_name}")
        if self.rna is not None:
            if g_ccr7 is None and (rc is None or rc.route == "rna"):
                c_rna, c_plan = self.by_lineage("ccr7", scopes, None if rc is None else rc.plan)
                if c_plan:
                    ccr7 = c_rna
                    src_c.add("RNA ccr7 set")
            if g_ra is None and (rr is None or rr.route == "rna"):
                src_r |= self._ra_rna(
                    scopes, ccr7, ra_hi, ra_lo, exhausted, r_plan, None if rr is None else rr.plan
                )
        mem = np.column_stack(
            [ccr7 * ra_hi, ccr7 * (1 - ra_hi), (1 - ccr7) * (1 - ra_lo), (1 - ccr7) * ra_lo]
        )
        mem[~t_call] = np.nan
        self.axes = (ccr7, ra_lo)
        partial = not src_r and partial_ra_plan(r_plan)
        if self.fitting:
            self.route(
                "ccr7",
                _route(
                    "protein_fused" if fused else "protein",
                    ", ".join(sorted(src_c)),
                    gates=["CCR7"],
                )
                if g_ccr7 is not None
                else _route("rna", "RNA ccr7 set", plan=c_plan)
                if c_plan
                else _route("none", "unavailable"),
            )
            self.route(
                "ra",
                _route(
                    ra_route,
                    f"protein {ra_name}",
                    gates=["CD45RA" if ra_route == "protein" else "CD45RO"],
                )
                if g_ra is not None
                else _route("rna", "RNA naive_vs_cm / temra_vs_em sets", plan=r_plan)
                if src_r
                else _route("rna", "RNA temra_vs_em set (CCR7-low cells only)", plan=r_plan)
                if partial
                else _route("none", "unavailable"),
            )
            if not src_c or not src_r:
                have = sorted(src_c | src_r) or ["neither axis"]
                models = self.params["rna"]["models"]
                desc = memory_unavailable_reason(have, models, partial and bool(src_c))
                self.route("memory", _route("none", desc, kind=""))
            else:
                desc = f"CCR7 axis: {', '.join(sorted(src_c))}; CD45RA axis: {', '.join(sorted(src_r))}"
                self.route("memory", _route("protein" if "protein" in desc else "rna", desc))
        if self.f.routes["memory"].route == "none":
            mem[:] = np.nan
        return mem, self.f.routes["memory"].description

    def _ra_rna(
        self,
        scopes: dict[str, np.ndarray],
        ccr7: np.ndarray,
        ra_hi: np.ndarray,
        ra_lo: np.ndarray,
        exhausted: np.ndarray,
        r_plan: dict[str, str],
        plan: dict[str, str] | None,
    ) -> set[str]:
        """The CD45RA axis from RNA surrogates, per lineage and CCR7 branch: naive_vs_cm in
        CCR7+ cells, temra_vs_em in CCR7- cells (a branch with too few cells in a lineage uses
        one fit over CD4 + CD8). For CD8 cells the temra_vs_em genes that exhausted cells share
        with TEMRA (``rna.exhaustion_confounded``) count with weight 1 - P(exhausted)."""
        src: set[str] = set()
        pooled: dict[str, SetModel | None] = {}
        confounded = {g.upper() for g in self.cfg.rna.exhaustion_confounded}
        both = np.concatenate(list(scopes.values()))
        for scope, rows in scopes.items():
            if not rows.size:
                continue
            c = ccr7[rows]
            if np.isnan(c).all():
                continue
            used = 0
            for sig_name, sub, target in (
                ("naive_vs_cm", rows[c >= 0.5], ra_hi),
                ("temra_vs_em", rows[c < 0.5], ra_lo),
            ):
                cb = ccr7[both]
                branch = np.sort(both[(cb >= 0.5) if sig_name == "naive_vs_cm" else (cb < 0.5)])
                if plan is None:
                    fit, _ = self.fit_model(sig_name, sub, scope)
                    key = f"{sig_name}@{scope}"
                    if fit is None or not fit.ok:
                        # too few cells in this lineage's branch: fit on CD4 + CD8 together
                        key = f"{sig_name}@T"
                        if sig_name not in pooled:
                            pooled[sig_name] = self.fit_model(sig_name, branch, "T")[0]
                        fit = pooled[sig_name]
                    if fit is None or not fit.ok:
                        continue
                    r_plan[f"{scope}:{sig_name}"] = key
                else:
                    key = plan.get(f"{scope}:{sig_name}", "")
                    if not key:
                        continue
                est = sub if key == f"{sig_name}@{scope}" else branch
                p = self.posterior_of(key, rows, est)
                model = self.f.models[key]
                if (
                    sig_name == "temra_vs_em"
                    and scope == "CD8"
                    and isinstance(model, BinFit)
                    and confounded & set(model.genes + model.sec_genes)
                ):
                    e = np.nan_to_num(exhausted[rows], nan=0.0)
                    if e.any():
                        p_spec = self.posterior_of(key, rows, est, drop=confounded)
                        p = (1.0 - e) * p + e * p_spec
                target[rows] = p
                used += 1
            if used == 2:
                src.add("RNA naive_vs_cm / temra_vs_em sets")
        return src


def _single_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread: the many small matrix-vector products here are otherwise
    dominated by waking BLAS worker threads (x20 slower, worse on a loaded machine)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def run_cascade(inp: CellInput, qc: np.ndarray, fitted: Fitted, *, fitting: bool) -> Labels:
    """Run the cascade: fit ``fitted`` on this object (``fitting=True``) or apply it."""
    with _single_blas_thread():
        return _Cascade(inp, qc, fitted, fitting=fitting).run()


def tim3_estimator(lab: Labels) -> str:
    """The ``tim3_estimator`` column: which estimator gave ``cd8_tim3_pct_cd8``."""
    e = lab.evidence.get("tim3", "unavailable")
    if e.startswith("protein"):
        return "protein:TIM3(CD366):per_sample_threshold"
    if e.startswith("RNA"):
        found = re.search(r"\[(.*?)\]", e)
        genes = found.group(1).replace(" ", "") if found else ""
        return f"rna_checkpoint_set:{genes}:mixture_posterior_mean"
    return "unavailable"
