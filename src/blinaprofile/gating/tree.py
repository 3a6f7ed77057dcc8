"""The gating strategy as a tree of gates, bound to a sample's channels and applied.

A :class:`GateTree` is built from our YAML (:mod:`blinaprofile.gating.strategy`), from a
FlowKit ``GatingStrategy`` (:meth:`GateTree.from_flowkit`; GatingML 2.0 and FlowJo 10
workspaces go through :mod:`blinaprofile.gating.interop`), and converts back to FlowKit
(:meth:`GateTree.to_flowkit`) for GatingML 2.0 export. :meth:`GateTree.apply` evaluates
gates top-down on their parent's event indices with the kernels of
:mod:`blinaprofile.gating.events`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from blinaprofile.errors import GatingError
from blinaprofile.gating.events import EventCache, gate_rows
from blinaprofile.gating.gates import (
    FCS_COMP,
    UNCOMPENSATED,
    Dim,
    Gate,
    GatingResult,
    Ratio,
    make_transform,
)
from blinaprofile.gating.panel import AbsentGate, plan_gates, resolve_markers
from blinaprofile.gating.placement import place_thresholds
from blinaprofile.io.atomic import atomic_path

__all__ = ["GateTree"]


@dataclass
class GateTree:
    """An ordered gate tree (parents before children) with its transforms and matrices.

    Build one with :func:`load_strategy` (YAML), :meth:`from_flowkit` or
    :mod:`blinaprofile.gating.interop`; bind it to a sample's channels with :meth:`bind`, then
    :meth:`apply` it to events.

    Attributes
    ----------
    transforms
        transform id -> :class:`~blinaprofile.config.TransformSpec` or a
        :mod:`blinaprofile.gating.transforms` object.
    matrices
        matrix id -> ``(detectors, spillover matrix)`` (rows: fluorochromes in detector
        order, ``$SPILLOVER`` convention).
    aliases
        names that are not markers but stand for a channel (e.g. a GatingML matrix's
        fluorochrome names) -> channel.
    partial
        :meth:`bind` leaves out the gates whose markers a sample lacks, as their policy
        says (``if_absent``), instead of refusing the sample (pre-gated exports).
    if_absent
        gate id -> ``skip``/``omit``/``error`` (see
        :data:`blinaprofile.gating.panel.DEFAULT_IF_ABSENT` for gates not listed).
    skipped
        After a partial :meth:`bind`: gate id -> :class:`~blinaprofile.gating.panel.AbsentGate`
        for every gate left out.
    """

    name: str
    gates: list[Gate]
    transforms: dict[str, Any]
    matrices: dict[str, tuple[list[str], np.ndarray]] = field(default_factory=dict)
    version: str = "1"
    bound: bool = False
    aliases: dict[str, str] = field(default_factory=dict)
    source: str = ""
    partial: bool = False
    if_absent: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, AbsentGate] = field(default_factory=dict)

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
    def channel_hints(self, channels: Sequence[str], markers: Sequence[str]) -> dict[str, str]:
        """Needed names that stand for a channel before any synonym matching.

        A FlowJo-style channel name (``/`` -> ``_``), an alias of the tree, or an exact
        ``$PnS`` label of exactly one channel.
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
        return hints

    def bind(
        self,
        channels: Sequence[str],
        markers: Sequence[str],
        *,
        path: str | None = None,
        overrides: Mapping[str, str] | None = None,
        partial: bool | None = None,
    ) -> GateTree:
        """Resolve every dimension's marker to the sample's channel.

        Names are matched, in order, as an explicit override, a channel name (``$PnN``,
        also with FlowJo's ``/`` -> ``_`` replacement), an alias of the tree (e.g. a
        GatingML fluorochrome), an exact ``$PnS`` label, then a marker through the
        panel synonyms (case, spaces and punctuation ignored).

        With ``partial`` (default: :attr:`partial`) a gate whose markers the sample lacks
        is skipped, omitted or refused as its ``if_absent`` policy says
        (:func:`blinaprofile.gating.panel.plan_gates`); the bound tree lists the gates
        left out in :attr:`skipped`.

        Raises
        ------
        PanelMismatchError
            A needed marker is missing or ambiguous (the message lists the file's channels);
            with ``partial``, only a marker of a required gate, or when no gate can be bound.
        """
        chans = list(channels)
        hints = self.channel_hints(chans, markers)
        hints.update(overrides or {})
        gates, skipped = self.gates, dict(self.skipped)
        if self.partial if partial is None else partial:
            plan = plan_gates(
                self.gates,
                chans,
                markers,
                policies=self.if_absent,
                path=path,
                overrides=hints,
                strategy=self.name,
            )
            mapping, gates = plan.mapping, plan.gates
            skipped.update(plan.absent)
        else:
            mapping = resolve_markers(
                self.needed_names(), chans, markers, path=path, overrides=hints
            )

        def bind_dim(d: Dim) -> Dim:
            if d.ratio is not None:
                r = replace(
                    d.ratio, channels=(mapping[d.ratio.numerator], mapping[d.ratio.denominator])
                )
                return replace(d, ratio=r, channel=r.channels[0] if r.channels else None)
            return replace(d, channel=mapping[d.name])

        gates = [replace(g, dims=tuple(bind_dim(d) for d in g.dims)) for g in gates]
        return replace(self, gates=gates, bound=True, skipped=skipped)

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
        adaptive: bool = True,
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
            Per-sample placement (the default): rectangle bounds with an ``adaptive`` spec
            are placed from the sample's own populations (see
            :mod:`blinaprofile.gating.placement`). ``False`` uses the configured bounds and
            only flags a sample whose populations lie far from them. Gates without
            ``adaptive`` specs (GatingML, FlowJo workspaces) are the same either way.
        path
            The sample's file, for error messages.
        scaling
            channel -> function mapping stored values to scaled values (see
            :func:`fcs_scaling`); channels not listed are used as stored.
        """
        if not self.bound:
            raise GatingError(f"gating strategy {self.name!r} must be bound to a sample first")
        ev = EventCache(self, np.asarray(events), list(channels), spillover, path, scaling=scaling)
        n = ev.n
        masks: dict[str, np.ndarray] = {}
        rows: dict[str, np.ndarray | None] = {}
        result = GatingResult(masks=masks, counts={}, n_events=n)
        for g in self.gates:
            prow = rows[g.parent] if g.parent else None
            if g.kind == "rectangle":
                dims = g.dims
                if any(a is not None for a in g.adaptive):
                    # fixed mode too: placement then only flags a shifted sample
                    pmask = masks[g.parent] if g.parent else None
                    dims = place_thresholds(g, ev, pmask, result, apply=adaptive)
                r = gate_rows(ev, g, dims, prow, masks)
                for d in dims:
                    if d.min is not None:
                        result.thresholds[f"{g.id}:{d.name}:min"] = d.min
                    if d.max is not None:
                        result.thresholds[f"{g.id}:{d.name}:max"] = d.max
            else:
                r = gate_rows(ev, g, g.dims, prow, masks)
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
    def placed(self, result: GatingResult) -> GateTree:
        """This bound tree with every rectangle bound where ``result`` placed it.

        Per-sample placement moves thresholds for each sample; the tree returned here is
        the strategy *as applied* to that sample (its GatingML export reproduces the
        sample's membership exactly), which is what results record and export.
        """
        gates = []
        for g in self.gates:
            if g.kind == "rectangle":
                dims = tuple(
                    replace(
                        d,
                        min=result.thresholds.get(f"{g.id}:{d.name}:min", d.min),
                        max=result.thresholds.get(f"{g.id}:{d.name}:max", d.max),
                    )
                    for d in g.dims
                )
                g = replace(g, dims=dims, adaptive=tuple(None for _ in dims))
            gates.append(g)
        return replace(self, gates=gates)

    def to_flowkit(self) -> Any:
        """This strategy as a ``flowkit.GatingStrategy`` (after :meth:`bind`).

        The file's spillover is referenced as ``'FCS'`` (FlowKit's embedded-matrix id);
        quadrants are written as the rectangles they are.
        """
        import flowkit as fk

        from blinaprofile.gating.gatingml import compensation_ref as comp_ref
        from blinaprofile.gating.gatingml import ratio_ids as name_ratios

        if not self.bound:
            raise GatingError("bind the strategy to a sample before exporting it")
        gs = fk.GatingStrategy()
        used = {d.transform for g in self.gates for d in g.dims if d.transform}
        for tid in sorted(used):
            gs.add_transform(tid, make_transform(self.transforms[tid]).to_flowkit(tid))
        ratio_ids = name_ratios(self, set(used))
        for ratio, rid in ratio_ids.items():
            assert ratio.channels is not None
            gs.add_transform(
                rid, fk.transforms.RatioTransform(list(ratio.channels), ratio.a, ratio.b, ratio.c)
            )
        for mid, (detectors, matrix) in self.matrices.items():
            gs.add_comp_matrix(mid, fk.Matrix(np.asarray(matrix, dtype=float), list(detectors)))
        paths: dict[str | None, tuple[str, ...]] = {None: ("root",)}

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

        import blinaprofile.gating.transforms as tr

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
        """Write the bound strategy as GatingML 2.0 (atomically; see
        :func:`blinaprofile.gating.gatingml.gatingml_text`: FlowKit is not imported)."""
        from blinaprofile.gating.gatingml import gatingml_text

        text = gatingml_text(self)
        with atomic_path(path) as tmp:
            tmp.write_bytes(text.encode("utf-8"))
        return Path(path)


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
