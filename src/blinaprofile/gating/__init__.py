"""Gating: gate types, the fast gate-tree engine, per-sample placement, interop, panels.

Data flows ``panel`` (channel -> marker) -> ``strategy`` (YAML/GatingML/FlowJo -> a
:class:`GateTree` of :class:`Gate`) -> ``tree``/``events`` (bind to a sample, evaluate
gates; ``placement`` moves thresholds per sample) -> ``sample`` (one FCS file -> counts,
masks or AnnData). ``transforms`` holds the fast inverse transforms the engine uses;
``plot`` draws gates on their parent's events.
"""

from blinaprofile.gating.events import fcs_scaling, points_in_polygon
from blinaprofile.gating.gates import Dim, Gate, GatingResult, Ratio
from blinaprofile.gating.sample import gate_events, gate_sample
from blinaprofile.gating.strategy import load_strategy, strategy_from_config
from blinaprofile.gating.tree import GateTree

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
