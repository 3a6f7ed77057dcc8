"""Typed, validated YAML configuration.

Every YAML file in ``configs/`` is loaded through :func:`load_config` into a
pydantic model that forbids unknown keys. Problems raise :class:`ConfigError`
naming the file and the key (``gates.3.dims: field required``); a misspelt key gets the
closest known one (``compensaton: unknown key; did you mean `compensation`?``) and a value
outside a fixed set of choices gets the choices and what each is for.

Every key has a description (``Field(description=...)``; the choices of a fixed set in
``json_schema_extra={"choices": ...}``): ``scripts/config_reference.py`` renders them as
``docs/config_reference.md``.

The models live in modules by what they configure, imported on first use of a name from
here (``from blinaprofile.config import GatingConfig`` loads the panel and gating models
only): :mod:`~blinaprofile.config.gating` (panel and gating strategy),
:mod:`~blinaprofile.config.qc`, :mod:`~blinaprofile.config.training`,
:mod:`~blinaprofile.config.simulation`; :mod:`~blinaprofile.config.loading` reads and
validates files and :mod:`~blinaprofile.config.base` holds the shared base model and types.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blinaprofile.config.base import (
        ChannelName as ChannelName,
    )
    from blinaprofile.config.base import (
        FileSafeName as FileSafeName,
    )
    from blinaprofile.config.base import (
        Fraction as Fraction,
    )
    from blinaprofile.config.base import (
        MarkerName as MarkerName,
    )
    from blinaprofile.config.base import (
        Positive as Positive,
    )
    from blinaprofile.config.base import (
        StrictModel as StrictModel,
    )
    from blinaprofile.config.gating import (
        AdaptiveSpec as AdaptiveSpec,
    )
    from blinaprofile.config.gating import (
        GateSpec as GateSpec,
    )
    from blinaprofile.config.gating import (
        GatingConfig as GatingConfig,
    )
    from blinaprofile.config.gating import (
        PanelChannel as PanelChannel,
    )
    from blinaprofile.config.gating import (
        PanelConfig as PanelConfig,
    )
    from blinaprofile.config.gating import (
        RangeSpec as RangeSpec,
    )
    from blinaprofile.config.gating import (
        TransformSpec as TransformSpec,
    )
    from blinaprofile.config.loading import (
        MAX_CONFIG_BYTES as MAX_CONFIG_BYTES,
    )
    from blinaprofile.config.loading import (
        STRICT_LOADER as STRICT_LOADER,
    )
    from blinaprofile.config.loading import (
        choice_notes as choice_notes,
    )
    from blinaprofile.config.loading import (
        load_config as load_config,
    )
    from blinaprofile.config.loading import (
        parse_yaml as parse_yaml,
    )
    from blinaprofile.config.loading import (
        validate_config as validate_config,
    )
    from blinaprofile.config.qc import QCConfig as QCConfig
    from blinaprofile.config.simulation import (
        SIMULATION_CD4_SUBSETS as SIMULATION_CD4_SUBSETS,
    )
    from blinaprofile.config.simulation import (
        SIMULATION_CD8_SUBSETS as SIMULATION_CD8_SUBSETS,
    )
    from blinaprofile.config.simulation import (
        SIMULATION_COMPOSITION as SIMULATION_COMPOSITION,
    )
    from blinaprofile.config.simulation import (
        SIMULATION_LATENT as SIMULATION_LATENT,
    )
    from blinaprofile.config.simulation import (
        LatentSpec as LatentSpec,
    )
    from blinaprofile.config.simulation import (
        SimulationConfig as SimulationConfig,
    )
    from blinaprofile.config.simulation import (
        SubsetSplit as SubsetSplit,
    )
    from blinaprofile.config.training import (
        AliasName as AliasName,
    )
    from blinaprofile.config.training import (
        ModelSpec as ModelSpec,
    )
    from blinaprofile.config.training import (
        PromotionRule as PromotionRule,
    )
    from blinaprofile.config.training import (
        ThresholdRule as ThresholdRule,
    )
    from blinaprofile.config.training import (
        TrainConfig as TrainConfig,
    )

__all__ = [
    "GateSpec",
    "GatingConfig",
    "PanelChannel",
    "PanelConfig",
    "PromotionRule",
    "QCConfig",
    "SimulationConfig",
    "TrainConfig",
    "TransformSpec",
    "choice_notes",
    "load_config",
    "parse_yaml",
    "validate_config",
]

#: submodule -> the public names it defines (each imported on first use)
_MODULES = {
    "base": ("ChannelName", "FileSafeName", "Fraction", "MarkerName", "Positive", "StrictModel"),
    "gating": (
        "AdaptiveSpec",
        "GateSpec",
        "GatingConfig",
        "PanelChannel",
        "PanelConfig",
        "RangeSpec",
        "TransformSpec",
    ),
    "loading": (
        "MAX_CONFIG_BYTES",
        "STRICT_LOADER",
        "choice_notes",
        "load_config",
        "parse_yaml",
        "validate_config",
    ),
    "qc": ("QCConfig",),
    "simulation": (
        "SIMULATION_CD4_SUBSETS",
        "SIMULATION_CD8_SUBSETS",
        "SIMULATION_COMPOSITION",
        "SIMULATION_LATENT",
        "LatentSpec",
        "SimulationConfig",
        "SubsetSplit",
    ),
    "training": ("AliasName", "ModelSpec", "PromotionRule", "ThresholdRule", "TrainConfig"),
}
_WHERE = {name: module for module, names in _MODULES.items() for name in names}


def __getattr__(name: str) -> Any:
    """Import the module defining ``name`` on first use (PEP 562)."""
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
