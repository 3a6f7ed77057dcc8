"""Gating: one fast gate-tree engine, FlowKit/GatingML/FlowJo interoperability, AnnData output.

A gating strategy is held in a small intermediate representation: a :class:`GateTree`
of :class:`Gate` objects (rectangles, polygons, ellipsoids and boolean gates; GatingML
quadrants become one rectangle per quadrant) whose :class:`Dim` name a channel (or a
:class:`Ratio` of two channels), a compensation and a transform. It is built from our
YAML (``configs/gating/*.yaml``, markers resolved through the panel synonyms), from a
FlowKit ``GatingStrategy`` (:meth:`GateTree.from_flowkit`; GatingML 2.0 and FlowJo 10
workspaces go through :mod:`blinaprofile.interop`), and it converts back to FlowKit
(:meth:`GateTree.to_flowkit`) for GatingML 2.0 export.

The engine (:meth:`GateTree.apply`)

* reads each needed channel once, applying the FCS ``$PnG``/``$PnE``/``$TIMESTEP`` scaling
  FlowKit and FlowJo apply (:func:`fcs_scaling`);
* compensates only the channels the gates need, and only the events that reach the first
  gate needing them (rows are added lazily when a sibling branch needs more);
* evaluates range/rectangle bounds on raw (compensated, untransformed) values against
  thresholds mapped back through the inverse transform, so most gates never transform
  an event; polygons and ellipsoids transform only their parent's events;
* evaluates gates top-down on their parent's event indices;
* decides the rare events that lie within rounding distance of a bound or a polygon edge
  again with FlowKit's own arithmetic (``numpy.linalg.solve`` compensation, the reference
  logicle/hyperlog iteration, flowutils' winding-number test), so per-event membership is
  identical to ``flowkit.GatingStrategy.gate_sample`` on the same strategy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
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
    "Ratio",
    "fcs_scaling",
    "gate_events",
    "gate_sample",
    "load_strategy",
    "points_in_polygon",
    "strategy_from_config",
]

#: compensation id of a dimension read as acquired
UNCOMPENSATED = "uncompensated"
#: the file's $SPILLOVER; the file must have one (our YAML strategies)
FILE_COMP = "file"
#: the file's $SPILLOVER if it has one, else uncompensated (GatingML 2.0 ``FCS``)
FCS_COMP = "FCS"

GateKind = Literal["rectangle", "polygon", "ellipsoid", "boolean"]

# relative width of the band around a bound inside which events are decided again with
# FlowKit's arithmetic (our fast path agrees with it to ~1e-13 relative)
_BAND = 1e-9
# absolute width (raw units) of that band for compensated values
_ABS_BAND = 1e-6


@dataclass(frozen=True)
class Ratio:
    """A derived dimension ``a * (x - b) / (y - c)`` of two channels (GatingML ``fratio``).

    ``numerator``/``denominator`` are names (channels or markers) resolved like any
    dimension; ``channels`` holds the bound channel names. As in FlowKit, the ratio is
    computed from scaled, uncompensated values.
    """

    numerator: str
    denominator: str
    a: float = 1.0
    b: float = 0.0
    c: float = 0.0
    channels: tuple[str, str] | None = None


@dataclass(frozen=True)
class Dim:
    """One gate dimension: a channel, how it is compensated, how it is transformed.

    ``min``/``max`` bound rectangle gates ([min, max), transformed units). ``name`` is
    what the strategy calls the dimension before binding (a marker or a channel; for a
    ratio dimension the ratio's id). ``compensation`` is :data:`UNCOMPENSATED`,
    :data:`FILE_COMP`, :data:`FCS_COMP` or the id of a matrix in
    :attr:`GateTree.matrices`; ``transform`` the id of a transform in
    :attr:`GateTree.transforms` (``None``: untransformed).
    """

    name: str
    channel: str | None = None
    compensation: str = UNCOMPENSATED
    transform: str | None = None
    min: float | None = None
    max: float | None = None
    ratio: Ratio | None = None


@dataclass(frozen=True)
class Gate:
    """A gate of the tree; ``parent`` is ``None`` for gates on all events.

    Attributes
    ----------
    kind
        ``rectangle`` (any number of dims, bounds in the dims), ``polygon`` (2 dims,
        ``vertices``), ``ellipsoid`` (``mean``, ``covariance``, ``distance_square``: events
        with Mahalanobis distance squared ``<= distance_square``) or ``boolean`` (``op``
        ``and``/``or``/``not`` over ``refs``, each ``(gate id, complement)``).
    complement
        Select the events outside the shape (still within the parent).
    group
        The quadrant gate a rectangle came from (GatingML/FlowJo quadrants).
    adaptive
        Per-dim ``AdaptiveSpec`` (or ``None``) of a rectangle; see :mod:`blinaprofile.adaptive`.
    """

    id: str
    kind: GateKind
    dims: tuple[Dim, ...]
    parent: str | None = None
    vertices: tuple[tuple[float, float], ...] = ()
    label: str = ""
    adaptive: tuple[Any, ...] = ()
    mean: tuple[float, ...] = ()
    covariance: tuple[tuple[float, ...], ...] = ()
    distance_square: float = 1.0
    op: Literal["and", "or", "not"] | None = None
    refs: tuple[tuple[str, bool], ...] = ()
    complement: bool = False
    group: str | None = None


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
    """An ordered gate tree (parents before children) with its transforms and matrices.

    Build one with :func:`load_strategy` (YAML), :meth:`from_flowkit` or
    :mod:`blinaprofile.interop`; bind it to a sample's channels with :meth:`bind`, then
    :meth:`apply` it to events.

    Attributes
    ----------
    transforms
        transform id -> :class:`~blinaprofile.config.TransformSpec` or a
        :mod:`blinaprofile.transforms` object.
    matrices
        matrix id -> ``(detectors, spillover matrix)`` (rows: fluorochromes in detector
        order, ``$SPILLOVER`` convention).
    aliases
        names that are not markers but stand for a channel (e.g. a GatingML matrix's
        fluorochrome names) -> channel.
    """

    name: str
    gates: list[Gate]
    transforms: dict[str, Any]
    matrices: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    version: str = "1"
    bound: bool = False
    aliases: dict[str, str] = field(default_factory=dict)
    source: str = ""

    # ------------------------------------------------------------------ structure
    def gate(self, gate_id: str) -> Gate:
        """The gate with this id (``GatingError`` if none)."""
        for g in self.gates:
            if g.id == gate_id:
                return g
        raise GatingError(f"gating strategy {self.name!r} has no gate {gate_id!r}")

    @property
    def gate_ids(self) -> list[str]:
        """Gate ids in evaluation order."""
        return [g.id for g in self.gates]

    def children(self, gate_id: str | None) -> list[Gate]:
        """Gates whose parent is ``gate_id`` (``None``: the root gates)."""
        return [g for g in self.gates if g.parent == gate_id]

    def path(self, gate_id: str) -> tuple[str, ...]:
        """Ancestor ids of a gate, root first (``('root', ..., parent)``)."""
        out: list[str] = []
        g = self.gate(gate_id)
        while g.parent is not None:
            out.append(g.parent)
            g = self.gate(g.parent)
        return ("root", *reversed(out))

    def needed_names(self) -> list[str]:
        """Marker or channel names the strategy reads (order of first use)."""
        seen: dict[str, None] = {}
        for g in self.gates:
            for d in g.dims:
                if d.ratio is not None:
                    seen.setdefault(d.ratio.numerator, None)
                    seen.setdefault(d.ratio.denominator, None)
                else:
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

        Names are matched, in order, as an explicit override, a channel name (``$PnN``,
        also with FlowJo's ``/`` -> ``_`` replacement), an alias of the tree (e.g. a
        GatingML fluorochrome), an exact ``$PnS`` label, then a marker through the
        panel synonyms (case, spaces and punctuation ignored).

        Raises
        ------
        PanelMismatchError
            A needed marker is missing or ambiguous (the message lists the file's channels).
        """
        chans = list(channels)
        hints: dict[str, str] = {}
        flowjo = {c.replace("/", "_"): c for c in chans}
        pns: dict[str, list[str]] = {}
        for c, m in zip(chans, markers, strict=True):
            if m:
                pns.setdefault(m, []).append(c)
        for name in self.needed_names():
            if name in chans:
                continue
            if name in flowjo:
                hints[name] = flowjo[name]
            elif name in self.aliases and self.aliases[name] in chans:
                hints[name] = self.aliases[name]
            elif len(pns.get(name, ())) == 1:
                hints[name] = pns[name][0]
        hints.update(overrides or {})
        mapping = resolve_markers(self.needed_names(), chans, markers, path=path, overrides=hints)

        def bind_dim(d: Dim) -> Dim:
            if d.ratio is not None:
                r = replace(
                    d.ratio, channels=(mapping[d.ratio.numerator], mapping[d.ratio.denominator])
                )
                return replace(d, ratio=r, channel=r.channels[0] if r.channels else None)
            return replace(d, channel=mapping[d.name])

        gates = [replace(g, dims=tuple(bind_dim(d) for d in g.dims)) for g in self.gates]
        return replace(self, gates=gates, bound=True)

    def channel_map(self) -> dict[str, str]:
        """Dimension name -> channel (after :meth:`bind`)."""
        out: dict[str, str] = {}
        for g in self.gates:
            for d in g.dims:
                if d.ratio is not None and d.ratio.channels:
                    out[d.ratio.numerator] = d.ratio.channels[0]
                    out[d.ratio.denominator] = d.ratio.channels[1]
                elif d.channel:
                    out[d.name] = d.channel
        return out

    # ------------------------------------------------------------------ engine
    def apply(
        self,
        events: np.ndarray,
        channels: Sequence[str],
        *,
        spillover: tuple[Sequence[str], np.ndarray] | None = None,
        adaptive: bool = False,
        path: str | None = None,
        scaling: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    ) -> GatingResult:
        """Gate events (rows) whose columns are ``channels``.

        Parameters
        ----------
        events
            Raw (uncompensated, untransformed) event matrix, any real dtype.
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
        scaling
            channel -> function mapping stored values to scaled values (see
            :func:`fcs_scaling`); channels not listed are used as stored.
        """
        if not self.bound:
            raise GatingError(f"gating strategy {self.name!r} must be bound to a sample first")
        ev = _EventCache(self, np.asarray(events), list(channels), spillover, path, scaling=scaling)
        n = ev.n
        masks: dict[str, np.ndarray] = {}
        rows: dict[str, np.ndarray | None] = {}
        result = GatingResult(masks=masks, counts={}, n_events=n)
        for g in self.gates:
            prow = rows[g.parent] if g.parent else None
            if g.kind == "rectangle":
                dims = g.dims
                if adaptive and any(a is not None for a in g.adaptive):
                    from .adaptive import place_thresholds

                    pmask = masks[g.parent] if g.parent else None
                    dims = place_thresholds(g, ev, pmask, result)
                r = _rectangle_rows(ev, g, dims, prow)
                for d in dims:
                    if d.min is not None:
                        result.thresholds[f"{g.id}:{d.name}:min"] = d.min
                    if d.max is not None:
                        result.thresholds[f"{g.id}:{d.name}:max"] = d.max
            elif g.kind == "polygon":
                r = _polygon_rows(ev, g, prow)
            elif g.kind == "ellipsoid":
                r = _ellipsoid_rows(ev, g, prow)
            elif g.kind == "boolean":
                r = _boolean_rows(g, masks, prow, n)
            else:  # pragma: no cover - Gate.kind is a Literal
                raise GatingError(f"gate {g.id!r}: unknown kind {g.kind!r}")
            rows[g.id] = r
            m = np.zeros(n, dtype=bool)
            if r is None:
                m[:] = True
            else:
                m[r] = True
            masks[g.id] = m
            result.counts[g.id] = n if r is None else int(r.size)
        return result

    # ------------------------------------------------------------------ FlowKit
    def to_flowkit(self) -> Any:
        """This strategy as a ``flowkit.GatingStrategy`` (after :meth:`bind`).

        The file's spillover is referenced as ``'FCS'`` (FlowKit's embedded-matrix id);
        quadrants are written as the rectangles they are.
        """
        import flowkit as fk

        if not self.bound:
            raise GatingError("bind the strategy to a sample before exporting it")
        gs = fk.GatingStrategy()
        used = {d.transform for g in self.gates for d in g.dims if d.transform}
        for tid in sorted(used):
            gs.add_transform(tid, _make_transform(self.transforms[tid]).to_flowkit(tid))
        ratio_ids: dict[Ratio, str] = {}
        for g in self.gates:
            for d in g.dims:
                if d.ratio is not None and d.ratio not in ratio_ids:
                    rid = d.name if d.name not in gs.transformations else f"ratio_{len(ratio_ids)}"
                    ratio_ids[d.ratio] = rid
                    assert d.ratio.channels is not None
                    gs.add_transform(
                        rid,
                        fk.transforms.RatioTransform(
                            list(d.ratio.channels), d.ratio.a, d.ratio.b, d.ratio.c
                        ),
                    )
        for mid, (detectors, matrix) in self.matrices.items():
            gs.add_comp_matrix(mid, fk.Matrix(np.asarray(matrix, dtype=float), list(detectors)))
        paths: dict[str | None, tuple[str, ...]] = {None: ("root",)}

        def comp_ref(d: Dim) -> str:
            return "FCS" if d.compensation in (FILE_COMP, FCS_COMP) else d.compensation

        for g in self.gates:
            dims: list[Any] = []
            for d in g.dims:
                if d.ratio is not None:
                    dims.append(
                        fk.RatioDimension(
                            ratio_ids[d.ratio],
                            comp_ref(d),
                            transformation_ref=d.transform,
                            range_min=d.min,
                            range_max=d.max,
                        )
                    )
                else:
                    dims.append(
                        fk.Dimension(
                            d.channel,
                            compensation_ref=comp_ref(d),
                            transformation_ref=d.transform,
                            range_min=d.min,
                            range_max=d.max,
                        )
                    )
            gate: Any
            if g.kind == "rectangle":
                gate = fk.gates.RectangleGate(g.id, dims, use_complement=g.complement)
            elif g.kind == "polygon":
                gate = fk.gates.PolygonGate(
                    g.id, dims, [list(v) for v in g.vertices], use_complement=g.complement
                )
            elif g.kind == "ellipsoid":
                gate = fk.gates.EllipsoidGate(
                    g.id,
                    dims,
                    list(g.mean),
                    [list(r) for r in g.covariance],
                    g.distance_square,
                )
            else:
                refs = [
                    {"ref": ref, "path": paths[self.gate(ref).parent], "complement": comp}
                    for ref, comp in g.refs
                ]
                gate = fk.gates.BooleanGate(g.id, g.op or "and", refs)
            gs.add_gate(gate, gate_path=paths[g.parent])
            paths[g.id] = (*paths[g.parent], g.id)
        return gs

    @classmethod
    def from_flowkit(
        cls,
        strategy: Any,
        *,
        name: str = "imported",
        sample_id: str | None = None,
        version: str = "1",
        source: str = "",
    ) -> GateTree:
        """Convert a ``flowkit.GatingStrategy`` (from GatingML or a FlowJo workspace).

        Gate ids are the FlowKit gate names; a name used at several places of the tree
        becomes ``parent path/name``. Quadrant gates become one rectangle per quadrant
        (``group`` = the quadrant gate's name). FlowKit custom (sample-specific) gates are
        used when ``sample_id`` is given.

        Raises
        ------
        GatingError
            A gate or transform FlowKit parsed that the engine cannot represent.
        """
        import flowkit as fk

        from . import transforms as tr

        entries = list(strategy.get_gate_ids())
        name_count: dict[str, int] = {}
        for gname, _gpath in entries:
            name_count[gname] = name_count.get(gname, 0) + 1

        def uid(gname: str, gpath: Sequence[str]) -> str:
            if name_count.get(gname, 0) <= 1:
                return gname
            return "/".join([*gpath[1:], gname])

        xforms: dict[str, Any] = {}
        ratio_of: dict[str, Any] = {}
        for tid, t in strategy.transformations.items():
            if isinstance(t, fk.transforms.RatioTransform):
                ratio_of[tid] = t
                continue
            try:
                xforms[tid] = tr.from_flowkit(t)
            except GatingError as err:
                raise GatingError(f"transform {tid!r}: {err}") from None
        matrices: dict[str, tuple[list[str], np.ndarray]] = {}
        aliases: dict[str, str] = {}
        for mid, m in strategy.comp_matrices.items():
            if not isinstance(m, fk.Matrix):
                raise GatingError(
                    f"compensation {mid!r}: only square spillover matrices are supported"
                )
            matrices[mid] = (list(m.detectors), np.asarray(m.matrix, dtype=np.float64))
            for fl, det in zip(m.fluorochromes or [], m.detectors, strict=False):
                if fl:
                    aliases.setdefault(fl, det)

        def comp_of(ref: str | None) -> str:
            if ref in (None, "", UNCOMPENSATED):
                return UNCOMPENSATED
            if str(ref).upper() == "FCS":
                return FCS_COMP
            if ref not in matrices:
                raise GatingError(f"compensation {ref!r} is not defined in the strategy")
            return str(ref)

        def dim_of(d: Any, lo: float | None = None, hi: float | None = None) -> Dim:
            tref = d.transformation_ref
            if tref is not None and tref not in xforms:
                raise GatingError(f"transform {tref!r} is not defined in the strategy")
            if isinstance(d, fk.RatioDimension):
                rt = ratio_of.get(d.ratio_ref)
                if rt is None:
                    raise GatingError(f"ratio dimension {d.ratio_ref!r} has no ratio transform")
                ratio = Ratio(
                    str(rt.dimensions[0]),
                    str(rt.dimensions[1]),
                    float(rt.param_a),
                    float(rt.param_b),
                    float(rt.param_c),
                )
                return Dim(
                    name=str(d.ratio_ref),
                    compensation=comp_of(d.compensation_ref),
                    transform=tref,
                    min=getattr(d, "min", None) if lo is None else lo,
                    max=getattr(d, "max", None) if hi is None else hi,
                    ratio=ratio,
                )
            return Dim(
                name=str(d.id),
                compensation=comp_of(d.compensation_ref),
                transform=tref,
                min=d.min if lo is None else lo,
                max=d.max if hi is None else hi,
            )

        gates: list[Gate] = []
        quadrant_owner: dict[tuple[str, tuple[str, ...]], str] = {}
        for gname, gpath in entries:
            try:
                g = strategy.get_gate(gname, gpath, sample_id=sample_id)
            except fk.exceptions.QuadrantReferenceError:
                continue
            parent: str | None = None
            if len(gpath) > 1:
                parent = uid(gpath[-1], gpath[:-1])
                parent = quadrant_owner.get((gpath[-1], tuple(gpath[:-1])), parent)
            gid = uid(gname, gpath)
            if isinstance(g, fk.gates.RectangleGate):
                gates.append(
                    Gate(
                        gid,
                        "rectangle",
                        tuple(dim_of(d) for d in g.dimensions),
                        parent,
                        label=gname,
                        complement=bool(getattr(g, "use_complement", False)),
                    )
                )
            elif isinstance(g, fk.gates.PolygonGate):
                gates.append(
                    Gate(
                        gid,
                        "polygon",
                        tuple(dim_of(d) for d in g.dimensions),
                        parent,
                        vertices=tuple((float(v[0]), float(v[1])) for v in g.vertices),
                        label=gname,
                        complement=bool(getattr(g, "use_complement", False)),
                    )
                )
            elif isinstance(g, fk.gates.EllipsoidGate):
                gates.append(
                    Gate(
                        gid,
                        "ellipsoid",
                        tuple(dim_of(d) for d in g.dimensions),
                        parent,
                        label=gname,
                        mean=tuple(float(v) for v in g.coordinates),
                        covariance=tuple(
                            tuple(float(v) for v in row) for row in g.covariance_matrix
                        ),
                        distance_square=float(g.distance_square),
                    )
                )
            elif isinstance(g, fk.gates.QuadrantGate):
                dividers = {div.id: div for div in g.dimensions}
                for q in g.quadrants.values():
                    qdims = []
                    for ref in q.divider_refs:
                        div = dividers[ref]
                        lo, hi = q.get_divider_range(ref)
                        qdims.append(
                            Dim(
                                name=str(div.dimension_ref),
                                compensation=comp_of(div.compensation_ref),
                                transform=div.transformation_ref,
                                min=None if lo is None else float(lo),
                                max=None if hi is None else float(hi),
                            )
                        )
                    qid = uid(q.id, (*gpath, gname))
                    quadrant_owner[(q.id, (*gpath, gname))] = qid
                    gates.append(
                        Gate(qid, "rectangle", tuple(qdims), parent, label=q.id, group=gname)
                    )
            elif isinstance(g, fk.gates.BooleanGate):
                refs = []
                for ref in g.gate_refs:
                    rpath = tuple(ref["path"])
                    rid = quadrant_owner.get((ref["ref"], rpath), uid(ref["ref"], rpath))
                    refs.append((rid, bool(ref["complement"])))
                gates.append(
                    Gate(
                        gid,
                        "boolean",
                        (),
                        parent,
                        label=gname,
                        op=g.type,
                        refs=tuple(refs),
                    )
                )
            else:
                raise GatingError(
                    f"gate {gname!r}: FlowKit gate type {type(g).__name__} is not supported"
                )
        # parents and boolean references must come first
        gates = _topological(gates)
        tree = cls(
            name=name,
            gates=gates,
            transforms=xforms,
            matrices=matrices,
            version=version,
            aliases=aliases,
            source=source,
        )
        for g in gates:
            for d in g.dims:
                if d.transform is not None and d.transform not in xforms:
                    raise GatingError(f"gate {g.id!r}: transform {d.transform!r} is undefined")
        return tree

    def export_gatingml(self, path: str | os.PathLike[str]) -> Path:
        """Write the bound strategy as GatingML 2.0 (atomically)."""
        import flowkit as fk

        out = Path(path)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "wb") as fh:
            fk.export_gatingml(self.to_flowkit(), fh)
        os.replace(tmp, out)
        return out


def _topological(gates: list[Gate]) -> list[Gate]:
    """Order gates so every parent and boolean reference precedes its users."""
    by_id = {g.id: g for g in gates}
    out: list[Gate] = []
    state: dict[str, int] = {}

    def visit(g: Gate) -> None:
        s = state.get(g.id, 0)
        if s == 2:
            return
        if s == 1:
            raise GatingError(f"gate {g.id!r} is part of a reference cycle")
        state[g.id] = 1
        deps = ([g.parent] if g.parent else []) + [r for r, _ in g.refs]
        for dep in deps:
            if dep not in by_id:
                raise GatingError(f"gate {g.id!r} refers to unknown gate {dep!r}")
            visit(by_id[dep])
        state[g.id] = 2
        out.append(g)

    for g in gates:
        visit(g)
    return out


# ---------------------------------------------------------------------- FCS scaling
def fcs_scaling(data: FCSData) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Per-channel scaling of stored values as FlowKit/flowio and FlowJo apply it.

    ``$PnE`` log-amplified channels become ``10 ** (decades * x / $PnR) * offset``
    (offset 0 read as 1), then non-time channels with ``$PnG`` other than 0 or 1 are
    divided by the gain, and the ``Time`` channel is multiplied by ``$TIMESTEP``.
    Channels needing none of this are absent from the result.
    """
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    kw = {k.upper(): v for k, v in data.keywords.items()}
    n = len(data.channels)
    gains = list(data.gains) + [None] * (n - len(data.gains))
    decs = list(data.decades) + [None] * (n - len(data.decades))
    rngs = list(data.ranges) + [float("nan")] * (n - len(data.ranges))
    step: float | None = None
    raw_step = kw.get("$TIMESTEP", "").strip()
    if raw_step:
        try:
            step = float(raw_step)
        except ValueError:
            raise GatingError(f"$TIMESTEP {raw_step!r} is not a number", path=data.path) from None
    for ch, gain, dec, prange in zip(data.channels, gains, decs, rngs, strict=True):
        if ch.lower() == "time":
            if step is not None and step != 1.0:
                out[ch] = _time_scaler(step)
            continue
        decades, log0 = dec if dec is not None else (0.0, 0.0)
        log_scale = decades > 0
        if log_scale and log0 == 0:
            log0 = 1.0
        g = gain if gain is not None else 1.0
        use_gain = g not in (0.0, 1.0)
        if not log_scale and not use_gain:
            continue
        if log_scale and not np.isfinite(prange):
            raise GatingError(
                f"channel {ch!r} is log-amplified ($PnE) but has no $PnR", path=data.path
            )
        out[ch] = _channel_scaler(
            float(decades) if log_scale else 0.0, float(log0), float(prange), g if use_gain else 1.0
        )
    return out


def _time_scaler(step: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) * step

    return f


def _channel_scaler(
    decades: float, log0: float, prange: float, gain: float
) -> Callable[[np.ndarray], np.ndarray]:
    def f(x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float64)
        if decades > 0:
            y = (10 ** (decades * y / prange)) * log0
        if gain != 1.0:
            y = y / gain
        return y

    return f


# ---------------------------------------------------------------------- event cache
class _Comp:
    """Lazily compensated channels of one matrix.

    Values are held for a set of computed events: all of them (``pos is None`` and
    ``local`` has ``n`` columns) or the rows first asked for, extended when a gate on
    another branch needs more (``pos`` maps an event to its column in ``local``, -1 if
    not computed yet).
    """

    def __init__(
        self, detectors: list[str], matrix: np.ndarray, cols: list[int], wanted: list[str]
    ):
        self.detectors = detectors
        self.matrix = matrix
        self.cols = cols
        self.inv = np.linalg.inv(matrix)
        self.set_wanted(wanted)

    def set_wanted(self, wanted: list[str]) -> None:
        self.wanted = wanted
        self.index = {c: i for i, c in enumerate(wanted)}
        # (J, k): compensated channel j = sum_i w[j, i] * detector i
        self.w = np.ascontiguousarray(self.inv[:, [self.detectors.index(c) for c in wanted]].T)
        self.local: np.ndarray | None = None  # (J, m)
        self.pos: np.ndarray | None = None  # (n,) int64, -1 = not computed; None = all rows
        self.all_rows = False


# below this share of the events a matrix is applied to the requested rows only;
# above it, one BLAS pass over all events (no gather) is cheaper
_SUBSET_SHARE = 0.3


class _EventCache:
    """Scaled, compensated and transformed columns, each computed at most once per sample.

    Parameters
    ----------
    tree
        The bound strategy.
    events, channels
        Stored event matrix and its column names.
    spillover
        The file's ``(detectors, matrix)`` or ``None``.
    path
        The file, for messages.
    scaling
        channel -> scaling function (see :func:`fcs_scaling`).
    """

    def __init__(
        self,
        tree: GateTree,
        events: np.ndarray,
        channels: list[str],
        spillover: tuple[Sequence[str], np.ndarray] | None,
        path: str | None,
        *,
        scaling: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
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
        self.scaling = dict(scaling or {})
        self.n = events.shape[0]
        self._cols: dict[str, np.ndarray] = {}
        self._comps: dict[str, _Comp | None] = {}
        self._xf: dict[tuple[str, str, str | None], np.ndarray] = {}
        self._transforms: dict[str, Any] = {}

    # -- basics -----------------------------------------------------------------------
    def transform(self, tid: str) -> Any:
        """The transform object for a transform id of the tree."""
        if tid not in self._transforms:
            if tid not in self.tree.transforms:
                raise GatingError(f"unknown transform {tid!r}", path=self.path)
            self._transforms[tid] = _make_transform(self.tree.transforms[tid])
        return self._transforms[tid]

    def _col(self, channel: str) -> int:
        col = self.index.get(channel)
        if col is None:
            raise GatingError(f"channel {channel!r} is not in the file", path=self.path)
        return col

    def column(self, channel: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Scaled, uncompensated values of a channel (all events or ``rows``), float64."""
        col = self._col(channel)
        full = self._cols.get(channel)
        if full is not None:
            return full if rows is None else full[rows]
        f = self.scaling.get(channel)
        if rows is None:
            v = self.events[:, col]
            if f is not None:
                v = f(v)
            elif v.dtype != np.float64:
                v = v.astype(np.float64)
            else:
                return v
            self._cols[channel] = v
            return v
        v = self.events[rows, col]
        return f(v) if f is not None else np.asarray(v, dtype=np.float64)

    def block(self, channels: Sequence[str], rows: np.ndarray | None) -> np.ndarray:
        """Scaled values of several channels, ``(rows, channels)`` float64."""
        cols = [self._col(c) for c in channels]
        b = np.take(self.events, cols, axis=1) if rows is None else self.events[np.ix_(rows, cols)]
        b = np.asarray(b, dtype=np.float64)
        for j, c in enumerate(channels):
            f = self.scaling.get(c)
            if f is not None:
                b[:, j] = f(b[:, j])
        return b

    # -- compensation ----------------------------------------------------------------
    def _matrix(self, comp: str) -> tuple[list[str], np.ndarray] | None:
        if comp in (FILE_COMP, FCS_COMP):
            if self.spillover is None:
                if comp == FCS_COMP:
                    return None
                raise GatingError(
                    "the gating strategy compensates with the file's spillover matrix, "
                    "but the file has no $SPILLOVER/$SPILL keyword",
                    path=self.path,
                )
            return list(self.spillover[0]), np.asarray(self.spillover[1], dtype=np.float64)
        if comp in self.tree.matrices:
            det, mat = self.tree.matrices[comp]
            return list(det), np.asarray(mat, dtype=np.float64)
        raise GatingError(f"unknown compensation matrix {comp!r}", path=self.path)

    def _comp_state(self, comp: str) -> _Comp | None:
        if comp in self._comps:
            return self._comps[comp]
        m = self._matrix(comp)
        if m is None:
            self._comps[comp] = None
            return None
        detectors, matrix = m
        if matrix.shape != (len(detectors), len(detectors)):
            raise GatingError(
                f"compensation {comp!r}: matrix shape {matrix.shape} does not match "
                f"{len(detectors)} detectors",
                path=self.path,
            )
        missing = [d for d in detectors if d not in self.index]
        if missing:
            raise GatingError(
                f"spillover matrix names detector(s) {missing} absent from the file",
                path=self.path,
            )
        if abs(np.linalg.det(matrix)) < 1e-12:
            raise GatingError(f"the spillover matrix {comp!r} is singular", path=self.path)
        wanted: dict[str, None] = {}
        for g in self.tree.gates:
            for d in g.dims:
                if d.compensation == comp and d.ratio is None and d.channel in detectors:
                    wanted.setdefault(d.channel, None)
        st = _Comp(detectors, matrix, [self._col(d) for d in detectors], list(wanted))
        self._comps[comp] = st
        return st

    def _span(self, st: _Comp) -> tuple[int, np.ndarray] | None:
        """First column and (J, span) weights to compensate by one strided BLAS pass."""
        if any(c in self.scaling for c in st.detectors) or self.events.dtype != np.float64:
            return None
        lo, hi = min(st.cols), max(st.cols) + 1
        extra = [c for c in range(lo, hi) if c not in st.cols]
        if len(extra) > len(st.cols) or (
            extra and not np.isfinite(self.events[:, extra]).all()
        ):  # 0 * nan would spoil the sum
            return None
        w = np.zeros((st.w.shape[0], hi - lo), dtype=np.float64)
        w[:, [c - lo for c in st.cols]] = st.w
        return lo, w

    def _compensate_rows(self, st: _Comp, rows: np.ndarray | None) -> np.ndarray | None:
        """Make sure ``rows`` are compensated; return their columns in ``st.local``."""
        if st.all_rows:
            return rows
        if st.local is None and (rows is None or rows.size >= _SUBSET_SHARE * self.n):
            span = self._span(st)
            if span is not None:
                lo, w = span
                view = self.events[:, lo : lo + w.shape[1]]
                st.local = w @ view.T
            else:
                b = self.block(st.detectors, None)
                st.local = st.w @ b.T
            st.all_rows = True
            return rows
        if st.local is None:
            assert rows is not None
            b = self.block(st.detectors, rows)
            st.local = st.w @ b.T
            st.pos = np.full(self.n, -1, dtype=np.int64)
            st.pos[rows] = np.arange(rows.size)
            return np.arange(rows.size)
        assert st.pos is not None
        if rows is None:
            rows = np.arange(self.n)
        p = st.pos[rows]
        missing = p < 0
        if missing.any():
            new = rows[missing]
            b = self.block(st.detectors, new)
            m = st.local.shape[1]
            st.local = np.concatenate([st.local, st.w @ b.T], axis=1)
            st.pos[new] = np.arange(m, m + new.size)
            p = st.pos[rows]
        return p

    def raw(self, channel: str, comp: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Compensated (or raw) values of a channel as float64 (all events or ``rows``)."""
        if comp == UNCOMPENSATED:
            return self.column(channel, rows)
        st = self._comp_state(comp)
        if st is None or channel not in st.detectors:
            return self.column(channel, rows)
        if channel not in st.index:
            # a detector no gate asked for with this matrix (adaptive/feature use)
            st.set_wanted([*st.wanted, channel])
        p = self._compensate_rows(st, rows)
        assert st.local is not None
        v = st.local[st.index[channel]]
        return v if p is None else v[p]

    def comp_error_scale(self, comp: str, channel: str) -> float:
        """Absolute error bound of the fast compensation of ``channel`` (0 if not compensated).

        ``k * eps * sum |w| * max |x|`` stays below 1e-8 for values up to 2**22 (any flow
        cytometer's range); the band is set well above it.
        """
        if comp == UNCOMPENSATED:
            return 0.0
        st = self._comp_state(comp)
        if st is None or channel not in st.detectors:
            return 0.0
        return _ABS_BAND

    # -- values in gate space -------------------------------------------------------------
    def _ratio(self, r: Ratio, rows: np.ndarray | None) -> np.ndarray:
        assert r.channels is not None
        x = self.column(r.channels[0], rows)
        y = self.column(r.channels[1], rows)
        return r.a * ((x - r.b) / (y - r.c))

    def transformed(self, dim: Dim, where: np.ndarray | None = None) -> np.ndarray:
        """Transformed values of a dimension (for all events, or the indices ``where``)."""
        if dim.ratio is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = self._ratio(dim.ratio, where)
            if dim.transform is None:
                return x
            return np.asarray(self.transform(dim.transform).apply(x), dtype=np.float64)
        assert dim.channel is not None, "bind the strategy first"
        if dim.transform is None:
            return self.raw(dim.channel, dim.compensation, where)
        key = (dim.channel, dim.compensation, dim.transform)
        full = self._xf.get(key)
        if full is not None:
            return full if where is None else full[where]
        t = self.transform(dim.transform)
        x = self.raw(dim.channel, dim.compensation, where)
        if getattr(t, "kind", "") == "flin":
            y = (x + t.a) / (t.t + t.a)  # FlowKit's expression, one pass
        else:
            y = np.asarray(t.apply(x), dtype=np.float64)
        if where is None:
            self._xf[key] = y
        return y

    def exact(self, dim: Dim, rows: np.ndarray) -> np.ndarray:
        """Values of a dimension at ``rows`` computed with FlowKit's own arithmetic.

        Compensation by ``numpy.linalg.solve`` on the transposed spillover matrix (as
        flowutils does), logicle/hyperlog by the reference iteration.
        """
        rows = np.asarray(rows, dtype=np.intp)
        if dim.ratio is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = self._ratio(dim.ratio, rows)
        else:
            assert dim.channel is not None
            st = None if dim.compensation == UNCOMPENSATED else self._comp_state(dim.compensation)
            if st is None or dim.channel not in st.detectors:
                x = self.column(dim.channel, rows)
            else:
                # LAPACK takes another code path for a single right-hand side; pad to two
                pad = rows.size == 1
                r2 = np.concatenate([rows, rows]) if pad else rows
                b = self.block(st.detectors, r2)
                sol = np.linalg.solve(st.matrix.T, b.T).T
                x = sol[: rows.size, st.detectors.index(dim.channel)]
        if dim.transform is None:
            return np.asarray(x, dtype=np.float64)
        t = self.transform(dim.transform)
        ref = getattr(t, "apply_reference", None)
        return np.asarray(ref(x) if ref is not None else t.apply(x), dtype=np.float64)


# ---------------------------------------------------------------------- gate kernels
_SAFE_KINDS = ("flin", "fasinh", "logicle", "hyperlog")


def _raw_bound(ev: _EventCache, dim: Dim, bound: float) -> float | None:
    """``bound`` mapped to raw units, or ``None`` when the raw shortcut is not exact."""
    if dim.ratio is not None:
        return None
    if dim.transform is None:
        return float(bound)
    t = ev.transform(dim.transform)
    kind = getattr(t, "kind", "")
    if kind not in _SAFE_KINDS:
        return None
    if kind == "flin" and not (t.t + t.a) > 0:
        return None
    rb = float(np.asarray(t.inverse(np.array([bound], dtype=np.float64)))[0])
    return rb if np.isfinite(rb) else None


def _dim_test(
    ev: _EventCache, dim: Dim, rows: np.ndarray | None, lo: float | None, hi: float | None
) -> np.ndarray:
    """``lo <= value < hi`` for the events ``rows`` (all when ``None``), exactly as FlowKit."""
    rb_lo = None if lo is None else _raw_bound(ev, dim, lo)
    rb_hi = None if hi is None else _raw_bound(ev, dim, hi)
    fast = (lo is None or rb_lo is not None) and (hi is None or rb_hi is not None)
    if fast:
        assert dim.channel is not None
        x = ev.raw(dim.channel, dim.compensation, rows)
        # the fast value differs from FlowKit's only by compensation rounding (escale) and,
        # with a transform, by the rounding of inverse(bound) versus the forward transform
        escale = ev.comp_error_scale(dim.compensation, dim.channel)
        res: np.ndarray | None = None
        near: np.ndarray | None = None
        for rb, upper in ((rb_lo, False), (rb_hi, True)):
            if rb is None:
                continue
            t = x < rb if upper else x >= rb
            res = t if res is None else (res & t)
            if dim.transform is None and escale == 0.0:
                continue
            tol = max(_BAND * max(1.0, abs(rb)), escale)
            band = np.abs(x - rb) <= tol
            near = band if near is None else (near | band)
        assert res is not None
    else:
        y = ev.transformed(dim, rows)
        res = np.ones(y.shape[0], dtype=bool)
        if lo is not None:
            res &= y >= lo
        if hi is not None:
            res &= y < hi
        near = None
        if dim.ratio is None and (
            dim.compensation != UNCOMPENSATED
            or (
                dim.transform is not None
                and hasattr(ev.transform(dim.transform), "apply_reference")
            )
        ):
            near = np.zeros(y.shape[0], dtype=bool)
            for b in (lo, hi):
                if b is not None:
                    near |= np.abs(y - b) <= _BAND * max(1.0, abs(b))
    if near is not None and near.any():
        idx = np.flatnonzero(near)
        sel = idx if rows is None else rows[idx]
        y = ev.exact(dim, sel)
        ok = np.ones(idx.size, dtype=bool)
        if lo is not None:
            ok &= y >= lo
        if hi is not None:
            ok &= y < hi
        res[idx] = ok
    return res


def _rectangle_rows(
    ev: _EventCache, g: Gate, dims: Sequence[Dim], prow: np.ndarray | None
) -> np.ndarray | None:
    rows = prow
    if g.complement:
        inside = np.ones(ev.n if rows is None else rows.size, dtype=bool)
        for d in dims:
            if d.min is None and d.max is None:
                continue
            inside &= _dim_test(ev, d, rows, d.min, d.max)
        keep = ~inside
        return np.flatnonzero(keep) if rows is None else rows[keep]
    for d in dims:
        if d.min is None and d.max is None:
            continue
        ok = _dim_test(ev, d, rows, d.min, d.max)
        rows = np.flatnonzero(ok) if rows is None else rows[ok]
    return rows


def _winding(
    vx: np.ndarray, vy: np.ndarray, x: np.ndarray, y: np.ndarray, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Odd winding number (flowutils' rule) and a mask of points within ``tol`` of a tie.

    Same decisions as flowutils' ``points_in_polygon``: points outside the vertices'
    bounding box are out; otherwise an edge crossed upward (``ay <= py < by``) with the
    point strictly left of it adds 1, an edge crossed downward (``by <= py < ay``) with
    the point strictly right subtracts 1, and an odd total is inside. ``is_left`` is
    computed with flowutils' exact expression. With ``tol > 0``, points whose decision
    could flip under a perturbation of ``tol`` are flagged (for an exact re-check).
    """
    x0, x1, y0, y1 = float(vx.min()), float(vx.max()), float(vy.min()), float(vy.max())
    if tol <= 0:
        return _parity(vx, vy, x, y, (x0, x1, y0, y1)), np.zeros(x.shape[0], dtype=bool)
    inside = np.zeros(x.shape[0], dtype=bool)
    near = np.zeros(x.shape[0], dtype=bool)
    if tol > 0:
        loose = (x >= x0 - tol) & (x <= x1 + tol) & (y >= y0 - tol) & (y <= y1 + tol)
        cand = np.flatnonzero(loose)
        px = x[cand]
        py = y[cand]
        strict = (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)
        near[cand[~strict]] = True
        cand, px, py = cand[strict], px[strict], py[strict]
    else:
        cand = np.flatnonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
        px = x[cand]
        py = y[cand]
    if cand.size == 0:
        return inside, near
    nv = vx.shape[0]
    wind: np.ndarray = np.zeros(cand.size, dtype=np.int32)
    for i in range(nv):
        ax, ay = float(vx[i]), float(vy[i])
        bx, by = float(vx[(i + 1) % nv]), float(vy[(i + 1) % nv])
        if tol > 0:
            ties = np.flatnonzero((np.abs(py - ay) <= tol) | (np.abs(py - by) <= tol))
            near[cand[ties]] = True
        if ay == by:
            continue  # a horizontal edge is never crossed
        upward = ay < by
        lo, hi = (ay, by) if upward else (by, ay)
        cross = np.flatnonzero((py >= lo) & (py < hi))
        if cross.size == 0:
            continue
        cy = py[cross]
        cx = px[cross]
        is_left = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
        hit = cross[is_left > 0] if upward else cross[is_left < 0]
        np.add.at(wind, hit, 1 if upward else -1)
        if tol > 0:
            close = np.abs(is_left) <= tol * (abs(bx - ax) + abs(by - ay) + 1.0)
            near[cand[cross[close]]] = True
    inside[cand] = (wind % 2) != 0
    return inside, near


def _parity(
    vx: np.ndarray,
    vy: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    box: tuple[float, float, float, float],
) -> np.ndarray:
    """Odd winding number by parity: each counted crossing (+1 or -1) flips it.

    Branch-free over all points (no gathers), in preallocated buffers.
    """
    n = x.shape[0]
    inside = np.zeros(n, dtype=bool)
    t1 = np.empty(n, dtype=np.float64)
    t2 = np.empty(n, dtype=np.float64)
    b1 = np.empty(n, dtype=bool)
    b2 = np.empty(n, dtype=bool)
    nv = vx.shape[0]
    for i in range(nv):
        ax, ay = float(vx[i]), float(vy[i])
        bx, by = float(vx[(i + 1) % nv]), float(vy[(i + 1) % nv])
        if ay == by:
            continue
        upward = ay < by
        lo, hi = (ay, by) if upward else (by, ay)
        # is_left = (bx - ax) * (y - ay) - (x - ax) * (by - ay), as flowutils computes it
        np.subtract(y, ay, out=t1)
        np.multiply(t1, bx - ax, out=t1)
        np.subtract(x, ax, out=t2)
        np.multiply(t2, by - ay, out=t2)
        np.subtract(t1, t2, out=t1)
        if upward:
            np.greater(t1, 0.0, out=b1)
        else:
            np.less(t1, 0.0, out=b1)
        np.greater_equal(y, lo, out=b2)
        b1 &= b2
        np.less(y, hi, out=b2)
        b1 &= b2
        inside ^= b1
    x0, x1, y0, y1 = box
    for arr, op, v in (
        (x, np.greater_equal, x0),
        (x, np.less_equal, x1),
        (y, np.greater_equal, y0),
        (y, np.less_equal, y1),
    ):
        op(arr, v, out=b1)
        inside &= b1
    return inside


def points_in_polygon(vertices: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Winding-number point-in-polygon for many points (odd winding count inside).

    Reproduces flowutils' ``points_in_polygon`` (FlowKit's polygon gate) exactly,
    including self-intersecting polygons.
    """
    v = np.asarray(vertices, dtype=np.float64)
    inside, _ = _winding(
        v[:, 0], v[:, 1], np.asarray(x, np.float64), np.asarray(y, np.float64), 0.0
    )
    return inside


def _needs_band(ev: _EventCache, dims: Sequence[Dim]) -> bool:
    """Whether the fast values of these dims may differ from FlowKit's in the last bits."""
    for d in dims:
        if d.ratio is not None:
            continue
        if d.compensation != UNCOMPENSATED and ev._comp_state(d.compensation) is not None:
            st = ev._comp_state(d.compensation)
            if st is not None and d.channel in st.detectors:
                return True
        if d.transform is not None and hasattr(ev.transform(d.transform), "apply_reference"):
            return True
    return False


def _polygon_rows(ev: _EventCache, g: Gate, prow: np.ndarray | None) -> np.ndarray:
    if len(g.dims) != 2:
        raise GatingError(f"polygon gate {g.id!r} needs exactly 2 dimensions", path=ev.path)
    x = ev.transformed(g.dims[0], prow)
    y = ev.transformed(g.dims[1], prow)
    v = np.asarray(g.vertices, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(v)))) if v.size else 1.0
    tol = _BAND * scale if _needs_band(ev, g.dims) else 0.0
    inside, near = _winding(v[:, 0], v[:, 1], x, y, tol)
    if tol > 0 and near.any():
        idx = np.flatnonzero(near)
        sel = idx if prow is None else prow[idx]
        ex = ev.exact(g.dims[0], sel)
        ey = ev.exact(g.dims[1], sel)
        inside[idx], _ = _winding(v[:, 0], v[:, 1], ex, ey, 0.0)
    if g.complement:
        inside = ~inside
    return np.flatnonzero(inside) if prow is None else prow[inside]


def _ellipsoid_d2(g: Gate, pts: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances with flowutils' arithmetic."""
    translated = pts - np.asarray(g.mean, dtype=np.float64)
    inv = np.linalg.inv(np.asarray(g.covariance, dtype=np.float64))
    rot = np.dot(translated, inv)
    return np.asarray((rot * translated).sum(axis=1), dtype=np.float64)


def _ellipsoid_rows(ev: _EventCache, g: Gate, prow: np.ndarray | None) -> np.ndarray:
    k = len(g.dims)
    if k < 2 or len(g.mean) != k or len(g.covariance) != k:
        raise GatingError(
            f"ellipsoid gate {g.id!r}: mean/covariance do not match its dims", path=ev.path
        )
    pts = np.column_stack([ev.transformed(d, prow) for d in g.dims])
    d2 = _ellipsoid_d2(g, pts)
    inside = d2 <= g.distance_square
    if _needs_band(ev, g.dims):
        near = np.abs(d2 - g.distance_square) <= _BAND * max(1.0, abs(g.distance_square))
        if near.any():
            idx = np.flatnonzero(near)
            sel = idx if prow is None else prow[idx]
            ex = np.column_stack([ev.exact(d, sel) for d in g.dims])
            inside[idx] = _ellipsoid_d2(g, ex) <= g.distance_square
    if g.complement:
        inside = ~inside
    return np.flatnonzero(inside) if prow is None else prow[inside]


def _boolean_rows(
    g: Gate, masks: Mapping[str, np.ndarray], prow: np.ndarray | None, n: int
) -> np.ndarray:
    if not g.refs:
        raise GatingError(f"boolean gate {g.id!r} has no operands")
    parts = []
    for ref, comp in g.refs:
        if ref not in masks:
            raise GatingError(f"boolean gate {g.id!r} refers to {ref!r}, not evaluated before it")
        parts.append(~masks[ref] if comp else masks[ref])
    if g.op == "or":
        m = np.logical_or.reduce(parts)
    elif g.op == "not":
        m = ~parts[0]
    else:
        m = np.logical_and.reduce(parts)
    if prow is not None:
        return prow[m[prow]]
    return np.flatnonzero(m)


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
                    vertices=tuple((float(v[0]), float(v[1])) for v in spec.vertices),
                    label=spec.label,
                )
            )
    return GateTree(
        name=cfg.name, gates=gates, transforms=dict(cfg.transforms), version=cfg.version
    )


def load_strategy(path: str | os.PathLike[str] | None = None) -> GateTree:
    """Load a gating strategy (default: the shipped T-cell strategy).

    ``.yaml``/``.yml`` files are our gating YAML; ``.xml`` files GatingML 2.0 and ``.wsp``
    files FlowJo 10 workspaces (see :mod:`blinaprofile.interop`).
    """
    from .settings import settings

    p = Path(path or settings.default_gating)
    suffix = p.suffix.lower()
    if suffix == ".wsp":
        from .interop import load_wsp

        return load_wsp(p)
    if suffix == ".xml":
        from .interop import load_gatingml

        return load_gatingml(p)
    return strategy_from_config(load_config(GatingConfig, p))


# ---------------------------------------------------------------------- samples
def gate_events(
    data: FCSData,
    strategy: GateTree,
    *,
    adaptive: bool = False,
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
