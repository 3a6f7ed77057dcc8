"""The project's exception hierarchy.

Every error a user can cause (bad file, bad config, bad manifest, missing marker)
is raised as a subclass of :class:`BlinaprofileError`. The CLI prints ``str(err)``
as a single line and exits non-zero; batches record it as an error row.
"""

from __future__ import annotations

import os

__all__ = [
    "BlinaprofileError",
    "ConfigError",
    "FCSFormatError",
    "FeatureSchemaError",
    "GatingError",
    "InputError",
    "ManifestError",
    "ModelError",
    "OutputError",
    "PanelMismatchError",
    "SingleCellInputError",
    "one_line",
]


#: Longest message :func:`one_line` keeps (a cut message ends with ``...``).
MAX_MESSAGE_LENGTH = 2000


def one_line(text: str, *, limit: int = MAX_MESSAGE_LENGTH) -> str:
    """``text`` on one line (line breaks and tabs become spaces), cut to ``limit`` characters.

    Error messages are printed as a single line by the CLI and stored in one cell of a
    batch's error row, whatever a file's content or name contained.
    """
    flat = "".join(" " if ch in "\r\n\t\v\f\x85\u2028\u2029" else ch for ch in text)
    if len(flat) > limit:
        flat = flat[: limit - 3] + "..."
    return flat


class BlinaprofileError(Exception):
    """Base class of all errors raised by blinaprofile.

    Parameters
    ----------
    message
        What went wrong, in words a lab scientist can act on.
    path
        The file the problem is in, if any; it is prefixed to the message.
    """

    exit_code: int = 2

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None) -> None:
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        super().__init__(str(self))

    def __str__(self) -> str:
        text = f"{self.path}: {self.message}" if self.path else self.message
        return one_line(text)

    def __reduce__(self):  # keep errors picklable across Dask/multiprocessing workers
        return (_rebuild, (type(self), self.message, self.path))


def _rebuild(cls: type[BlinaprofileError], message: str, path: str | None) -> BlinaprofileError:
    return cls(message, path=path)


class ConfigError(BlinaprofileError):
    """A YAML configuration is invalid (the message names the key)."""


class InputError(BlinaprofileError):
    """An input file cannot be used."""


class FCSFormatError(InputError):
    """An FCS file is malformed (truncated, lying TEXT segment, bad values...)."""


class PanelMismatchError(InputError):
    """A sample lacks a marker the panel or gating strategy needs."""


class ManifestError(InputError):
    """A cohort manifest is malformed (missing files, duplicate IDs, unknown labels)."""


class SingleCellInputError(InputError):
    """A single-cell object lacks what the single-cell path needs."""


class OutputError(BlinaprofileError):
    """A result could not be written (disk full, permissions...); nothing was left half-written."""


class GatingError(BlinaprofileError):
    """A gating strategy cannot be built or applied."""


class ModelError(BlinaprofileError):
    """A model cannot be trained, loaded or applied."""


class FeatureSchemaError(ModelError):
    """A feature table does not match the feature schema a model expects."""
