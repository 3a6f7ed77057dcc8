"""The bad-input corpus: every broken input a lab can hand the tool, generated here.

Each case is written to a temporary folder by the test itself and checked twice:

- through the Python API: the project's own error type, a phrase of the message and the
  file's path in the message;
- through the CLI (a subprocess): a non-zero exit, exactly one line on stderr that names
  the file, no traceback (a traceback only with ``--debug``), and no output file left behind.

``test_corpus_table`` builds the table (case -> error type -> message) on its own, checks
that ``docs/reliability.md`` lists every case with the same error type, and prints it (run
with ``-s`` to see it). A cohort goes on past bad samples: see
``test_featurize_manifest_goes_on_past_bad_samples``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from blinaprofile.config import (
    GatingConfig,
    PanelConfig,
    SimulationConfig,
    TrainConfig,
    load_config,
)
from blinaprofile.errors import (
    BlinaprofileError,
    ConfigError,
    FCSFormatError,
    InputError,
    ManifestError,
    PanelMismatchError,
    SingleCellInputError,
)
from blinaprofile.features.flow import featurize_fcs, featurize_manifest, load_qc
from blinaprofile.features.singlecell import featurize_single_cell
from blinaprofile.gating.strategy import load_strategy
from blinaprofile.io.fcs import read_fcs
from blinaprofile.io.fcs_write import write_fcs
from blinaprofile.io.read import read_manifest
from conftest_fcs_helpers import build_fcs, encode_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
RELIABILITY_DOC = ROOT / "docs" / "reliability.md"
N_EVENTS = 3000


# --------------------------------------------------------------------------- the good input
@dataclass
class Base:
    """A valid sample (and what is needed to break it) shared by every case."""

    root: Path
    fcs: Path
    keywords: dict[str, str]
    events: np.ndarray
    channels: list[str]
    markers: list[str]
    spillover: Any
    features_csv: Path
    strategy: Any = field(repr=False, default=None)

    @property
    def data_bytes(self) -> bytes:
        return np.ascontiguousarray(self.events, dtype="<f4").tobytes()

    def text_keywords(self) -> dict[str, str]:
        """The TEXT keywords without the DATA offsets (``build_fcs`` adds them)."""
        return {k: v for k, v in self.keywords.items() if k not in ("$BEGINDATA", "$ENDDATA")}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, small_cohort: Any) -> Base:
    root = tmp_path_factory.mktemp("bad_inputs_base")
    src = sorted((small_cohort.out_dir / "fcs").glob("*.fcs"))[0]
    full = read_fcs(src)
    fcs = root / "good.fcs"
    write_fcs(
        fcs,
        full.events[:N_EVENTS],
        channels=full.channels,
        markers=full.markers,
        spillover=full.spillover,
        keywords={"$CYT": "test cytometer"},
    )
    good = read_fcs(fcs)
    feats = root / "features.csv"
    pd.DataFrame({"sample_id": ["a", "b"], "patient_id": ["a", "b"], "response": [1, 0]}).to_csv(
        feats, index=False
    )
    return Base(
        root=root,
        fcs=fcs,
        keywords=dict(good.keywords),
        events=good.events.astype(np.float32),
        channels=list(good.channels),
        markers=list(good.markers),
        spillover=good.spillover,
        features_csv=feats,
        strategy=load_strategy(),
    )


# --------------------------------------------------------------------------- FCS builders
def _write(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


def _with_keywords(b: Base, d: Path, name: str, **changes: str | None) -> Path:
    kw = b.text_keywords()
    for k, v in changes.items():
        key = k.replace("_", "$", 1) if k.startswith("_") else k
        if v is None:
            kw.pop(key, None)
        else:
            kw[key] = v
    return _write(d / name, build_fcs(kw, b.data_bytes))


def fcs_truncated_data(b: Base, d: Path) -> Path:
    raw = b.fcs.read_bytes()
    return _write(d / "truncated.fcs", raw[: len(raw) // 2])


def fcs_truncated_header(b: Base, d: Path) -> Path:
    return _write(d / "truncated_header.fcs", b.fcs.read_bytes()[:40])


def fcs_truncated_text(b: Base, d: Path) -> Path:
    return _write(d / "truncated_text.fcs", b.fcs.read_bytes()[:300])


def fcs_wrong_magic(b: Base, d: Path) -> Path:
    return _write(d / "wrong_magic.fcs", b"FCX" + b.fcs.read_bytes()[3:])


def fcs_unsupported_version(b: Base, d: Path) -> Path:
    return _write(d / "version.fcs", b"FCS9.9" + b.fcs.read_bytes()[6:])


def fcs_par_lies(b: Base, d: Path) -> Path:
    return _with_keywords(b, d, "par_lies.fcs", _PAR=str(len(b.channels) + 3))


def fcs_tot_lies(b: Base, d: Path) -> Path:
    return _with_keywords(b, d, "tot_lies.fcs", _TOT=str(2 * N_EVENTS))


def fcs_tot_huge(b: Base, d: Path) -> Path:
    return _with_keywords(b, d, "tot_huge.fcs", _TOT=str(10**15))


def fcs_data_offset_past_end(b: Base, d: Path) -> Path:
    kw = b.text_keywords()
    size = len(build_fcs(kw, b.data_bytes))
    payload = build_fcs(kw, b.data_bytes, header={2: size + 1000, 3: size + 5000})
    return _write(d / "data_past_end.fcs", payload)


def fcs_data_offset_in_header(b: Base, d: Path) -> Path:
    payload = build_fcs(b.text_keywords(), b.data_bytes, header={2: 10})
    return _write(d / "data_in_header.fcs", payload)


def fcs_text_offset_past_end(b: Base, d: Path) -> Path:
    payload = build_fcs(b.text_keywords(), b.data_bytes, header={1: 99_999_000})
    return _write(d / "text_past_end.fcs", payload)


def fcs_csv_not_fcs(b: Base, d: Path) -> Path:
    return _write(d / "export.fcs", b"event,FSC-A,SSC-A\n1,100.5,200.25\n2,101.0,180.0\n")


def fcs_zip_not_fcs(b: Base, d: Path) -> Path:
    return _write(d / "workbook.fcs", b"PK\x03\x04" + bytes(200))


def fcs_empty(b: Base, d: Path) -> Path:
    return _write(d / "empty.fcs", b"")


def fcs_zero_events(b: Base, d: Path) -> Path:
    p = d / "zero_events.fcs"
    write_fcs(p, np.empty((0, len(b.channels))), channels=b.channels, markers=b.markers)
    return p


def _events_with(b: Base, value: float) -> np.ndarray:
    ev = b.events.copy()
    ev[17, 5] = value
    ev[1234, 2] = value
    return ev


def fcs_nan_values(b: Base, d: Path) -> Path:
    p = d / "nan.fcs"
    write_fcs(p, _events_with(b, np.nan), channels=b.channels, markers=b.markers)
    return p


def fcs_inf_values(b: Base, d: Path) -> Path:
    p = d / "inf.fcs"
    write_fcs(p, _events_with(b, np.inf), channels=b.channels, markers=b.markers)
    return p


def fcs_duplicate_channels(b: Base, d: Path) -> Path:
    return _with_keywords(b, d, "duplicate_channels.fcs", _P3N=b.channels[1])


def fcs_missing_marker(b: Base, d: Path) -> Path:
    keep = [i for i, m in enumerate(b.markers) if m != "CD8"]
    assert len(keep) == len(b.channels) - 1, b.markers
    p = d / "no_cd8.fcs"
    write_fcs(
        p,
        b.events[:, keep],
        channels=[b.channels[i] for i in keep],
        markers=[b.markers[i] for i in keep],
    )
    return p


def fcs_long_keyword(b: Base, d: Path) -> Path:
    kw = b.text_keywords()
    kw["$COM"] = "x" * 200_000
    return _write(d / "long_keyword.fcs", build_fcs(kw, b.data_bytes))


def fcs_odd_text(b: Base, d: Path) -> Path:
    kw = b.text_keywords()
    raw = encode_text(kw) + b"$DANGLING/"
    return _write(d / "odd_text.fcs", build_fcs(kw, b.data_bytes, text=raw))


def fcs_ascii_datatype(b: Base, d: Path) -> Path:
    return _with_keywords(b, d, "ascii.fcs", _DATATYPE="A")


def fcs_bad_bit_width(b: Base, d: Path) -> Path:
    return _with_keywords(b, d, "bits.fcs", _P3B="thirty-two")


def fcs_bad_byteorder(b: Base, d: Path) -> Path:
    return _with_keywords(b, d, "byteord.fcs", _BYTEORD="3,4,1,2")


def fcs_not_found(b: Base, d: Path) -> Path:
    return d / "never_written.fcs"


def fcs_directory(b: Base, d: Path) -> Path:
    p = d / "folder.fcs"
    p.mkdir()
    return p


# --------------------------------------------------------------------------- manifests
def _manifest(d: Path, name: str, text: str | bytes, *, with_files: int = 2) -> Path:
    for i in range(with_files):
        target = d / f"s{i}.fcs"
        if not target.exists():
            shutil.copy(d.parent / "good.fcs", target)
    p = d / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def man_missing_files(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "sample_id,file\nA,s0.fcs\nB,gone.fcs\n")


def man_duplicate_ids(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "sample_id,file\nA,s0.fcs\nA,s1.fcs\n")


def man_unknown_labels(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "sample_id,file,response\nA,s0.fcs,R\nB,s1.fcs,partial\n")


def man_latin1(b: Base, d: Path) -> Path:
    text = "sample_id,file,site\nA,s0.fcs,Zürich\nB,s1.fcs,Genève\n"
    return _manifest(d, "m.csv", text.encode("latin-1"))


def man_utf16(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "sample_id,file\nA,s0.fcs\n".encode("utf-16"))


def man_excel(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", b"PK\x03\x04\x14\x00\x06\x00" + bytes(100))


def man_missing_column(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "sample_id,fcs_path\nA,s0.fcs\n")


def man_empty(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "")


def man_header_only(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "sample_id,file,response\n")


def man_nul_bytes(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", b"sample_id,file\nA,s0\x00.fcs\n")


def man_path_in_id(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "sample_id,file\n../../etc/A,s0.fcs\n")


def man_duplicate_columns(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "sample_id,file,Sample_ID\nA,s0.fcs,B\n")


def man_unclosed_quote(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", 'sample_id,file\nA,"s0.fcs\nB,s1.fcs\n')


def man_unlabelled_for_training(b: Base, d: Path) -> Path:
    return _manifest(d, "m.csv", "sample_id,file,response\nA,s0.fcs,R\nB,s1.fcs,\n")


def man_not_found(b: Base, d: Path) -> Path:
    return d / "no_manifest.csv"


# --------------------------------------------------------------------------- configs
def _config_from(d: Path, name: str, source: Path, edit: Callable[[str], str]) -> Path:
    p = d / name
    p.write_text(edit(source.read_text(encoding="utf-8")), encoding="utf-8")
    return p


SIM = CONFIGS / "simulation" / "default.yaml"
GATING = CONFIGS / "gating" / "default_tcell.yaml"
PANEL = CONFIGS / "panels" / "post_hct_tcell.yaml"
TRAIN = CONFIGS / "train" / "default.yaml"
QC = CONFIGS / "qc.yaml"


def _sub(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert old in text, old
        return text.replace(old, new, 1)

    return edit


def cfg_wrong_type(b: Base, d: Path) -> Path:
    return _config_from(d, "sim.yaml", SIM, _sub("n_patients: 40", "n_patients: forty"))


def cfg_unknown_key(b: Base, d: Path) -> Path:
    return _config_from(d, "sim.yaml", SIM, _sub("n_patients: 40", "n_patient: 40"))


def cfg_fraction_out_of_range(b: Base, d: Path) -> Path:
    return _config_from(
        d, "sim.yaml", SIM, _sub("responder_fraction: 0.5", "responder_fraction: 1.5")
    )


def cfg_nan(b: Base, d: Path) -> Path:
    return _config_from(
        d, "sim.yaml", SIM, _sub("within_patient_sd: 0.2", "within_patient_sd: .nan")
    )


def cfg_timepoint_path(b: Base, d: Path) -> Path:
    return _config_from(d, "sim.yaml", SIM, _sub("timepoints: [D28]", "timepoints: [../D28]"))


def cfg_composition(b: Base, d: Path) -> Path:
    return _config_from(d, "sim.yaml", SIM, _sub("debris: 0.06", "debris: 0.9"))


def cfg_qc_negative(b: Base, d: Path) -> Path:
    return _config_from(d, "qc.yaml", QC, _sub("min_events: 5000", "min_events: -5000"))


def cfg_qc_wrong_type(b: Base, d: Path) -> Path:
    return _config_from(d, "qc.yaml", QC, _sub("ood_max_z: 4.0", "ood_max_z: four"))


def cfg_train_threshold(b: Base, d: Path) -> Path:
    return _config_from(
        d,
        "train.yaml",
        TRAIN,
        _sub("threshold: {rule: max_balanced_accuracy}", "threshold: {rule: fixed, value: 1.5}"),
    )


def cfg_train_family(b: Base, d: Path) -> Path:
    return _config_from(d, "train.yaml", TRAIN, _sub("family: xgboost", "family: deep_net"))


def cfg_gating_parent(b: Base, d: Path) -> Path:
    return _config_from(d, "gating.yaml", GATING, _sub("parent: live", "parent: alive"))


def cfg_gating_logicle(b: Base, d: Path) -> Path:
    text = GATING.read_text(encoding="utf-8")
    assert "type: logicle" in text
    return _config_from(d, "gating.yaml", GATING, lambda t: t.replace("w: 0.5", "w: 3.0", 1))


def cfg_panel_duplicate(b: Base, d: Path) -> Path:
    def edit(text: str) -> str:
        return text.replace("channel: FSC-H", "channel: FSC-A", 1)

    return _config_from(d, "panel.yaml", PANEL, edit)


def cfg_yaml_syntax(b: Base, d: Path) -> Path:
    return _config_from(d, "sim.yaml", SIM, lambda t: t + "\nlatent: [unclosed\n")


def cfg_duplicate_key(b: Base, d: Path) -> Path:
    return _config_from(d, "sim.yaml", SIM, lambda t: t + "\nn_patients: 60\n")


def cfg_python_tag(b: Base, d: Path) -> Path:
    marker = d / "pwned"
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    return _config_from(d, "sim.yaml", SIM, _sub("name: default", f"name: {tag}"))


def cfg_top_level_list(b: Base, d: Path) -> Path:
    p = d / "sim.yaml"
    p.write_text("- name: default\n- n_patients: 40\n", encoding="utf-8")
    return p


def cfg_bad_date(b: Base, d: Path) -> Path:
    return _config_from(d, "sim.yaml", SIM, _sub("name: default", "name: 2024-13-45"))


def cfg_not_utf8(b: Base, d: Path) -> Path:
    p = d / "sim.yaml"
    p.write_bytes(SIM.read_bytes().replace(b"name: default", b"name: d\xe9faut"))
    return p


def cfg_not_found(b: Base, d: Path) -> Path:
    return d / "missing.yaml"


# --------------------------------------------------------------------------- single cell
def _h5ad(d: Path, name: str, *, genes: list[str], obs: dict[str, list[str]]) -> Path:
    rng = np.random.default_rng(0)
    n = len(next(iter(obs.values())))
    adata = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(1.0, (n, len(genes))).astype(np.float32)),
        obs=pd.DataFrame(obs, index=[f"cell{i}" for i in range(n)]),
        var=pd.DataFrame(index=genes),
    )
    p = d / name
    adata.write_h5ad(p)
    return p


def sc_no_genes(b: Base, d: Path) -> Path:
    genes = [f"GENE{i}" for i in range(40)]
    return _h5ad(d, "no_genes.h5ad", genes=genes, obs={"sample": ["s1"] * 150})


def sc_no_sample_key(b: Base, d: Path) -> Path:
    genes = ["CD3E", "CD3D", "CD8A", "CD4", *[f"GENE{i}" for i in range(30)]]
    return _h5ad(d, "no_sample_key.h5ad", genes=genes, obs={"donor": ["a"] * 150})


def sc_not_h5ad(b: Base, d: Path) -> Path:
    return _write(d / "broken.h5ad", b"\x89HDF\r\n\x1a\n" + bytes(64))


# --------------------------------------------------------------------------- the corpus
@dataclass(frozen=True)
class Case:
    name: str
    kind: str  # fcs, manifest, train-manifest, config:<Model>, qc, h5ad, h5ad-key
    make: Callable[[Base, Path], Path]
    error: type[BlinaprofileError]
    phrase: str


# fmt: off
CASES: list[Case] = [
    Case("truncated FCS (DATA cut)", "fcs", fcs_truncated_data, FCSFormatError, "truncated"),
    Case("truncated FCS (HEADER cut)", "fcs", fcs_truncated_header, FCSFormatError, "truncated"),
    Case("truncated FCS (TEXT cut)", "fcs", fcs_truncated_text, FCSFormatError, "truncated"),
    Case("wrong magic", "fcs", fcs_wrong_magic, FCSFormatError, "not an FCS file"),
    Case("unsupported version", "fcs", fcs_unsupported_version, FCSFormatError, "unsupported FCS version"),
    Case("TEXT lies: $PAR", "fcs", fcs_par_lies, FCSFormatError, "$PAR=18"),
    Case("TEXT lies: $TOT", "fcs", fcs_tot_lies, FCSFormatError, "$TOT too large"),
    Case("TEXT lies: $TOT = 10**15", "fcs", fcs_tot_huge, FCSFormatError, "$TOT too large"),
    Case("DATA offsets past the end", "fcs", fcs_data_offset_past_end, FCSFormatError, "DATA segment starts at byte"),
    Case("DATA offset inside HEADER", "fcs", fcs_data_offset_in_header, FCSFormatError, "inside the 58-byte HEADER"),
    Case("TEXT offset past the end", "fcs", fcs_text_offset_past_end, FCSFormatError, "TEXT segment ends at byte"),
    Case("not an FCS (CSV text)", "fcs", fcs_csv_not_fcs, FCSFormatError, "looks like a text file"),
    Case("not an FCS (zip/xlsx)", "fcs", fcs_zip_not_fcs, FCSFormatError, "ZIP archive"),
    Case("empty file", "fcs", fcs_empty, FCSFormatError, "the file is empty"),
    Case("zero events", "fcs", fcs_zero_events, FCSFormatError, "zero events"),
    Case("NaN values", "fcs", fcs_nan_values, FCSFormatError, "NaN or infinite"),
    Case("inf values", "fcs", fcs_inf_values, FCSFormatError, "NaN or infinite"),
    Case("duplicate channel names", "fcs", fcs_duplicate_channels, FCSFormatError, "duplicate channel names"),
    Case("missing marker (no CD8)", "fcs", fcs_missing_marker, PanelMismatchError, "missing marker(s) CD8"),
    Case("absurdly long keyword value", "fcs", fcs_long_keyword, FCSFormatError, "has a value of 200000 characters"),
    Case("keyword without value", "fcs", fcs_odd_text, FCSFormatError, "odd number of fields"),
    Case("ASCII $DATATYPE", "fcs", fcs_ascii_datatype, FCSFormatError, "unsupported $DATATYPE"),
    Case("non-numeric $PnB", "fcs", fcs_bad_bit_width, FCSFormatError, "$P3B"),
    Case("unsupported $BYTEORD", "fcs", fcs_bad_byteorder, FCSFormatError, "unsupported $BYTEORD"),
    Case("FCS file not found", "fcs", fcs_not_found, InputError, "file not found"),
    Case("FCS path is a folder", "fcs", fcs_directory, InputError, "not a regular file"),
    Case("manifest: missing files", "manifest", man_missing_files, ManifestError, "file(s) not found: ['gone.fcs']"),
    Case("manifest: duplicate sample IDs", "manifest", man_duplicate_ids, ManifestError, "duplicate sample_id(s) ['A']"),
    Case("manifest: unknown labels", "manifest", man_unknown_labels, ManifestError, "unknown response label(s) ['partial']"),
    Case("manifest: Latin-1 encoding", "manifest", man_latin1, ManifestError, "not UTF-8 text"),
    Case("manifest: UTF-16 encoding", "manifest", man_utf16, ManifestError, "UTF-16"),
    Case("manifest: Excel workbook", "manifest", man_excel, ManifestError, "Excel workbook"),
    Case("manifest: missing column", "manifest", man_missing_column, ManifestError, "missing column(s) ['file']"),
    Case("manifest: empty", "manifest", man_empty, ManifestError, "the manifest is empty"),
    Case("manifest: header only", "manifest", man_header_only, ManifestError, "no samples"),
    Case("manifest: NUL bytes", "manifest", man_nul_bytes, ManifestError, "NUL characters"),
    Case("manifest: path in sample_id", "manifest", man_path_in_id, ManifestError, "path separator"),
    Case("manifest: duplicate columns", "manifest", man_duplicate_columns, ManifestError, "appear more than once"),
    Case("manifest: unclosed quote", "manifest", man_unclosed_quote, ManifestError, "not a valid CSV"),
    Case("manifest: not found", "manifest", man_not_found, ManifestError, "manifest not found"),
    Case("manifest: unlabelled sample (training)", "train-manifest", man_unlabelled_for_training, ManifestError, "no response label"),
    Case("config: wrong type", "config:SimulationConfig", cfg_wrong_type, ConfigError, "n_patients: Input should be a valid integer"),
    Case("config: unknown key", "config:SimulationConfig", cfg_unknown_key, ConfigError, "n_patient: unknown key"),
    Case("config: fraction out of range", "config:SimulationConfig", cfg_fraction_out_of_range, ConfigError, "responder_fraction: Input should be less than 1"),
    Case("config: NaN", "config:SimulationConfig", cfg_nan, ConfigError, "within_patient_sd: Input should be a finite number"),
    Case("config: timepoint with a path", "config:SimulationConfig", cfg_timepoint_path, ConfigError, "timepoints.0"),
    Case("config: composition leaves no cells", "config:SimulationConfig", cfg_composition, ConfigError, "no live lymphocytes"),
    Case("config: QC threshold negative", "qc", cfg_qc_negative, ConfigError, "min_events: Input should be greater than or equal to 0"),
    Case("config: QC wrong type", "qc", cfg_qc_wrong_type, ConfigError, "ood_max_z: Input should be a valid number"),
    Case("config: train threshold > 1", "config:TrainConfig", cfg_train_threshold, ConfigError, "threshold.value: Input should be less than or equal to 1"),
    Case("config: unknown model family", "config:TrainConfig", cfg_train_family, ConfigError, "models.1.family"),
    Case("config: gate parent undefined", "config:GatingConfig", cfg_gating_parent, ConfigError, "parent 'alive' is not defined"),
    Case("config: logicle w > m/2", "config:GatingConfig", cfg_gating_logicle, ConfigError, "w <= m / 2"),
    Case("config: panel duplicate channel", "config:PanelConfig", cfg_panel_duplicate, ConfigError, "duplicate channel names"),
    Case("config: YAML syntax", "config:SimulationConfig", cfg_yaml_syntax, ConfigError, "not valid YAML"),
    Case("config: duplicate YAML key", "config:SimulationConfig", cfg_duplicate_key, ConfigError, "duplicate key 'n_patients'"),
    Case("config: Python tag in YAML", "config:SimulationConfig", cfg_python_tag, ConfigError, "not valid YAML"),
    Case("config: top level is a list", "config:SimulationConfig", cfg_top_level_list, ConfigError, "expected a mapping"),
    Case("config: impossible date", "config:SimulationConfig", cfg_bad_date, ConfigError, "not valid YAML"),
    Case("config: not UTF-8", "config:SimulationConfig", cfg_not_utf8, ConfigError, "not UTF-8"),
    Case("config: not found", "config:SimulationConfig", cfg_not_found, ConfigError, "config file not found"),
    Case("h5ad: no T-cell genes", "h5ad", sc_no_genes, SingleCellInputError, "cannot call T cells"),
    Case("h5ad: sample key missing", "h5ad-key", sc_no_sample_key, SingleCellInputError, "sample key 'sample' is not an obs column"),
    Case("h5ad: not an AnnData file", "h5ad", sc_not_h5ad, SingleCellInputError, "cannot read as .h5ad"),
]
# fmt: on
CASE_IDS = [c.name for c in CASES]
MODELS = {
    "SimulationConfig": SimulationConfig,
    "TrainConfig": TrainConfig,
    "GatingConfig": GatingConfig,
    "PanelConfig": PanelConfig,
}


def _python_call(case: Case, path: Path, b: Base) -> Any:
    """The public API call that must raise for this input."""
    if case.kind == "fcs":
        return featurize_fcs(path, strategy=b.strategy)
    if case.kind == "manifest":
        return read_manifest(path)
    if case.kind == "train-manifest":
        return read_manifest(path, require_response=True)
    if case.kind.startswith("config:"):
        return load_config(MODELS[case.kind.split(":", 1)[1]], path)
    if case.kind == "qc":
        return load_qc(path)
    if case.kind == "h5ad-key":
        return featurize_single_cell(path, sample_key="sample")
    return featurize_single_cell(path)


def _case_dir(tmp_path: Path, b: Base) -> Path:
    d = tmp_path / "inputs"
    d.mkdir()
    shutil.copy(b.fcs, tmp_path / "good.fcs")  # manifests reference copies beside them
    return d


def _check_api_error(case: Case, b: Base, tmp_path: Path) -> str:
    """Feed the case to the Python API, check the error; return its message with ``<file>``."""
    d = _case_dir(tmp_path, b)
    path = case.make(b, d)
    with pytest.raises(BlinaprofileError) as info:
        _python_call(case, path, b)
    err = info.value
    assert type(err) is case.error, f"{case.name}: {type(err).__name__}: {err}"
    msg = str(err)
    assert case.phrase in msg, msg
    assert str(path) in msg, msg
    assert "\n" not in msg
    assert err.path == str(path)
    if case.name == "config: Python tag in YAML":
        assert not (d / "pwned").exists(), "the YAML tag was executed"
    return msg.replace(str(path), "<file>")


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_api_raises_own_error_naming_file(case: Case, base: Base, tmp_path: Path) -> None:
    _check_api_error(case, base, tmp_path)


# --------------------------------------------------------------------------- CLI
def run_cli(
    args: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m blinaprofile ARGS`` in a subprocess."""
    full_env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    full_env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    # Byte-compile once into a scratch cache (outside the source tree) instead of
    # recompiling pandas & co. in every subprocess when PYTHONDONTWRITEBYTECODE is set.
    full_env.pop("PYTHONDONTWRITEBYTECODE", None)
    full_env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "blinaprofile-test-pycache")
    return subprocess.run(
        [sys.executable, "-m", "blinaprofile", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _cli_args(case: Case, path: Path, work: Path, b: Base) -> tuple[list[str], dict[str, str]]:
    """The command that feeds this input to the CLI, and extra environment variables."""
    kind = case.kind
    if kind == "fcs":
        return ["gate", str(path), "--h5ad", str(work / "out.h5ad")], {}
    if kind == "manifest":
        return ["featurize", "--manifest", str(path), "--out", str(work / "features.csv")], {}
    if kind == "train-manifest":
        return ["train", "--manifest", str(path), "--export", str(work / "model")], {}
    if kind == "qc":
        configs = work.parent / "configs"
        shutil.copytree(CONFIGS, configs)
        os.replace(path, configs / "qc.yaml")
        return ["featurize", str(b.fcs), "--out", str(work / "features.csv")], {
            "BLINAPROFILE_CONFIG_DIR": str(configs)
        }
    if kind.startswith("config:"):
        model = kind.split(":", 1)[1]
        if model == "SimulationConfig":
            return ["simulate", "--scenario", str(path), "--out", str(work / "cohort")], {}
        if model == "PanelConfig":
            out = str(work / "cohort")
            return ["simulate", "--panel", str(path), "--out", out, "--n-patients", "2"], {}
        if model == "GatingConfig":
            return ["gate", str(b.fcs), "--strategy", str(path), "--h5ad", str(work / "o.h5ad")], {}
        features = str(b.features_csv)
        return [
            "train",
            "--features",
            features,
            "--config",
            str(path),
            "--export",
            str(work / "m"),
        ], {}
    # the shipped model is flow-trained: a single-cell sample needs the explicit flag to be
    # read at all (without it the modality refusal comes first, before the file is opened)
    sc = ["--allow-other-modality", "--json", "--out-dir", str(work)]
    if kind == "h5ad":
        return ["score", str(path), *sc], {}
    if kind == "h5ad-key":
        return ["score", str(path), "--sample-key", "sample", *sc], {}
    raise AssertionError(f"no CLI recipe for case kind {kind!r}")


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _named_path(case: Case, path: Path, work: Path) -> str:
    if case.kind == "qc":
        return str(work.parent / "configs" / "qc.yaml")
    return str(path)


@dataclass
class CliRun:
    """One corpus case fed to the CLI (the runs are made concurrently, up front)."""

    case: Case
    path: Path
    work: Path
    before: set[str]
    args: list[str]
    env: dict[str, str]
    result: subprocess.CompletedProcess[str] | None = None


@pytest.fixture(scope="module")
def cli_runs(base: Base, tmp_path_factory: pytest.TempPathFactory) -> dict[str, CliRun]:
    runs: dict[str, CliRun] = {}
    for case in CASES:
        root = tmp_path_factory.mktemp("cli_case")
        work = root / "work"
        work.mkdir()
        path = case.make(base, _case_dir(root, base))
        args, env = _cli_args(case, path, work, base)
        runs[case.name] = CliRun(case, path, work, _tree(work), args, env)
    todo = list(runs.values())
    workers = max(2, os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = pool.map(lambda r: run_cli(r.args, cwd=r.work, env=r.env), todo)
        for run, result in zip(todo, done, strict=True):
            run.result = result
    return runs


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cli_one_line_error_no_output(case: Case, cli_runs: dict[str, CliRun]) -> None:
    run = cli_runs[case.name]
    r = run.result
    assert r is not None
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: "), lines
    assert _named_path(case, run.path, run.work) in lines[0], lines[0]
    assert case.phrase in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    if case.name == "config: Python tag in YAML":
        assert not (run.path.parent / "pwned").exists(), "the YAML tag was executed"
    # nothing was written: no output, no temporary file, no half-made folder
    assert _tree(run.work) == run.before, sorted(_tree(run.work) - run.before)


DEBUG_CASES = [
    c
    for c in CASES
    if c.name in {"TEXT lies: $TOT", "manifest: duplicate sample IDs", "config: unknown key"}
]


@pytest.mark.parametrize("case", DEBUG_CASES, ids=[c.name for c in DEBUG_CASES])
def test_cli_traceback_only_with_debug(case: Case, base: Base, tmp_path: Path) -> None:
    d = _case_dir(tmp_path, base)
    path = case.make(base, d)
    work = tmp_path / "work"
    work.mkdir()
    args, env = _cli_args(case, path, work, base)
    r = run_cli([*args, "--debug"], cwd=work, env=env)
    assert r.returncode != 0
    assert "Traceback (most recent call last)" in r.stderr
    assert f"blinaprofile.errors.{case.error.__name__}" in r.stderr
    assert str(path) in r.stderr


def test_cli_internal_error_is_one_line(tmp_path: Path) -> None:
    """An unexpected exception (a bug) is one line too, and says how to get the traceback."""
    code = (
        "import sys, blinaprofile.cli.dispatch as c\n"
        "def boom(a):\n"
        "    raise RuntimeError('line one\\nline two')\n"
        "c.HANDLERS['schema'] = boom\n"
        "sys.exit(c.main(['schema']))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=False
    )
    assert r.returncode == 3
    lines = r.stderr.splitlines()
    assert lines == [
        "internal error: RuntimeError: line one line two (rerun with --debug for a traceback)"
    ]


def test_cli_unwritable_output_is_one_line(base: Base, tmp_path: Path) -> None:
    """An output the OS refuses to write is the user's problem: one line naming it."""
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where a folder is expected\n")
    r = run_cli(["featurize", str(base.fcs), "--out", str(blocker / "f.csv")], cwd=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(blocker) in lines[0]
    assert "Traceback" not in r.stderr


# --------------------------------------------------------------------------- a cohort goes on
FCS_CASES = [c for c in CASES if c.kind == "fcs"]


def _bad_cohort(base: Base, folder: Path) -> tuple[Path, dict[str, tuple[Case, Path]]]:
    folder.mkdir()
    rows = []
    for i in range(3):
        shutil.copy(base.fcs, folder / f"good{i}.fcs")
        rows.append({"sample_id": f"G{i}", "file": f"good{i}.fcs", "response": "R"})
    bad: dict[str, tuple[Case, Path]] = {}
    for i, case in enumerate(FCS_CASES):
        sub = folder / f"case{i:02d}"
        sub.mkdir()
        p = case.make(base, sub)
        if not p.exists():  # "not found" cannot pass the manifest's own file check
            continue
        sid = f"B{i:02d}"
        bad[sid] = (case, p)
        rows.append({"sample_id": sid, "file": str(p.relative_to(folder)), "response": "NR"})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest, bad


def test_featurize_manifest_goes_on_past_bad_samples(base: Base, tmp_path: Path) -> None:
    manifest, bad = _bad_cohort(base, tmp_path / "cohort")
    table = featurize_manifest(manifest, n_jobs=2).set_index("sample_id")
    assert len(table) == 3 + len(bad)
    good = table.loc[["G0", "G1", "G2"]]
    assert (good["error"] == "").all()
    assert good["cd8_em_pct_cd8"].notna().all() and (good["n_events"] == N_EVENTS).all()
    for sid, (case, path) in bad.items():
        msg = table.loc[sid, "error"]
        assert case.phrase in msg, (case.name, msg)
        assert "internal error" not in msg, msg
        # the sample is named, never its file (file names may identify a patient)
        assert msg.startswith(f"{sid}: "), msg
        assert str(path) not in msg and path.name not in msg, msg
    # every feature column is present even for error rows
    assert table.loc[list(bad), "cd8_em_pct_cd8"].isna().all()
    print(f"\nfeaturize_manifest: 3 good + {len(bad)} bad samples -> {len(bad)} error rows")


def test_featurize_cli_writes_error_rows_and_exits_1(base: Base, tmp_path: Path) -> None:
    manifest, bad = _bad_cohort(base, tmp_path / "cohort")
    out = tmp_path / "features.csv"
    r = run_cli(["featurize", "--manifest", str(manifest), "--out", str(out)], cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    table = pd.read_csv(out, keep_default_na=False)
    assert len(table) == 3 + len(bad)
    err_lines = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(err_lines) == len(bad), r.stderr
    assert "Traceback" not in r.stderr
    assert (table.set_index("sample_id").loc[list(bad), "error"] != "").all()


def _doc_corpus_rows() -> list[tuple[str, str]]:
    """(case, error type) of each row of the corpus table in ``docs/reliability.md``."""
    text = RELIABILITY_DOC.read_text(encoding="utf-8")
    section = text.split("## The bad-input corpus", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) >= 3 and cells[0] != "case":
            rows.append((cells[0], cells[1]))
    return rows


def test_corpus_table(base: Base, tmp_path: Path) -> None:
    """Every case raises its error; the documented table lists each case with that error."""
    table = []
    for i, case in enumerate(CASES):
        case_root = tmp_path / f"case{i:02d}"
        case_root.mkdir()
        table.append((case.name, case.error.__name__, _check_api_error(case, base, case_root)))
    assert len({name for name, _, _ in table}) == len(CASES), "case names must be unique"
    documented = _doc_corpus_rows()
    assert [err for _, err in documented] == [err for _, err, _ in table], (
        f"{RELIABILITY_DOC} lists {len(documented)} cases; the corpus has {len(CASES)}: "
        "keep its table in the order and with the error types of CASES"
    )
    width = max(len(name) for name, _, _ in table)
    print(f"\n{'case':<{width}}  {'error':<20}  message")
    for name, err, msg in table:
        print(f"{name:<{width}}  {err:<20}  {msg}")


def test_train_features_without_response_is_a_user_error(tmp_path: Path) -> None:
    table = tmp_path / "features.csv"
    table.write_text("sample_id,patient_id,cd8_em_pct_cd8\nA,A,10.0\n", encoding="utf-8")
    r = run_cli(["train", "--features", str(table)], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and str(table) in r.stderr
