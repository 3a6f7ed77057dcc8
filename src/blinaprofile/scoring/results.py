"""Batch result tables: error rows, the typed result frame and its files.

Shared by the per-sample batch (:mod:`blinaprofile.scoring.batch`) and the per-patient
batch of change-feature models (:mod:`blinaprofile.scoring.paired_batch`), so that both
write the same columns, types and files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blinaprofile.errors import one_line
from blinaprofile.io.atomic import atomic_path, write_csv

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["error_row", "result_frame", "write_results"]


def error_row(sample_id: str, message: str, **extra: Any) -> dict[str, Any]:
    """The result row of a sample that could not be scored.

    Every result column is present (``None`` but for the ones set here): ``call`` is
    ``"error"`` and ``error`` is ``message`` on one line. ``extra`` sets further columns
    (a paired batch's ``patient_id``...).
    """
    from blinaprofile.scoring.score import RESULT_COLUMNS

    row: dict[str, Any] = dict.fromkeys(RESULT_COLUMNS)
    row.update(
        sample_id=sample_id,
        call="error",
        call_reason="",
        qc_pass=None,
        reasons="",
        error=one_line(message),
    )
    row.update(extra)
    return row


def result_frame(
    rows: list[dict[str, Any]],
    *,
    extra_columns: Sequence[str] = (),
    extra_text_columns: Sequence[str] = (),
) -> pd.DataFrame:
    """The result table of ``rows``: the result columns, then ``extra_columns``, typed.

    ``qc_pass`` is a nullable boolean, the text columns (and ``extra_text_columns``)
    strings, every other column float; ``error`` and ``warnings`` are ``""`` when empty.
    """
    import pandas as pd

    from blinaprofile.scoring.score import RESULT_COLUMNS, TEXT_RESULT_COLUMNS

    text = {*TEXT_RESULT_COLUMNS, *extra_text_columns}
    df = pd.DataFrame(rows, columns=[*RESULT_COLUMNS, *extra_columns])
    for c in df.columns:
        if c == "qc_pass":
            df[c] = df[c].astype("boolean")
        elif c in text:
            df[c] = df[c].astype("string")
        else:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    df["error"] = df["error"].fillna("")
    df["warnings"] = df["warnings"].fillna("")  # error rows, and parts from older versions
    return df


def write_results(df: pd.DataFrame, out: Path) -> None:
    """``out/results.parquet`` and ``out/results.csv``, each written atomically."""
    with atomic_path(out / "results.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    write_csv(df, out / "results.csv")
