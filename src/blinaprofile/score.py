"""Scoring one sample: features, QC, out-of-distribution check, probability and call.

The call is ``"no call"`` (with reasons) when the sample fails QC or any model feature
lies outside the training cohort (robust z beyond ``qc.ood_max_z``); a confident label
is never given for such a sample.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import QCConfig
from .errors import BlinaprofileError

__all__ = ["ScoreResult", "file_checksum", "score_features", "score_sample"]

NO_CALL = "no call"


def file_checksum(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file (of every file, sorted, for a folder)."""
    h = hashlib.sha256()
    p = Path(path)
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class ScoreResult:
    """The outcome of scoring one sample."""

    sample_id: str
    modality: str
    probability: float | None
    call: str
    threshold: float | None
    qc_pass: bool
    reasons: list[str]
    features: dict[str, float]
    top_features: list[dict[str, float | str]] = field(default_factory=list)
    ood_z: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return _jsonable(d)

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [f"sample        {self.sample_id} ({self.modality})"]
        lines.append(f"QC            {'PASS' if self.qc_pass else 'FAIL'}")
        if self.probability is not None:
            lines.append(
                f"probability   {self.probability:.3f} responder (threshold {self.threshold:.3f})"
            )
        lines.append(f"call          {self.call}")
        for r in self.reasons:
            lines.append(f"  reason: {r}")
        if self.top_features:
            lines.append("key features  (value, contribution to log-odds)")
            for t in self.top_features:
                lines.append(
                    f"  {t['feature']:<20} {float(t['value']):8.2f}  {float(t['contribution']):+.3f}"
                )
        if self.model:
            lines.append(f"model         {self.model.get('uri')} ({self.model.get('family')})")
        return "\n".join(lines)


def _jsonable(o: Any) -> Any:
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


_MODEL_CACHE: dict[str, Any] = {}


def _get_model(uri: str | None) -> tuple[Any, Any, str]:
    from .model import load_model
    from .settings import settings

    key = str(uri or settings.default_model)
    if key not in _MODEL_CACHE:
        _MODEL_CACHE[key] = load_model(key)
    pyfunc, runtime = _MODEL_CACHE[key]
    return pyfunc, runtime, key


def score_features(
    row: dict[str, Any],
    *,
    model: str | None = None,
    qc: QCConfig | None = None,
    threshold: float | None = None,
    n_top: int = 5,
) -> ScoreResult:
    """Score one feature row (from either modality)."""
    import pandas as pd

    from .featurize import load_qc

    qc = qc or load_qc()
    pyfunc, runtime, uri = _get_model(model)
    reasons: list[str] = [r for r in str(row.get("qc_reasons") or "").split("; ") if r]
    qc_pass = bool(row.get("qc_pass", True)) and not reasons
    table = pd.DataFrame([row])
    feats = runtime.features
    missing = [f for f in feats if f not in table.columns or pd.isna(table[f].iloc[0])]
    prob: float | None = None
    contrib: dict[str, float] = {}
    ood: dict[str, float] = {}
    if missing:
        reasons.append(
            f"feature(s) {missing} unavailable for this {row.get('modality', 'sample')} sample"
        )
    else:
        out = pyfunc.predict(table[feats].astype(float), params={"threshold": threshold or runtime.threshold})
        prob = float(out["probability"].iloc[0])
        contrib = {f: float(out[f"contrib_{f}"].iloc[0]) for f in feats}
        z = runtime.ood_scores(table).iloc[0]
        ood = {f: float(z[f]) for f in feats}
        far = {f: v for f, v in ood.items() if abs(v) > qc.ood_max_z}
        if far:
            desc = ", ".join(f"{f} (z={v:+.1f})" for f, v in sorted(far.items(), key=lambda kv: -abs(kv[1])))
            reasons.append(f"outside the training cohort (|z| > {qc.ood_max_z}): {desc}")
    t = runtime.threshold if threshold is None else float(threshold)
    if prob is None or reasons:
        call = NO_CALL
    else:
        call = "responder" if prob >= t else "nonresponder"
    top = sorted(contrib.items(), key=lambda kv: -abs(kv[1]))[:n_top]
    features = {k: float(row[k]) for k in row if isinstance(row.get(k), int | float | np.number) and not isinstance(row.get(k), bool)}
    return ScoreResult(
        sample_id=str(row.get("sample_id", "")),
        modality=str(row.get("modality", "flow")),
        probability=prob,
        call=call,
        threshold=t,
        qc_pass=qc_pass,
        reasons=reasons,
        features=features,
        top_features=[{"feature": f, "value": float(row[f]), "contribution": c} for f, c in top],
        ood_z=ood,
        model={
            "uri": uri,
            "family": runtime.meta.get("family"),
            "schema_version": runtime.meta.get("schema_version"),
            "trained_on": runtime.meta.get("trained_on"),
            "threshold_rule": runtime.meta.get("threshold_rule"),
        },
    )


def score_sample(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    strategy: str | os.PathLike[str] | None = None,
    adaptive: bool = False,
    qc: QCConfig | None = None,
    sample_id: str | None = None,
    threshold: float | None = None,
) -> ScoreResult:
    """Read, gate/annotate, featurize and score one sample (FCS or single-cell).

    Raises
    ------
    BlinaprofileError
        For unreadable input, panel mismatch, bad config or model problems. QC failures do
        not raise: they give ``call == "no call"`` with reasons.
    """
    from .featurize import featurize_fcs, load_qc
    from .gate import load_strategy
    from .read import ensure_file, modality_of

    p = ensure_file(path)
    qc = qc or load_qc()
    info: dict[str, Any] = {"file": p.name, "sha256": file_checksum(p)}
    if modality_of(p) == "flow":
        tree = load_strategy(strategy)
        sf = featurize_fcs(p, strategy=tree, adaptive=adaptive, sample_id=sample_id, qc=qc, keep_gating=True)
        row = sf.row
        info["gating_strategy"] = tree.name
        if sf.tree is not None:
            info["channel_map"] = sf.tree.channel_map()
    else:
        from .singlecell import featurize_single_cell

        table = featurize_single_cell(p)
        if len(table) != 1:
            raise BlinaprofileError(
                f"the object holds {len(table)} samples; use 'score-batch' or --sample-key",
                path=p,
            )
        row = table.iloc[0].to_dict()
        if sample_id:
            row["sample_id"] = sample_id
    res = score_features(row, model=model, qc=qc, threshold=threshold)
    res.input = info
    return res
