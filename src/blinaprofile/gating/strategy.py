"""Loading gating strategies (our YAML, GatingML 2.0, FlowJo 10 workspaces) and checking them.

:func:`check_panel` tells, before any file is read, whether a panel holds every marker a
strategy requires; :func:`scale_problems` whether a sample's values are on the scale the
strategy's transforms expect (raw intensities for logicle, ion counts for ``arcsinh``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from blinaprofile.config import GatingConfig, RangeSpec, load_config
from blinaprofile.errors import GatingError
from blinaprofile.gating.gates import (
    FCS_COMP,
    FILE_COMP,
    UNCOMPENSATED,
    Dim,
    Gate,
    make_transform,
)
from blinaprofile.gating.interop import load_gatingml, load_wsp
from blinaprofile.gating.panel import AbsentGate, load_panel, plan_gates
from blinaprofile.gating.tree import GateTree
from blinaprofile.settings import settings

if TYPE_CHECKING:
    from blinaprofile.io.fcs import FCSData

__all__ = [
    "DISPLAY_RANGES",
    "as_exported",
    "check_panel",
    "is_mass_cytometry",
    "load_strategy",
    "scale_problems",
    "strategy_from_config",
]

#: ``$PnR`` values of display-scale exports (FlowJo/Diva channel numbers).
DISPLAY_RANGES: tuple[float, ...] = (1024.0, 4096.0)
#: Below this, every value of a fluorescence channel looks already transformed.
TRANSFORMED_MAX = 10.0
#: A transform whose top of scale is at least this many times ``$PnR`` expects raw data.
_TOP_RATIO = 16.0
_MASS_CYT = ("CYTOF", "HELIOS", "DVS", "FLUIDIGM", "STANDARD BIOTOOLS")


# ---------------------------------------------------------------------- YAML loading
def _dim(name: str, cfg: GatingConfig, rng: RangeSpec | None = None) -> Dim:
    tid = cfg.channel_transforms.get(name, cfg.channel_transforms.get("default"))
    if tid is not None and cfg.transforms[tid].type == "none":
        tid = None  # values as stored
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
    """Build an unbound :class:`GateTree` from a validated :class:`GatingConfig`.

    ``arcsinh`` transforms become their GatingML ``asinh`` equivalent
    (:meth:`TransformSpec.engine_spec`); dimensions on a ``none`` transform are untransformed.
    """
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
    transforms = {
        tid: engine for tid, t in cfg.transforms.items() if (engine := t.engine_spec()) is not None
    }
    return GateTree(
        name=cfg.name,
        gates=gates,
        transforms=transforms,
        version=cfg.version,
        if_absent={g.id: g.if_absent for g in cfg.gates if g.if_absent},
    )


def load_strategy(path: str | os.PathLike[str] | None = None) -> GateTree:
    """Load a gating strategy (default: the shipped T-cell strategy).

    ``.yaml``/``.yml`` files are our gating YAML; ``.xml`` files GatingML 2.0 and ``.wsp``
    files FlowJo 10 workspaces (see :mod:`blinaprofile.gating.interop`).
    """
    p = Path(path or settings.default_gating)
    suffix = p.suffix.lower()
    if suffix == ".wsp":
        return load_wsp(p)
    if suffix == ".xml":
        return load_gatingml(p)
    return strategy_from_config(load_config(GatingConfig, p))


# ---------------------------------------------------------------------- checks
def as_exported(tree: GateTree, data: FCSData) -> GateTree:
    """The strategy for a file without a spillover matrix: its values gated as exported.

    Exports of gated cells (FlowJo CSV/FCS exports, converted tables) hold compensated
    values and no ``$SPILLOVER``. A strategy that compensates with the file's matrix
    (``compensation: file``) would refuse them; here such dimensions use the file's matrix
    if it has one, else the values as they are, and a warning is added to ``data.warnings``.
    Files with a matrix, and strategies that do not compensate, are returned unchanged.

    Parameters
    ----------
    tree
        An unbound strategy.
    data
        The sample it is about to gate.

    Returns
    -------
    GateTree
        ``tree``, or a copy whose ``file`` compensations are GatingML ``FCS`` ones.
    """
    if data.spillover is not None:
        return tree
    if not any(d.compensation == FILE_COMP for g in tree.gates for d in g.dims):
        return tree
    gates = [
        replace(
            g,
            dims=tuple(
                replace(d, compensation=FCS_COMP) if d.compensation == FILE_COMP else d
                for d in g.dims
            ),
        )
        for g in tree.gates
    ]
    data.warnings.append(
        "the file has no spillover matrix ($SPILLOVER): its values are gated as they are "
        "(an export of compensated values?)"
    )
    return replace(tree, gates=gates)


def check_panel(tree: GateTree, panel: str | os.PathLike[str]) -> dict[str, AbsentGate]:
    """Check, before reading any file, that a panel holds every marker ``tree`` requires.

    The panel's channels and markers are matched as a sample's would be, with the gates'
    ``if_absent`` policies (:func:`blinaprofile.gating.panel.plan_gates`).

    Parameters
    ----------
    tree
        An unbound strategy.
    panel
        A panel YAML (:class:`~blinaprofile.config.PanelConfig`).

    Returns
    -------
    dict of str to AbsentGate
        The gates the panel's samples will be gated without (skipped or omitted).

    Raises
    ------
    PanelMismatchError
        The panel lacks a marker of a required gate (or of every gate); the message names
        the panel file, the markers, the gates and the panel's channels.
    ConfigError
        The panel is not a valid panel YAML.
    """
    cfg = load_panel(panel)
    channels = [c.channel for c in cfg.channels]
    markers = [c.marker or "" for c in cfg.channels]
    plan = plan_gates(
        tree.gates,
        channels,
        markers,
        policies=tree.if_absent,
        path=panel,
        overrides=tree.channel_hints(channels, markers),
        source="panel",
        strategy=tree.name,
    )
    return plan.absent


def is_mass_cytometry(data: FCSData) -> bool:
    """Whether a sample comes from a mass cytometer (``$CYT``, or isotope channel names)."""
    cyt = str(data.keywords.get("$CYT", "")).upper()
    if any(k in cyt for k in _MASS_CYT):
        return True
    mass = [c for c in data.channels if c.endswith(("Di", "Dd")) and any(ch.isdigit() for ch in c)]
    return len(mass) >= max(3, len(data.channels) // 2)


def _names(items: Sequence[str], limit: int = 6) -> str:
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head} and {len(items) - limit} more"


def scale_problems(tree: GateTree, data: FCSData) -> list[str]:
    """Whether the sample's values are on the scale the bound strategy's transforms expect.

    A transform whose top of scale ``T`` is far above the channel's ``$PnR`` (a logicle
    for raw intensities up to 262,144 on channels with ``$PnR`` 1,024 or 4,096) or a
    fluorescence channel whose values all lie below 10 (already log- or
    arcsinh-transformed) gates nonsense. Transforms with a small ``T`` (``arcsinh``
    cofactors), ``none`` and log-amplified (``$PnE``) channels are not questioned.

    Parameters
    ----------
    tree
        The strategy bound to ``data``.
    data
        The sample.

    Returns
    -------
    list of str
        One message per kind of problem, naming the channels and what to do (empty when
        the scale looks right). Callers report each as a warning and a QC flag.
    """
    if not tree.bound:
        raise GatingError(f"gating strategy {tree.name!r} must be bound to the sample first")
    index = {c: i for i, c in enumerate(data.channels)}
    display: list[tuple[str, float]] = []
    transformed: list[tuple[str, float]] = []
    kinds: dict[str, float] = {}
    seen: set[str] = set()
    for g in tree.gates:
        for d in g.dims:
            ch = d.channel
            if d.ratio is not None or ch is None or d.transform is None or ch in seen:
                continue
            seen.add(ch)
            tf = make_transform(tree.transforms[d.transform])
            top = getattr(tf, "t", None)
            i = index.get(ch)
            if top is None or top < 1000.0 or i is None or ch.lower() == "time":
                continue
            dec = data.decades[i] if i < len(data.decades) else None
            if dec is not None and dec[0] > 0:
                continue  # log-amplified: $PnE decodes it
            prange = data.ranges[i] if i < len(data.ranges) else float("nan")
            col = np.asarray(data.events[:, i], dtype=np.float64)
            vmax = float(np.max(col)) if col.size else 0.0
            kind = str(getattr(tf, "kind", type(tf).__name__))
            if np.isfinite(prange) and prange <= max(DISPLAY_RANGES) and top >= _TOP_RATIO * prange:
                display.append((ch, prange))
                kinds[kind] = top
            elif vmax < TRANSFORMED_MAX and not ch.upper().startswith(("FSC", "SSC")):
                transformed.append((ch, vmax))
                kinds[kind] = top
    if not display and not transformed:
        return []
    how = ", ".join(f"{k} (T={t:g})" for k, t in kinds.items())
    if is_mass_cytometry(data):
        chans = [c for c, _ in display + transformed]
        return [
            f"mass-cytometry data (channels {_names(chans)}) gated with {how}, a transform "
            "for flow intensities: use a strategy with `arcsinh` transforms (cofactor 5), "
            "e.g. configs/gating/cytof_tcell.yaml"
        ]
    out = []
    if display:
        ranges = sorted({f"{r:g}" for _, r in display})
        out.append(
            f"channels {_names([c for c, _ in display])} span 0-{'/'.join(ranges)} ($PnR) but "
            f"are gated with {how}, which expects raw intensities: a display-scale "
            "(channel-value) export? declare it with --display-scale, or gate with a "
            "strategy whose transforms are `none` or `linear`"
        )
    if transformed:
        top = max(v for _, v in transformed)
        out.append(
            f"every value of {_names([c for c, _ in transformed])} is below "
            f"{TRANSFORMED_MAX:g} (max {top:.3g}): already transformed? {how} expects raw "
            "intensities; gate with a strategy whose transforms are `none`, bounds in "
            "these units"
        )
    return out
