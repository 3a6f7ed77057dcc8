"""The single-sample HTML report: self-contained, offline, and it shows the key elements.

The Chromium tests render the report headless, keep a screenshot ``report.png`` (and the
no-call one ``report_no_call.png``), check the rendered DOM, and print the reports to PDF
(``report.pdf``, ``report_no_call.pdf``, ``report_sparse.pdf``) to count their pages. Every
output goes to pytest's ``tmp_path``; set ``BLINAPROFILE_TEST_ARTIFACTS=/some/folder`` to keep
the screenshots and PDFs there for a human to look at.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from blinaprofile.features.schema import FEATURES, MODEL_FEATURES
from blinaprofile.io.files import file_checksum
from blinaprofile.scoring.report import training_figure, write_report
from blinaprofile.scoring.score import NO_CALL, load_scoring_model, score_sample
from conftest_scoring_helpers import scoring_model, write_fcs_like

IDENT = {
    "$SRC": "DOE^JANE",
    "$OP": "Operator Smith",
    "$DATE": "02-MAR-2026",
    "$FIL": "JANE_DOE_01.fcs",
}


@pytest.fixture(scope="module")
def sm(tmp_path_factory):
    return scoring_model(tmp_path_factory)


@pytest.fixture(scope="module")
def report(sm, tmp_path_factory):
    d = tmp_path_factory.mktemp("report")
    src = sorted((sm.new_cohort / "fcs").glob("*.fcs"))[0]
    f = write_fcs_like(src, d / "JANE_DOE_01.fcs", keywords=IDENT)
    res = score_sample(f, model=str(sm.model_dir), keep_gating=True)
    path = write_report(res, d / "report.html")
    return res, path, f


@pytest.fixture
def artifacts(tmp_path) -> Path:
    """Where screenshots go: ``$BLINAPROFILE_TEST_ARTIFACTS`` if set, else ``tmp_path``."""
    override = os.environ.get("BLINAPROFILE_TEST_ARTIFACTS")
    return Path(override) if override else tmp_path


@pytest.fixture(scope="module")
def no_call_report(sm, tmp_path_factory):
    d = tmp_path_factory.mktemp("report_nc")
    src = sorted((sm.new_cohort / "fcs").glob("*.fcs"))[1]
    f = write_fcs_like(src, d / "short.fcs", n_events=3000)
    res = score_sample(f, model=str(sm.model_dir), sample_id="LAB-0042", keep_gating=True)
    return res, write_report(res, d / "report_nc.html")


@pytest.fixture(scope="module")
def sparse_report(sm, tmp_path_factory):
    """A sample just above the event threshold: small parents drawn as dots."""
    d = tmp_path_factory.mktemp("report_sparse")
    src = sorted((sm.new_cohort / "fcs").glob("*.fcs"))[2]
    f = write_fcs_like(src, d / "sparse.fcs", n_events=5500)
    res = score_sample(f, model=str(sm.model_dir), sample_id="LAB-SPARSE", keep_gating=True)
    return res, write_report(res, d / "report_sparse.html")


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: dict[str, str] = {}
        self.srcs: list[str] = []
        self.hrefs: list[str] = []
        self.tags: set[str] = set()
        self._open: list[tuple[str, str]] = []
        self.text: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "src" in a:
            self.srcs.append(a["src"] or "")
        if "href" in a:
            self.hrefs.append(a["href"] or "")
        if "id" in a:
            self.ids[a["id"]] = tag
            self._open.append((tag, a["id"]))
            self.text.setdefault(a["id"], [])
        elif tag not in ("img", "br", "meta"):
            self._open.append((tag, ""))

    def handle_endtag(self, tag):
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                break

    def handle_data(self, data):
        for _, i in self._open:
            if i:
                self.text[i].append(data)

    def get(self, i: str) -> str:
        return " ".join("".join(self.text.get(i, [])).split())


def _parse(html: str) -> _Collect:
    c = _Collect()
    c.feed(html)
    return c


def test_report_is_self_contained_and_private(report):
    res, path, f = report
    html = path.read_text(encoding="utf-8")
    c = _parse(html)
    # offline: no external resource of any kind
    assert not re.search(
        r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", re.sub(r"base64,[A-Za-z0-9+/=]+", "", html)
    )
    assert "script" not in c.tags and "link" not in c.tags and "iframe" not in c.tags
    assert c.srcs and all(s.startswith("data:image/png;base64,") for s in c.srcs)
    assert not c.hrefs
    # key elements
    for i in (
        "sample-id",
        "call",
        "probability",
        "probability-interval",
        "threshold",
        "qc-verdict",
        "qc-table",
        "features",
        "training-comparison",
        "gating-plots",
        "gate-counts",
        "provenance",
        "model-name",
        "model-version",
        "model-alias",
        "checksum",
        "panel",
        "gating-strategy",
        "interval-method",
        "qc-thresholds",
    ):
        assert i in c.ids, i
    assert c.get("call") == res.call
    assert c.get("probability") == f"{res.probability:.3f}"
    assert (
        c.get("probability-interval") == f"{res.probability_low:.3f} - {res.probability_high:.3f}"
    )
    assert c.get("checksum") == file_checksum(f)
    assert c.get("sample-id") == f"S-{file_checksum(f)[:12]}"
    assert c.get("gating-strategy").startswith("default-tcell")
    assert "ood_max_z = 4.0" in c.get("qc-thresholds") and "min_events = 5000" in c.get(
        "qc-thresholds"
    )
    for t in res.top_features:
        assert t["feature"] in c.get("features")
    # privacy: no TEXT keyword value and not the file's name
    visible = re.sub(r"base64,[A-Za-z0-9+/=]+", "", html)
    for v in [*IDENT.values(), f.name, f.stem, "JANE", "Smith"]:
        assert v not in visible, v
    print(
        f"\nreport {path.stat().st_size / 1e3:.0f} kB, {len(c.srcs)} embedded figures, {len(c.ids)} ids"
    )


def test_no_call_report_shows_reasons(no_call_report):
    res, path = no_call_report
    assert res.call == NO_CALL
    c = _parse(path.read_text(encoding="utf-8"))
    assert c.get("call") == NO_CALL
    assert "no-call-reasons" in c.ids
    assert "3000 events" in c.get("no-call-reasons") and "< 5000" in c.get("no-call-reasons")
    assert c.get("qc-verdict") == "FAIL"


def test_report_escapes_markup_in_values(report, tmp_path):
    res, _, _ = report
    evil = '<script>alert("x")</script>'
    bad = dataclasses.replace(
        res, sample_id=f"LAB-{evil}", reasons=[f"reason {evil}"], context=None
    )
    html = write_report(bad, tmp_path / "evil.html").read_text(encoding="utf-8")
    assert "<script>" not in html and "</script>" not in html
    assert "LAB-&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html
    c = _parse(html)
    assert "script" not in c.tags
    assert c.get("sample-id") == f"LAB-{evil}"
    assert f"reason {evil}" in c.get("no-call-reasons")
    assert "<title>blinaprofile report - LAB-&lt;script&gt;" in html
    assert c.get("probability") == f"{res.probability:.3f}"


SCHEMA = {f.name: f for f in FEATURES}


def test_features_named_in_plain_language_with_counts(report):
    res, path, _ = report
    c = _parse(path.read_text(encoding="utf-8"))
    counts = res.gating["counts"]
    for name in MODEL_FEATURES:
        row = c.get(f"feature-{name}")
        # "Effector-memory CD8 T cells, % of CD8 (cd8_em_pct_cd8)", then value and counts
        assert row.startswith(SCHEMA[name].title), (name, row)
        assert f"{res.features[name]:.1f}" in row or f"{res.features[name]:.2f}" in row
    em = c.get("feature-cd8_em_pct_cd8")
    assert em.startswith("Effector-memory CD8 T cells, % of CD8 (cd8_em_pct_cd8)")
    assert f"{counts['cd8_em']:,d} of {counts['cd8']:,d}" in em
    assert f"{counts['cd3']:,d} of {counts['live']:,d}" in c.get("feature-cd3_pct_lymph")
    assert f"{counts['cd4']:,d} / {counts['cd8']:,d}" in c.get("feature-cd4_cd8_ratio")
    # QC lists the absolute counts with separators
    qc = c.get("qc-table")
    for metric in ("n_events", "n_live", "n_cd3", "n_cd4", "n_cd8"):
        assert f"{int(res.features[metric]):,d}" in qc, metric
    # the 5 largest contributions are ranked and signed in the same table
    for rank, t in enumerate(sorted(res.top_features, key=lambda t: -abs(t["contribution"]))):
        row = c.get(f"feature-{t['feature']}")
        assert f"#{rank + 1} {t['contribution']:+.3f}" in row
        assert row.endswith(" NR") == (t["contribution"] < 0), row
    # the OOD line names the farthest feature the same way
    worst = max(res.ood_z, key=lambda k: abs(res.ood_z[k]))
    assert SCHEMA[worst].title in c.get("ood")


def test_no_call_reasons_name_features_in_plain_language(report, tmp_path):
    res, _, _ = report
    reason = "outside the training cohort (|robust z| > 4): cd8_em_pct_cd8 (z=+5.1)"
    bad = dataclasses.replace(res, call=NO_CALL, reasons=[reason], context=None)
    c = _parse(write_report(bad, tmp_path / "ood.html").read_text(encoding="utf-8"))
    assert (
        "outside the training cohort (|robust z| > 4): Effector-memory CD8 T cells, % of CD8 "
        "(cd8_em_pct_cd8) (z=+5.1)"
    ) in c.get("no-call-reasons")
    assert c.get("call") == NO_CALL


def test_training_figure_draws_outliers_unclipped(report, sm):
    res, _, _ = report
    training = load_scoring_model(str(sm.model_dir)).training
    em, ratio = training["cd8_em_pct_cd8"], training["cd4_cd8_ratio"]
    near = float(em.max() + 0.5 * (em.max() - em.min()))  # beyond the cohort: axis extended
    far = float(ratio.max() + 10 * (ratio.max() - ratio.min()))  # far beyond: arrow at edge
    feats = {**res.features, "cd8_em_pct_cd8": near, "cd4_cd8_ratio": far}
    z = {**res.ood_z, "cd4_cd8_ratio": 9.5}
    fig = training_figure(
        dataclasses.replace(res, features=feats, ood_z=z), training, list(MODEL_FEATURES)
    )
    panels = {ax.get_title().replace("\n", " "): ax for ax in fig.axes if ax.get_visible()}
    assert len(panels) == len(MODEL_FEATURES)
    for name in MODEL_FEATURES:
        (ax,) = [a for t, a in panels.items() if t.startswith(SCHEMA[name].title)]
        lo, hi = ax.get_ylim()
        vals = training[name].astype(float)
        assert lo < vals.min() and vals.max() < hi, f"{name}: training values clipped"
        texts = [t.get_text() for t in ax.texts]
        if name == "cd8_em_pct_cd8":
            assert lo < near < hi  # drawn at its true position, labelled with its value
            assert any(np.allclose(line.get_ydata(), near) for line in ax.lines)
            assert f"{near:.1f}" in texts
        elif name == "cd4_cd8_ratio":
            assert hi < far  # off the axis: an arrow at the top edge with the value printed
            assert f"{far:.2f} (off scale)" in texts
            assert "z=+9.5" in ax.get_title()
        else:
            assert lo < feats[name] < hi


def test_report_figures_are_crisp(report):
    import base64
    import io

    from PIL import Image

    _, path, _ = report
    c = _parse(path.read_text(encoding="utf-8"))
    sizes = []
    for src in c.srcs:
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert round(img.info["dpi"][0]) == 150
        sizes.append(img.size)
    # the cohort figure and the gating figure, both drawn at the page's width (1050 px)
    assert [w for w, _ in sizes] == [1050, 1050], sizes


def _chromium() -> str | None:
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )


def _chromium_args(exe: str, profile: Path) -> list[str]:
    return [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1200,2400",
    ]


def _render(path: Path, png: Path, tmp: Path) -> str:
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "chromium not installed (apt-get install -y chromium); the CI script installs it"
        )
    png.parent.mkdir(parents=True, exist_ok=True)
    url = path.resolve().as_uri()
    shot = subprocess.run(
        [*_chromium_args(exe, tmp / "profile1"), f"--screenshot={png}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    dom = subprocess.run(
        [*_chromium_args(exe, tmp / "profile2"), "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    return dom.stdout


def _png_stats(png: Path) -> tuple[tuple[int, int], int]:
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    rgb = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colors = len(np.unique(rgb[:: max(1, len(rgb) // 200_000)], axis=0))
    return img.shape[:2], colors


def test_report_renders_in_headless_chromium(report, tmp_path, artifacts):
    res, path, _ = report
    png = artifacts / "report.png"
    dom = _render(path, png, tmp_path)
    c = _parse(dom)
    assert c.get("call") == res.call
    assert c.get("probability") == f"{res.probability:.3f}"
    assert c.get("qc-verdict") == ("PASS" if res.qc_pass else "FAIL")
    assert "gating-plots" in c.ids and "probability-gauge" in c.ids
    assert res.model["name"] in c.get("model-name")
    assert c.get("checksum") == res.input["sha256"]
    (h, w), colors = _png_stats(png)
    assert (w, h) == (1200, 2400)
    assert colors > 200, "the screenshot looks blank"
    print(f"\nscreenshot {png} ({w}x{h}, {colors} distinct colours)")


def test_no_call_report_renders_in_headless_chromium(no_call_report, tmp_path, artifacts):
    _, path = no_call_report
    png = artifacts / "report_no_call.png"
    c = _parse(_render(path, png, tmp_path))
    assert c.get("call") == NO_CALL and "no-call-reasons" in c.ids
    print(f"\nscreenshot {png}")


def _pdf_pages(pdf: Path) -> int:
    """Pages of a PDF written by Chromium (its page objects are not compressed)."""
    pages = len(re.findall(rb"/Type\s*/Page(?![a-zA-Z])", pdf.read_bytes()))
    if shutil.which("pdfinfo"):
        info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True)
        assert re.search(rf"^Pages:\s+{pages}$", info.stdout, re.M), info.stdout
    return pages


def _pdf_text(pdf: Path, page: int) -> str | None:
    """The text of one page (``None`` without poppler's ``pdftotext``)."""
    if not shutil.which("pdftotext"):
        return None
    out = subprocess.run(
        ["pdftotext", "-layout", "-f", str(page), "-l", str(page), str(pdf), "-"],
        capture_output=True,
        text=True,
        check=True,
    )
    return " ".join(out.stdout.split())


def _print_pdf(path: Path, pdf: Path, tmp: Path) -> int:
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "chromium not installed (apt-get install -y chromium); the CI script installs it"
        )
    pdf.parent.mkdir(parents=True, exist_ok=True)
    args = [a for a in _chromium_args(exe, tmp / "profile-pdf") if "window-size" not in a]
    out = subprocess.run(
        [*args, "--no-pdf-header-footer", f"--print-to-pdf={pdf}", path.resolve().as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and pdf.is_file(), out.stderr[-2000:]
    return _pdf_pages(pdf)


def test_report_has_a_print_layout(report):
    _, path, _ = report
    html = path.read_text(encoding="utf-8")
    assert "@media print" in html and "@page{size:A4;" in html
    assert "break-inside:avoid" in html and "#gating-page.with-figure{break-before:page}" in html
    c = _parse(html)
    assert c.get("review") == "Reviewed by ________________________________ Date ________________"
    assert html.index('id="review"') > html.index('id="provenance"')  # the end of page 2
    assert "Research use only" in html.split("<h1>")[0]  # the banner opens the report


@pytest.mark.parametrize(
    ("fixture", "name"),
    [
        ("report", "report"),
        ("no_call_report", "report_no_call"),
        ("sparse_report", "report_sparse"),
    ],
)
def test_report_prints_on_two_pages(fixture, name, request, tmp_path, artifacts):
    res, path = request.getfixturevalue(fixture)[:2]
    pdf = artifacts / f"{name}.pdf"
    pages = _print_pdf(path, pdf, tmp_path)
    assert 1 <= pages <= 2, f"{pdf} has {pages} pages"
    assert b"/MediaBox [0 0 594.95996 841.91998]" in pdf.read_bytes()  # A4, as @page asks
    first, second = _pdf_text(pdf, 1), _pdf_text(pdf, 2)
    if first is not None and second is not None:
        # headline, QC, features and the cohort on page 1; gating, provenance, reviewer on 2
        for text in (
            "Research use only",
            res.call.upper(),
            f"{res.probability:.3f} (95% interval",
            "Quality control and abstention",
            "Effector-memory CD8 T cells, % of CD8 (cd8_em_pct_cd8)",
            "This sample against the training cohort",
        ):
            assert text in first, text
        for text in ("Gating", "Gate counts", "Provenance", "Reviewed by", "Date"):
            assert text in second, text
    print(f"\n{name}: {pages} A4 pages ({pdf})")
