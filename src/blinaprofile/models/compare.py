"""Leaderboards of training runs from MLflow (``blinaprofile compare``).

Every :func:`blinaprofile.models.train.train` run logs one nested *candidate* run per model family
(tag ``blinaprofile.run_kind = candidate``) holding that family's cross-validated metrics,
their bootstrap 95% intervals and the permutation p-value. :func:`leaderboard` collects
those candidate runs through the MLflow API, from any tracking store (local SQLite, the
team server), into one table grouped by cohort (metrics from different cohorts are not
comparable), with the registry aliases each registered version holds now;
:func:`write_leaderboard` writes it as CSV (numbers), Markdown and HTML (formatted,
``AUC [95% CI]``).
"""

from __future__ import annotations

import html
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from blinaprofile.errors import BlinaprofileError
from blinaprofile.io.atomic import write_csv, write_text

__all__ = ["LEADERBOARD_COLUMNS", "format_leaderboard", "leaderboard", "write_leaderboard"]

_CI_METRICS = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "brier", "ece")

#: Columns of :func:`leaderboard` (numbers stay numbers; CSV keeps all of them).
LEADERBOARD_COLUMNS: tuple[str, ...] = (
    "experiment",
    "cohort",
    "training_run",
    "training_run_id",
    "candidate_run_id",
    "started",
    "family",
    "chosen",
    "n_samples",
    "n_patients",
    *[f"{m}{s}" for m in _CI_METRICS for s in ("", "_ci_low", "_ci_high")],
    "threshold",
    "perm_pvalue",
    "n_permutations",
    "selection_pvalue",
    "registered_model",
    "version",
    "aliases",
    "promotion",
    "trained_on",
    "schema_version",
    "git_commit",
)


class CompareError(BlinaprofileError):
    """The tracking store has nothing to compare (or cannot be read)."""


def _experiments(client: Any, names: list[str] | None) -> list[Any]:
    if not names:
        return list(client.search_experiments())
    out = []
    for n in names:
        exp = client.get_experiment_by_name(n)
        if exp is None:
            known = sorted(e.name for e in client.search_experiments())
            raise CompareError(f"no MLflow experiment named {n!r} (known: {known})")
        out.append(exp)
    return out


def leaderboard(
    experiment: str | list[str] | None = None,
    *,
    tracking_uri: str | None = None,
    max_runs: int = 1000,
    sort_by: str = "roc_auc",
    cohort: str | None = None,
) -> pd.DataFrame:
    """One row per (training run, model family) with metrics, 95% CIs and p-values.

    Parameters
    ----------
    experiment
        Experiment name(s); ``None`` means every experiment in the store.
    tracking_uri
        MLflow tracking URI (default :attr:`Settings.tracking_uri`).
    max_runs
        At most this many candidate runs (newest first) are read.
    sort_by
        Column to rank by (descending, except ``brier`` and ``ece``: ascending).
    cohort
        Only runs on this cohort (tag ``blinaprofile.cohort``; runs from before that tag
        existed are matched by their ``trained_on`` text).

    Returns
    -------
    DataFrame
        Columns :data:`LEADERBOARD_COLUMNS`, grouped by cohort, best first within each, with
        a 1-based ``rank`` index that restarts for every cohort. ``aliases`` are the registry
        aliases the row's registered version holds now.

    Raises
    ------
    CompareError
        Unknown experiment, or no candidate runs to compare.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from blinaprofile.settings import settings

    uri = tracking_uri or settings.tracking_uri
    client = mlflow.tracking.MlflowClient(uri)
    names = [experiment] if isinstance(experiment, str) else experiment
    try:
        exps = _experiments(client, names)
        if not exps:
            raise CompareError(f"the tracking store {uri} has no experiments")
        by_id = {e.experiment_id: e.name for e in exps}
        runs = client.search_runs(
            experiment_ids=list(by_id),
            filter_string="tags.`blinaprofile.run_kind` = 'candidate'",
            max_results=max_runs,
            order_by=["attributes.start_time DESC"],
        )
    except MlflowException as err:
        raise CompareError(f"cannot read the tracking store {uri}: {err.message}") from None
    if not runs:
        where = f"experiment(s) {sorted(by_id.values())}" if names else f"store {uri}"
        raise CompareError(
            f"no training runs to compare in {where} (train with 'blinaprofile train')"
        )
    parents: dict[str, Any] = {}
    aliases: dict[str, dict[str, list[str]]] = {}
    rows = []
    for r in runs:
        tags, m, p = r.data.tags, r.data.metrics, r.data.params
        pid = tags.get("mlflow.parentRunId", "")
        if pid and pid not in parents:
            try:
                parents[pid] = client.get_run(pid)
            except MlflowException:
                parents[pid] = None
        parent = parents.get(pid)
        ptags = parent.data.tags if parent is not None else {}
        pmetrics = parent.data.metrics if parent is not None else {}
        chosen = tags.get("chosen") == "true"
        row: dict[str, Any] = {
            "experiment": by_id.get(r.info.experiment_id, r.info.experiment_id),
            "training_run": parent.info.run_name if parent is not None else "",
            "training_run_id": pid,
            "candidate_run_id": r.info.run_id,
            "started": datetime.fromtimestamp(r.info.start_time / 1000, tz=UTC).strftime(
                "%Y-%m-%d %H:%M:%S"
            ),
            "family": tags.get("family", p.get("family", "")),
            "chosen": chosen,
            "n_samples": _int(p.get("n_samples")),
            "n_patients": _int(p.get("n_patients")),
        }
        for name in LEADERBOARD_COLUMNS:
            if name in row:
                continue
            if name in m:
                row[name] = float(m[name])
        row["selection_pvalue"] = float(pmetrics.get("selection_pvalue", np.nan))
        row["registered_model"] = name = ptags.get("registered_model", "")
        row["version"] = version = ptags.get("registered_version", "") if chosen else ""
        if name and name not in aliases:
            aliases[name] = _aliases_by_version(client, name)
        row["aliases"] = " ".join(f"@{a}" for a in aliases.get(name, {}).get(version, []))
        row["promotion"] = ptags.get("blinaprofile.promotion", "") if chosen else ""
        row["trained_on"] = tags.get("trained_on", ptags.get("trained_on", ""))
        row["cohort"] = tags.get("blinaprofile.cohort", ptags.get("blinaprofile.cohort", ""))
        row["cohort"] = row["cohort"] or row["trained_on"] or "unnamed"
        row["schema_version"] = tags.get("schema_version", "")
        row["git_commit"] = ptags.get("git_commit", "")
        rows.append(row)
    df = pd.DataFrame(rows).reindex(columns=list(LEADERBOARD_COLUMNS))
    if sort_by not in df.columns:
        raise CompareError(f"cannot sort by {sort_by!r}; choose one of {list(df.columns)}")
    if cohort is not None:
        df = df[df["cohort"] == cohort]
        if df.empty:
            known = sorted(set(r["cohort"] for r in rows))
            raise CompareError(f"no training runs on cohort {cohort!r} (cohorts: {known})")
    df = df.sort_values(
        ["cohort", sort_by, "started"],
        ascending=[True, sort_by in ("brier", "ece"), False],
        na_position="last",
    ).reset_index(drop=True)
    df.index = pd.Index(df.groupby("cohort").cumcount().to_numpy() + 1, name="rank")
    return df


def _aliases_by_version(client: Any, name: str) -> dict[str, list[str]]:
    """``{version: [alias, ...]}`` of a registered model now (empty if it is gone)."""
    from mlflow.exceptions import MlflowException

    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        return {}
    out: dict[str, list[str]] = {}
    for alias, version in sorted((rm.aliases or {}).items()):
        out.setdefault(str(version), []).append(str(alias))
    return out


def _int(v: Any) -> float:
    try:
        return int(v)
    except (TypeError, ValueError):
        return np.nan


def _num(v: Any, digits: int = 3) -> str:
    return "" if v is None or not np.isfinite(v) else f"{v:.{digits}f}"


def _ci(row: pd.Series, m: str, digits: int = 2) -> str:
    v, lo, hi = row.get(m), row.get(f"{m}_ci_low"), row.get(f"{m}_ci_high")
    if v is None or not np.isfinite(v):
        return ""
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{v:.{digits}f}"
    return f"{v:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _pval(row: pd.Series, col: str) -> str:
    p = row.get(col)
    n = row.get("n_permutations")
    if p is None or not np.isfinite(p):
        return "n/a"
    floor = 1.0 / (1.0 + n) if n is not None and np.isfinite(n) and n > 0 else 0.0
    return f"<={p:.3f}" if abs(p - floor) < 1e-12 else f"{p:.3f}"


def format_leaderboard(df: pd.DataFrame) -> pd.DataFrame:
    """Human-readable leaderboard: ``metric [95% CI]`` strings and p-values."""
    out = pd.DataFrame(index=df.index)
    out["cohort"] = df["cohort"]
    out["family"] = df["family"]
    out["training run"] = df["training_run"]
    out["experiment"] = df["experiment"]
    out["started (UTC)"] = df["started"]
    out["n"] = df["n_samples"].map(lambda v: "" if pd.isna(v) else str(int(v)))
    out["ROC AUC [95% CI]"] = df.apply(_ci, axis=1, m="roc_auc")
    out["bal. accuracy [95% CI]"] = df.apply(_ci, axis=1, m="balanced_accuracy")
    out["sensitivity"] = df.apply(_ci, axis=1, m="sensitivity")
    out["specificity"] = df.apply(_ci, axis=1, m="specificity")
    out["Brier [95% CI]"] = df.apply(_ci, axis=1, m="brier", digits=3)
    out["ECE"] = df["ece"].map(lambda v: _num(v, 3))
    out["perm. p"] = df.apply(_pval, axis=1, col="perm_pvalue")
    out["registered"] = [
        (f"{m} v{v} {a}".strip() if v else "chosen, not registered") if c else ""
        for m, v, a, c in zip(
            df["registered_model"],
            df["version"].fillna(""),
            df["aliases"].fillna(""),
            df["chosen"],
            strict=True,
        )
    ]
    return out


def _markdown(df: pd.DataFrame) -> str:
    cols = ["rank", *df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for idx, row in df.iterrows():
        cells = [str(idx), *(str(v).replace("|", "\\|") for v in row.to_numpy())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_NOTE = (
    "Metrics are out-of-fold from nested, repeated, patient-grouped, stratified "
    "cross-validation; intervals are patient-bootstrap 95% percentile intervals; "
    "'perm. p' is the label-permutation p-value (n/a when the run had no permutations; "
    "'<=' marks the smallest p-value its number of permutations can give). The chosen "
    "family's AUC is optimistic by the choice among families: see the run's "
    "selection_pvalue."
)


def write_leaderboard(
    df: pd.DataFrame, out_dir: str | os.PathLike[str], *, stem: str = "leaderboard"
) -> dict[str, Path]:
    """Write ``<stem>.csv`` (raw numbers), ``<stem>.md`` and ``<stem>.html`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pretty = format_leaderboard(df)
    paths = {"csv": out / f"{stem}.csv", "md": out / f"{stem}.md", "html": out / f"{stem}.html"}
    write_csv(df, paths["csv"], index=True)
    write_text(paths["md"], f"# blinaprofile leaderboard\n\n{_markdown(pretty)}\n{_NOTE}\n")
    table = pretty.to_html(index=True, escape=True, border=0, classes="leaderboard")
    page = (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>blinaprofile leaderboard"
        "</title><style>body{font-family:sans-serif;margin:1.5em}"
        "table{border-collapse:collapse;font-size:0.9em}"
        "th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}"
        "th{background:#f4f4f4}</style></head><body>\n"
        "<h1>blinaprofile leaderboard</h1>\n"
        f"{table}\n<p>{html.escape(_NOTE)}</p>\n</body></html>\n"
    )
    write_text(paths["html"], page)
    return paths
