"""Tests of the FCS reader/writer (:mod:`blinaprofile.io.fcs`)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

# Free-text TEXT values are never quoted in messages (they may name a patient): numbers and
# short codes are, anything else is described by its length ("a 3-character text").
import flowio
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import blinaprofile.io.atomic as atomic
import blinaprofile.io.fcs as fcs
import blinaprofile.io.fcs_write as fcs_write
from blinaprofile.errors import (
    BlinaprofileError,
    FCSFormatError,
    InputError,
    OutputError,
    PanelMismatchError,
)
from blinaprofile.io.fcs import FCSData, read_fcs
from blinaprofile.io.fcs_write import write_fcs
from conftest_fcs_helpers import (
    build_fcs,
    encode_text,
    float_file,
    header_bytes,
    standard_keywords,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

CHANNELS = ["FSC-A", "SSC-A", "CD3"]


def _write_bytes(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _small_events(n: int = 4) -> np.ndarray:
    return np.arange(n * 3, dtype=np.float32).reshape(n, 3) * 1.5


def _shared(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"shared test data {path} is absent (needs ../shared/data next to the repo)")
    return path


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("n_events", [0, 1, 997])
@pytest.mark.parametrize("source_dtype", [np.float32, np.float64, np.int16, np.uint8])
@pytest.mark.parametrize("read_dtype", [np.float32, np.float64])
def test_round_trip_values_and_metadata(
    tmp_path: Path, n_events: int, source_dtype: type, read_dtype: type
) -> None:
    rng = np.random.default_rng(n_events)
    raw = rng.normal(100, 40, size=(n_events, 4))
    events: np.ndarray
    if np.dtype(source_dtype).kind == "f":
        events = raw.astype(source_dtype)
    else:
        events = np.clip(raw, 0, 255).astype(source_dtype)
    channels = ["FSC-A", "SSC-A", "FITC-A", "PE|Cy7-A"]
    markers = ["", "", "CD19", "CD3 ünïcode"]
    names = ["FITC-A", "PE|Cy7-A"]
    matrix = np.array([[1.0, 0.123456789012345], [1e-17, 1.0]])
    custom: dict[str, str | int | float] = {
        "$CYT": "Simulated",
        "PATIENT": "P-001",
        "NOTE": "a|b||c ends with|",
        "Lower Case Key": "x",
        "NUMBER": 42,
        "EMPTY": "",
    }
    path = tmp_path / "rt.fcs"
    write_fcs(
        path,
        events,
        channels=channels,
        markers=markers,
        spillover=(names, matrix),
        keywords=custom,
    )
    data = read_fcs(path, dtype=read_dtype)

    expected: np.ndarray = events.astype(np.float32).astype(read_dtype)
    assert data.events.dtype == np.dtype(read_dtype)
    assert data.events.shape == (n_events, 4)
    assert data.events.flags.c_contiguous
    np.testing.assert_array_equal(data.events, expected)
    assert data.n_events == n_events
    assert data.n_channels == 4
    assert data.version == "3.1"
    assert data.channels == channels
    assert data.markers == markers
    assert data.spillover is not None
    assert data.spillover[0] == names
    np.testing.assert_array_equal(data.spillover[1], matrix)
    assert data.keywords["$CYT"] == "Simulated"
    assert data.keywords["PATIENT"] == "P-001"
    assert data.keywords["NOTE"] == "a|b||c ends with|"
    assert data.keywords["LOWER CASE KEY"] == "x"
    assert data.keywords["NUMBER"] == "42"
    assert data.keywords["EMPTY"] == ""
    assert data.keywords["$DATATYPE"] == "F"
    assert data.keywords["$BYTEORD"] == "1,2,3,4"
    assert data.keywords["$MODE"] == "L"
    assert data.keywords["$P1B"] == "32"
    assert data.decades == [(0.0, 0.0)] * 4
    assert all(r >= 262144 for r in data.ranges)
    assert data.n_nonfinite == 0
    assert data.warnings == []
    assert not data.has_more_datasets
    assert data.path == os.fspath(path)


def test_zero_events_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "empty.fcs"
    write_fcs(path, np.empty((0, 3)), channels=CHANNELS)
    data = read_fcs(path)
    assert data.n_events == 0
    assert data.events.shape == (0, 3)
    assert data.events.dtype == np.float64
    assert data.channels == CHANNELS
    assert data.keywords["$TOT"] == "0"
    assert data.warnings == []


def test_range_is_ceiling_of_data_max(tmp_path: Path) -> None:
    events = np.array([[1.0, 300000.25], [2.0, -5.0]], dtype=np.float32)
    path = tmp_path / "range.fcs"
    write_fcs(path, events, channels=["A", "B"])
    data = read_fcs(path)
    assert data.ranges == [262144.0, 300001.0]


def test_written_file_is_readable_by_flowio(tmp_path: Path) -> None:
    events = _small_events(50)
    path = tmp_path / "interop.fcs"
    # flowio does not undo doubled delimiters, so the custom value avoids '|' here.
    write_fcs(path, events, channels=CHANNELS, markers=["", "", "CD3"], keywords={"K": "v/w"})
    ref = flowio.FlowData(os.fspath(path))
    assert ref.version == "3.1"
    assert ref.event_count == 50
    assert [ref.channels[i + 1]["pnn"] for i in range(3)] == CHANNELS
    np.testing.assert_array_equal(np.asarray(ref.events, dtype=np.float32).reshape(50, 3), events)
    assert ref.text["k"] == "v/w"
    assert ref.channels[3]["pns"] == "CD3"


def test_nan_and_inf_are_kept_and_counted(tmp_path: Path) -> None:
    events = _small_events(5)
    events[0, 0] = np.nan
    events[2, 1] = np.inf
    events[4, 2] = -np.inf
    path = tmp_path / "nan.fcs"
    write_fcs(path, events, channels=CHANNELS)
    data = read_fcs(path)
    assert data.n_nonfinite == 3
    assert np.isnan(data.events[0, 0])
    assert data.events[2, 1] == np.inf
    assert data.events[4, 2] == -np.inf
    np.testing.assert_array_equal(data.events[1], events[1])


def test_offsets_beyond_header_limit_go_to_keywords(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Pretend the 8-digit HEADER limit is tiny so a small file exercises the 3.1 rule.
    monkeypatch.setattr(fcs_write, "HEADER_OFFSET_LIMIT", 1000)
    events = _small_events(200)
    path = tmp_path / "large_offsets.fcs"
    write_fcs(path, events, channels=CHANNELS)
    raw = path.read_bytes()
    assert raw[26:42] == b"       0       0"
    data = read_fcs(path)
    assert int(data.keywords["$ENDDATA"]) > 1000
    assert int(data.keywords["$ENDDATA"]) - int(data.keywords["$BEGINDATA"]) + 1 == events.nbytes
    np.testing.assert_array_equal(data.events, events)


@pytest.mark.slow
def test_real_file_over_100_mb_uses_keyword_offsets(tmp_path: Path) -> None:
    n_events = 1_600_000  # x 16 channels x 4 bytes = 102.4 MB > 99,999,999
    events = np.zeros((n_events, 16), dtype=np.float32)
    events[:, 0] = np.arange(n_events, dtype=np.float32)
    events[-1] = 7.0
    path = tmp_path / "huge.fcs"
    write_fcs(path, events, channels=[f"C{i}" for i in range(16)])
    with path.open("rb") as fh:
        header = fh.read(58)
    assert header[26:42] == b"       0       0"
    data = read_fcs(path, dtype=np.float32)
    assert data.n_events == n_events
    np.testing.assert_array_equal(data.events[:, 0][:-1], events[:-1, 0])
    np.testing.assert_array_equal(data.events[-1], np.full(16, 7.0, dtype=np.float32))


def test_large_file_reads_every_event_exactly(tmp_path: Path) -> None:
    """A 1,000,000 x 16 float32 file reads whole (speed: ``benchmarks/fcs_read.py``)."""
    rng = np.random.default_rng(1)
    events = rng.normal(1000, 300, size=(1_000_000, 16)).astype(np.float32)
    channels = [f"C{i}" for i in range(16)]
    path = tmp_path / "large.fcs"
    write_fcs(path, events, channels=channels)
    data = read_fcs(path)
    assert data.n_events == 1_000_000
    assert data.channels == channels
    assert data.events.shape == (1_000_000, 16)
    assert data.events.dtype == np.float64
    assert data.events.flags.c_contiguous
    np.testing.assert_array_equal(data.events, events.astype(np.float64))
    as_f32 = read_fcs(path, dtype=np.float32)
    assert as_f32.events.dtype == np.float32
    np.testing.assert_array_equal(as_f32.events, events)


def test_only_text_reads_metadata_without_events(tmp_path: Path) -> None:
    path = tmp_path / "text_only.fcs"
    write_fcs(path, _small_events(7), channels=CHANNELS, markers=["", "", "CD3"])
    data = read_fcs(path, only_text=True)
    assert data.only_text
    assert data.n_events == 7
    assert data.events.shape == (0, 3)
    assert data.markers == ["", "", "CD3"]


def test_channel_index(tmp_path: Path) -> None:
    path = tmp_path / "idx.fcs"
    write_fcs(path, _small_events(), channels=CHANNELS)
    data = read_fcs(path)
    assert data.channel_index("CD3") == 2
    with pytest.raises(PanelMismatchError, match=r"channel 'CD4' is not in this file") as exc:
        data.channel_index("CD4")
    assert os.fspath(path) in str(exc.value)


# --------------------------------------------------------------------------- writer


def test_atomic_write_leaves_original_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sample.fcs"
    write_fcs(path, _small_events(3), channels=CHANNELS)
    original = path.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OutputError, match="simulated crash"):
        write_fcs(path, _small_events(100), channels=CHANNELS)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.fcs"]


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "ok.fcs"
    write_fcs(path, _small_events(3), channels=CHANNELS)
    write_fcs(path, _small_events(6), channels=CHANNELS)  # replace an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.fcs"]
    assert read_fcs(path).n_events == 6


def test_non_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "direct.fcs"
    write_fcs(path, _small_events(3), channels=CHANNELS, atomic=False)
    np.testing.assert_array_equal(read_fcs(path, dtype=np.float32).events, _small_events(3))


@pytest.mark.parametrize(
    ("kwargs", "phrase"),
    [
        ({"channels": ["A", "B"]}, "channels has 2 entries"),
        ({"channels": ["A", "A", "B"]}, "duplicate channel names: A"),
        ({"channels": CHANNELS, "markers": ["x"]}, "markers has 1 entries"),
        ({"channels": CHANNELS, "keywords": {"$PAR": "9"}}, "set by write_fcs itself"),
        ({"channels": CHANNELS, "keywords": {"$p2r": "9"}}, "set by write_fcs itself"),
        ({"channels": CHANNELS, "keywords": {"K": "|starts"}}, "starts with the delimiter"),
        ({"channels": CHANNELS, "keywords": {"a": "1", "A": "2"}}, "given twice"),
        (
            {"channels": CHANNELS, "spillover": (["CD3", "CD4"], np.eye(2))},
            "spillover channel 'CD4' is not one of the channels",
        ),
        ({"channels": CHANNELS, "spillover": (["CD3"], np.eye(2))}, "must be 1 x 1"),
    ],
)
def test_write_rejects_invalid_arguments(
    tmp_path: Path, kwargs: dict[str, object], phrase: str
) -> None:
    path = tmp_path / "bad_args.fcs"
    with pytest.raises(ValueError, match=phrase.replace("$", r"\$").replace("|", r"\|")):
        write_fcs(path, _small_events(), **kwargs)  # type: ignore[arg-type]
    assert not path.exists()


def test_write_rejects_float32_overflow(tmp_path: Path) -> None:
    events = np.array([[1e39, 1.0, 2.0]])
    with pytest.raises(ValueError, match="beyond the float32 range"):
        write_fcs(tmp_path / "x.fcs", events, channels=CHANNELS)


def test_read_rejects_non_float_dtype(tmp_path: Path) -> None:
    path = tmp_path / "x.fcs"
    write_fcs(path, _small_events(), channels=CHANNELS)
    with pytest.raises(ValueError, match="floating-point dtype"):
        read_fcs(path, dtype=np.int32)


# --------------------------------------------------------------------------- real files


REAL_FILES = [
    ("real-fcs/100715.fcs", "2.0", 65016, True),
    ("real-fcs/test_comp_example.fcs", "3.0", 10703, True),
    ("gatingml2-compliance/data1.fcs", "2.0", 13367, False),
    ("flowjo-workspace/68983.fcs", "3.0", 19225, True),
]


@pytest.mark.shared
@pytest.mark.parametrize(("relative", "version", "n_events", "has_spill"), REAL_FILES)
def test_real_files_match_flowio(
    relative: str, version: str, n_events: int, has_spill: bool
) -> None:
    path = _shared(relative)
    data = read_fcs(path)
    if relative.endswith("test_comp_example.fcs"):
        # The file's DATA segment is one byte longer than the events: flowio warns.
        with pytest.warns(UserWarning, match="offset"):
            ref = flowio.FlowData(os.fspath(path), ignore_offset_error=True)
        assert any("1 more than $TOT=10703" in w for w in data.warnings)
    else:
        ref = flowio.FlowData(os.fspath(path))
    n_channels = ref.channel_count
    expected = np.asarray(ref.events, dtype=np.float64).reshape(ref.event_count, n_channels)

    assert data.version == version
    assert data.n_events == n_events == ref.event_count
    assert data.channels == [ref.channels[i + 1]["pnn"] for i in range(n_channels)]
    assert data.markers == [ref.channels[i + 1].get("pns", "").strip() for i in range(n_channels)]
    assert data.events.shape == expected.shape
    np.testing.assert_array_equal(data.events, expected)
    assert data.n_nonfinite == 0
    assert not data.has_more_datasets

    spill_text = ref.text.get("spill") or ref.text.get("$spillover") or ref.text.get("spillover")
    if has_spill:
        assert spill_text is not None
        parts = spill_text.split(",")
        n = int(parts[0])
        assert data.spillover is not None
        assert data.spillover[0] == [p.strip() for p in parts[1 : 1 + n]]
        ref_matrix = np.array([float(x) for x in parts[1 + n :]]).reshape(n, n)
        np.testing.assert_array_equal(data.spillover[1], ref_matrix)
        assert set(data.spillover[0]) <= set(data.channels)
    else:
        assert spill_text is None
        assert data.spillover is None


@pytest.mark.shared
def test_real_integer_file_details() -> None:
    data = read_fcs(_shared("gatingml2-compliance/data1.fcs"), dtype=np.float32)
    assert data.keywords["$DATATYPE"] == "I"
    assert data.keywords["$CYT"] == "FACSCalibur"
    assert data.channels[:3] == ["FSC-H", "SSC-H", "FL1-H"]
    assert data.ranges[0] == 1024.0
    assert data.gains[0] == pytest.approx(3.67)
    assert data.events.dtype == np.float32
    assert data.events.max() <= 1023  # $PnR 1024: values live in 10 bits
    # The TEXT is MacRoman/Latin-1, not UTF-8, and ends with an empty value.
    assert "CELLQuest" in data.keywords["CREATOR"]
    assert any("Latin-1" in w for w in data.warnings)


@pytest.mark.shared
def test_real_file_round_trip_through_writer(tmp_path: Path) -> None:
    data = read_fcs(_shared("real-fcs/100715.fcs"), dtype=np.float32)
    assert data.spillover is not None
    out = tmp_path / "copy.fcs"
    write_fcs(
        out, data.events, channels=data.channels, markers=data.markers, spillover=data.spillover
    )
    again = read_fcs(out, dtype=np.float32)
    np.testing.assert_array_equal(again.events, data.events)
    assert again.spillover is not None
    assert again.spillover[0] == data.spillover[0]
    np.testing.assert_array_equal(again.spillover[1], data.spillover[1])


# --------------------------------------------------------------------------- other layouts


def test_fcs20_big_endian_int16_with_range_mask(tmp_path: Path) -> None:
    # $PnR=1024 -> only the low 10 bits count; high bits (e.g. flags) are masked off.
    raw = np.array([[5, 1023], [1024 + 7, 0xFC00 | 512]], dtype=">u2")
    kw = standard_keywords(["FL1-H", "FL2-H"], 2, datatype="I", bits=16, byteord="4,3,2,1")
    kw["$P1R"] = "1024"
    kw["$P2R"] = "1000"  # not a power of two: rounded up to 1024
    path = _write_bytes(tmp_path, "int16.fcs", build_fcs(kw, raw.tobytes(), version="2.0"))
    data = read_fcs(path)
    np.testing.assert_array_equal(data.events, [[5, 1023], [7, 512]])
    assert data.version == "2.0"


@pytest.mark.parametrize(("bits", "byteord"), [(8, "1,2,3,4"), (32, "4,3,2,1"), (64, "1,2,3,4")])
def test_integer_widths(tmp_path: Path, bits: int, byteord: str) -> None:
    values = np.array([[0, 1, 200], [3, 255, 17]], dtype=np.uint64)
    order = ">" if byteord.startswith("4") else "<"
    raw = values.astype(f"{order}u{bits // 8}").tobytes()
    kw = standard_keywords(["A", "B", "C"], 2, datatype="I", bits=bits, byteord=byteord, ranges=256)
    path = _write_bytes(tmp_path, f"int{bits}.fcs", build_fcs(kw, raw, version="3.0"))
    np.testing.assert_array_equal(read_fcs(path).events, values.astype(np.float64))


def test_integer_mixed_widths(tmp_path: Path) -> None:
    record = np.dtype([("a", "<u2"), ("b", "<u4"), ("c", "u1")])
    table = np.array([(1, 70000, 3), (65535, 5, 255)], dtype=record)
    kw = standard_keywords(
        ["A", "B", "C"], 2, datatype="I", bits=[16, 32, 8], ranges=[1024, 2**32, 256]
    )
    path = _write_bytes(tmp_path, "mixed.fcs", build_fcs(kw, table.tobytes()))
    np.testing.assert_array_equal(read_fcs(path).events, [[1, 70000, 3], [1023, 5, 255]])


def _layouts(n: int) -> list[tuple[str, bytes, np.ndarray]]:
    """Files in several on-disk layouts with the values a reader must return."""
    rng = np.random.default_rng(7)
    floats = rng.normal(0, 1e4, size=(n, 3))
    floats[::97, 1] = np.nan
    ints = rng.integers(0, 2**16, size=(n, 2), dtype=np.uint64)
    kw_i = standard_keywords(["A", "B"], n, datatype="I", bits=16, byteord="4,3,2,1")
    kw_i["$P1R"], kw_i["$P2R"] = "1024", "65536"
    mixed = np.zeros(n, dtype=[("a", "<u4"), ("b", "<u2"), ("c", "u1")])
    mixed["a"], mixed["b"], mixed["c"] = ints[:, 0] * 3, ints[:, 1], ints[:, 1] % 256
    kw_m = standard_keywords(
        ["A", "B", "C"], n, datatype="I", bits=[32, 16, 8], ranges=[2**32, 512, 256]
    )
    kw_d = standard_keywords(CHANNELS, n, datatype="D", bits=64, byteord="4,3,2,1")
    expected_mixed = np.stack([mixed["a"], mixed["b"] & 511, mixed["c"]], axis=1)
    return [
        ("F big-endian", float_file(floats, CHANNELS, big_endian=True), floats.astype(np.float32)),
        ("F little-endian", float_file(floats, CHANNELS), floats.astype(np.float32)),
        ("D big-endian", build_fcs(kw_d, floats.astype(">f8").tobytes()), floats),
        (
            "I16 masked",
            build_fcs(kw_i, ints.astype(">u2").tobytes()),
            ints & np.array([1023, 65535], dtype=np.uint64),
        ),
        ("I mixed widths", build_fcs(kw_m, mixed.tobytes()), expected_mixed),
    ]


@pytest.mark.parametrize("chunk_bytes", [1, 64, 1 << 20])
@pytest.mark.parametrize("read_dtype", [np.float32, np.float64])
def test_chunked_conversion_of_all_layouts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_bytes: int, read_dtype: type
) -> None:
    monkeypatch.setattr(fcs, "_CHUNK_BYTES", chunk_bytes)
    for name, content, expected in _layouts(1003):
        data = read_fcs(_write_bytes(tmp_path, "layout.fcs", content), dtype=read_dtype)
        assert data.events.dtype == np.dtype(read_dtype), name
        assert data.events.flags.c_contiguous, name
        np.testing.assert_array_equal(
            data.events, np.asarray(expected).astype(read_dtype), err_msg=name
        )
        n_nan = int(np.isnan(np.asarray(expected, dtype=np.float64)).sum())
        assert data.n_nonfinite == n_nan, name


def test_double_big_endian_and_two_byte_byteord(tmp_path: Path) -> None:
    values = np.array([[1.25, -3.5e100], [np.pi, 0.0]])
    kw = standard_keywords(["A", "B"], 2, datatype="D", bits=64, byteord="4,3,2,1")
    path = _write_bytes(tmp_path, "d.fcs", build_fcs(kw, values.astype(">f8").tobytes()))
    data = read_fcs(path)
    np.testing.assert_array_equal(data.events, values)

    ints = np.array([[513, 2]], dtype=">u2")
    kw2 = standard_keywords(["A", "B"], 1, datatype="I", bits=16, byteord="2,1", ranges=65536)
    path2 = _write_bytes(tmp_path, "i2.fcs", build_fcs(kw2, ints.tobytes()))
    np.testing.assert_array_equal(read_fcs(path2).events, [[513, 2]])


@pytest.mark.parametrize("delimiter", [b"/", b"\\", b"\x0c", b"*", b","])
def test_any_delimiter_with_escaping(tmp_path: Path, delimiter: bytes) -> None:
    d = delimiter.decode("latin-1")
    events = _small_events()
    extra = {"COMMENT": f"a{d}b{d}{d}c", "$SPILLOVER": "1,CD3,1"} if d != "," else {}
    content = float_file(events, CHANNELS, extra=extra, delimiter=delimiter, version="3.0")
    data = read_fcs(_write_bytes(tmp_path, "delim.fcs", content))
    np.testing.assert_array_equal(data.events, events)
    assert data.channels == CHANNELS
    if extra:
        assert data.keywords["COMMENT"] == f"a{d}b{d}{d}c"
        assert data.spillover is not None
        assert data.spillover[0] == ["CD3"]


def test_keywords_are_case_insensitive_and_values_stripped(tmp_path: Path) -> None:
    kw = {k.lower(): f"  {v} " for k, v in standard_keywords(CHANNELS, 4).items()}
    events = _small_events()
    path = _write_bytes(tmp_path, "lower.fcs", build_fcs(kw, events.tobytes(), version="3.0"))
    data = read_fcs(path)
    assert data.keywords["$PAR"] == "3"
    assert data.channels == CHANNELS
    np.testing.assert_array_equal(data.events, events)


def test_header_zero_offsets_use_begindata(tmp_path: Path) -> None:
    events = _small_events()
    content = float_file(events, CHANNELS, version="3.0", header_data_zero=True)
    assert content[26:42] == b"       0       0"
    np.testing.assert_array_equal(read_fcs(_write_bytes(tmp_path, "z.fcs", content)).events, events)


def test_big_endian_floats_with_gap_and_crc(tmp_path: Path) -> None:
    events = _small_events()
    content = float_file(events, CHANNELS, big_endian=True, gap=100, trailer=b"00000000")
    np.testing.assert_array_equal(
        read_fcs(_write_bytes(tmp_path, "be.fcs", content)).events, events
    )


def test_nextdata_reads_first_dataset_and_records_more(tmp_path: Path) -> None:
    events = _small_events()
    content = float_file(events, CHANNELS, extra={"$NEXTDATA": "99999"})
    data = read_fcs(_write_bytes(tmp_path, "multi.fcs", content))
    np.testing.assert_array_equal(data.events, events)
    assert data.has_more_datasets
    assert any("more than one dataset ($NEXTDATA=99999)" in w for w in data.warnings)


def test_extra_data_bytes_are_tolerated_with_warning(tmp_path: Path) -> None:
    events = _small_events()
    kw = standard_keywords(CHANNELS, 4)
    content = build_fcs(kw, events.tobytes() + b"\x00" * 8)
    data = read_fcs(_write_bytes(tmp_path, "extra.fcs", content))
    np.testing.assert_array_equal(data.events, events)
    assert any("8 more than $TOT=4 x $PAR=3 needs" in w for w in data.warnings)


def test_fcs20_without_tot_infers_event_count(tmp_path: Path) -> None:
    events = _small_events(6)
    kw = standard_keywords(CHANNELS, 6)
    del kw["$TOT"]
    content = build_fcs(kw, events.tobytes(), version="2.0", data_keywords=False)
    data = read_fcs(_write_bytes(tmp_path, "notot.fcs", content))
    assert data.n_events == 6
    assert any("$TOT is missing" in w for w in data.warnings)


def test_supplemental_text_is_merged(tmp_path: Path) -> None:
    events = _small_events()
    kw = standard_keywords(CHANNELS, 4)
    stext = encode_text({"EXTRA": "from stext", "$PAR": "3"})
    kw["$BEGINSTEXT"] = "0" * 10
    kw["$ENDSTEXT"] = "0" * 10
    content = build_fcs(kw, events.tobytes(), trailer=stext)
    start = len(content) - len(stext)
    kw["$BEGINSTEXT"] = str(start).rjust(10)
    kw["$ENDSTEXT"] = str(len(content) - 1).rjust(10)
    content = build_fcs(kw, events.tobytes(), trailer=stext)
    data = read_fcs(_write_bytes(tmp_path, "stext.fcs", content))
    assert data.keywords["EXTRA"] == "from stext"
    np.testing.assert_array_equal(data.events, events)


def test_comp_keyword_is_used_when_no_spillover(tmp_path: Path) -> None:
    content = float_file(_small_events(), CHANNELS, extra={"$COMP": "2,SSC-A,CD3,1,0.5,0,1"})
    data = read_fcs(_write_bytes(tmp_path, "comp.fcs", content))
    assert data.spillover is not None
    assert data.spillover[0] == ["SSC-A", "CD3"]
    np.testing.assert_array_equal(data.spillover[1], [[1, 0.5], [0, 1]])


# --------------------------------------------------------------------------- bad inputs


def _valid(**kwargs: object) -> bytes:
    return float_file(_small_events(), CHANNELS, **kwargs)  # type: ignore[arg-type]


def _with_keywords(**changes: str | None) -> bytes:
    """A valid 4 x 3 float file whose TEXT is altered (None deletes a keyword)."""
    kw = standard_keywords(CHANNELS, 4)
    for key, value in changes.items():
        name = key.replace("_", "$", 1) if key.startswith("_") else key
        if value is None:
            kw.pop(name, None)
        else:
            kw[name] = value
    return build_fcs(kw, _small_events().tobytes())


def _truncated_data() -> bytes:
    content = _valid()
    return content[: len(content) - 20]


def _header_only_truncated() -> bytes:
    return _valid()[:30]


def _text_truncated() -> bytes:
    return _valid()[:100]


def _par_bigger() -> bytes:
    return _with_keywords(_PAR="4", _P4B="32", _P4R="1024")


def _tot_too_large() -> bytes:
    return _with_keywords(_TOT="1000")


def _tot_absurd() -> bytes:
    return _with_keywords(_TOT=str(10**15))


def _data_start_past_eof() -> bytes:
    return _valid(header={2: 90000, 3: 90047})


def _data_end_past_eof() -> bytes:
    kw = standard_keywords(CHANNELS, 4)
    content = build_fcs(kw, _small_events().tobytes())
    start = int(content[26:34])
    return build_fcs(kw, _small_events().tobytes()[:24], header={2: start, 3: 98765})


def _begindata_non_numeric() -> bytes:
    kw = standard_keywords(CHANNELS, 4)
    kw["$BEGINDATA"] = "abc"
    kw["$ENDDATA"] = "400"
    return build_fcs(kw, _small_events().tobytes(), data_keywords=False, header_data_zero=True)


def _no_data_offsets() -> bytes:
    kw = standard_keywords(CHANNELS, 4)
    return build_fcs(kw, _small_events().tobytes(), data_keywords=False, header_data_zero=True)


def _duplicate_channels() -> bytes:
    kw = standard_keywords(["FSC-A", "SSC-A", "FSC-A"], 4)
    return build_fcs(kw, _small_events().tobytes())


def _long_keyword() -> bytes:
    return _with_keywords(**{"AN_EXTREMELY_LONG_KEYWORD_NAME_THAT_GOES_ON_AND_ON": "x" * 10_001})


def _zip_file() -> bytes:
    return b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 100


def _png_file() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + b"\x00" * 100


def _csv_file() -> bytes:
    return b"time,FSC-A,SSC-A\n1,2,3\n4,5,6\n" * 5


def _odd_fields() -> bytes:
    text = encode_text(standard_keywords(CHANNELS, 4))[:-1] + b"/$ORPHAN/"
    return build_fcs({}, _small_events().tobytes(), text=text, data_keywords=False)


def _header_text_garbage() -> bytes:
    return _valid(header={1: b"12ab5678"})


def _conflicting_duplicate_keyword() -> bytes:
    text = encode_text(standard_keywords(CHANNELS, 4)) + b"$par/7/"
    return build_fcs({}, _small_events().tobytes(), text=text, data_keywords=False)


BAD_FILES: list[tuple[str, Callable[[], bytes], str]] = [
    ("empty", lambda: b"", "not an FCS file: the file is empty (0 bytes)"),
    ("wrong_magic", lambda: b"FCX" + _valid()[3:], "not an FCS file: header starts with b'FCX3'"),
    ("zip", _zip_file, "not an FCS file: header starts with b'PK\\x03\\x04' (looks like a ZIP"),
    ("png", _png_file, "(looks like a PNG image)"),
    ("csv", _csv_file, "header starts with b'time' (looks like a text file, e.g. CSV)"),
    ("version", lambda: b"FCS4.0" + _valid()[6:], "unsupported FCS version b'FCS4.0'"),
    ("short_header", _header_only_truncated, "HEADER is 30 bytes but an FCS HEADER needs 58"),
    ("truncated_text", _text_truncated, "but the file has 100 bytes (truncated?)"),
    ("truncated_data", _truncated_data, "but the file has"),
    ("header_garbage", _header_text_garbage, "HEADER TEXT end offset is not a number: b'12ab5678'"),
    (
        "par_lies",
        _par_bigger,
        "TEXT segment says $PAR=4 but only 3 $PnN keywords are present (missing $P4N)",
    ),
    (
        "par_absurd",
        lambda: _with_keywords(_PAR=str(10**9)),
        "TEXT segment says $PAR=1000000000 but only 3 $PnN keywords are present",
    ),
    (
        "tot_lies",
        _tot_too_large,
        "DATA segment holds 48 bytes but $TOT=1000 events x $PAR=3 channels need 12000 bytes",
    ),
    ("tot_absurd", _tot_absurd, f"$TOT={10**15} events x $PAR=3 channels need"),
    ("tot_non_numeric", lambda: _with_keywords(_TOT="12e3"), "$TOT is not a non-negative integer"),
    ("data_start_past_eof", _data_start_past_eof, "DATA segment starts at byte 90000"),
    (
        "data_end_past_eof",
        _data_end_past_eof,
        "DATA segment ends at byte 98765 but the file has",
    ),
    (
        "begindata_text",
        _begindata_non_numeric,
        "$BEGINDATA is not a non-negative integer: a 3-character text",
    ),
    ("no_data_offsets", _no_data_offsets, "neither the HEADER nor $BEGINDATA/$ENDDATA"),
    ("datatype_ascii", lambda: _with_keywords(_DATATYPE="A"), "unsupported $DATATYPE 'A' (ASCII)"),
    ("datatype_missing", lambda: _with_keywords(_DATATYPE=None), "required keyword $DATATYPE"),
    ("mode_c", lambda: _with_keywords(_MODE="C"), "unsupported $MODE 'C'"),
    ("byteord", lambda: _with_keywords(_BYTEORD="3,4,1,2"), "unsupported $BYTEORD '3,4,1,2'"),
    ("pnb_missing", lambda: _with_keywords(_P2B=None), "$P2B is missing"),
    (
        "pnb_wrong_for_float",
        lambda: _with_keywords(_P1B="16"),
        "$DATATYPE F needs $PnB=32 but $P1B=16",
    ),
    (
        "pnb_odd_int",
        lambda: _with_keywords(_DATATYPE="I", _P1B="12", _P2B="12", _P3B="12"),
        "$P1B=12 is not supported",
    ),
    (
        "duplicate_channels",
        _duplicate_channels,
        "duplicate channel names in $PnN: 'FSC-A' ($P1N, $P3N)",
    ),
    ("empty_channel_name", lambda: _with_keywords(_P2N=" "), "$P2N is empty"),
    (
        "long_keyword",
        _long_keyword,
        "keyword 'AN_EXTREMELY_LONG_KEYWORD_NAME_THAT_GOES...' has a value of 10001 characters",
    ),
    ("odd_fields", _odd_fields, "odd number of fields (37): a keyword has no value"),
    (
        "conflicting_par",
        _conflicting_duplicate_keyword,
        "keyword '$PAR' appears more than once with different values",
    ),
    (
        "spill_count",
        lambda: _with_keywords(_SPILLOVER="2,FSC-A,CD3,1,0,0"),
        "$SPILLOVER declares n=2 channels, so it needs 6 comma-separated fields after n",
    ),
    (
        "spill_value",
        lambda: _with_keywords(SPILL="2,FSC-A,CD3,1,abc,0,1"),
        "SPILL value a 3-character text at row 1, column 2 is not a finite number",
    ),
    (
        "spill_nan",
        lambda: _with_keywords(_SPILL="2,FSC-A,CD3,1,0,nan,1"),
        "$SPILL value 'nan' at row 2, column 1 is not a finite number",
    ),
    (
        "spill_n",
        lambda: _with_keywords(_SPILLOVER="two,FSC-A,CD3,1,0,0,1"),
        "$SPILLOVER channel count n is not a non-negative integer: a 3-character text",
    ),
    (
        "spill_duplicate_names",
        lambda: _with_keywords(_SPILLOVER="2,CD3,CD3,1,0,0,1"),
        "$SPILLOVER names a channel more than once: CD3",
    ),
    ("pne_malformed", lambda: _with_keywords(_P1E="4"), "$P1E must be two comma-separated"),
    ("pnr_text", lambda: _with_keywords(_P3R="big"), "$P3R is not a number: a 3-character text"),
    ("nextdata_text", lambda: _with_keywords(_NEXTDATA="x"), "$NEXTDATA is not a non-negative"),
    (
        "stext_outside",
        lambda: _with_keywords(_BEGINSTEXT="5000", _ENDSTEXT="6000"),
        "supplemental TEXT segment ($BEGINSTEXT=5000, $ENDSTEXT=6000) lies outside",
    ),
]


@pytest.mark.parametrize(
    ("make", "phrase"), [(m, p) for _, m, p in BAD_FILES], ids=[n for n, _, _ in BAD_FILES]
)
def test_bad_files_raise_precise_fcs_format_error(
    tmp_path: Path, make: Callable[[], bytes], phrase: str
) -> None:
    path = _write_bytes(tmp_path, "bad.fcs", make())
    with pytest.raises(FCSFormatError) as exc:
        read_fcs(path)
    message = str(exc.value)
    assert message.startswith(f"{path}: ")
    assert phrase in message, message
    assert exc.value.path == os.fspath(path)


def test_truncated_data_message_is_exact(tmp_path: Path) -> None:
    content = _valid()
    end = int(content[34:42])
    path = _write_bytes(tmp_path, "cut.fcs", content[:-20])
    with pytest.raises(FCSFormatError) as exc:
        read_fcs(path)
    assert str(exc.value) == (
        f"{path}: DATA segment ends at byte {end} but the file has {len(content) - 20} bytes "
        f"(truncated?)"
    )


def test_bad_file_error_also_raised_with_only_text(tmp_path: Path) -> None:
    path = _write_bytes(tmp_path, "bad.fcs", _tot_too_large())
    with pytest.raises(FCSFormatError, match=r"\$TOT=1000"):
        read_fcs(path, only_text=True)


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.fcs"
    with pytest.raises(InputError) as exc:
        read_fcs(path)
    assert not isinstance(exc.value, FCSFormatError)
    assert str(exc.value) == f"{path}: file not found"


def test_directory_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError) as exc:
        read_fcs(tmp_path)
    assert str(exc.value) == f"{tmp_path}: not a regular file (it is a directory)"


def test_max_keyword_length_is_configurable(tmp_path: Path) -> None:
    path = _write_bytes(tmp_path, "kw.fcs", _with_keywords(NOTE="y" * 50))
    assert read_fcs(path).keywords["NOTE"] == "y" * 50
    with pytest.raises(FCSFormatError, match="keyword 'NOTE' has a value of 50 characters"):
        read_fcs(path, max_keyword_length=49)


def test_large_spectral_spillover_is_accepted(tmp_path: Path) -> None:
    # 45 colours: the $SPILLOVER value is far longer than 10,000 characters.
    channels = [f"FL{i}-A" for i in range(45)]
    rng = np.random.default_rng(3)
    matrix = np.eye(45) + rng.uniform(0, 0.3, size=(45, 45)) * (1 - np.eye(45))
    path = tmp_path / "spectral.fcs"
    write_fcs(path, np.ones((3, 45)), channels=channels, spillover=(channels, matrix))
    data = read_fcs(path)
    assert len(data.keywords["$SPILLOVER"]) > 10_000
    assert data.spillover is not None
    np.testing.assert_array_equal(data.spillover[1], matrix)
    with pytest.raises(FCSFormatError, match=r"keyword '\$SPILLOVER' has a value of"):
        read_fcs(path, max_keyword_length=100)


def test_writer_refuses_values_the_reader_would_refuse(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="value of keyword 'NOTE' is 10001 characters"):
        write_fcs(
            tmp_path / "x.fcs", _small_events(), channels=CHANNELS, keywords={"NOTE": "n" * 10_001}
        )


def test_many_duplicate_channels_are_reported_quickly(tmp_path: Path) -> None:
    n = 20_000
    kw = standard_keywords([f"C{i % 2}" for i in range(n)], 0)
    path = _write_bytes(tmp_path, "dups.fcs", build_fcs(kw, b""))
    start = time.perf_counter()
    with pytest.raises(
        FCSFormatError, match=r"duplicate channel names in \$PnN: 'C0' \(\$P1N, \$P3N"
    ) as exc:
        read_fcs(path)
    assert time.perf_counter() - start < 5.0
    assert "'C1' ($P2N, $P4N, $P6N, $P8N, $P10N, ...)" in str(exc.value)
    assert len(str(exc.value)) < 500


def test_lying_files_do_not_allocate(tmp_path: Path) -> None:
    # $TOT of 10**15 and $PAR of 10**9 are refused by arithmetic, before allocation.
    for name, content in (
        ("tot.fcs", _tot_absurd()),
        ("par.fcs", _with_keywords(_PAR="999999999")),
    ):
        path = _write_bytes(tmp_path, name, content)
        start = time.perf_counter()
        with pytest.raises(FCSFormatError):
            read_fcs(path)
        assert time.perf_counter() - start < 1.0


# --------------------------------------------------------------------------- fuzzing


def _fuzz_seeds() -> list[bytes]:
    events = _small_events(5)
    events[1, 1] = np.nan
    int_kw = standard_keywords(["A", "B"], 3, datatype="I", bits=[16, 8], ranges=[1000, 256])
    int_data = np.array([(1, 2), (1023, 255), (4096, 7)], dtype=[("a", ">u2"), ("b", "u1")])
    int_kw["$BYTEORD"] = "4,3,2,1"
    return [
        float_file(
            events,
            CHANNELS,
            extra={"$SPILLOVER": "2,SSC-A,CD3,1,0.1,0.2,1", "$P3S": "CD3"},
            version="3.0",
        ),
        build_fcs(int_kw, int_data.tobytes(), version="2.0", delimiter=b"\\"),
        float_file(events, CHANNELS, header_data_zero=True, big_endian=True),
        header_bytes("3.1", [58, 57, 0, 0, 0, 0]) + b"",
    ]


FUZZ_SEEDS = _fuzz_seeds()


@st.composite
def _mutated_fcs(draw: st.DrawFn) -> bytes:
    content = bytearray(draw(st.sampled_from(FUZZ_SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "digits", "delim"]))
        at = draw(st.integers(0, max(len(content) - 1, 0)))
        if op == "flip" and content:
            content[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            content[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del content[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del content[at:]
        elif op == "digits":
            digits = draw(st.text("0123456789 ", min_size=1, max_size=10)).encode()
            content[at : at + len(digits)] = digits
        elif op == "delim" and content:
            content[at] = content[58] if len(content) > 58 else ord("/")
    return bytes(content)


@settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(content=_mutated_fcs())
def test_fuzzed_bytes_only_raise_project_errors(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "fuzz.fcs"
    path.write_bytes(content)
    try:
        data = read_fcs(path)
    except BlinaprofileError as exc:
        assert str(exc).startswith(f"{path}: ")
        return
    assert isinstance(data, FCSData)
    assert data.events.shape == (data.n_events, data.n_channels)
    assert data.events.flags.c_contiguous
    assert len(data.markers) == len(data.channels) == len(data.ranges)


def test_fuzz_seeds_are_valid_or_known_invalid(tmp_path: Path) -> None:
    # The first three seeds are valid files (so the fuzzer mutates real structure).
    for i, content in enumerate(FUZZ_SEEDS[:3]):
        data = read_fcs(_write_bytes(tmp_path, f"seed{i}.fcs", content))
        assert data.n_events in (3, 5)
    ints = read_fcs(_write_bytes(tmp_path, "ints.fcs", FUZZ_SEEDS[1]))
    np.testing.assert_array_equal(ints.events, [[1, 2], [1023, 255], [0, 7]])
    with pytest.raises(FCSFormatError, match="before it starts"):
        read_fcs(_write_bytes(tmp_path, "seed3.fcs", FUZZ_SEEDS[3]))
