"""The fitted state of a :class:`~blinaprofile.annotate.estimator.TCellAnnotator` as plain,
validated JSON: numbers, strings, lists and mappings only (no pickle).

:class:`AnnotatorState` is the schema (pydantic; unknown keys, non-finite numbers, wrong
lengths and dangling references are errors); :func:`state_from_fitted` and
:func:`fitted_from_state` convert between it and the runtime objects of
:mod:`~blinaprofile.annotate.mixtures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from blinaprofile.annotate.config import SingleCellConfig
from blinaprofile.annotate.mixtures import GMM, BinFit, FuseModel, GateModel, GaussFit, SetModel
from blinaprofile.annotate.rna import Controls
from blinaprofile.config import StrictModel

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ROUTE_KEYS",
    "AnnotatorState",
    "Fitted",
    "RouteState",
    "fitted_from_state",
    "plain",
    "state_from_fitted",
]

FORMAT: Literal["blinaprofile.TCellAnnotator"] = "blinaprofile.TCellAnnotator"
FORMAT_VERSION: Literal[1] = 1

Pos = Annotated[float, Field(gt=0.0)]
Unit = Annotated[float, Field(ge=0.0, le=1.0)]
OpenUnit = Annotated[float, Field(gt=0.0, lt=1.0)]
Theta = Annotated[float, Field(ge=0.5, le=1000.0)]
Count = Annotated[int, Field(ge=0)]
GeneList = list[Annotated[str, Field(min_length=1)]]

RouteName = Literal[
    "prefiltered",
    "protein",
    "protein_fused",
    "protein_inverted",
    "protein_diagonal",
    "protein_product",
    "rna",
    "homogeneous",
    "none",
]
#: every label the cascade decides a route for
ROUTE_KEYS: tuple[str, ...] = (
    "t_cell",
    "cell_type",
    "lineage",
    "ccr7",
    "ra",
    "memory",
    "tim3",
    "pd1",
    "treg",
    "exhausted",
)


# =========================================================================== schema
class GMMState(StrictModel):
    """A two-component 1-D Gaussian mixture (component 0 low, 1 high)."""

    mean: tuple[float, float]
    sd: tuple[Pos, Pos]
    weight: tuple[Unit, Unit]
    n_cells: Count
    separation: float | None
    ok: bool
    threshold: float
    method: Literal["mixture", "pooled_mixture", "rule_rare_positive"]


class GateState(StrictModel):
    """Cohort-level fallbacks of one protein gate (per-sample fits are redone per sample)."""

    marker: str
    rare: bool
    available: bool
    pooled: GMMState | None = None
    rule: GMMState | None = None


class NBSetState(StrictModel):
    """A negative-binomial two-state mixture on a gene set (rates per UMI)."""

    kind: Literal["nb"]
    genes: GeneList = Field(min_length=1)
    n_up: Annotated[int, Field(ge=0)]
    rate_high: list[Pos]
    rate_low: list[Pos]
    theta: list[Theta]
    prior: OpenUnit
    secondary_genes: GeneList = Field(default_factory=list)
    secondary_log_ratio: list[float] = Field(default_factory=list)
    secondary_rate_terms: list[float] = Field(default_factory=list)
    fold: Pos
    ok: bool
    n_cells: Count
    n_iter: Count
    note: str = ""

    @model_validator(mode="after")
    def _lengths(self) -> NBSetState:
        n = len(self.genes)
        if not (len(self.rate_high) == len(self.rate_low) == len(self.theta) == n):
            raise ValueError(f"rate_high, rate_low and theta must each have {n} values (genes)")
        if self.n_up > n:
            raise ValueError("n_up exceeds the number of genes")
        k = len(self.secondary_genes)
        if not (len(self.secondary_log_ratio) == len(self.secondary_rate_terms) == k):
            raise ValueError(f"secondary_log_ratio and secondary_rate_terms must have {k} values")
        if len(set(self.genes)) != n:
            raise ValueError("genes must be unique")
        return self


class GaussSetState(StrictModel):
    """A Gaussian two-component mixture on a log-normalised gene-set score."""

    kind: Literal["gauss"]
    genes: GeneList = Field(min_length=1)
    n_up: Annotated[int, Field(ge=1)]
    gmm: GMMState
    prior: OpenUnit
    ok: bool
    n_cells: Count
    note: str = ""

    @model_validator(mode="after")
    def _lengths(self) -> GaussSetState:
        if self.n_up > len(self.genes):
            raise ValueError("n_up exceeds the number of genes")
        return self


SetState = Annotated[NBSetState | GaussSetState, Field(discriminator="kind")]


class FuseState(StrictModel):
    """RNA evidence added to a weak protein gate."""

    marker: str
    gene_set: str
    kind: Literal["nb", "gauss"]
    genes: GeneList = Field(min_length=1)
    cap: Pos
    n_cells: Count
    n_up: Count = 0
    rate_high: list[Pos] = Field(default_factory=list)
    rate_low: list[Pos] = Field(default_factory=list)
    theta: list[Theta] = Field(default_factory=list)
    mean_high: float = 0.0
    mean_low: float = 0.0
    sd: Pos = 1.0

    @model_validator(mode="after")
    def _lengths(self) -> FuseState:
        n = len(self.genes)
        if self.kind == "nb" and not (
            len(self.rate_high) == len(self.rate_low) == len(self.theta) == n
        ):
            raise ValueError(f"rate_high, rate_low and theta must each have {n} values (genes)")
        return self


class ControlState(StrictModel):
    """Expression-matched control genes (symbols per bin) and each gene-set gene's bin."""

    gene_bin: dict[str, Count]
    bins: list[GeneList]

    @model_validator(mode="after")
    def _bins(self) -> ControlState:
        bad = [g for g, b in self.gene_bin.items() if b >= len(self.bins)]
        if bad:
            raise ValueError(f"gene_bin of {bad[:3]} points past the {len(self.bins)} bins")
        return self


class ProteinState(StrictModel):
    antibodies: GeneList = Field(min_length=1)
    clr_axis: Literal["cell", "feature"]
    pseudocount: Pos
    center: list[float] | None = None
    gates: dict[str, GateState] = Field(default_factory=dict)
    fused: dict[str, FuseState] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _center(self) -> ProteinState:
        if self.center is not None and len(self.center) != len(self.antibodies):
            raise ValueError("center must have one value per antibody")
        return self


class RNAState(StrictModel):
    controls: ControlState
    models: dict[str, SetState] = Field(default_factory=dict)
    scored_sets: list[str] = Field(default_factory=list)


class RouteState(StrictModel):
    """How one label is estimated, decided once on the training cohort.

    ``model``: the RNA model key; ``gates``: protein gate keys; ``plan``: per lineage (or
    ``<lineage>:<gene set>``) the RNA model key applied to it; ``share``: the detected share
    of a homogeneous T-cell population.
    """

    route: RouteName
    description: str
    kind: Literal["protein", "RNA", "protein+RNA", "prefiltered", ""] = ""
    model: str = ""
    gates: list[str] = Field(default_factory=list)
    plan: dict[str, str] = Field(default_factory=dict)
    share: Unit | None = None


class AnnotatorState(StrictModel):
    """Everything a fitted annotator learned, as validated JSON."""

    format: Literal["blinaprofile.TCellAnnotator"]
    format_version: Literal[1]
    package_version: str
    schema_version: str
    config: SingleCellConfig
    x_kind: Literal["counts", "log1p-cp10k", "log-tpm", "tpm", "none"]
    n_cells: Count
    n_qc_cells: Count
    n_samples: Count
    sample_key: str
    protein: ProteinState | None = None
    rna: RNAState | None = None
    routes: dict[str, RouteState]

    @model_validator(mode="after")
    def _references(self) -> AnnotatorState:
        missing = [k for k in ROUTE_KEYS if k not in self.routes]
        if missing:
            raise ValueError(f"routes: missing {missing}")
        models = set(self.rna.models) if self.rna is not None else set()
        gates = set(self.protein.gates) if self.protein is not None else set()
        for key, r in self.routes.items():
            refs = [r.model] if r.model else []
            refs += [v for v in r.plan.values() if v]
            bad = [m for m in refs if m not in models]
            if bad:
                raise ValueError(f"routes.{key} refers to unknown RNA model(s) {bad}")
            bad = [g for g in r.gates if g not in gates]
            if bad:
                raise ValueError(f"routes.{key} refers to unknown protein gate(s) {bad}")
        return self


# =========================================================================== runtime
@dataclass
class Fitted:
    """The runtime form of :class:`AnnotatorState` used by the label cascade."""

    config: SingleCellConfig
    x_kind: str = "none"
    n_cells: int = 0
    n_qc_cells: int = 0
    n_samples: int = 0
    sample_key: str = ""
    antibodies: list[str] | None = None
    clr_center: np.ndarray | None = None
    gates: dict[str, GateModel] = field(default_factory=dict)
    fused: dict[str, FuseModel] = field(default_factory=dict)
    controls: Controls | None = None
    models: dict[str, SetModel] = field(default_factory=dict)
    scored_sets: list[str] = field(default_factory=list)
    routes: dict[str, RouteState] = field(default_factory=dict)


def _fl(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def _gmm_state(g: GMM) -> GMMState:
    return GMMState(
        mean=(float(g.mu[0]), float(g.mu[1])),
        sd=(float(g.sd[0]), float(g.sd[1])),
        weight=(float(g.w[0]), float(g.w[1])),
        n_cells=int(g.n),
        separation=_fl(g.separation),
        ok=bool(g.ok),
        threshold=float(g.threshold),
        method=g.method,  # type: ignore[arg-type]
    )


def _gmm(s: GMMState) -> GMM:
    return GMM(
        np.array(s.mean, dtype=np.float64),
        np.array(s.sd, dtype=np.float64),
        np.array(s.weight, dtype=np.float64),
        s.n_cells,
        float("nan") if s.separation is None else s.separation,
        s.ok,
        s.threshold,
        s.method,
    )


def _lst(a: np.ndarray) -> list[float]:
    return [float(x) for x in np.asarray(a, dtype=np.float64)]


def _set_state(m: SetModel) -> NBSetState | GaussSetState:
    if isinstance(m, GaussFit):
        return GaussSetState(
            kind="gauss",
            genes=m.genes,
            n_up=m.n_up,
            gmm=_gmm_state(m.gmm),
            prior=float(m.prior),
            ok=m.ok,
            n_cells=m.n_cells,
            note=m.note,
        )
    return NBSetState(
        kind="nb",
        genes=m.genes,
        n_up=m.n_up,
        rate_high=_lst(m.rate_high),
        rate_low=_lst(m.rate_low),
        theta=_lst(m.theta),
        prior=float(m.prior),
        secondary_genes=m.sec_genes,
        secondary_log_ratio=_lst(m.sec_log_ratio),
        secondary_rate_terms=_lst(m.sec_rate_terms),
        fold=float(m.fold),
        ok=m.ok,
        n_cells=m.n_cells,
        n_iter=m.n_iter,
        note=m.note,
    )


def _set_model(s: NBSetState | GaussSetState) -> SetModel:
    if isinstance(s, GaussSetState):
        return GaussFit(list(s.genes), s.n_up, _gmm(s.gmm), s.prior, s.ok, s.n_cells, s.note)
    terms = np.array(s.secondary_rate_terms, dtype=np.float64)
    return BinFit(
        genes=list(s.genes),
        n_up=s.n_up,
        rate_high=np.array(s.rate_high, dtype=np.float64),
        rate_low=np.array(s.rate_low, dtype=np.float64),
        theta=np.array(s.theta, dtype=np.float64),
        log_prior=np.zeros(0),
        weights={},
        fold=s.fold,
        ok=s.ok,
        n_cells=s.n_cells,
        n_iter=s.n_iter,
        note=s.note,
        prior=s.prior,
        sec_genes=list(s.secondary_genes),
        sec_log_ratio=np.array(s.secondary_log_ratio, dtype=np.float64),
        sec_rate_terms=terms,
        sec_rate_diff=float(terms.sum()),
    )


def state_from_fitted(f: Fitted, *, package_version: str, schema_version: str) -> AnnotatorState:
    """The validated JSON-able state of a fitted cascade."""
    protein = None
    if f.antibodies is not None:
        protein = ProteinState(
            antibodies=f.antibodies,
            clr_axis=f.config.protein.clr_axis,
            pseudocount=f.config.protein.pseudocount,
            center=None if f.clr_center is None else _lst(f.clr_center),
            gates={
                k: GateState(
                    marker=g.marker,
                    rare=g.rare,
                    available=g.available,
                    pooled=None if g.pooled is None else _gmm_state(g.pooled),
                    rule=None if g.rule is None else _gmm_state(g.rule),
                )
                for k, g in f.gates.items()
            },
            fused={
                k: FuseState(
                    marker=u.marker,
                    gene_set=u.gene_set,
                    kind=u.kind,  # type: ignore[arg-type]
                    genes=u.genes,
                    cap=u.cap,
                    n_cells=u.n_cells,
                    n_up=u.n_up,
                    rate_high=_lst(u.rate_high),
                    rate_low=_lst(u.rate_low),
                    theta=_lst(u.theta),
                    mean_high=u.mean_high,
                    mean_low=u.mean_low,
                    sd=u.sd,
                )
                for k, u in f.fused.items()
            },
        )
    rna = None
    if f.controls is not None:
        rna = RNAState(
            controls=ControlState(gene_bin=dict(f.controls.gene_bin), bins=f.controls.bins),
            models={k: _set_state(m) for k, m in f.models.items()},
            scored_sets=list(f.scored_sets),
        )
    return AnnotatorState(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        package_version=package_version,
        schema_version=schema_version,
        config=f.config,
        x_kind=f.x_kind,  # type: ignore[arg-type]
        n_cells=f.n_cells,
        n_qc_cells=f.n_qc_cells,
        n_samples=f.n_samples,
        sample_key=f.sample_key,
        protein=protein,
        rna=rna,
        routes=dict(f.routes),
    )


def fitted_from_state(s: AnnotatorState) -> Fitted:
    """The runtime objects of a validated state."""
    f = Fitted(
        config=s.config,
        x_kind=s.x_kind,
        n_cells=s.n_cells,
        n_qc_cells=s.n_qc_cells,
        n_samples=s.n_samples,
        sample_key=s.sample_key,
        routes=dict(s.routes),
    )
    if s.protein is not None:
        p = s.protein
        f.antibodies = list(p.antibodies)
        f.clr_center = None if p.center is None else np.array(p.center, dtype=np.float64)
        f.gates = {
            k: GateModel(
                g.marker,
                g.rare,
                g.available,
                None if g.pooled is None else _gmm(g.pooled),
                None if g.rule is None else _gmm(g.rule),
            )
            for k, g in p.gates.items()
        }
        f.fused = {
            k: FuseModel(
                marker=u.marker,
                gene_set=u.gene_set,
                kind=u.kind,
                genes=list(u.genes),
                cap=u.cap,
                n_cells=u.n_cells,
                rate_high=np.array(u.rate_high, dtype=np.float64),
                rate_low=np.array(u.rate_low, dtype=np.float64),
                theta=np.array(u.theta, dtype=np.float64),
                n_up=u.n_up,
                mean_high=u.mean_high,
                mean_low=u.mean_low,
                sd=u.sd,
            )
            for k, u in p.fused.items()
        }
    if s.rna is not None:
        f.controls = Controls(dict(s.rna.controls.gene_bin), [list(b) for b in s.rna.controls.bins])
        f.models = {k: _set_model(m) for k, m in s.rna.models.items()}
        f.scored_sets = list(s.rna.scored_sets)
    return f


def plain(obj: Any) -> Any:
    """``obj`` with tuples as lists (what ``json.loads(json.dumps(obj))`` gives)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain(v) for v in obj]
    return obj
