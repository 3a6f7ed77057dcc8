"""The base of every config model and the constrained types several configs share."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ChannelName", "FileSafeName", "Fraction", "MarkerName", "Positive", "StrictModel"]

Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Positive = Annotated[float, Field(gt=0.0)]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys and non-finite numbers are errors."""

    # NaN/inf are refused in every float field: no threshold or rate can be infinite.
    # Schemas are built on first use (defer_build) so that the CLI starts quickly.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, defer_build=True)


# A name written into FCS TEXT ($PnN) and $SPILLOVER: printable, no comma, no surrounding
# blanks, not starting with the FCS delimiter.
ChannelName = Annotated[
    str,
    Field(
        min_length=1,
        max_length=256,
        pattern=r"^[^\s|,\x00-\x1f\x7f](?:[^,\x00-\x1f\x7f]*[^\s,\x00-\x1f\x7f])?$",
    ),
]
MarkerName = Annotated[
    str,
    Field(
        max_length=256,
        pattern=r"^(?:[^\s|\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f])?)?$",
    ),
]
# A name that becomes part of file names (sample IDs, timepoints).
FileSafeName = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
]
