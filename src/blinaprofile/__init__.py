"""blinaprofile: immune-profiling responder classifier for blinatumomab maintenance.

``import blinaprofile`` is light: the public functions below are imported on first use.

- :func:`score_samples` - score many samples (local processes or a Dask cluster).
- :func:`score_sample` - score one sample (FCS or single-cell).
- :func:`write_report` - the self-contained HTML report of a scored sample.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blinaprofile.scoring.batch import score_samples
    from blinaprofile.scoring.report import write_report
    from blinaprofile.scoring.score import score_sample

__all__ = ["__version__", "score_sample", "score_samples", "write_report"]

_LAZY = {
    "score_samples": ("batch", "score_samples"),
    "score_sample": ("score", "score_sample"),
    "write_report": ("report", "write_report"),
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

        module, attr = _LAZY[name]
        return getattr(import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, "__version__"])
