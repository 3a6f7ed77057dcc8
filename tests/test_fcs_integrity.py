"""Issue 11: no event silently lost, no wrong bytes read.

Every attack is built in ``tmp_path`` from a valid simulated sample and checked through
:func:`blinaprofile.io.fcs.read_fcs` and through the command line: by default the file is
refused (exit 2, one ``error: FILE: ...`` line); with the documented override it is read,
the event count is ``$TOT`` and the warning reaches stderr, ``score --json``, the batch
row, the feature table and the HTML report. The real files in ``../shared/data`` must all
still read with the right event counts (their padding is measured here too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from blinaprofile.errors import FCSFormatError
from blinaprofile.io.fcs import HEADER_LENGTH, read_fcs
from blinaprofile.io.read import (
    FCSReadOptions,
    current_fcs_read_options,
    fcs_read_options,
    join_warnings,
    read_flow,
    split_warnings,
)
from conftest_fcs_helpers import (
    build_fcs,
    encode_text,
    float_file,
    header_bytes,
    standard_keywords,
)

ROOT = Path(__file__).resolve().parents[1]
ACCEPT_TOT = FCSReadOptions(allow_tot_mismatch=True)
TOT_REFUSAL = (
    "{path}: $TOT={tot} events but the DATA segment holds {length} bytes, {whole} events of "
    "{bpe} bytes{rest}: {lost} would be ignored; refusing (allow_tot_mismatch=True, CLI "
    "--accept-tot-mismatch, reads only the first $TOT events)"
)


# --------------------------------------------------------------------------- building attacks


@dataclass(frozen=True)
class Sample:
    """A valid simulated sample taken apart: TEXT keywords, DATA bytes and its events."""

    keywords: dict[str, str]  # without $BEGINDATA/$ENDDATA (build_fcs adds the true ones)
    data: bytes
    events: np.ndarray
    n: int
    bpe: int  # bytes per event

    def file(self, **kwargs: object) -> bytes:
        return build_fcs(self.keywords, self.data, **kwargs)  # type: ignore[arg-type]

    def with_tot(self, tot: int) -> bytes:
        return build_fcs({**self.keywords, "$TOT": str(tot)}, self.data)


@pytest.fixture(scope="module")
def sample(tmp_path_factory, sim_config, panel) -> Sample:
    from blinaprofile.simulate.flow import simulate_cohort

    out = tmp_path_factory.mktemp("integrity_cohort")
    simulate_cohort(sim_config, out, panel=panel, n_patients=2, events_per_sample=10_000, seed=5)
    src = sorted((out / "fcs").glob("*.fcs"))[0]
    text = read_fcs(src, only_text=True)
    raw = src.read_bytes()
    start, end = int(text.keywords["$BEGINDATA"]), int(text.keywords["$ENDDATA"])
    keywords = {k: v for k, v in text.keywords.items() if k not in ("$BEGINDATA", "$ENDDATA")}
    n = int(keywords["$TOT"])
    bpe = (end - start + 1) // n
    assert bpe * n == end - start + 1 and bpe == 4 * text.n_channels
    return Sample(keywords, raw[start : end + 1], read_fcs(src).events, n, bpe)


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _offsets(content: bytes) -> list[int]:
    """The six HEADER offsets of a file."""
    return [int(content[10 + 8 * i : 18 + 8 * i]) for i in range(6)]


def _with_header_data(content: bytes, start: int, end: int) -> bytes:
    """``content`` with other DATA offsets written in its HEADER only."""
    return content[:26] + str(start).rjust(8).encode() + str(end).rjust(8).encode() + content[42:]


def _cli(*args: str | os.PathLike[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        [sys.executable, "-m", "blinaprofile", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _stderr_lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.strip()]


def _warning_lines(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in _stderr_lines(out) if line.startswith("warning:")]


# --------------------------------------------------------------------------- attack 1: $TOT


def test_tot_smaller_than_data_is_refused_naming_both_numbers(sample, tmp_path):
    path = _write(tmp_path, "tot30.fcs", sample.with_tot(3000))
    with pytest.raises(FCSFormatError) as err:
        read_fcs(path)
    assert str(err.value) == TOT_REFUSAL.format(
        path=path,
        tot=3000,
        length=sample.n * sample.bpe,
        whole=sample.n,
        bpe=sample.bpe,
        rest="",
        lost="7000 events",
    )
    with pytest.raises(FCSFormatError, match=r"\$TOT=3000"):
        read_fcs(path, only_text=True)  # the layout is checked without loading events
    with pytest.raises(FCSFormatError, match=r"7000 events would be ignored"):
        read_flow(path)


def test_tot_smaller_than_data_accepted_reads_tot_events_and_warns(sample, tmp_path):
    path = _write(tmp_path, "tot30.fcs", sample.with_tot(3000))
    data = read_fcs(path, allow_tot_mismatch=True)
    assert data.n_events == 3000
    np.testing.assert_array_equal(data.events, sample.events[:3000])
    assert data.warnings == [
        f"$TOT=3000 events but the DATA segment holds {sample.n} events of {sample.bpe} bytes; "
        f"read the first 3000 as allowed by allow_tot_mismatch, 7000 events ignored"
    ]
    # the same through read_flow, explicitly or from an enclosing block
    assert read_flow(path, fcs_options=ACCEPT_TOT).n_events == 3000
    with fcs_read_options(ACCEPT_TOT):
        assert current_fcs_read_options() == ACCEPT_TOT
        assert read_flow(path).n_events == 3000
        with pytest.raises(FCSFormatError):  # an explicit choice wins over the block's
            read_flow(path, fcs_options=FCSReadOptions())
    assert current_fcs_read_options().is_strict
    with pytest.raises(FCSFormatError):
        read_flow(path)


def test_data_shorter_than_tot_is_refused_even_when_mismatch_is_allowed(sample, tmp_path):
    path = _write(tmp_path, "tot_plus1.fcs", sample.with_tot(sample.n + 1))
    expected = (
        f"{path}: DATA segment holds {sample.n * sample.bpe} bytes but $TOT={sample.n + 1} events "
        f"x $PAR={sample.bpe // 4} channels need {(sample.n + 1) * sample.bpe} bytes "
        f"(truncated, or $TOT too large)"
    )
    for allow in (False, True):
        with pytest.raises(FCSFormatError) as err:
            read_fcs(path, allow_tot_mismatch=allow)
        assert str(err.value) == expected


def test_remainder_smaller_than_one_event_is_tolerated_with_warning(sample, tmp_path):
    pad = sample.bpe - 1
    path = _write(tmp_path, "pad.fcs", build_fcs(sample.keywords, sample.data + b"\0" * pad))
    data = read_fcs(path)
    assert data.n_events == sample.n
    np.testing.assert_array_equal(data.events, sample.events)
    assert data.warnings == [
        f"DATA segment holds {sample.n * sample.bpe + pad} bytes, {pad} more than "
        f"$TOT={sample.n} x $PAR={sample.bpe // 4} needs (less than one {sample.bpe}-byte "
        f"event); the extra bytes were ignored"
    ]


def test_remainder_of_one_event_is_refused_and_can_be_accepted(sample, tmp_path):
    extra = b"\0" * (sample.bpe + 3)  # one whole event and 3 bytes
    path = _write(tmp_path, "one_more.fcs", build_fcs(sample.keywords, sample.data + extra))
    length = sample.n * sample.bpe + len(extra)
    with pytest.raises(FCSFormatError) as err:
        read_fcs(path)
    assert str(err.value) == TOT_REFUSAL.format(
        path=path,
        tot=sample.n,
        length=length,
        whole=sample.n + 1,
        bpe=sample.bpe,
        rest=" and 3 more bytes",
        lost="1 event",
    )
    data = read_fcs(path, allow_tot_mismatch=True)
    assert data.n_events == sample.n
    assert data.warnings == [
        f"$TOT={sample.n} events but the DATA segment holds {sample.n + 1} events of "
        f"{sample.bpe} bytes and 3 more bytes; read the first {sample.n} as allowed by "
        f"allow_tot_mismatch, 1 event ignored"
    ]


def test_tot_zero_with_events_in_data_is_refused(tmp_path):
    events = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = _write(tmp_path, "tot0.fcs", float_file(events, ["A", "B", "C"], extra={"$TOT": "0"}))
    with pytest.raises(FCSFormatError, match=r"\$TOT=0 events .* 4 events would be ignored"):
        read_fcs(path)
    data = read_fcs(path, allow_tot_mismatch=True)
    assert data.n_events == 0 and len(data.warnings) == 1
    with pytest.raises(FCSFormatError, match="zero events"):
        read_flow(path, fcs_options=ACCEPT_TOT)


def test_data_end_past_eof_by_a_whole_event_is_a_tot_mismatch(sample, tmp_path):
    good = sample.file()
    start, end = _offsets(good)[2:4]
    kw = {**sample.keywords, "$BEGINDATA": str(start).rjust(12)}
    kw["$ENDDATA"] = str(end + sample.bpe).rjust(12)
    content = build_fcs(kw, sample.data, data_keywords=False, header={3: end + sample.bpe})
    assert _offsets(content)[2] == start and len(content) == end + 1
    path = _write(tmp_path, "end_past_eof.fcs", content)
    with pytest.raises(FCSFormatError, match=r"past the end of the file's .* 1 event would be"):
        read_fcs(path)
    assert read_fcs(path, allow_tot_mismatch=True).n_events == sample.n


def test_fcs20_without_tot_keeps_whole_events_and_warns_about_the_rest(tmp_path):
    events = np.arange(18, dtype=np.float32).reshape(6, 3)
    kw = standard_keywords(["C1", "C2", "C3"], 6)
    del kw["$TOT"]
    content = build_fcs(kw, events.tobytes() + b"\n", version="2.0", data_keywords=False)
    data = read_fcs(_write(tmp_path, "notot.fcs", content))
    np.testing.assert_array_equal(data.events, events)
    assert any("$TOT is missing" in w for w in data.warnings)
    assert any("1 more than $TOT=6 x $PAR=3 needs" in w for w in data.warnings)


# --------------------------------------------------------------------------- attack 2: offsets


def test_header_data_offset_inside_text_is_refused(sample, tmp_path):
    """FlowKit's data_start_offset_discrepancy_example.fcs, rebuilt from our sample."""
    good = sample.file()
    text_start, text_end, start, end = _offsets(good)[:4]
    wrong = text_start + 100
    path = _write(tmp_path, "discrepancy.fcs", _with_header_data(good, wrong, end))
    # what the HEADER points at is TEXT, not events
    assert path.read_bytes()[wrong : wrong + 4] == good[wrong : wrong + 4]
    assert wrong < text_end < start
    with pytest.raises(FCSFormatError) as err:
        read_fcs(path)
    assert str(err.value) == (
        f"{path}: HEADER and TEXT disagree on where the DATA segment is: HEADER says bytes "
        f"{wrong}-{end}, $BEGINDATA/$ENDDATA say {start}-{end} (HEADER: DATA segment (bytes "
        f"{wrong}-{end}) overlaps the TEXT segment (bytes {text_start}-{text_end})); refusing "
        f"to guess which bytes are events (data_offsets='header' or 'text', CLI "
        f"--data-offsets, chooses the source to trust)"
    )
    with pytest.raises(FCSFormatError, match="disagree"):
        read_fcs(path, only_text=True)

    data = read_fcs(path, data_offsets="text")
    np.testing.assert_array_equal(data.events, sample.events)
    assert data.warnings == [
        f"HEADER DATA offsets ({wrong}-{end}) differ from $BEGINDATA/$ENDDATA ({start}-{end}); "
        f"used the TEXT offsets as requested (data_offsets='text')"
    ]
    # trusting the HEADER cannot make TEXT bytes events
    with pytest.raises(FCSFormatError) as err:
        read_fcs(path, data_offsets="header")
    assert str(err.value) == (
        f"{path}: DATA segment (bytes {wrong}-{end}) overlaps the TEXT segment "
        f"(bytes {text_start}-{text_end})"
    )


def test_header_data_end_disagreeing_is_refused_and_either_source_can_be_chosen(sample, tmp_path):
    good = sample.file()
    start, end = _offsets(good)[2:4]
    path = _write(tmp_path, "end_differs.fcs", _with_header_data(good, start, end - sample.bpe))
    with pytest.raises(FCSFormatError, match=rf"HEADER says bytes {start}-{end - sample.bpe}, "):
        read_fcs(path)
    np.testing.assert_array_equal(read_fcs(path, data_offsets="text").events, sample.events)
    # the HEADER's segment is one event short of $TOT: still refused
    with pytest.raises(FCSFormatError, match=r"need \d+ bytes \(truncated, or \$TOT too large\)"):
        read_fcs(path, data_offsets="header")


def test_header_and_text_agreeing_on_a_segment_that_overlaps_text_is_refused(sample, tmp_path):
    good = sample.file()
    text_start, text_end, _, end = _offsets(good)[:4]
    inside = text_end - 10
    kw = {**sample.keywords, "$BEGINDATA": str(inside).rjust(12), "$ENDDATA": str(end).rjust(12)}
    content = build_fcs(kw, sample.data, data_keywords=False, header={2: inside, 3: end})
    assert _offsets(content)[:2] == [text_start, text_end]
    path = _write(tmp_path, "overlap.fcs", content)
    for choice in ("strict", "header", "text"):
        with pytest.raises(FCSFormatError, match=r"overlaps the TEXT segment \(bytes "):
            read_fcs(path, data_offsets=choice, allow_tot_mismatch=True)


def test_data_overlapping_the_supplemental_text_is_refused(sample, tmp_path):
    stext = encode_text({"EXTRA": "from stext"})
    kw = dict(sample.keywords)
    for key in ("$BEGINDATA", "$ENDDATA", "$BEGINSTEXT", "$ENDSTEXT"):
        kw[key] = "0" * 12
    start = HEADER_LENGTH + len(encode_text(kw))
    true_end = start + len(sample.data) - 1
    s_start, s_end = true_end + 1, true_end + len(stext)
    declared_end = true_end + 5  # the last 5 bytes "of DATA" are the supplemental TEXT's
    for key, value in (
        ("$BEGINDATA", start),
        ("$ENDDATA", declared_end),
        ("$BEGINSTEXT", s_start),
        ("$ENDSTEXT", s_end),
    ):
        kw[key] = str(value).rjust(12)
    content = build_fcs(
        kw, sample.data, data_keywords=False, header={3: declared_end}, trailer=stext
    )
    assert _offsets(content)[2:4] == [start, declared_end] and len(content) == s_end + 1
    path = _write(tmp_path, "stext_overlap.fcs", content)
    with pytest.raises(FCSFormatError) as err:
        read_fcs(path)
    assert str(err.value) == (
        f"{path}: DATA segment (bytes {start}-{declared_end}) overlaps the supplemental TEXT "
        f"segment (bytes {s_start}-{s_end})"
    )


@pytest.mark.parametrize(
    ("data_start", "header_start"),
    [
        (100_000_000, 0),  # FCS 3.1: both HEADER offsets 0 when any part is beyond the limit
        (99_999_990, 99_999_990),  # some writers keep a start that fits and write 0 for the end
    ],
)
def test_large_file_zero_header_offsets_are_not_a_discrepancy(
    tmp_path, data_start: int, header_start: int
):
    """Beyond 99,999,999 bytes the HEADER cannot hold offsets; TEXT has them (sparse file)."""
    events = np.arange(12, dtype=np.float32).reshape(4, 3)
    kw = standard_keywords(["C1", "C2", "C3"], 4)
    kw["$BEGINDATA"] = str(data_start)
    kw["$ENDDATA"] = str(data_start + events.nbytes - 1)
    text = encode_text(kw)
    path = tmp_path / "large.fcs"
    with open(path, "wb") as fh:
        offsets = [HEADER_LENGTH, HEADER_LENGTH + len(text) - 1, header_start, 0, 0, 0]
        fh.write(header_bytes("3.1", offsets) + text)
        fh.seek(data_start)
        fh.write(events.tobytes())
    data = read_fcs(path)
    np.testing.assert_array_equal(data.events, events)
    assert data.warnings == []


def test_data_offsets_value_is_checked():
    with pytest.raises(ValueError, match="data_offsets must be one of strict, header, text"):
        FCSReadOptions(data_offsets="trust-me")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="read_fcs data_offsets must be one of"):
        read_fcs("/nonexistent.fcs", data_offsets="both")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- real files

#: Every real FCS file in ../shared/data: (path, version, $TOT, DATA bytes beyond $TOT
#: events, bytes between TEXT and DATA, bytes after DATA). Measured from the files: only
#: test_comp_example.fcs declares DATA one byte longer than its events (a writer counting
#: the end offset one too far); data1.fcs and 100715.fcs pad TEXT to a block boundary
#: before DATA; the FCS 3.0 files end with an 8-byte CRC field ("00000000") after DATA.
REAL_FILES = [
    ("gatingml2-compliance/data1.fcs", "2.0", 13_367, 0, 240, 0),
    ("flowjo-workspace/68983.fcs", "3.0", 19_225, 0, 0, 8),
    ("real-fcs/100715.fcs", "2.0", 65_016, 0, 20, 0),
    ("real-fcs/test_comp_example.fcs", "3.0", 10_703, 1, 40, 9),
    ("cytof/Gates_PTLG021_Unstim_Control_1.fcs", "3.0", 1_000, 0, 0, 8),
    ("cytof/Gates_PTLG021_Unstim_Control_2.fcs", "3.0", 1_000, 0, 0, 8),
    ("cytof/Gates_PTLG028_Unstim_Control_1.fcs", "3.0", 1_000, 0, 0, 8),
    ("cytof/Gates_PTLG028_Unstim_Control_2.fcs", "3.0", 1_000, 0, 0, 8),
]


def test_every_real_fcs_file_is_listed(shared_data):
    found = sorted(str(p.relative_to(shared_data)) for p in shared_data.rglob("*.fcs"))
    assert found == sorted(r[0] for r in REAL_FILES)


@pytest.mark.parametrize(
    ("relative", "version", "tot", "remainder", "gap", "after"),
    REAL_FILES,
    ids=[Path(r[0]).name for r in REAL_FILES],
)
def test_real_files_still_read_with_their_event_counts(
    shared_data, relative, version, tot, remainder, gap, after
):
    path = shared_data / relative
    raw = path.read_bytes()
    text_end, start, end = _offsets(raw)[1:4]
    data = read_fcs(path)
    bpe = sum(int(data.keywords[f"$P{i}B"]) for i in range(1, data.n_channels + 1)) // 8
    # the layout as measured
    assert (data.version, data.declared_events) == (version, tot)
    assert (end - start + 1 - tot * bpe, start - text_end - 1, len(raw) - end - 1) == (
        remainder,
        gap,
        after,
    )
    # read in full, strictly, with the right number of events
    assert data.n_events == tot and data.events.shape == (tot, data.n_channels)
    assert read_flow(path).n_events == tot
    assert read_fcs(path, only_text=True).n_events == tot
    layout = [w for w in data.warnings if "DATA" in w or "$TOT" in w]
    if remainder:
        assert layout == [
            f"DATA segment holds {tot * bpe + remainder} bytes, {remainder} more than "
            f"$TOT={tot} x $PAR={data.n_channels} needs (less than one {bpe}-byte event); "
            f"the extra bytes were ignored"
        ]
    else:
        assert layout == []


# --------------------------------------------------------------------------- through the CLI

ATTACKS = {
    "tot_smaller": lambda s, good: s.with_tot(3000),
    "one_event_remainder": lambda s, good: build_fcs(s.keywords, s.data + b"\0" * s.bpe),
    "data_shorter_than_tot": lambda s, good: s.with_tot(s.n + 1),
    "header_offset_in_text": lambda s, good: _with_header_data(
        good, _offsets(good)[0] + 100, _offsets(good)[3]
    ),
    "header_end_differs": lambda s, good: _with_header_data(
        good, _offsets(good)[2], _offsets(good)[3] + 7
    ),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_cli_score_refuses_each_attack_with_one_line(sample, tmp_path, attack):
    path = _write(tmp_path, f"{attack}.fcs", ATTACKS[attack](sample, sample.file()))
    with pytest.raises(FCSFormatError) as err:
        read_fcs(path)
    out = _cli("score", path, "--no-report", cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert _stderr_lines(out) == [f"error: {err.value}"]
    assert str(path) in str(err.value)
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{attack}.fcs"]


def test_cli_score_accepts_tot_mismatch_and_reports_it_everywhere(sample, tmp_path):
    path = _write(tmp_path, "tot30.fcs", sample.with_tot(3000))
    out_dir = tmp_path / "out"
    out = _cli("score", path, "--accept-tot-mismatch", "--json", "--out-dir", out_dir, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    warning = (
        f"$TOT=3000 events but the DATA segment holds {sample.n} events of {sample.bpe} bytes; "
        f"read the first 3000 as allowed by allow_tot_mismatch, 7000 events ignored"
    )
    result = json.loads(out.stdout)
    # named as the CLI names the sample elsewhere (its ID or pseudonym by default)
    assert _warning_lines(out) == [f"warning: {result['sample_id']}: {warning}"]
    assert result["warnings"] == [warning]
    assert result["features"]["n_events"] == 3000
    assert {c["metric"]: c["value"] for c in result["qc"]["counts"]}["n_events"] == 3000
    (report,) = out_dir.glob("*.report.html")
    html = report.read_text(encoding="utf-8")
    assert 'id="reader-warnings"' in html and f"<li>{warning}</li>" in html
    assert "File warnings (1)" in html
    (saved,) = out_dir.glob("*.score.json")
    assert json.loads(saved.read_text())["warnings"] == [warning]


def test_cli_score_with_data_offsets_text_reads_the_right_events(sample, tmp_path):
    good = sample.file()
    start, end = _offsets(good)[2:4]
    wrong = _offsets(good)[0] + 100
    path = _write(tmp_path, "discrepancy.fcs", _with_header_data(good, wrong, end))
    clean = _write(tmp_path, "clean.fcs", good)
    got = _cli("score", path, "--data-offsets", "text", "--json", "--no-report", cwd=tmp_path)
    ref = _cli("score", clean, "--json", "--no-report", cwd=tmp_path)
    assert got.returncode == 0 and ref.returncode == 0, got.stderr + ref.stderr
    warning = (
        f"HEADER DATA offsets ({wrong}-{end}) differ from $BEGINDATA/$ENDDATA ({start}-{end}); "
        f"used the TEXT offsets as requested (data_offsets='text')"
    )
    a, b = json.loads(got.stdout), json.loads(ref.stdout)
    assert _warning_lines(got) == [f"warning: {a['sample_id']}: {warning}"]
    assert _stderr_lines(ref) == []
    assert a["warnings"] == [warning] and b["warnings"] == []
    assert a["features"] == b["features"] and a["probability"] == b["probability"]


def test_cli_gate_and_featurize_refuse_and_accept(sample, tmp_path):
    path = _write(tmp_path, "tot30.fcs", sample.with_tot(3000))
    refused = _cli("gate", path, "--json", cwd=tmp_path)
    assert refused.returncode == 2 and len(_stderr_lines(refused)) == 1
    gated = _cli("gate", path, "--json", "--accept-tot-mismatch", cwd=tmp_path)
    assert gated.returncode == 0, gated.stderr
    g = json.loads(gated.stdout)
    assert g["counts"][next(iter(g["counts"]))] <= 3000 and len(g["warnings"]) == 1
    (line,) = _warning_lines(gated)
    assert line.endswith(f": {g['warnings'][0]}")

    table = tmp_path / "feats.csv"
    feat = _cli("featurize", path, "--out", table, "--accept-tot-mismatch", cwd=tmp_path)
    assert feat.returncode == 0, feat.stderr
    df = pd.read_csv(table, keep_default_na=False)
    assert df["n_events"].tolist() == [3000]
    assert split_warnings(df["warnings"].iloc[0]) == g["warnings"]
    (line,) = _warning_lines(feat)
    assert line == f"warning: {df['sample_id'].iloc[0]}: {g['warnings'][0]}"
    strict = _cli("featurize", path, "--out", tmp_path / "strict.csv", cwd=tmp_path)
    assert strict.returncode == 1
    (line,) = _stderr_lines(strict)
    assert line.startswith("error: ") and line.endswith(f": {_tot30_message(sample)}")


def _tot30_message(sample: Sample) -> str:
    return TOT_REFUSAL.format(
        path="",
        tot=3000,
        length=sample.n * sample.bpe,
        whole=sample.n,
        bpe=sample.bpe,
        rest="",
        lost="7000 events",
    )[2:]


def test_cli_score_batch_rows_and_stderr_carry_the_warning(sample, tmp_path):
    bad = _write(tmp_path, "tot30.fcs", sample.with_tot(3000))
    good = _write(tmp_path, "good.fcs", sample.file())
    out = _cli(
        "score-batch",
        bad,
        good,
        "--out",
        tmp_path / "batch",
        "--jobs",
        "2",
        "--no-progress",
        "--accept-tot-mismatch",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    df = pd.read_csv(tmp_path / "batch" / "results.csv", keep_default_na=False)
    assert "warnings" in df.columns and df["error"].tolist() == ["", ""]
    assert df["n_events"].tolist() == [3000, sample.n]
    assert df["warnings"].iloc[1] == ""
    (warning,) = split_warnings(df["warnings"].iloc[0])
    assert warning.startswith("$TOT=3000 events but the DATA segment holds")
    assert _warning_lines(out) == [f"warning: {df['sample_id'].iloc[0]}: {warning}"]
    run = json.loads((tmp_path / "batch" / "run.json").read_text())
    assert run["fcs_options"] == {"allow_tot_mismatch": True, "data_offsets": "strict"}
    # the same folder without the override holds results made with other settings
    again = _cli("score-batch", bad, good, "--out", tmp_path / "batch", cwd=tmp_path)
    assert again.returncode == 2 and "fcs_options" in again.stderr


# --------------------------------------------------------------------------- Python API


def test_batch_api_strict_error_row_and_accepted_warning_row(sample, tmp_path):
    from blinaprofile.scoring.batch import score_samples

    path = _write(tmp_path, "tot30.fcs", sample.with_tot(3000))
    strict = score_samples([path], n_jobs=1, progress=False)
    assert strict["call"].tolist() == ["error"] and strict["warnings"].tolist() == [""]
    assert strict["error"].iloc[0].endswith(f": {_tot30_message(sample)}")
    accepted = score_samples([path], n_jobs=1, progress=False, fcs_options=ACCEPT_TOT)
    assert accepted["error"].tolist() == [""] and accepted["n_events"].tolist() == [3000]
    assert (
        split_warnings(accepted["warnings"].iloc[0])
        == read_fcs(path, allow_tot_mismatch=True).warnings
    )


def test_featurize_manifest_workers_receive_the_options(sample, tmp_path):
    from blinaprofile.features.flow import featurize_manifest

    paths = [
        _write(tmp_path, "tot30.fcs", sample.with_tot(3000)),
        _write(tmp_path, "pad.fcs", build_fcs(sample.keywords, sample.data + b"\n")),
    ]
    df = pd.DataFrame({"sample_id": ["a", "b"], "path": [str(p) for p in paths]})
    with fcs_read_options(ACCEPT_TOT):  # worker processes get the block's options explicitly
        table = featurize_manifest(df, n_jobs=2)
    assert table["error"].tolist() == ["", ""]
    assert table["n_events"].tolist() == [3000, sample.n]
    assert [len(split_warnings(w)) for w in table["warnings"]] == [1, 1]
    assert "less than one" in table["warnings"].iloc[1]
    strict = featurize_manifest(df, n_jobs=2)
    assert "7000 events would be ignored" in strict["error"].iloc[0]
    assert strict["error"].iloc[1] == "" and strict["warnings"].iloc[0] == ""


def test_score_result_carries_warnings_into_json_row_summary_and_report(sample, tmp_path):
    from blinaprofile.scoring.report import render_report
    from blinaprofile.scoring.score import RESULT_COLUMNS, score_sample

    path = _write(tmp_path, "tot30.fcs", sample.with_tot(3000))
    with fcs_read_options(ACCEPT_TOT):
        res = score_sample(path, interval=False)
    (warning,) = res.warnings
    assert res.features["n_events"] == 3000
    assert res.as_dict()["warnings"] == [warning]
    row = res.to_row()
    assert list(row) == list(RESULT_COLUMNS) and row["warnings"] == warning
    assert f"  warning: {warning}" in res.summary().splitlines()
    html = render_report(res)
    assert f"<li>{warning}</li>" in html
    clean = score_sample(_write(tmp_path, "good.fcs", sample.file()), interval=False)
    assert clean.warnings == [] and clean.to_row()["warnings"] == ""
    assert 'id="reader-warnings">File warnings: none' in render_report(clean)


# --------------------------------------------------------------------------- privacy

IDENTIFIERS = ("DOE^JANE", "MRN1234567", "Jane Doe", "Operator Smith", "02-MAR-2026")


def test_warnings_never_quote_text_values(tmp_path):
    """Every kind of reader warning at once, on a file full of identifiers."""
    events = np.arange(24, dtype=np.float32).reshape(8, 3)
    kw = {
        "$BYTEORD": "1,2,3,4",
        "$DATATYPE": "F",
        "$NEXTDATA": "99999",  # a second dataset (ignored)
        "$PAR": "3",
        "$TOT": "6",  # 2 events fewer than DATA (accepted below)
        "$P1N": "FSC-A",
        "$P1B": "32",
        "$P2N": "SSC-A",
        "$P2B": "32",
        "$P3N": "CD3",
        "$P3B": "32",
        "$P3R": "1024",
        "$SRC": "DOE^JANE",
        "$OP": "Operator Smith",
        "$DATE": "02-MAR-2026",
        "SPILL": "2,MRN1234567,CD3,1,0.1,0,1",  # a "channel" that is an identifier
        "$P4N": "Jane Doe",  # beyond $PAR
    }
    text = bytearray(encode_text(kw))
    text += "PATIENT/Jane Doé/".encode("latin-1")  # Latin-1, not UTF-8
    text += b"PATIENT/MRN1234567/NOTE/unterminated Jane Doe"  # repeated, and no final "/"
    content = build_fcs({}, events.tobytes(), text=bytes(text), version="3.0")
    path = _write(tmp_path, "MRN1234567.fcs", content)
    data = read_fcs(path, allow_tot_mismatch=True)
    assert data.n_events == 6
    kinds = [
        "TEXT segment does not end with its delimiter",
        "not valid UTF-8",
        "appears more than once",
        "more than one dataset",
        "$TOT=6 events",
        "$MODE is missing",
        "$P1R is missing",
        "beyond $PAR=3",
        "names 1 channel(s) that are not in $PnN",
    ]
    for kind in kinds:
        assert any(kind in w for w in data.warnings), (kind, data.warnings)
    cell = join_warnings(data.warnings)
    for secret in (*IDENTIFIERS, "Doé", "unterminated"):
        assert all(secret not in w for w in data.warnings), secret
        assert secret not in cell


def test_warnings_cell_round_trip():
    warnings = ["a | b", "line\nbreak", "", "plain"]
    cell = join_warnings(warnings)
    assert cell == "a / b | line break | plain"
    assert split_warnings(cell) == ["a / b", "line break", "plain"]
    assert split_warnings(float("nan")) == [] and split_warnings(None) == []
    assert split_warnings("") == [] and join_warnings([]) == ""
