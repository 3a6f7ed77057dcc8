"""The single-sample HTML report: self-contained, offline, and it shows the key elements.

The Chromium test renders the report headless, keeps a screenshot ``report.png`` (and the
no-call one ``report_no_call.png``) and checks the rendered DOM. Every output goes to pytest's
``tmp_path``; set ``BLINAPROFILE_TEST_ARTIFACTS=/some/folder`` to keep the screenshots there
for a human to look at.
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

from blinaprofile.io.files import file_checksum
from blinaprofile.scoring.report import write_report
from blinaprofile.scoring.score import NO_CALL, score_sample
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
        "top-features",
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
        assert t["feature"] in c.get("top-features")
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
