"""The QC and abstention thresholds model (``configs/qc.yaml``)."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from blinaprofile.config.base import StrictModel

__all__ = ["QCConfig"]


class QCConfig(StrictModel):
    """QC and abstention thresholds (``configs/qc.yaml``).

    A sample below any count is a "no call". When a strategy has no ``live`` or ``cd3``
    gate for the sample (a pre-gated export), ``min_live``/``min_cd3`` apply to the events
    its first present gate starts from, and the QC text says so; without a ``live`` gate
    ``min_events`` is not checked (the file's events are the live cells).
    """

    min_events: Annotated[int, Field(ge=0)] = Field(
        default=5_000, description="events read from the file"
    )
    min_live: Annotated[int, Field(ge=0)] = Field(
        default=1_000, description="events in the `live` gate (live single cells)"
    )
    min_cd3: Annotated[int, Field(ge=0)] = Field(default=300, description="CD3+ T cells")
    min_cd8: Annotated[int, Field(ge=0)] = Field(
        default=100, description="CD8+ T cells (denominator of the key features)"
    )
    min_cd4: Annotated[int, Field(ge=0)] = Field(default=100, description="CD4+ T cells")
    ood_max_z: Annotated[float, Field(gt=0.0)] = Field(
        default=4.0,
        description="max |robust z| of a model feature against the training cohort",
    )
