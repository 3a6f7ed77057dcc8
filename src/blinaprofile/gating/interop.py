"""Import and export gating strategies: GatingML 2.0 and FlowJo 10 workspaces.

The lab's own gates become :class:`~blinaprofile.gating.tree.GateTree` objects that ``gate``,
``train`` and ``score`` use like our YAML strategies (``load_strategy`` dispatches on the
file suffix: ``.xml`` GatingML, ``.wsp`` FlowJo). Parsing goes through FlowKit's parsers
(:func:`flowkit.parse_gating_xml`, :class:`flowkit.Workspace`); the result is converted
with :meth:`GateTree.from_flowkit <blinaprofile.gating.tree.GateTree.from_flowkit>`, so every gate
FlowKit understands (rectangles and ranges, polygons, ellipsoids, quadrants, boolean gates,
ratio dimensions, every GatingML/FlowJo transform, GatingML and FlowJo compensation) is
evaluated by our engine with FlowKit's per-event result.

Gates keep the names the lab gave them; :func:`rename_gates` maps them onto the ids the
feature table expects (``cd3``, ``cd8``, ``cd8_em`` ...).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blinaprofile.errors import GatingError, InputError

if TYPE_CHECKING:
    from blinaprofile.gating.tree import GateTree

__all__ = [
    "export_gatingml",
    "gatingml_text",
    "load_gatingml",
    "load_wsp",
    "rename_gates",
    "wsp_sample_ids",
]

_MIN_FLOWJO_MAJOR = 10


def _check_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise InputError("gating file not found", path=p)
    return p


def load_gatingml(path: str | os.PathLike[str], *, name: str | None = None) -> GateTree:
    """Read a GatingML 2.0 file into an (unbound) gate tree.

    Raises
    ------
    InputError
        The file does not exist.
    GatingError
        The file is not GatingML 2.0 FlowKit can parse, or uses something the engine
        does not represent; the message names the file.
    """
    import flowkit as fk

    from blinaprofile.gating.tree import GateTree

    p = _check_file(path)
    try:
        gs = fk.parse_gating_xml(str(p))
    except Exception as err:  # FlowKit raises bare ValueError/KeyError/lxml errors
        raise GatingError(
            f"cannot parse GatingML 2.0: {type(err).__name__}: {err}", path=p
        ) from None
    try:
        return GateTree.from_flowkit(gs, name=name or p.stem, source=str(p))
    except GatingError as err:
        raise GatingError(err.message, path=p) from None


def _flowjo_version(p: Path) -> str:
    head = p.read_bytes()[:4096].decode("utf-8", errors="replace")
    m = re.search(r'flowJoVersion="([^"]+)"', head)
    return m.group(1) if m else ""


def _open_workspace(p: Path) -> Any:
    import flowkit as fk

    version = _flowjo_version(p)
    major = re.match(r"\s*(\d+)", version)
    if not major:
        raise GatingError("not a FlowJo workspace (no flowJoVersion attribute)", path=p)
    if int(major.group(1)) < _MIN_FLOWJO_MAJOR:
        raise GatingError(
            f"FlowJo {version} workspace: only FlowJo 10 or later workspaces are supported "
            "(re-save it in FlowJo 10)",
            path=p,
        )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ws = fk.Workspace(str(p), load_missing_file_data=True)
    except Exception as err:  # FlowKit raises several unrelated types for bad workspaces
        raise GatingError(
            f"cannot parse FlowJo workspace: {type(err).__name__}: {err}", path=p
        ) from None
    for w in caught:
        if "not loaded" not in str(w.message):  # FCS files are not needed to read gates
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ws


def wsp_sample_ids(path: str | os.PathLike[str]) -> list[str]:
    """Sample ids (FCS file names) a FlowJo workspace holds gates for."""
    p = _check_file(path)
    ws = _open_workspace(p)
    return list(ws.get_sample_ids(loaded_only=False))


def load_wsp(
    path: str | os.PathLike[str],
    *,
    sample_id: str | None = None,
    name: str | None = None,
) -> GateTree:
    """Read one sample's gating strategy from a FlowJo 10 workspace.

    Parameters
    ----------
    path
        The ``.wsp`` file.
    sample_id
        Which sample's gates (FlowJo's sample name, usually the FCS file name); the
        first sample when omitted. Sample-specific (custom) gates are honoured.
    name
        Name of the strategy (default: ``<wsp stem>:<sample>``).

    Raises
    ------
    GatingError
        Not a FlowJo 10+ workspace, unknown sample, or a gate the engine cannot evaluate.
    """
    from blinaprofile.gating.tree import GateTree

    p = _check_file(path)
    ws = _open_workspace(p)
    ids = list(ws.get_sample_ids(loaded_only=False))
    if not ids:
        raise GatingError("the workspace holds no samples", path=p)
    sid = sample_id or ids[0]
    if sid not in ids:
        raise GatingError(f"no sample {sid!r} in the workspace; it has {ids}", path=p)
    gs = ws.get_gating_strategy(sid)
    try:
        return GateTree.from_flowkit(
            gs, name=name or f"{p.stem}:{sid}", sample_id=sid, source=str(p)
        )
    except GatingError as err:
        raise GatingError(err.message, path=p) from None


def rename_gates(tree: GateTree, mapping: Mapping[str, str]) -> GateTree:
    """Rename gates (and every reference to them), e.g. ``{'CD8 T cells': 'cd8'}``.

    Raises
    ------
    GatingError
        A key is not a gate of the tree, or the new ids collide.
    """
    ids = tree.gate_ids
    unknown = sorted(set(mapping) - set(ids))
    if unknown:
        raise GatingError(f"cannot rename unknown gate(s) {unknown}; the tree has {ids}")
    new_ids = [mapping.get(i, i) for i in ids]
    dup = sorted({i for i in new_ids if new_ids.count(i) > 1})
    if dup:
        raise GatingError(f"renaming would duplicate gate id(s) {dup}")

    def m(x: str | None) -> str | None:
        return None if x is None else mapping.get(x, x)

    gates = [
        replace(
            g,
            id=mapping.get(g.id, g.id),
            parent=m(g.parent),
            refs=tuple((mapping.get(r, r), c) for r, c in g.refs),
        )
        for g in tree.gates
    ]
    return replace(tree, gates=gates)


def export_gatingml(tree: GateTree, path: str | os.PathLike[str]) -> Path:
    """Write a bound strategy as GatingML 2.0 (atomically); see :meth:`GateTree.export_gatingml`."""
    return tree.export_gatingml(path)


def gatingml_text(tree: GateTree) -> str:
    """A bound strategy as GatingML 2.0 text, to keep with a sample's results."""
    from blinaprofile.gating.gatingml import gatingml_text as write_text

    return write_text(tree)
