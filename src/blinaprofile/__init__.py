"""blinaprofile: immune-profiling responder classifier for blinatumomab maintenance.

The package is laid out by pipeline stage, in the order data flows:

- :mod:`blinaprofile.io` - FCS and single-cell readers, manifests, privacy filter, atomic writes
- :mod:`blinaprofile.gating` - gate types, the gate-tree engine, per-sample placement, interop
- :mod:`blinaprofile.annotate` - single-cell protein and RNA calls
- :mod:`blinaprofile.features` - the versioned feature schema and the featurizers
- :mod:`blinaprofile.models` - pipelines, validation, metrics, packaging, training, compare
- :mod:`blinaprofile.scoring` - scoring one sample or a batch, the HTML report
- :mod:`blinaprofile.simulate` - the simulated cohorts (flow and single-cell)

``import blinaprofile`` is light: the public functions below are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blinaprofile.annotate.annotator import annotate
    from blinaprofile.features.flow import featurize_fcs, featurize_manifest
    from blinaprofile.features.singlecell import featurize_single_cell
    from blinaprofile.gating.sample import gate_sample
    from blinaprofile.gating.strategy import load_strategy
    from blinaprofile.io.read import read_flow, read_manifest
    from blinaprofile.io.singlecell import read_single_cell
    from blinaprofile.models.train import train
    from blinaprofile.scoring.batch import score_samples
    from blinaprofile.scoring.report import write_report
    from blinaprofile.scoring.score import score_sample
    from blinaprofile.simulate.flow import simulate_cohort

__all__ = [
    "__version__",
    "annotate",
    "featurize_fcs",
    "featurize_manifest",
    "featurize_single_cell",
    "gate_sample",
    "load_strategy",
    "read_flow",
    "read_manifest",
    "read_single_cell",
    "score_sample",
    "score_samples",
    "simulate_cohort",
    "train",
    "write_report",
]

_LAZY = {
    "annotate": "blinaprofile.annotate.annotator",
    "featurize_fcs": "blinaprofile.features.flow",
    "featurize_manifest": "blinaprofile.features.flow",
    "featurize_single_cell": "blinaprofile.features.singlecell",
    "gate_sample": "blinaprofile.gating.sample",
    "load_strategy": "blinaprofile.gating.strategy",
    "read_flow": "blinaprofile.io.read",
    "read_manifest": "blinaprofile.io.read",
    "read_single_cell": "blinaprofile.io.singlecell",
    "score_samples": "blinaprofile.scoring.batch",
    "score_sample": "blinaprofile.scoring.score",
    "simulate_cohort": "blinaprofile.simulate.flow",
    "train": "blinaprofile.models.train",
    "write_report": "blinaprofile.scoring.report",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("blinaprofile")
        except PackageNotFoundError:
            return "unknown"
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, "__version__"])
