"""Typed configuration of the single-cell annotator (``configs/single_cell.yaml``): signatures, cell and sample QC, protein and RNA settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from blinaprofile.config import StrictModel, load_config, validate_config
from blinaprofile.errors import ConfigError

PathLike = str | os.PathLike[str]
Count = Annotated[int, Field(ge=0)]
Prob = Annotated[float, Field(gt=0.0, lt=1.0)]

MEMORY_LABELS: tuple[str, ...] = ("naive", "CM", "EM", "TEMRA")
#: ``bp_effector``: the CD45RA split of CCR7-low T cells (effector memory vs TEMRA-like)
EFFECTOR_LABELS: tuple[str, ...] = ("EM", "TEMRA")
LINEAGE_LABELS: tuple[str, ...] = ("CD4", "CD8", "other", "non_T")
CELL_TYPE_LABELS: tuple[str, ...] = ("T", "B", "NK", "myeloid", "other", "non_T")
EVIDENCE_LABELS: tuple[str, ...] = ("protein", "RNA", "protein+RNA", "prefiltered", "none")


# =========================================================================== config
class SignatureSpec(StrictModel):
    """A gene set: ``up`` genes mark the positive state, ``down`` genes the negative one.

    ``secondary`` genes are not used to find the states; their rates are learned from the
    confidently called cells and then add (capped) evidence for the uncertain ones.
    """

    up: list[str] = Field(min_length=1)
    down: list[str] = Field(default_factory=list)
    secondary: list[str] = Field(default_factory=list)
    description: str = ""


def _sig(
    up: list[str],
    down: list[str] | None = None,
    secondary: list[str] | None = None,
    description: str = "",
) -> SignatureSpec:
    return SignatureSpec(up=up, down=down or [], secondary=secondary or [], description=description)


def _default_signatures() -> dict[str, SignatureSpec]:
    return {
        "t_cell": _sig(
            ["CD3E", "CD3D", "CD3G", "TRAC"],
            description="T cells (CD3 complex, TCR alpha constant) vs all other cells",
        ),
        "cd8_vs_cd4": _sig(
            ["CD8A", "CD8B"],
            ["CD4", "CD40LG"],
            [
                "CCL5",
                "NKG7",
                "GZMK",
                "GZMA",
                "GZMH",
                "CST7",
                "KLRD1",
                "LTB",
                "MAL",
                "TNFRSF4",
                "ICOS",
                "CD28",
            ],
            description="CD8 (positive) vs CD4 (negative) T cells",
        ),
        "ccr7": _sig(
            ["CCR7", "SELL", "LEF1", "TCF7"],
            description="CCR7+ (naive/central memory) vs CCR7- (effector memory/TEMRA)",
        ),
        "naive_vs_cm": _sig(
            ["LEF1", "TCF7", "CCR7", "MAL"],
            ["S100A4", "ANXA1", "GZMK", "KLRB1"],
            description="naive (CD45RA+ surrogate) vs central memory among CCR7+ cells",
        ),
        "temra_vs_em": _sig(
            ["GZMB", "GNLY", "FGFBP2", "CX3CR1", "GZMH", "KLRG1", "PRF1"],
            ["GZMK", "IL7R"],
            description="TEMRA (CD45RA+ surrogate) vs effector memory among CCR7- cells",
        ),
        "checkpoint": _sig(
            ["HAVCR2", "PDCD1", "LAG3", "TIGIT", "CTLA4", "TOX", "ENTPD1", "LAYN"],
            description="checkpoint-high (TIM3+ exhausted-like) state; HAVCR2 alone is too sparse",
        ),
        "pd1": _sig(["PDCD1"], secondary=["TOX", "TIGIT", "CXCL13"], description="PD-1+ state"),
        "treg": _sig(
            ["FOXP3", "IL2RA", "CTLA4", "IKZF2"],
            description="regulatory T cells among CD4",
        ),
        "b_cell": _sig(["MS4A1", "CD79A", "CD79B", "CD19"], description="B cells (score only)"),
        "nk": _sig(["KLRF1", "NCAM1", "FCER1G", "TYROBP"], description="NK cells (score only)"),
        "myeloid": _sig(
            ["LYZ", "CD14", "S100A8", "S100A9", "FCN1", "CST3"],
            description="myeloid cells (score only)",
        ),
    }


#: gene sets every configuration must define (more may be added for scores only)
REQUIRED_SIGNATURES: tuple[str, ...] = tuple(_default_signatures())


class CellQCSpec(StrictModel):
    """Per-cell QC (a cell failing any rule is not annotated and not counted in ``n_live``).

    Gene- and count-based rules apply only when the RNA matrix has at least
    ``min_panel_genes`` genes (targeted panels and protein-only objects skip them).
    """

    min_genes: Count = 200
    min_counts: Count = 400
    max_mito_pct: Annotated[float, Field(gt=0.0, le=100.0)] = 20.0
    mito_prefix: str = "MT-"
    min_panel_genes: Count = 1000


class SampleQCSpec(StrictModel):
    """Per-sample QC: below any of these the sample fails and unstable features are NaN."""

    min_cells: Count = 200
    min_cd3: Count = 100
    min_cd4: Count = 50
    min_cd8: Count = 50


class ProteinSpec(StrictModel):
    """CITE-seq protein normalisation and per-sample thresholds."""

    obsm_keys: list[str] = Field(
        default_factory=lambda: [
            "protein",
            "protein_expression",
            "adt",
            "ADT",
            "X_adt",
            "X_protein",
        ]
    )
    clr_axis: Literal["cell", "feature"] = "cell"
    pseudocount: Annotated[float, Field(gt=0.0)] = 5.0
    min_cells_per_fit: Annotated[int, Field(ge=10)] = 50
    min_separation: Annotated[float, Field(gt=0.0)] = 2.0
    min_weight: Prob = 0.02
    rule_k_mad: Annotated[float, Field(gt=0.0)] = 3.0
    rare_positive: list[str] = Field(default_factory=lambda: ["PD1", "TIM3", "CD25", "CD25-CD127"])
    fuse_rna: dict[str, str] = Field(
        default_factory=lambda: {"CCR7": "ccr7"},
        description="protein marker -> RNA gene set whose evidence is added to the protein "
        "posterior (for weak antibodies such as CCR7)",
    )
    fuse_max_log_ratio: Annotated[float, Field(gt=0.0)] = 4.0
    max_iter: Annotated[int, Field(ge=10)] = 300


class RNASpec(StrictModel):
    """RNA gene-set scores and the count mixtures built on them."""

    target_sum: Annotated[float, Field(gt=0.0)] = 1e4
    n_bins: Annotated[int, Field(ge=2, le=100)] = 25
    n_ctrl_per_bin: Annotated[int, Field(ge=1, le=200)] = 10
    control_seed: int = 0
    prior_umis: Annotated[float, Field(ge=0.0)] = 1e4
    sample_prior_cells: Annotated[float, Field(ge=0.0)] = 50.0
    min_fold: Annotated[float, Field(gt=1.0)] = 2.0
    anchor_posterior: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.9
    max_secondary_log_ratio: Annotated[float, Field(gt=0.0)] = 1.5
    min_cells_per_fit: Annotated[int, Field(ge=2)] = 30
    max_iter: Annotated[int, Field(ge=1)] = 200
    tol: Annotated[float, Field(gt=0.0)] = 1e-6
    max_fit_cells: Annotated[int, Field(ge=100)] = 20_000
    homogeneous_min_detected: Annotated[float, Field(gt=0.0, le=1.0)] = 0.8
    gauss_min_separation: Annotated[float, Field(gt=0.0)] = 1.5
    exhaustion_confounded: list[str] = Field(
        default_factory=lambda: ["GZMB", "PRF1", "GZMH", "IL7R"],
        description="temra_vs_em genes that exhausted (checkpoint-high) CD8 cells share with "
        "TEMRA; for CD8 cells their evidence is weighted by 1 - P(exhausted)",
    )
    signatures: dict[str, SignatureSpec] = Field(default_factory=_default_signatures)

    @model_validator(mode="after")
    def _required(self) -> RNASpec:
        missing = [k for k in REQUIRED_SIGNATURES if k not in self.signatures]
        if missing:
            raise ValueError(f"signatures: missing required gene set(s) {missing}")
        return self


class SingleCellConfig(StrictModel):
    """Configuration of the single-cell path (``configs/single_cell.yaml``)."""

    name: str = "default"
    version: str = "1"
    sample_key_candidates: list[str] = Field(default_factory=lambda: ["sample_id", "sample"])
    patient_key_candidates: list[str] = Field(
        default_factory=lambda: ["patient_id", "patient", "donor_id", "donor"]
    )
    t_cells_prefiltered: bool = False
    cd3_denominator: Literal["all_qc_cells", "lymphocytes"] = "lymphocytes"
    fraction_estimator: Literal["posterior_mean", "hard_calls"] = "posterior_mean"
    cell_qc: CellQCSpec = CellQCSpec()
    sample_qc: SampleQCSpec = SampleQCSpec()
    protein: ProteinSpec = ProteinSpec()
    rna: RNASpec = RNASpec()


def default_config_path() -> Path:
    """``single_cell.yaml`` in :attr:`blinaprofile.settings.settings.config_dir`."""
    from blinaprofile.settings import settings

    return Path(settings.config_dir) / "single_cell.yaml"


def load_single_cell_config(path: PathLike | None = None) -> SingleCellConfig:
    """Load and validate a single-cell configuration.

    Parameters
    ----------
    path
        A YAML file; ``None`` reads :func:`default_config_path` and, when that file does not
        exist (an installed package without ``configs/``), returns the built-in defaults,
        which ``configs/single_cell.yaml`` mirrors.

    Raises
    ------
    ConfigError
        The file is missing (explicit path), not YAML, or has unknown or invalid keys.
    """
    if path is None:
        p = default_config_path()
        return load_config(SingleCellConfig, p) if p.is_file() else SingleCellConfig()
    return load_config(SingleCellConfig, path)


def resolve_config(
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None,
) -> SingleCellConfig:
    if config is None:
        return load_single_cell_config()
    if isinstance(config, SingleCellConfig):
        return config
    if isinstance(config, Mapping):
        return validate_config(SingleCellConfig, dict(config), source="<single-cell config>")
    if isinstance(config, str | os.PathLike):
        return load_single_cell_config(config)
    raise ConfigError(
        f"config must be a SingleCellConfig, a mapping or a path, not {type(config).__name__}"
    )
