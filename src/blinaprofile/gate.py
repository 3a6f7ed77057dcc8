"""Gating: a small gate-tree engine, FlowKit interoperability and AnnData output.

A gating strategy is held in a tiny intermediate representation (:class:`GateTree`
of :class:`Gate` objects whose :class:`Dim` name a channel, a compensation and a
transform). It is built from our YAML (``configs/gating/*.yaml``) with the sample's
markers resolved through the panel synonyms, and it converts to and from FlowKit's
``GatingStrategy`` (so GatingML 2.0 export and event-for-event checks against
``GatingStrategy.gate_sample`` are one call away).

The engine (:meth:`GateTree.apply`) compensates once per sample and only the
channels the gates need, transforms each needed channel at most once, evaluates
rectangle gates on raw values against thresholds mapped back through the inverse
transform (events within a rounding band of a threshold are decided in transformed
space, so results equal FlowKit's), and evaluates gates top-down on parent masks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .config import GatingConfig, RangeSpec, TransformSpec, load_config
from .errors import GatingError
from .panel import resolve_markers

if TYPE_CHECKING:
    import anndata

    from .fcs import FCSData

__all__ = [
    "Dim",
    "Gate",
    "GateTree",
    "GatingResult",
    "gate_events",
    "gate_sample",
    "load_strategy",
]

UNCOMPENSATED = "uncompensated"
FILE_COMP = "file"


@dataclass(frozen=True)
class Dim:
    """One gate dimension: a channel, how it is compensated, how it is transformed.

    ``min``/``max`` bound rectangle gates ([min, max), transformed units). ``name`` is
    what the strategy calls the dimension before binding (a marker or a channel).
    """

    name: str
    channel: str | None = None
    compensation: str = UNCOMPENSATED
    transform: str | None = None
    min: float | None = None
    max: float | None = None


@dataclass(frozen=True)
class Gate:
    """A gate of the tree; ``parent`` is ``None`` for gates on all events."""

    id: str
    kind: Literal["rectangle", "polygon"]
    dims: tuple[Dim, ...]
    parent: str | None = None
    vertices: tuple[tuple[float, float], ...] = ()
    label: str = ""
    adaptive: tuple[Any, ...] = ()  # per-dim AdaptiveSpec or None (rectangles)


@dataclass
class GatingResult:
    """Per-event membership of every gate plus what the engine decided.

    Attributes
    ----------
    masks
        gate id -> boolean vector (event in gate and all its ancestors).
    counts
        gate id -> number of events.
    thresholds
        ``"gate_id:dim_name:min|max"`` -> threshold used (transformed units).
    flags
        QC flags raised while gating (e.g. an adaptive gate that could not be placed).
    confidence
        ``"gate_id:dim_name:min|max"`` -> confidence of an adaptive placement (0-1).
    """

    masks: dict[str, np.ndarray]
    counts: dict[str, int]
    n_events: int
    thresholds: dict[str, float] = field(default_factory=dict)
    confidence: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def parent_percent(self, tree: GateTree) -> dict[str, float]:
        """Percent of parent for every gate."""
        out = {}
        for g in tree.gates:
            parent = self.counts[g.parent] if g.parent else self.n_events
            out[g.id] = 100.0 * self.counts[g.id] / parent if parent else float("nan")
        return out


def _make_transform(spec: TransformSpec | Any) -> Any:
    """Our fast transform for a YAML transform spec (or pass through a ready transform)."""
    from . import transforms as tr

    if not isinstance(spec, TransformSpec):
        return spec
    if spec.type == "linear":
        return tr.LinearTransform(t=spec.t, a=spec.a)
    if spec.type == "log":
        return tr.LogTransform(t=spec.t, m=spec.m)
    if spec.type == "asinh":
        return tr.AsinhTransform(t=spec.t, m=spec.m, a=spec.a)
    if spec.type == "logicle":
        return tr.LogicleTransform(t=spec.t, w=spec.w, m=spec.m, a=spec.a)
    return tr.HyperlogTransform(t=spec.t, w=spec.w, m=spec.m, a=spec.a)


@dataclass
class GateTree:
    """An ordered gate tree (parents before children) with its transforms.

    Build one with :func:`load_strategy` (YAML) or :meth:`from_flowkit`; bind it to a
    sample's channels with :meth:`bind`, then :meth:`apply` it to events.
    """

    name: str
    gates: list[Gate]
    transforms: dict[str, Any]  # TransformSpec (YAML) or a blinaprofile.transforms object
    matrices: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    version: str = "1"
    bound: bool = False

    # ------------------------------------------------------------------ structure
    def gate(self, gate_id: str) -> Gate:
        for g in self.gates:
            if g.id == gate_id:
                return g
        raise GatingError(f"gating strategy {self.name!r} has no gate {gate_id!r}")

    @property
    def gate_ids(self) -> list[str]:
        return [g.id for g in self.gates]

    def children(self, gate_id: str | None) -> list[Gate]:
        return [g for g in self.gates if g.parent == gate_id]

    def needed_names(self) -> list[str]:
        """Marker or channel names the strategy reads (order of first use)."""
        seen: dict[str, None] = {}
        for g in self.gates:
            for d in g.dims:
                seen.setdefault(d.name, None)
        return list(seen)

    # ------------------------------------------------------------------ binding
    def bind(
        self,
        channels: Sequence[str],
        markers: Sequence[str],
        *,
        path: str | None = None,
        overrides: Mapping[str, str] | None = None,
    ) -> GateTree:
        """Resolve every dimension's marker to the sample's channel.

        Raises
        ------
        PanelMismatchError
            A needed marker is missing or ambiguous (the message lists the file's channels).
        """
        mapping = resolve_markers(
            self.needed_names(), channels, markers, path=path, overrides=overrides
        )
        gates = [
            replace(g, dims=tuple(replace(d, channel=mapping[d.name]) for d in g.dims))
            for g in self.gates
        ]
        return replace(self, gates=gates, bound=True)

    def channel_map(self) -> dict[str, str]:
        """Dimension name -> channel (after :meth:`bind`)."""
        return {d.name: d.channel for g in self.gates for d in g.dims if d.channel}

    # ------------------------------------------------------------------ engine
    def apply(
        self,
        events: np.ndarray,
        channels: Sequence[str],
        *,
        spillover: tuple[Sequence[str], np.ndarray] | None = None,
        adaptive: bool = False,
        path: str | None = None,
    ) -> GatingResult:
        """Gate events (rows) whose columns are ``channels``.

        Parameters
        ----------
        events
            Raw (uncompensated, untransformed) event matrix.
        channels
            Column names of ``events`` ($PnN).
        spillover
            ``(detectors, matrix)``; required when a dimension is compensated with the file's
            matrix.
        adaptive
            Move rectangle thresholds that have an ``adaptive`` spec to the sample's density
            valley within the configured limits (see :mod:`blinaprofile.adaptive`).
        path
            The sample's file, for error messages.
        """
        if not self.bound:
            raise GatingError(f"gating strategy {self.name!r} must be bound to a sample first")
        ev = _EventCache(self, np.asarray(events), list(channels), spillover, path)
        n = ev.n
        masks: dict[str, np.ndarray] = {}
        result = GatingResult(masks=masks, counts={}, n_events=n)
        for g in self.gates:
            parent = masks[g.parent] if g.parent else None
            if g.kind == "rectangle":
                dims = g.dims
                if adaptive and any(g.adaptive):
                    from .adaptive import place_thresholds

                    dims = place_thresholds(g, ev, parent, result)
                m = _rectangle(g, dims, ev, parent)
                for d in dims:
                    if d.min is not None:
                        result.thresholds[f"{g.id}:{d.name}:min"] = d.min
                    if d.max is not None:
                        result.thresholds[f"{g.id}:{d.name}:max"] = d.max
            else:
                m = _polygon(g, ev, parent)
            masks[g.id] = m
            result.counts[g.id] = int(np.count_nonzero(m))
        return result

    # ------------------------------------------------------------------ FlowKit
    def to_flowkit(self) -> Any:
        """This strategy as a ``flowkit.GatingStrategy`` (after :meth:`bind`).

        The file's spillover is referenced as ``'FCS'`` (FlowKit's embedded-matrix id).
        """
        import flowkit as fk

        if not self.bound:
            raise GatingError("bind the strategy to a sample before exporting it")
        gs = fk.GatingStrategy()
        used = {d.transform for g in self.gates for d in g.dims if d.transform}
        for tid in sorted(used):
            gs.add_transform(tid, _make_transform(self.transforms[tid]).to_flowkit(tid))
        for mid, (detectors, matrix) in self.matrices.items():
            gs.add_comp_matrix(mid, fk.Matrix(matrix, detectors))
        paths: dict[str | None, tuple[str, ...]] = {None: ("root",)}
        for g in self.gates:
            dims = [
                fk.Dimension(
                    d.channel,
                    compensation_ref="FCS" if d.compensation == FILE_COMP else d.compensation,
                    transformation_ref=d.transform,
                    range_min=d.min,
                    range_max=d.max,
                )
                for d in g.dims
            ]
            if g.kind == "rectangle":
                gate = fk.gates.RectangleGate(g.id, dims)
            else:
                gate = fk.gates.PolygonGate(g.id, dims, [list(v) for v in g.vertices])
            gs.add_gate(gate, gate_path=paths[g.parent])
            paths[g.id] = (*paths[g.parent], g.id)
        return gs

    def export_gatingml(self, path: str | os.PathLike[str]) -> Path:
        """Write the bound strategy as GatingML 2.0 (atomically)."""
        import flowkit as fk

        out = Path(path)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as fh:
            fk.export_gatingml(self.to_flowkit(), fh)
        os.replace(tmp, out)
        return out


class _EventCache:
    """Compensated / transformed columns, each computed at most once per sample."""

    def __init__(
        self,
        tree: GateTree,
        events: np.ndarray,
        channels: list[str],
        spillover: tuple[Sequence[str], np.ndarray] | None,
        path: str | None,
    ) -> None:
        if events.ndim != 2 or events.shape[1] != len(channels):
            raise GatingError(
                f"event matrix has shape {events.shape} but {len(channels)} channels", path=path
            )
        self.tree = tree
        self.events = events
        self.channels = channels
        self.index = {c: i for i, c in enumerate(channels)}
        self.spillover = spillover
        self.path = path
        self.n = events.shape[0]
        self._comp: dict[tuple[str, str], np.ndarray] = {}
        self._xf: dict[tuple[str, str, str | None], np.ndarray] = {}
        self._inv_cache: dict[tuple[str, str], np.ndarray] = {}
        self._transforms: dict[str, Any] = {}

    def transform(self, tid: str) -> Any:
        if tid not in self._transforms:
            self._transforms[tid] = _make_transform(self.tree.transforms[tid])
        return self._transforms[tid]

    def _matrix(self, comp: str) -> tuple[list[str], np.ndarray]:
        if comp == FILE_COMP:
            if self.spillover is None:
                raise GatingError(
                    "the gating strategy compensates with the file's spillover matrix, "
                    "but the file has no $SPILLOVER/$SPILL keyword",
                    path=self.path,
                )
            return list(self.spillover[0]), np.asarray(self.spillover[1], dtype=float)
        if comp in self.tree.matrices:
            return self.tree.matrices[comp]
        raise GatingError(f"unknown compensation matrix {comp!r}", path=self.path)

    def raw(self, channel: str, comp: str) -> np.ndarray:
        """A compensated (or raw) column as float64."""
        col = self.index.get(channel)
        if col is None:
            raise GatingError(f"channel {channel!r} is not in the file", path=self.path)
        if comp == UNCOMPENSATED:
            key = (UNCOMPENSATED, channel)
            if key not in self._comp:
                self._comp[key] = np.asarray(self.events[:, col], dtype=np.float64)
            return self._comp[key]
        key = (comp, channel)
        if key not in self._comp:
            detectors, matrix = self._matrix(comp)
            if channel not in detectors:
                self._comp[key] = np.asarray(self.events[:, col], dtype=np.float64)
            else:
                inv = self._inv_cache.get((comp, "inv"))
                if inv is None:
                    try:
                        inv = np.linalg.inv(matrix)
                    except np.linalg.LinAlgError:
                        raise GatingError(
                            "the spillover matrix is singular", path=self.path
                        ) from None
                    self._inv_cache[(comp, "inv")] = inv
                missing = [d for d in detectors if d not in self.index]
                if missing:
                    raise GatingError(
                        f"spillover matrix names detector(s) {missing} absent from the file",
                        path=self.path,
                    )
                cols = [self.index[d] for d in detectors]
                j = detectors.index(channel)
                sub = self.events[:, cols]
                self._comp[key] = np.asarray(sub @ inv[:, j], dtype=np.float64)
        return self._comp[key]

    def transformed(self, dim: Dim, where: np.ndarray | None = None) -> np.ndarray:
        """Transformed values of a dimension (for all events, or the indices ``where``)."""
        assert dim.channel is not None
        x = self.raw(dim.channel, dim.compensation)
        if dim.transform is None:
            return x if where is None else x[where]
        key = (dim.channel, dim.compensation, dim.transform)
        full = self._xf.get(key)
        if full is not None:
            return full if where is None else full[where]
        t = self.transform(dim.transform)
        if where is None:
            full = np.asarray(t.apply(x), dtype=np.float64)
            self._xf[key] = full
            return full
        return np.asarray(t.apply(x[where]), dtype=np.float64)


def _bound_test(
    ev: _EventCache, dim: Dim, x: np.ndarray, bound: float, *, upper: bool
) -> np.ndarray:
    """``t(x) >= bound`` (or ``< bound`` if upper) decided on raw values via the inverse."""
    if dim.transform is None:
        return x < bound if upper else x >= bound
    t = ev.transform(dim.transform)
    raw_bound = float(np.asarray(t.inverse(np.array([bound], dtype=np.float64)))[0])
    res = x < raw_bound if upper else x >= raw_bound
    # events within rounding distance of the raw threshold: decide in transformed space
    tol = 1e-9 * max(1.0, abs(raw_bound))
    close = np.flatnonzero(np.abs(x - raw_bound) <= tol)
    if close.size:
        tx = np.asarray(t.apply(x[close]), dtype=np.float64)
        res[close] = tx < bound if upper else tx >= bound
    return res


def _rectangle(
    g: Gate, dims: Sequence[Dim], ev: _EventCache, parent: np.ndarray | None
) -> np.ndarray:
    if parent is not None:
        idx = np.flatnonzero(parent)
        sub = np.ones(idx.size, dtype=bool)
        for d in dims:
            assert d.channel is not None
            x = ev.raw(d.channel, d.compensation)[idx]
            if d.min is not None:
                sub &= _bound_test(ev, d, x, d.min, upper=False)
            if d.max is not None:
                sub &= _bound_test(ev, d, x, d.max, upper=True)
        out = np.zeros(ev.n, dtype=bool)
        out[idx[sub]] = True
        return out
    res = np.ones(ev.n, dtype=bool)
    for d in dims:
        assert d.channel is not None
        x = ev.raw(d.channel, d.compensation)
        if d.min is not None:
            res &= _bound_test(ev, d, x, d.min, upper=False)
        if d.max is not None:
            res &= _bound_test(ev, d, x, d.max, upper=True)
    return res


def points_in_polygon(vertices: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd rule point-in-polygon for many points (vectorised over points).

    Matches FlowKit's rule (odd winding count inside) for points off the boundary.
    """
    v = np.asarray(vertices, dtype=np.float64)
    inside = np.zeros(x.shape[0], dtype=bool)
    n = v.shape[0]
    for i in range(n):
        x1, y1 = v[i]
        x2, y2 = v[(i + 1) % n]
        if y1 == y2:
            continue
        cond = (y1 <= y) != (y2 <= y)
        if not cond.any():
            continue
        idx = np.flatnonzero(cond)
        xc = x1 + (y[idx] - y1) * (x2 - x1) / (y2 - y1)
        hit = x[idx] < xc
        inside[idx[hit]] ^= True
    return inside


def _polygon(g: Gate, ev: _EventCache, parent: np.ndarray | None) -> np.ndarray:
    where = None if parent is None else np.flatnonzero(parent)
    x = ev.transformed(g.dims[0], where)
    y = ev.transformed(g.dims[1], where)
    inside = points_in_polygon(np.array(g.vertices), x, y)
    if where is None:
        return inside
    out = np.zeros(ev.n, dtype=bool)
    out[where[inside]] = True
    return out


# ---------------------------------------------------------------------- YAML loading
def _dim(name: str, cfg: GatingConfig, rng: RangeSpec | None = None) -> Dim:
    tid = cfg.channel_transforms.get(name, cfg.channel_transforms.get("default"))
    scatter_like = name.upper().startswith(("FSC", "SSC", "TIME"))
    comp = FILE_COMP if (cfg.compensation == "file" and not scatter_like) else UNCOMPENSATED
    return Dim(
        name=name,
        compensation=comp,
        transform=tid,
        min=rng.min if rng else None,
        max=rng.max if rng else None,
    )


def strategy_from_config(cfg: GatingConfig) -> GateTree:
    """Build an unbound :class:`GateTree` from a validated :class:`GatingConfig`."""
    gates = []
    for spec in cfg.gates:
        parent = None if spec.parent == "root" else spec.parent
        if spec.type == "rectangle":
            assert spec.ranges is not None
            dims = tuple(_dim(k, cfg, r) for k, r in spec.ranges.items())
            adaptive = tuple(r.adaptive for r in spec.ranges.values())
            gates.append(
                Gate(spec.id, "rectangle", dims, parent, label=spec.label, adaptive=adaptive)
            )
        else:
            assert spec.dims is not None and spec.vertices is not None
            gates.append(
                Gate(
                    spec.id,
                    "polygon",
                    tuple(_dim(k, cfg) for k in spec.dims),
                    parent,
                    vertices=tuple(tuple(v) for v in spec.vertices),  # type: ignore[misc]
                    label=spec.label,
                )
            )
    return GateTree(name=cfg.name, gates=gates, transforms=dict(cfg.transforms), version=cfg.version)


def load_strategy(path: str | os.PathLike[str] | None = None) -> GateTree:
    """Load a gating strategy from YAML (default: the shipped T-cell strategy)."""
    from .settings import settings

    return strategy_from_config(load_config(GatingConfig, path or settings.default_gating))


# ---------------------------------------------------------------------- samples
def gate_events(
    data: FCSData,
    strategy: GateTree,
    *,
    adaptive: bool = False,
    overrides: Mapping[str, str] | None = None,
) -> tuple[GateTree, GatingResult]:
    """Bind ``strategy`` to an FCS sample and gate it."""
    bound = strategy.bind(data.channels, data.markers, path=data.path, overrides=overrides)
    res = bound.apply(
        data.events, data.channels, spillover=data.spillover, adaptive=adaptive, path=data.path
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
    adaptive: bool = False,
    sample_id: str | None = None,
) -> anndata.AnnData:
    """Gate an FCS sample into an AnnData (events x channels).

    ``X`` holds the raw (uncompensated) event values; ``var`` has ``channel`` and
    ``marker``; ``obs`` one boolean column per gate and ``subset`` (the most specific
    T-cell subset, else the deepest gate reached, else ``'ungated'``); ``uns['gating']``
    the strategy name, counts, percents, thresholds, confidences and QC flags.
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
    adata.uns["gating"] = {
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
    adata.uns["sample_id"] = sample_id or Path(data.path).stem
    return adata
