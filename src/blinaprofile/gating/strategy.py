"""Loading gating strategies: our YAML, GatingML 2.0 and FlowJo 10 workspaces."""

from __future__ import annotations

import os
from pathlib import Path

from blinaprofile.config import GatingConfig, RangeSpec, load_config
from blinaprofile.gating.gates import FILE_COMP, UNCOMPENSATED, Dim, Gate
from blinaprofile.gating.interop import load_gatingml, load_wsp
from blinaprofile.gating.tree import GateTree
from blinaprofile.settings import settings

__all__ = ["load_strategy", "strategy_from_config"]


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
    files FlowJo 10 workspaces (see :mod:`blinaprofile.gating.interop`).
    """
    p = Path(path or settings.default_gating)
    suffix = p.suffix.lower()
    if suffix == ".wsp":
        return load_wsp(p)
    if suffix == ".xml":
        return load_gatingml(p)
    return strategy_from_config(load_config(GatingConfig, p))
