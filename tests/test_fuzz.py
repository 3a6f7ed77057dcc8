"""Property-based fuzzing: mutated FCS files, configs and manifests.

Hypothesis mutates valid inputs (bytes of an FCS file, its TEXT keywords, its event values;
the YAML of the gating, QC and simulation configs; a manifest) and drives reading, gating
and featurizing (and simulating, for scenarios). The property: whatever the input, the
only exceptions that escape are the project's own (:class:`BlinaprofileError`). Every test
prints how many examples it ran and how they ended.

Runs are derandomized (the same examples every run, so CI is reproducible); set
``BLINAPROFILE_FUZZ_RANDOM=1`` for fresh random examples and ``BLINAPROFILE_FUZZ_SCALE=10``
for ten times more of them.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blinaprofile.config import (
    GatingConfig,
    PanelConfig,
    QCConfig,
    SimulationConfig,
    load_config,
)
from blinaprofile.errors import BlinaprofileError
from blinaprofile.features.flow import featurize_fcs
from blinaprofile.gating.strategy import load_strategy, strategy_from_config
from blinaprofile.io.fcs import read_fcs
from blinaprofile.io.fcs_write import write_fcs
from blinaprofile.io.read import read_manifest
from conftest_fcs_helpers import build_fcs

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SCALE = float(os.environ.get("BLINAPROFILE_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("BLINAPROFILE_FUZZ_RANDOM", "") not in ("", "0")


def fuzz_settings(n: int) -> settings:
    return settings(
        max_examples=max(1, int(n * SCALE)),
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        print_blob=True,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.function_scoped_fixture,
        ],
    )


class Outcomes:
    """Counts how examples ended; the property is enforced by letting others propagate."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()

    def run(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except BlinaprofileError as err:
            self.counts[type(err).__name__] += 1
        else:
            self.counts["ok"] += 1

    def report(self) -> None:
        n = sum(self.counts.values())
        detail = ", ".join(f"{k} {v}" for k, v in self.counts.most_common())
        print(f"\nfuzz {self.name}: {n} examples ({detail}); no other exception escaped")
        # every fuzz test must really run examples (hypothesis may not silently do nothing)
        assert n >= 10, f"fuzz {self.name}: only {n} examples ran"


# --------------------------------------------------------------------------- the base input
N_EVENTS = 1200


class _Base(dict):  # type: ignore[type-arg]
    """The valid input the mutations start from (short repr: Hypothesis prints it)."""

    def __repr__(self) -> str:
        return f"<valid {N_EVENTS}-event FCS sample and its parts>"


@pytest.fixture(scope="module")
def base(small_cohort: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    src = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    full = read_fcs(src)
    root = tmp_path_factory.mktemp("fuzz")
    good = root / "base.fcs"
    write_fcs(
        good,
        full.events[:N_EVENTS],
        channels=full.channels,
        markers=full.markers,
        spillover=full.spillover,
        keywords={"$CYT": "fuzz cytometer"},
    )
    data = read_fcs(good)
    raw = good.read_bytes()
    text_end = int(raw[18:26])
    keywords = {k: v for k, v in data.keywords.items() if k not in ("$BEGINDATA", "$ENDDATA")}
    return _Base(
        root=root,
        raw=raw,
        text_end=text_end,
        keywords=keywords,
        events=data.events.astype(np.float32),
        channels=data.channels,
        markers=data.markers,
        spillover=data.spillover,
        strategy=load_strategy(),
        qc=QCConfig(),
    )


def _drive_fcs(path: Path, b: dict[str, Any]) -> None:
    """Read, gate and featurize: the whole flow path a sample takes."""
    sf = featurize_fcs(path, strategy=b["strategy"], qc=b["qc"], keep_gating=True)
    assert sf.result is not None and sf.result.n_events > 0
    for k, v in sf.row.items():
        if isinstance(v, float) and k.endswith(("_pct_cd3", "_pct_cd4", "_pct_cd8")):
            assert math.isnan(v) or 0.0 <= v <= 100.0, (k, v)


# --------------------------------------------------------------------------- FCS bytes
INTERESTING_BYTES = b"0123456789/|\\ ,$-.eE\x00\xff\n\r"


@st.composite
def byte_mutations(draw: st.DrawFn, raw: bytes, text_end: int) -> bytes:
    out = bytearray(raw)
    for _ in range(draw(st.integers(1, 4))):
        if not out:
            break
        hi = len(out) - 1
        # most mutations hit the HEADER and TEXT, where the structure is
        pos = draw(st.one_of(st.integers(0, min(text_end, hi)), st.integers(0, hi)))
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "number"]))
        if op == "flip":
            out[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            out[pos] = draw(st.sampled_from(list(INTERESTING_BYTES)) | st.integers(0, 255))
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
        else:  # rewrite a number of the HEADER/TEXT: offsets, $PAR, $TOT, $PnB, $PnR ...
            runs = [m.span() for m in re.finditer(rb"\d+", bytes(out[: text_end + 1]))]
            if runs:
                a, z = draw(st.sampled_from(runs))
                value = draw(st.integers(0, 10**20) | st.integers(0, 10_000))
                out[a:z] = str(value).encode()
    return bytes(out)


def test_fuzz_fcs_bytes(base: dict[str, Any]) -> None:
    out = Outcomes("FCS bytes")
    target = base["root"] / "bytes.fcs"

    @fuzz_settings(300)
    @given(payload=byte_mutations(base["raw"], base["text_end"]))
    def check(payload: bytes) -> None:
        target.write_bytes(payload)
        out.run(lambda: _drive_fcs(target, base))

    check()
    out.report()


# --------------------------------------------------------------------------- FCS keywords
_KEY_VALUES = st.one_of(
    st.integers(-3, 10**19).map(str),
    st.sampled_from(
        [
            "",
            " ",
            "0",
            "-1",
            "nan",
            "inf",
            "-inf",
            "1e308",
            "abc",
            "0,0",
            "4,3,2,1",
            "1,2",
            "1,2,3",
            "*",
            "F",
            "D",
            "I",
            "A",
            "L",
            "C",
            "32",
            "16",
            "8",
            "64",
            "7",
            "CD8",
            "CD3",
            "Live/Dead",
            "TIM-3",
            "PD-1",
            "CCR7",
            "CD45RA",
            "FSC-A",
            "SSC-A",
            "Time",
        ]
    ),
    st.text(max_size=24),
)


@st.composite
def keyword_mutations(draw: st.DrawFn, b: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    kw = dict(b["keywords"])
    names = sorted(kw)
    for _ in range(draw(st.integers(1, 5))):
        op = draw(st.sampled_from(["set", "set", "delete", "add", "spillover"]))
        if op == "set":
            kw[draw(st.sampled_from(names))] = draw(_KEY_VALUES)
        elif op == "delete":
            kw.pop(draw(st.sampled_from(names)), None)
        elif op == "add":
            i = draw(st.integers(1, 20))
            kw[f"$P{i}{draw(st.sampled_from('NSBERGV'))}"] = draw(_KEY_VALUES)
        else:
            n = draw(st.integers(0, 12))
            chans = draw(st.lists(st.sampled_from(b["channels"] + ["X"]), min_size=n, max_size=n))
            size = max(0, n * n + draw(st.sampled_from([-1, 0, 0, 1])))
            vals = draw(
                st.lists(
                    st.floats(allow_nan=True, allow_infinity=True, width=32).map(repr)
                    | st.sampled_from(["0", "1", "-1", "1e300"]),
                    min_size=size,
                    max_size=size,
                )
            )
            kw["$SPILLOVER"] = ",".join([str(n), *chans, *vals])
    data = np.ascontiguousarray(b["events"], dtype="<f4").tobytes()
    cut = draw(st.sampled_from([None, None, None, 0, len(data) // 2, len(data) - 3]))
    if cut is not None:
        data = data[:cut]
    return kw, data


def test_fuzz_fcs_keywords(base: dict[str, Any]) -> None:
    out = Outcomes("FCS TEXT keywords")
    target = base["root"] / "keywords.fcs"

    @fuzz_settings(250)
    @given(case=keyword_mutations(base))
    def check(case: tuple[dict[str, str], bytes]) -> None:
        kw, data = case
        try:
            payload = build_fcs(kw, data)
        except (UnicodeEncodeError, AssertionError):  # the test helper cannot encode it
            return
        target.write_bytes(payload)
        out.run(lambda: _drive_fcs(target, base))

    check()
    out.report()


# --------------------------------------------------------------------------- event values
_EXTREME = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 1e30, -1e30, 262143.0, -1.0]),
)


def test_fuzz_event_values(base: dict[str, Any]) -> None:
    out = Outcomes("event values")
    target = base["root"] / "values.fcs"
    n_ev, n_ch = base["events"].shape

    @fuzz_settings(120)
    @given(
        cells=st.lists(
            st.tuples(st.integers(0, n_ev - 1), st.integers(0, n_ch - 1), _EXTREME),
            min_size=1,
            max_size=40,
        ),
        whole_column=st.none() | st.tuples(st.integers(0, n_ch - 1), _EXTREME),
        n_rows=st.sampled_from([n_ev, n_ev, 1, 2, 7]),
    )
    def check(
        cells: list[tuple[int, int, float]],
        whole_column: tuple[int, float] | None,
        n_rows: int,
    ) -> None:
        ev = base["events"].copy()
        for i, j, v in cells:
            ev[i, j] = v
        if whole_column is not None:
            ev[:, whole_column[0]] = whole_column[1]
        write_fcs(
            target,
            ev[:n_rows],
            channels=base["channels"],
            markers=base["markers"],
            spillover=base["spillover"],
        )
        out.run(lambda: _drive_fcs(target, base))

    check()
    out.report()


# --------------------------------------------------------------------------- configs
_ANY_VALUE = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**12), 10**12),
        st.sampled_from([0, 1, -1, 2**63, 10**30]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=12),
        st.sampled_from(["logicle", "rectangle", "polygon", "root", "live", "cd8", "CD8", "file"]),
    ),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        node = node[p]
    return node


@st.composite
def config_mutations(draw: st.DrawFn, source: Path) -> str:
    text = source.read_text(encoding="utf-8")
    if draw(st.integers(0, 9)) == 0:  # text-level damage
        pos = draw(st.integers(0, len(text)))
        return text[:pos] + draw(st.text(max_size=6)) + text[pos + draw(st.integers(0, 6)) :]
    data = yaml.safe_load(text)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(data)
        path = draw(st.sampled_from(paths))
        parent_path, leaf = path[:-1], path[-1] if path else None
        op = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate", "number"]))
        if not path:
            if op == "add" and isinstance(data, dict):
                data[draw(st.text(max_size=8))] = draw(_ANY_VALUE)
            continue
        parent = _get(data, parent_path)
        if op == "replace":
            parent[leaf] = draw(_ANY_VALUE)
        elif op == "delete":
            del parent[leaf]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(_ANY_VALUE)
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(leaf, parent[leaf])
        elif (
            op == "number"
            and isinstance(parent[leaf], int | float)
            and not isinstance(parent[leaf], bool)
        ):
            factor = draw(st.sampled_from([-1.0, 0.0, 0.5, 2.0, 1e6, -1e-9]))
            parent[leaf] = type(parent[leaf])(parent[leaf] * factor) if factor else 0
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def test_fuzz_gating_config(base: dict[str, Any]) -> None:
    out = Outcomes("gating YAML")
    target = base["root"] / "gating.yaml"
    fcs = base["root"] / "base.fcs"

    @fuzz_settings(150)
    @given(text=config_mutations(CONFIGS / "gating" / "default_tcell.yaml"))
    def check(text: str) -> None:
        target.write_text(text, encoding="utf-8")

        def drive() -> None:
            tree = strategy_from_config(load_config(GatingConfig, target))
            featurize_fcs(fcs, strategy=tree, qc=base["qc"])

        out.run(drive)

    check()
    out.report()


def test_fuzz_qc_config(base: dict[str, Any]) -> None:
    out = Outcomes("QC YAML")
    target = base["root"] / "qc.yaml"
    fcs = base["root"] / "base.fcs"

    @fuzz_settings(80)
    @given(text=config_mutations(CONFIGS / "qc.yaml"))
    def check(text: str) -> None:
        target.write_text(text, encoding="utf-8")

        def drive() -> None:
            qc = load_config(QCConfig, target)
            featurize_fcs(fcs, strategy=base["strategy"], qc=qc)

        out.run(drive)

    check()
    out.report()


def test_fuzz_simulation_config(base: dict[str, Any]) -> None:
    from blinaprofile.simulate.flow import simulate_cohort

    out = Outcomes("simulation YAML")
    target = base["root"] / "scenario.yaml"
    panel = load_config(PanelConfig, CONFIGS / "panels" / "post_hct_tcell.yaml")
    sim_dir = base["root"] / "sim"

    @fuzz_settings(40)
    @given(text=config_mutations(CONFIGS / "simulation" / "default.yaml"))
    def check(text: str) -> None:
        target.write_text(text, encoding="utf-8")

        def drive() -> None:
            cfg = load_config(SimulationConfig, target)
            cfg = cfg.model_copy(update={"timepoints": cfg.timepoints[:2]})
            res = simulate_cohort(cfg, sim_dir, panel=panel, n_patients=2, events_per_sample=400)
            first = sorted((res.out_dir / "fcs").glob("*.fcs"))[0]
            featurize_fcs(first, strategy=base["strategy"], qc=base["qc"])

        out.run(drive)

    check()
    out.report()


# --------------------------------------------------------------------------- manifests
@st.composite
def manifest_bytes(draw: st.DrawFn) -> bytes:
    rows = ["sample_id,file,patient_id,response", "S1,a.fcs,P1,R", "S2,b.fcs,P2,NR"]
    text = "\n".join(rows) + "\n"
    raw = bytearray(text.encode())
    for _ in range(draw(st.integers(1, 4))):
        pos = draw(st.integers(0, len(raw)))
        op = draw(st.sampled_from(["insert", "delete", "set"]))
        if op == "insert":
            raw[pos:pos] = draw(
                st.binary(max_size=6) | st.sampled_from([b",", b'"', b"\n", b";", b"\t"])
            )
        elif op == "delete":
            del raw[pos : pos + draw(st.integers(1, 8))]
        elif raw and pos < len(raw):
            raw[pos] = draw(st.integers(0, 255))
    return bytes(raw)


def test_fuzz_manifest(tmp_path: Path) -> None:
    out = Outcomes("manifest CSV")
    for name in ("a.fcs", "b.fcs"):
        (tmp_path / name).write_bytes(b"x")
    target = tmp_path / "manifest.csv"

    @fuzz_settings(200)
    @given(payload=manifest_bytes())
    def check(payload: bytes) -> None:
        target.write_bytes(payload)

        def drive() -> None:
            df = read_manifest(target)
            assert df["sample_id"].is_unique and (df["sample_id"] != "").all()
            assert {"sample_id", "patient_id", "path", "response"} <= set(df.columns)

        out.run(drive)

    check()
    out.report()
