"""GatingML 2.0 text of a bound gate tree, written with the standard library.

FlowKit's exporter needs FlowKit, whose import (bokeh, networkx, lxml...) takes most of a
second: more than everything else ``blinaprofile score`` does to keep the strategy with a
sample's results. :func:`gatingml_text` writes the same document (byte for byte what
``flowkit.export_gatingml(tree.to_flowkit(), ...)`` writes, which the tests check) without
importing FlowKit, for every strategy whose transforms GatingML 2.0 defines (``flin``,
``flog``, ``fasinh``, ``logicle``, ``hyperlog`` and ``fratio``). A strategy with a FlowJo
transform (``WSPLogTransform``, ``WSPBiexTransform``) has no GatingML form of its own; it
goes through FlowKit's exporter as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import fields
from typing import Any, Protocol

from blinaprofile.errors import GatingError
from blinaprofile.gating.gates import FCS_COMP, FILE_COMP, Dim, Gate, Ratio, make_transform


class GateTree(Protocol):
    """What the writer needs of a bound :class:`blinaprofile.gating.tree.GateTree`."""

    @property
    def gates(self) -> Sequence[Gate]: ...

    @property
    def transforms(self) -> Mapping[str, Any]: ...

    @property
    def matrices(self) -> Mapping[str, tuple[Sequence[str], Any]]: ...

    @property
    def bound(self) -> bool: ...

    def to_flowkit(self) -> Any: ...


__all__ = ["GATINGML_KINDS", "compensation_ref", "gatingml_text", "ratio_ids"]

_NS = {
    "gating": "http://www.isac-net.org/std/Gating-ML/v2.0/gating",
    "data-type": "http://www.isac-net.org/std/Gating-ML/v2.0/datatypes",
    "transforms": "http://www.isac-net.org/std/Gating-ML/v2.0/transformations",
}
#: Transform kinds with a GatingML 2.0 element of the same name, and the element's
#: parameters in the order FlowKit writes them.
GATINGML_KINDS: dict[str, tuple[str, ...]] = {
    "flin": ("T", "A"),
    "flog": ("T", "M"),
    "fasinh": ("T", "M", "A"),
    "logicle": ("T", "W", "M", "A"),
    "hyperlog": ("T", "W", "M", "A"),
}
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
_ESCAPES.update({"\n": "&#10;", "\r": "&#13;", "\t": "&#9;"})


def compensation_ref(d: Dim) -> str:
    """The GatingML ``compensation-ref`` of a dimension (``FCS`` for the file's matrix)."""
    return "FCS" if d.compensation in (FILE_COMP, FCS_COMP) else d.compensation


def ratio_ids(tree: GateTree, taken: set[str]) -> dict[Ratio, str]:
    """The transform id of each ratio dimension, in gate order: the dimension's name,
    or ``ratio_<n>`` when that name is already a transform id (``taken``, updated)."""
    ids: dict[Ratio, str] = {}
    for g in tree.gates:
        for d in g.dims:
            if d.ratio is not None and d.ratio not in ids:
                rid = d.name if d.name not in taken else f"ratio_{len(ids)}"
                ids[d.ratio] = rid
                taken.add(rid)
    return ids


def _q(value: Any) -> str:
    text = str(value)
    for ch, esc in _ESCAPES.items():
        text = text.replace(ch, esc)
    return text


class _Doc:
    """Lines of an indented XML document (the layout lxml's ``pretty_print`` gives)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0

    def empty(self, tag: str, **attrs: Any) -> None:
        self.lines.append(f"{'  ' * self.depth}<{tag}{self._attrs(attrs)}/>")

    def open(self, tag: str, **attrs: Any) -> None:
        self.lines.append(f"{'  ' * self.depth}<{tag}{self._attrs(attrs)}>")
        self.depth += 1

    def close(self, tag: str) -> None:
        self.depth -= 1
        self.lines.append(f"{'  ' * self.depth}</{tag}>")

    @staticmethod
    def _attrs(attrs: dict[str, Any]) -> str:
        # keyword names use "__" for ":" and "_" for "-" (gating__parent_id stays as is)
        out = []
        for key, value in attrs.items():
            if value is None:
                continue
            prefix, _, name = key.partition("__")
            prefix = prefix.replace("_", "-")
            if name not in ("parent_id", "divider_ref"):
                name = name.replace("_", "-")
            out.append(f' {prefix}:{name}="{_q(value)}"')
        return "".join(out)


def _transforms(doc: _Doc, tree: GateTree) -> dict[Ratio, str] | None:
    """Write the transformations; ``None`` if one has no GatingML 2.0 element."""
    used = sorted({d.transform for g in tree.gates for d in g.dims if d.transform})
    made = {tid: make_transform(tree.transforms[tid]) for tid in used}
    if any(getattr(t, "kind", None) not in GATINGML_KINDS for t in made.values()):
        return None
    for tid, t in made.items():
        values = {f.name.upper(): getattr(t, f.name) for f in fields(t)}
        params = {f"transforms__{p}": values[p] for p in GATINGML_KINDS[t.kind]}
        doc.open("transforms:transformation", transforms__id=tid)
        doc.empty(f"transforms:{t.kind}", **params)
        doc.close("transforms:transformation")
    rids = ratio_ids(tree, set(made))
    for ratio, rid in rids.items():
        assert ratio.channels is not None
        doc.open("transforms:transformation", transforms__id=rid)
        doc.open(
            "transforms:fratio", transforms__A=ratio.a, transforms__B=ratio.b, transforms__C=ratio.c
        )
        for channel in ratio.channels:
            doc.empty("data-type:fcs-dimension", data_type__name=channel)
        doc.close("transforms:fratio")
        doc.close("transforms:transformation")
    return rids


def _matrices(doc: _Doc, tree: GateTree) -> None:
    for mid, (detectors, matrix) in tree.matrices.items():
        doc.open("transforms:spectrumMatrix", transforms__id=mid)
        doc.open("transforms:fluorochromes")
        for _ in detectors:  # FlowKit writes unnamed fluorochromes
            doc.empty("data-type:fcs-dimension", data_type__name="")
        doc.close("transforms:fluorochromes")
        doc.open("transforms:detectors")
        for det in detectors:
            doc.empty("data-type:fcs-dimension", data_type__name=det)
        doc.close("transforms:detectors")
        for row in matrix:
            doc.open("transforms:spectrum")
            for v in row:
                doc.empty("transforms:coefficient", transforms__value=float(v))
            doc.close("transforms:spectrum")
        doc.close("transforms:spectrumMatrix")


def _dimension(doc: _Doc, d: Dim, rids: dict[Ratio, str]) -> None:
    bounds = {
        "gating__min": None if d.min is None else float(d.min),
        "gating__max": None if d.max is None else float(d.max),
    }
    doc.open(
        "gating:dimension",
        gating__compensation_ref=compensation_ref(d),
        gating__transformation_ref=d.transform,
        **bounds,
    )
    if d.ratio is not None:
        doc.empty("data-type:new-dimension", data_type__transformation_ref=rids[d.ratio])
    else:
        doc.empty("data-type:fcs-dimension", data_type__name=d.channel)
    doc.close("gating:dimension")


def _gate(doc: _Doc, g: Gate, rids: dict[Ratio, str]) -> None:
    tag = {
        "rectangle": "gating:RectangleGate",
        "polygon": "gating:PolygonGate",
        "ellipsoid": "gating:EllipsoidGate",
        "boolean": "gating:BooleanGate",
    }.get(g.kind)
    if tag is None:
        raise GatingError(f"gate {g.id!r}: {g.kind} gates have no GatingML 2.0 form")
    doc.open(tag, gating__id=g.id, gating__parent_id=g.parent)
    for d in g.dims:
        _dimension(doc, d, rids)
    if g.kind == "polygon":
        for vertex in g.vertices:
            doc.open("gating:vertex")
            for c in vertex:
                doc.empty("gating:coordinate", data_type__value=c)
            doc.close("gating:vertex")
    elif g.kind == "ellipsoid":
        doc.open("gating:mean")
        for c in g.mean:
            doc.empty("gating:coordinate", data_type__value=c)
        doc.close("gating:mean")
        doc.open("gating:covarianceMatrix")
        for row in g.covariance:
            doc.open("gating:row")
            for v in row:
                doc.empty("gating:entry", data_type__value=v)
            doc.close("gating:row")
        doc.close("gating:covarianceMatrix")
        doc.empty("gating:distanceSquare", data_type__value=g.distance_square)
    elif g.kind == "boolean":
        op = g.op or "and"
        doc.open(f"gating:{op}")
        for ref, complement in g.refs:
            doc.empty(
                "gating:gateReference",
                gating__ref=ref,
                gating__use_as_complement="true" if complement else None,
            )
        doc.close(f"gating:{op}")
    doc.close(tag)


def _hierarchy(tree: GateTree, parent: str | None = None) -> Iterator[Gate]:
    """Gates depth first, each parent before its children (FlowKit's export order)."""
    for g in tree.gates:
        if g.parent == parent:
            yield g
            yield from _hierarchy(tree, g.id)


def gatingml_text(tree: GateTree) -> str:
    """A bound strategy as GatingML 2.0 text (FlowKit's exporter only for FlowJo transforms).

    Raises
    ------
    GatingError
        The strategy is not bound to a sample.
    """
    if not tree.bound:
        raise GatingError("bind the strategy to a sample before exporting it")
    text = _write(tree)
    if text is None:  # a FlowJo transform: what FlowKit writes for it, as before
        import io

        import flowkit as fk

        buf = io.BytesIO()
        fk.export_gatingml(tree.to_flowkit(), buf)
        text = buf.getvalue().decode("utf-8")
    return text


def _write(tree: GateTree) -> str | None:
    """The document, or ``None`` when a transform has no GatingML 2.0 element."""
    doc = _Doc()
    doc.lines.append("<?xml version='1.0' encoding='UTF-8'?>")
    ns = "".join(f' xmlns:{p}="{uri}"' for p, uri in _NS.items())
    doc.lines.append(f"<gating:Gating-ML{ns}>")
    doc.depth = 1
    rids = _transforms(doc, tree)
    if rids is None:
        return None
    _matrices(doc, tree)
    for g in _hierarchy(tree):
        _gate(doc, g, rids)
    doc.depth = 0
    doc.lines.append("</gating:Gating-ML>")
    return "\n".join(doc.lines) + "\n"
