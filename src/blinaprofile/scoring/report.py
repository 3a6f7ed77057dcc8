"""A self-contained HTML report of one scored sample, for lab scientists.

One file that opens offline: CSS is inline, figures are base64 PNGs, nothing refers to an
external URL. It shows the call (or "no call" and why), the responder probability with
its interval and the decision threshold, the QC verdict against the configured thresholds,
the out-of-distribution check, the features that contributed most, the sample placed
against the training cohort (responders vs nonresponders), every gate of the gating
strategy drawn on the sample's events, and the provenance (model name, version, alias;
input checksum; panel; gating strategy).

Like the result it renders, the report never contains the input file's name or FCS TEXT
keywords.
"""

from __future__ import annotations

import base64
import html
import io
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure

    from blinaprofile.scoring.score import ScoreResult

__all__ = ["gating_figure", "render_report", "training_figure", "write_report"]

_RESPONDER = "#1b7837"
_NONRESPONDER = "#b2182b"
_NOCALL = "#6b6b6b"
#: most events drawn per gate panel (a deterministic subsample of the parent)
MAX_PLOT_EVENTS = 20_000


# --------------------------------------------------------------------------- figures
def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def training_figure(result: ScoreResult, training: pd.DataFrame, features: list[str]) -> Figure:
    """The sample's value of each model feature against the training cohort by class."""
    n = len(features)
    ncol = 5
    nrow = int(np.ceil(n / ncol))
    fig = _new_figure(2.4 * ncol, 2.1 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    rng = np.random.default_rng(0)
    y = training["response"].astype(int).to_numpy() if "response" in training else None
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.set_visible(False)
            continue
        f = features[k]
        vals = training[f].astype(float).to_numpy()
        groups = [(1, "R", _RESPONDER), (0, "NR", _NONRESPONDER)] if y is not None else []
        for pos, (cls, _lab, color) in enumerate(groups):
            v = vals[(y == cls) & np.isfinite(vals)]
            ax.boxplot(
                [v],
                positions=[pos],
                widths=0.5,
                showfliers=False,
                medianprops={"color": color},
                boxprops={"color": color},
                whiskerprops={"color": color},
                capprops={"color": color},
            )
            ax.scatter(pos + rng.uniform(-0.18, 0.18, v.size), v, s=6, color=color, alpha=0.55)
        sv = result.features.get(f)
        if sv is not None and np.isfinite(sv):
            ax.axhline(sv, color="#2166ac", lw=2)
        ax.set_xticks([0, 1], ["R", "NR"])
        z = result.ood_z.get(f)
        ztxt = f" (z={z:+.1f})" if z is not None and np.isfinite(z) else ""
        ax.set_title(f"{f}{ztxt}", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(
        "This sample (blue line) vs the training cohort: R responders, NR nonresponders",
        fontsize=9,
    )
    return fig


def _own_gating_figure(data: Any, tree: Any, gres: Any) -> Figure:
    """Density plot of each gate's parent events with the gate drawn (fallback renderer)."""
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Polygon, Rectangle

    from blinaprofile.gating.events import EventCache

    ev = EventCache(tree, data.events, list(data.channels), data.spillover, data.path)
    gates = list(tree.gates)
    ncol = 4
    nrow = int(np.ceil(len(gates) / ncol))
    fig = _new_figure(3.0 * ncol, 2.7 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False)
    pct = gres.parent_percent(tree)
    rng = np.random.default_rng(0)
    for k, ax in enumerate(axes.ravel()):
        if k >= len(gates):
            ax.set_visible(False)
            continue
        g = gates[k]
        parent = gres.masks[g.parent] if g.parent else np.ones(gres.n_events, dtype=bool)
        idx = np.flatnonzero(parent)
        if idx.size > MAX_PLOT_EVENTS:
            idx = np.sort(rng.choice(idx, MAX_PLOT_EVENTS, replace=False))
        dims = g.dims
        thresholds = gres.thresholds
        title = f"{g.label or g.id}\n{gres.counts[g.id]:,} events, {pct[g.id]:.1f}% of {g.parent or 'all'}"
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
        if idx.size == 0:
            ax.text(0.5, 0.5, "no parent events", ha="center", va="center", transform=ax.transAxes)
            continue
        x = ev.transformed(dims[0], idx)
        if len(dims) == 1:
            ax.hist(x, bins=120, color="#888888")
            lo = thresholds.get(f"{g.id}:{dims[0].name}:min", dims[0].min)
            hi = thresholds.get(f"{g.id}:{dims[0].name}:max", dims[0].max)
            for b in (lo, hi):
                if b is not None:
                    ax.axvline(b, color="#d6604d", lw=1.5)
            ax.set_xlabel(f"{dims[0].name} ({dims[0].channel})", fontsize=7)
            continue
        yv = ev.transformed(dims[1], idx)
        ok = np.isfinite(x) & np.isfinite(yv)
        xlim = np.quantile(x[ok], [0.001, 0.999])
        ylim = np.quantile(yv[ok], [0.001, 0.999])
        ax.hist2d(
            x[ok],
            yv[ok],
            bins=110,
            cmap="viridis",
            norm=LogNorm(),
            range=[[xlim[0] - 0.05, xlim[1] + 0.05], [ylim[0] - 0.05, ylim[1] + 0.05]],
        )
        if g.kind == "polygon":
            ax.add_patch(Polygon(np.asarray(g.vertices), fill=False, ec="#d6604d", lw=1.5))
        else:
            (x0, x1), (y0, y1) = (
                (
                    thresholds.get(f"{g.id}:{d.name}:min", d.min),
                    thresholds.get(f"{g.id}:{d.name}:max", d.max),
                )
                for d in dims[:2]
            )
            ax.set_autoscale_on(False)
            xa, xb = ax.get_xlim()
            ya, yb = ax.get_ylim()
            x0 = xa if x0 is None else x0
            x1 = xb if x1 is None else x1
            y0 = ya if y0 is None else y0
            y1 = yb if y1 is None else y1
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="#d6604d", lw=1.5))
        ax.set_xlabel(f"{dims[0].name} ({dims[0].channel})", fontsize=7)
        ax.set_ylabel(f"{dims[1].name} ({dims[1].channel})", fontsize=7)
    fig.suptitle(f"Gating strategy '{tree.name}' on this sample (gates in red)", fontsize=9)
    return fig


def gating_figure(path: str | os.PathLike[str], tree: Any, gres: Any) -> Figure:
    """Every gate of ``tree`` drawn on the sample's events (count and % of parent).

    Uses :func:`blinaprofile.gating.plot.gating_figure` (titled with the strategy, never the file
    name); falls back to a simpler density plot per gate if that module is unavailable.
    """
    from blinaprofile.io.read import read_flow

    data = read_flow(path)
    try:
        from blinaprofile.gating.events import fcs_scaling
        from blinaprofile.gating.plot import gating_figure as plot_gates
    except ImportError:
        return _own_gating_figure(data, tree, gres)
    return plot_gates(
        tree,
        gres,
        data.events,
        data.channels,
        markers=data.markers,
        spillover=data.spillover,
        scaling=fcs_scaling(data),
        title=f"Gating strategy '{tree.name}' on this sample",
    )


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Arial,sans-serif;margin:0;
background:#f4f5f7;color:#1d1f21;font-size:14px}
main{max-width:1140px;margin:0 auto;padding:18px 24px 40px}
h1{font-size:22px;margin:4px 0}
h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d0d4da;padding-bottom:4px}
.muted{color:#5b6168;font-size:12px}
.card{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);padding:14px 18px;
margin:12px 0}
.verdict{display:flex;gap:24px;align-items:center;flex-wrap:wrap}
.badge{font-size:26px;font-weight:700;color:#fff;border-radius:8px;padding:10px 22px;
text-transform:uppercase;letter-spacing:.5px}
.kv{border-collapse:collapse}
.kv td{padding:3px 12px 3px 0;vertical-align:top}
.kv td:first-child{color:#5b6168;white-space:nowrap}
table.data{border-collapse:collapse;width:100%;font-size:13px}
table.data th,table.data td{border-bottom:1px solid #e3e6ea;padding:4px 8px;text-align:left}
table.data th{background:#eef0f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1b7837;font-weight:600}.fail{color:#b2182b;font-weight:600}
.reasons{background:#fdf0ef;border-left:4px solid #b2182b;padding:8px 12px;margin:10px 0}
.gauge{position:relative;height:34px;background:linear-gradient(90deg,#f7d9d6,#eaf3e6);
border-radius:4px;margin:26px 0 22px}
.gauge .iv{position:absolute;top:9px;height:16px;background:rgba(33,102,172,.35);border-radius:3px}
.gauge .pt{position:absolute;top:3px;width:4px;height:28px;background:#2166ac;margin-left:-2px}
.gauge .thr{position:absolute;top:-8px;height:50px;border-left:2px dashed #333}
.gauge .lab{position:absolute;font-size:11px;white-space:nowrap}
.bar{display:inline-block;height:10px;border-radius:2px}
img{max-width:100%;height:auto;background:#fff}
code{font-size:12px;word-break:break-all}
"""


def _e(x: Any) -> str:
    return html.escape("" if x is None else str(x))


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return "-" if not np.isfinite(x) else f"{x:.{nd}f}"
    return _e(x)


def _badge_color(call: str) -> str:
    return {"responder": _RESPONDER, "nonresponder": _NONRESPONDER}.get(call, _NOCALL)


def _gauge(result: ScoreResult) -> str:
    if result.probability is None:
        return '<p class="muted">No probability: the sample could not be scored.</p>'
    p = 100 * result.probability
    parts = ['<div class="gauge" id="probability-gauge">']
    if result.probability_low is not None and result.probability_high is not None:
        lo, hi = 100 * result.probability_low, 100 * result.probability_high
        parts.append(
            f'<div class="iv" style="left:{lo:.2f}%;width:{max(hi - lo, 0.4):.2f}%"></div>'
        )
    parts.append(f'<div class="pt" style="left:{p:.2f}%"></div>')
    if result.threshold is not None:
        t = 100 * result.threshold
        parts.append(f'<div class="thr" style="left:{t:.2f}%"></div>')
        parts.append(
            f'<div class="lab" style="left:{t:.2f}%;top:-24px">threshold {result.threshold:.2f}</div>'
        )
    parts.append('<div class="lab" style="left:0;top:38px">0 (nonresponder)</div>')
    parts.append('<div class="lab" style="right:0;top:38px">1 (responder)</div>')
    parts.append("</div>")
    return "".join(parts)


def _kv(rows: list[tuple[str, Any]], table_id: str = "") -> str:
    idattr = f' id="{table_id}"' if table_id else ""
    body = "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"{idattr}>{body}</table>'


def render_report(
    result: ScoreResult,
    *,
    training_png: str | None = None,
    gating_png: str | None = None,
    notes: list[str] | None = None,
) -> str:
    """The report's HTML (one string) for a scored sample and optional base64 PNG figures."""
    from blinaprofile import __version__ as bp_version

    r = result
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    call_color = _badge_color(r.call)
    prob = "-" if r.probability is None else f"{r.probability:.3f}"
    interval = "-"
    if r.probability_low is not None and r.probability_high is not None:
        interval = f"{r.probability_low:.3f} - {r.probability_high:.3f}"
    straddles = (
        r.probability_low is not None
        and r.probability_high is not None
        and r.threshold is not None
        and r.probability_low < r.threshold <= r.probability_high
    )
    out: list[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>blinaprofile report - {_e(r.sample_id)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        '<p class="muted">blinaprofile responder report - research use only; not a diagnostic '
        "device. Interpret with the clinical context.</p>",
        f'<h1>Sample <span id="sample-id">{_e(r.sample_id)}</span></h1>',
        f'<p class="muted">{_e(r.modality)} sample, scored {now} with blinaprofile {_e(bp_version)}</p>',
        '<section class="card verdict" id="verdict">',
        f'<div class="badge" id="call" style="background:{call_color}">{_e(r.call)}</div>',
        _kv(
            [
                ("responder probability", f'<b id="probability">{prob}</b>'),
                (
                    f"{int(100 * float(r.interval.get('level', 0.95)))}% interval",
                    f'<span id="probability-interval">{interval}</span>',
                ),
                ("decision threshold", f'<span id="threshold">{_fmt(r.threshold)}</span>'),
                (
                    "QC verdict",
                    f'<span id="qc-verdict" class="{"pass" if r.qc_pass else "fail"}">'
                    f"{'PASS' if r.qc_pass else 'FAIL'}</span>",
                ),
            ]
        ),
        "</section>",
    ]
    if r.reasons:
        items = "".join(f"<li>{_e(x)}</li>" for x in r.reasons)
        out.append(
            '<div class="reasons" id="no-call-reasons"><b>No call - reasons:</b>'
            f"<ul>{items}</ul>A label is never given for a sample that fails QC or lies "
            "outside the training cohort.</div>"
        )
    out.append("<h2>Responder probability</h2>")
    out.append(_gauge(r))
    desc = r.interval.get("description") or r.interval.get("note") or ""
    extra = (
        " <b>The interval crosses the decision threshold: the call is uncertain.</b>"
        if straddles
        else ""
    )
    out.append(f'<p class="muted" id="interval-method">Interval: {_e(desc)}.{extra}</p>')

    # QC
    out.append('<h2 id="qc">Quality control and abstention</h2><section class="card">')
    counts = r.qc.get("counts") or []
    if counts:
        rows = "".join(
            f"<tr><td>{_e(c['what'])}</td><td class='num'>{_fmt(c['value'])}</td>"
            + (
                "<td class='num'>-</td><td>single-cell QC</td></tr>"
                if c["pass"] is None
                else f"<td class='num'>&ge; {_e(c['minimum'])}</td>"
                f"<td class='{'pass' if c['pass'] else 'fail'}'>{'pass' if c['pass'] else 'FAIL'}</td></tr>"
            )
            for c in counts
        )
        out.append(
            '<table class="data" id="qc-table"><tr><th>check</th><th>value</th><th>threshold</th>'
            f"<th>result</th></tr>{rows}</table>"
        )
    flags = r.gating.get("flags") or []
    out.append("<p>Gate placement flags: " + (_e("; ".join(flags)) if flags else "none") + "</p>")
    z = {k: v for k, v in r.ood_z.items() if v is not None and np.isfinite(v)}
    ood_lim = r.qc.get("ood_max_z")
    if z:
        worst = max(z, key=lambda k: abs(z[k]))
        verdict = "pass" if abs(z[worst]) <= float(ood_lim or np.inf) else "FAIL"
        out.append(
            f'<p id="ood">Out-of-distribution check: largest |robust z| against the training '
            f"cohort is <b>{abs(z[worst]):.2f}</b> ({_e(worst)}); limit {_e(ood_lim)} - "
            f'<span class="{"pass" if verdict == "pass" else "fail"}">{verdict}</span>.</p>'
        )
    thr = r.qc.get("thresholds") or {}
    if thr:
        out.append(
            '<p class="muted" id="qc-thresholds">Thresholds in force: '
            + ", ".join(f"{_e(k)} = {_e(v)}" for k, v in thr.items())
            + "</p>"
        )
    out.append("</section>")

    # contributions
    out.append('<h2>Features that contributed most</h2><section class="card">')
    if r.top_features:
        mx = max(abs(float(t["contribution"])) for t in r.top_features) or 1.0
        rows = ""
        for t in r.top_features:
            c = float(t["contribution"])
            color = _RESPONDER if c > 0 else _NONRESPONDER
            width = 120 * abs(c) / mx
            direction = "towards responder" if c > 0 else "towards nonresponder"
            rows += (
                f"<tr><td>{_e(t['feature'])}</td><td class='num'>{float(t['value']):.2f}</td>"
                f"<td class='num'>{c:+.3f}</td><td><span class='bar' style='width:{width:.0f}px;"
                f"background:{color}'></span> {direction}</td></tr>"
            )
        out.append(
            '<table class="data" id="top-features"><tr><th>feature</th><th>value</th>'
            f"<th>log-odds contribution</th><th></th></tr>{rows}</table>"
        )
    else:
        out.append('<p id="top-features">No contributions: the sample was not scored.</p>')
    out.append("</section>")

    out.append(
        '<h2>This sample against the training cohort</h2><section class="card" id="training-comparison">'
    )
    if training_png:
        out.append(
            f'<img alt="features vs training cohort" src="data:image/png;base64,{training_png}">'
        )
    else:
        out.append("<p>The model carries no training table; no comparison shown.</p>")
    out.append("</section>")

    out.append('<h2>Gating</h2><section class="card" id="gating">')
    if gating_png:
        out.append(
            f'<img id="gating-plots" alt="gating plots" src="data:image/png;base64,{gating_png}">'
        )
    elif r.modality == "flow":
        out.append("<p>Gating plots not available for this sample.</p>")
    else:
        out.append("<p>Single-cell sample: cells were annotated, not gated.</p>")
    if r.gating.get("counts"):
        pct = r.gating.get("percent_of_parent", {})
        parents = r.gating.get("parents", {})
        rows = "".join(
            f"<tr><td>{_e(g)}</td><td>{_e(parents.get(g, ''))}</td><td class='num'>{int(n):,}</td>"
            f"<td class='num'>{_fmt(pct.get(g), 1)}</td></tr>"
            for g, n in r.gating["counts"].items()
        )
        out.append(
            '<table class="data" id="gate-counts"><tr><th>gate</th><th>parent</th><th>count</th>'
            f"<th>% of parent</th></tr>{rows}</table>"
        )
    out.append("</section>")

    # provenance
    m = r.model
    inp = r.input
    cmap = inp.get("channel_map") or {}
    out.append('<h2>Provenance</h2><section class="card" id="provenance">')
    out.append(
        _kv(
            [
                ("model name", f'<span id="model-name">{_e(m.get("name"))}</span>'),
                ("model version", f'<span id="model-version">{_e(m.get("version"))}</span>'),
                ("model alias", f'<span id="model-alias">{_e(m.get("alias") or "none")}</span>'),
                ("model URI", f"<code>{_e(m.get('uri'))}</code>"),
                ("model family", _e(m.get("family"))),
                ("feature schema", _e(m.get("schema_version"))),
                ("trained on", _e(m.get("trained_on"))),
                ("threshold rule", _e(m.get("threshold_rule"))),
                ("input SHA-256", f'<code id="checksum">{_e(inp.get("sha256"))}</code>'),
                ("sample ID source", _e(inp.get("sample_id_source"))),
                ("panel", f'<span id="panel">{_e(inp.get("panel") or "-")}</span>'),
                (
                    "gating strategy",
                    f'<span id="gating-strategy">{_e(inp.get("gating_strategy") or "-")}'
                    f"{' v' + _e(inp.get('gating_strategy_version')) if inp.get('gating_strategy_version') else ''}"
                    f"{' (adaptive)' if inp.get('adaptive') else ''}</span>",
                ),
                (
                    "markers -> channels",
                    _e(", ".join(f"{k}={v}" for k, v in cmap.items()) or "-"),
                ),
            ],
            table_id="provenance-table",
        )
    )
    out.append("</section>")
    for note in notes or []:
        out.append(f'<p class="muted">{_e(note)}</p>')
    out.append("</main></body></html>")
    return "\n".join(out)


def write_report(
    result: ScoreResult,
    path: str | os.PathLike[str],
    *,
    training: pd.DataFrame | None = None,
) -> Path:
    """Render ``result`` (with its figures) to one HTML file, written atomically.

    Parameters
    ----------
    result
        From :func:`blinaprofile.scoring.score.score_sample` (``keep_gating=True`` for gating
        plots).
    path
        The HTML file to write.
    training
        The training cohort's features and response; default: the table stored with the
        model named in ``result.model['uri']``.
    """
    from blinaprofile.scoring.score import load_scoring_model

    notes: list[str] = []
    if training is None and result.model.get("uri"):
        training = load_scoring_model(result.model["uri"]).training
    feats = [f for f in (result.ood_z or {}) if training is not None and f in training.columns]
    if not feats and training is not None:
        from blinaprofile.features.schema import MODEL_FEATURES

        feats = [f for f in MODEL_FEATURES if f in training.columns]
    training_png = (
        _png(training_figure(result, training, feats)) if training is not None and feats else None
    )
    gating_png = None
    ctx = result.context
    if ctx is not None and ctx.tree is not None and ctx.gating is not None:
        gating_png = _png(gating_figure(ctx.path, ctx.tree, ctx.gating))
    elif result.modality == "flow":
        notes.append("Gating plots need score_sample(..., keep_gating=True).")
    text = render_report(result, training_png=training_png, gating_png=gating_png, notes=notes)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out
