"""Single-cell path: read scRNA-seq / CITE-seq objects, annotate T cells, make per-sample features.

Public API
----------
:func:`read_single_cell`
    ``.h5ad``, a 10x matrix folder or a 10x ``.h5`` into an :class:`anndata.AnnData` with raw
    counts in ``X`` and ``layers['counts']`` and CITE-seq protein in ``obsm['protein']``.
:func:`annotate`
    Per-cell labels (``obs['bp_*']``) from protein where present, RNA gene sets otherwise;
    parameters in ``uns['blinaprofile']``.
:func:`featurize_single_cell`
    One row per sample in the versioned feature schema (:mod:`blinaprofile.schema`).
:class:`SingleCellConfig`, :func:`load_single_cell_config`
    The typed configuration (``configs/single_cell.yaml``).

Estimators (details in ``docs/single_cell.md``)
-----------------------------------------------
Protein
    Antibody counts are CLR-normalised per cell (``log(x + 5)`` minus the cell's mean); for
    each marker and sample a two-component Gaussian mixture is fitted to the parent
    population (all cells for CD3; T cells for CD4/CD8/CD45RA/CCR7; each lineage for
    PD-1/TIM3; CD4 T cells for the Treg gate on CLR CD25 - CLR CD127). The threshold is where
    the weighted component densities cross; the per-cell confidence is the mixture
    posterior. Samples that are too small or whose mixture is not bimodal (Ashman's D < 2)
    use the mixture pooled over samples; markers whose positives are a small minority
    (PD-1, TIM3, CD25, CD25-CD127) fall back to ``median + 3 MAD``. The weak CCR7 antibody
    gets RNA evidence added (``protein.fuse_rna``).
RNA
    Gene-set scores (counts per 10,000 + log1p; mean of the set minus the mean of
    expression-matched control genes) are reported in ``obs['bp_score_*']`` and start a
    two-state negative-binomial mixture on the raw counts of the set's genes with each cell's
    library size as exposure: rates are pooled over the object, the prior of the positive
    state is per sample (shrunk towards the pooled prior). A zero count in a shallow cell is
    therefore weak evidence, never a biological zero, and the expected fraction of a state
    is the mean posterior, not the share of hard calls.

Only :mod:`anndata` is imported at module level; scanpy is not needed.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Annotated, Any, Literal

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import Field, model_validator

from .config import _Strict, load_config, validate_config
from .errors import ConfigError, SingleCellInputError
from .panel import canonical_marker
from .schema import QC_COLUMNS, SCHEMA_VERSION, feature_names

__all__ = [
    "SingleCellConfig",
    "annotate",
    "default_config_path",
    "featurize_single_cell",
    "load_single_cell_config",
    "read_single_cell",
]

PathLike = str | os.PathLike[str]
Count = Annotated[int, Field(ge=0)]
Prob = Annotated[float, Field(gt=0.0, lt=1.0)]

MEMORY_LABELS: tuple[str, ...] = ("naive", "CM", "EM", "TEMRA")
LINEAGE_LABELS: tuple[str, ...] = ("CD4", "CD8", "other", "non_T", "NA")
CELL_TYPE_LABELS: tuple[str, ...] = ("T", "B", "NK", "myeloid", "other", "non_T", "NA")
EVIDENCE_LABELS: tuple[str, ...] = ("protein", "RNA", "protein+RNA", "prefiltered", "none")


# =========================================================================== config
class SignatureSpec(_Strict):
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


class CellQCSpec(_Strict):
    """Per-cell QC (a cell failing any rule is not annotated and not counted in ``n_live``).

    Gene- and count-based rules apply only when the RNA matrix has at least
    ``min_panel_genes`` genes (targeted panels and protein-only objects skip them).
    """

    min_genes: Count = 200
    min_counts: Count = 400
    max_mito_pct: Annotated[float, Field(gt=0.0, le=100.0)] = 20.0
    mito_prefix: str = "MT-"
    min_panel_genes: Count = 1000


class SampleQCSpec(_Strict):
    """Per-sample QC: below any of these the sample fails and unstable features are NaN."""

    min_cells: Count = 200
    min_cd3: Count = 100
    min_cd4: Count = 50
    min_cd8: Count = 50


class ProteinSpec(_Strict):
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


class RNASpec(_Strict):
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
    signatures: dict[str, SignatureSpec] = Field(default_factory=_default_signatures)

    @model_validator(mode="after")
    def _required(self) -> RNASpec:
        missing = [k for k in REQUIRED_SIGNATURES if k not in self.signatures]
        if missing:
            raise ValueError(f"signatures: missing required gene set(s) {missing}")
        return self


class SingleCellConfig(_Strict):
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
    from .settings import settings

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


def _resolve_config(
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


# =========================================================================== reading
_DEFAULT_OBSM_KEYS: tuple[str, ...] = tuple(ProteinSpec().obsm_keys)
_SYMBOL_COLUMNS: tuple[str, ...] = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "gene_name",
    "gene_names",
    "symbol",
)
_ANTIBODY_TYPES = {"antibody capture", "antibody_capture", "adt", "protein"}
_REAGENT_SUFFIX = re.compile(r"[_\-.\s]*(totalseq[abc]?|adt|antibody)$", re.IGNORECASE)


def _clean_antibody_name(name: str) -> str:
    """Canonical marker (``CD197_TotalSeqB`` -> ``CCR7``), else the name without reagent suffix."""
    canon = canonical_marker(name)
    if canon:
        return canon
    stripped = _REAGENT_SUFFIX.sub("", str(name).strip())
    return canonical_marker(stripped) or stripped or str(name)


def _protein_frame(values: Any, names: Sequence[str], index: pd.Index) -> pd.DataFrame:
    arr = values.toarray() if sp.issparse(values) else np.asarray(values)
    arr = np.asarray(arr, dtype=np.float64)
    cols: list[str] = []
    for n in names:
        base = _clean_antibody_name(str(n))
        c, k = base, 2
        while c in cols:  # a second antibody against the same antigen keeps its own column
            c = f"{base}_{k}"
            k += 1
        cols.append(c)
    return pd.DataFrame(arr, index=index, columns=cols)


def _find_obsm_protein(
    adata: ad.AnnData, keys: Sequence[str], source: str | None
) -> tuple[pd.DataFrame | None, dict[str, str], str | None]:
    """Protein counts from ``obsm`` (a DataFrame, or an array with names in ``uns``)."""
    for key in keys:
        if key not in adata.obsm:
            continue
        val = adata.obsm[key]
        if isinstance(val, pd.DataFrame):
            names = [str(c) for c in val.columns]
            frame = _protein_frame(val.to_numpy(), names, adata.obs_names)
        else:
            arr = np.asarray(sp.csr_matrix(val).toarray() if sp.issparse(val) else val)
            cand = [f"{key}_names", "protein_names", f"{key.removeprefix('X_')}_names"]
            names_val = next((adata.uns[c] for c in cand if c in adata.uns), None)
            if names_val is None:
                raise SingleCellInputError(
                    f"obsm['{key}'] holds protein counts without antibody names "
                    f"(looked for uns keys {cand})",
                    path=source,
                )
            names = [str(x) for x in np.asarray(names_val).ravel()]
            if arr.ndim != 2 or arr.shape[1] != len(names):
                raise SingleCellInputError(
                    f"obsm['{key}'] has {arr.shape[-1]} columns but {len(names)} antibody names",
                    path=source,
                )
            frame = _protein_frame(arr, names, adata.obs_names)
        values = frame.to_numpy()
        if values.size and (np.isnan(values).any() or values.min() < 0):
            raise SingleCellInputError(
                f"obsm['{key}'] holds negative or missing values: protein must be raw "
                "antibody counts",
                path=source,
            )
        return frame, dict(zip(frame.columns, names, strict=True)), key
    return None, {}, None


def _looks_like_counts(m: Any) -> bool:
    data = m.data if sp.issparse(m) else np.asarray(m).ravel()
    if data.size == 0:
        return True
    sample = np.asarray(data[: min(data.size, 200_000)], dtype=np.float64)
    return bool(np.all(sample >= 0) and np.all(np.abs(sample - np.round(sample)) < 1e-6))


def _count_matrix(adata: ad.AnnData, source: str | None) -> tuple[Any, pd.DataFrame]:
    """Raw RNA counts and their var: ``layers['counts']``, else ``X``, else ``.raw``."""
    if "counts" in adata.layers:
        mat, var = adata.layers["counts"], adata.var
    elif _looks_like_counts(adata.X):
        mat, var = adata.X, adata.var
    elif (
        adata.raw is not None and adata.raw.n_obs == adata.n_obs and _looks_like_counts(adata.raw.X)
    ):
        mat, var = adata.raw.X, adata.raw.var
    else:
        raise SingleCellInputError(
            "X holds non-integer values (normalised data?) and there is no layers['counts'] "
            "or .raw with raw counts",
            path=source,
        )
    if not _looks_like_counts(mat):
        raise SingleCellInputError(
            "the RNA count matrix holds negative or non-integer values", path=source
        )
    return mat, var


def _open_maybe_gz(path: Path) -> IO[bytes]:
    if path.suffix == ".gz":
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _first_existing(folder: Path, names: Sequence[str]) -> Path | None:
    for n in names:
        for cand in (folder / n, folder / f"{n}.gz"):
            if cand.is_file():
                return cand
    return None


def _read_10x_mtx(folder: Path) -> ad.AnnData:
    from scipy.io import mmread

    if not _first_existing(folder, ["matrix.mtx"]):
        for sub in ("filtered_feature_bc_matrix", "outs/filtered_feature_bc_matrix"):
            if _first_existing(folder / sub, ["matrix.mtx"]):
                folder = folder / sub
                break
    mtx = _first_existing(folder, ["matrix.mtx"])
    feats = _first_existing(folder, ["features.tsv", "genes.tsv"])
    bcs = _first_existing(folder, ["barcodes.tsv"])
    if mtx is None or feats is None or bcs is None:
        missing = [
            n
            for n, p in (
                ("matrix.mtx(.gz)", mtx),
                ("features.tsv(.gz) or genes.tsv(.gz)", feats),
                ("barcodes.tsv(.gz)", bcs),
            )
            if p is None
        ]
        raise SingleCellInputError(
            f"not a 10x matrix folder: missing {', '.join(missing)}", path=folder
        )
    try:
        with _open_maybe_gz(mtx) as fh:
            m = sp.coo_matrix(mmread(fh, spmatrix=False))
        f = pd.read_csv(feats, sep="\t", header=None, dtype=str, compression="infer")
        b = pd.read_csv(bcs, sep="\t", header=None, dtype=str, compression="infer")
    except (OSError, ValueError, EOFError, pd.errors.ParserError) as err:
        raise SingleCellInputError(
            f"cannot read the 10x matrix folder: {err}", path=folder
        ) from None
    if m.shape != (len(f), len(b)):
        raise SingleCellInputError(
            f"matrix.mtx is {m.shape[0]} features x {m.shape[1]} barcodes but the features "
            f"file has {len(f)} rows and the barcodes file {len(b)}",
            path=folder,
        )
    mat = sp.csr_matrix(m.T, dtype=np.float32)
    names = f[1] if f.shape[1] > 1 else f[0]
    ftype = f[2].to_numpy() if f.shape[1] > 2 else np.full(len(f), "Gene Expression", dtype=object)
    var = pd.DataFrame(
        {"gene_ids": f[0].to_numpy(), "feature_types": ftype},
        index=pd.Index(names.astype(str).to_numpy()),
    )
    obs = pd.DataFrame(index=pd.Index(b[0].astype(str).to_numpy()))
    return ad.AnnData(X=mat, obs=obs, var=var)


def _read_10x_h5(path: Path) -> ad.AnnData:
    import h5py

    def _str(node: Any) -> np.ndarray:
        return np.array(
            [x.decode() if isinstance(x, bytes) else str(x) for x in node[...]], dtype=object
        )

    try:
        with h5py.File(path, "r") as h5:
            if "matrix" in h5:  # Cell Ranger >= 3
                g = h5["matrix"]
                feat = g["features"]
                ids = _str(feat["id"])
                names = _str(feat["name"]) if "name" in feat else ids
                ftype = (
                    _str(feat["feature_type"])
                    if "feature_type" in feat
                    else np.full(len(ids), "Gene Expression", dtype=object)
                )
            else:  # Cell Ranger 2: one group per genome
                groups = [k for k in h5 if isinstance(h5[k], h5py.Group)]
                if not groups:
                    raise SingleCellInputError(
                        "not a 10x .h5 file: no 'matrix' or genome group", path=path
                    )
                g = h5[groups[0]]
                ids = _str(g["genes"])
                names = _str(g["gene_names"]) if "gene_names" in g else ids
                ftype = np.full(len(ids), "Gene Expression", dtype=object)
            n_feat, n_cells = (int(x) for x in g["shape"][...])
            barcodes = _str(g["barcodes"])
            # stored as CSC features x cells, i.e. CSR cells x features
            mat = sp.csr_matrix(
                (g["data"][...].astype(np.float32), g["indices"][...], g["indptr"][...]),
                shape=(n_cells, n_feat),
            )
    except (OSError, KeyError, ValueError) as err:
        raise SingleCellInputError(f"cannot read as a 10x .h5 file: {err}", path=path) from None
    var = pd.DataFrame({"gene_ids": ids, "feature_types": ftype}, index=pd.Index(names.astype(str)))
    return ad.AnnData(X=mat, obs=pd.DataFrame(index=pd.Index(barcodes.astype(str))), var=var)


def _read_h5ad(path: Path) -> ad.AnnData:
    try:
        return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise SingleCellInputError(f"cannot read as .h5ad: {err}", path=path) from None


def read_single_cell(path: PathLike, *, sample_key: str | None = None) -> ad.AnnData:
    """Read a single-cell object with RNA counts and optional CITE-seq protein.

    Parameters
    ----------
    path
        An ``.h5ad`` file, a 10x matrix folder (``matrix.mtx(.gz)``, ``features.tsv(.gz)`` or
        ``genes.tsv(.gz)``, ``barcodes.tsv(.gz)``; also its ``matrix.mtx(.gz)`` file or a parent
        holding ``filtered_feature_bc_matrix/``) or a 10x ``.h5`` file (Cell Ranger 2 or 3+).
    sample_key
        ``obs`` column holding each cell's sample; checked to exist.

    Returns
    -------
    AnnData
        ``X`` and ``layers['counts']`` are the same float32 CSR matrix of raw RNA counts
        (Gene Expression features only; nothing is normalised in place). CITE-seq antibody
        counts, from ``obsm`` (``protein``, ``protein_expression``, ``adt``...; names from the
        DataFrame columns or ``uns['protein_names']``) or from Antibody Capture features, are
        put in ``obsm['protein']``: a DataFrame whose columns are canonical marker names where
        known (``CD197_TotalSeqB`` -> ``CCR7``, ``PD-1`` -> ``PD1``, ``CD8a`` -> ``CD8``), else
        the name without its reagent suffix. ``uns['blinaprofile']`` records the source file
        and the original antibody names. If ``X`` is normalised, ``layers['counts']`` or
        ``.raw`` must hold the counts (``.raw`` then replaces ``X`` and ``var``).

    Raises
    ------
    SingleCellInputError
        The file is missing or unreadable, the format is unknown, there are no cells or no
        genes, no raw counts can be found, protein lacks names, or ``sample_key`` is not an
        ``obs`` column. The message starts with the file name.
    """
    p = Path(path)
    if not p.exists():
        raise SingleCellInputError("file not found", path=p)
    name = p.name.lower()
    if p.is_dir():
        adata = _read_10x_mtx(p)
    elif name.endswith((".mtx", ".mtx.gz")):
        adata = _read_10x_mtx(p.parent)
    elif name.endswith(".h5ad"):
        adata = _read_h5ad(p)
    elif name.endswith((".h5", ".hdf5")):
        adata = _read_10x_h5(p)
    else:
        raise SingleCellInputError(
            f"unsupported single-cell format {p.suffix!r}: expected .h5ad, a 10x .h5 file or "
            "a 10x matrix folder",
            path=p,
        )
    return _standardise(adata, source=str(p), sample_key=sample_key)


def _standardise(adata: ad.AnnData, *, source: str, sample_key: str | None) -> ad.AnnData:
    if sample_key is not None and sample_key not in adata.obs.columns:
        cols = ", ".join(map(str, adata.obs.columns)) or "no columns"
        raise SingleCellInputError(
            f"sample key {sample_key!r} is not an obs column (obs has: {cols})", path=source
        )
    if adata.n_obs == 0:
        raise SingleCellInputError("the object has no cells", path=source)
    prot, originals, key = _find_obsm_protein(adata, _DEFAULT_OBSM_KEYS, source)
    mat, var = _count_matrix(adata, source)
    if var is not adata.var:  # counts from .raw: rebuild on the raw genes
        new = ad.AnnData(X=sp.csr_matrix(mat, dtype=np.float32), obs=adata.obs, var=var.copy())
        for k, v in adata.obsm.items():
            new.obsm[k] = v
        new.uns.update(adata.uns)
        adata = new
    else:
        adata.X = sp.csr_matrix(mat, dtype=np.float32)
        if "counts" in adata.layers:
            del adata.layers["counts"]
    dropped: list[str] = []
    if "feature_types" in adata.var:
        ft = adata.var["feature_types"].astype(str).str.strip().str.lower()
        ab = ft.isin(_ANTIBODY_TYPES).to_numpy()
        other = ~ab & (ft != "gene expression").to_numpy()
        if ab.any() and prot is None:
            xmat = sp.csr_matrix(adata.X)
            prot = _protein_frame(
                xmat[:, np.flatnonzero(ab)], list(adata.var_names[ab]), adata.obs_names
            )
            originals = dict(zip(prot.columns, map(str, adata.var_names[ab]), strict=True))
            key = "feature_types"
        dropped = sorted(set(adata.var["feature_types"].astype(str)[ab | other]))
        if (ab | other).any():
            adata = adata[:, ~(ab | other)].copy()
    if adata.n_vars == 0:
        raise SingleCellInputError(
            "the object has no genes (no Gene Expression features)", path=source
        )
    adata.var_names_make_unique()
    if not isinstance(adata.X, sp.csr_matrix):
        adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.layers["counts"] = adata.X
    if prot is not None:
        adata.obsm["protein"] = prot
    info = dict(adata.uns.get("blinaprofile", {}))
    info.update(
        {
            "source": source,
            "protein_source": key or "",
            "protein_names_original": {str(k): str(v) for k, v in originals.items()},
            "dropped_feature_types": list(dropped),
        }
    )
    adata.uns["blinaprofile"] = info
    return adata


# =========================================================================== inputs
@dataclass
class _Input:
    """What the annotator needs, extracted without modifying the caller's object."""

    source: str | None
    n_obs: int
    counts: sp.csr_matrix | None  # RNA genes only
    symbols: np.ndarray  # upper-case gene symbol per RNA column
    protein: pd.DataFrame | None  # canonical names, raw counts
    sample: np.ndarray  # int code per cell
    sample_names: list[str]
    sample_key: str | None
    patient_of_sample: list[str]
    patient_key: str | None


def _source_of(adata: ad.AnnData) -> str | None:
    info = adata.uns.get("blinaprofile", {})
    src = info.get("source") if isinstance(info, Mapping) else None
    return str(src) if src else None


def _resolve_key(
    adata: ad.AnnData,
    key: str | None,
    candidates: Sequence[str],
    what: str,
    source: str | None,
) -> str | None:
    if key is not None:
        if key not in adata.obs.columns:
            cols = ", ".join(map(str, adata.obs.columns)) or "no columns"
            raise SingleCellInputError(
                f"{what} key {key!r} is not an obs column (obs has: {cols})", path=source
            )
        return key
    return next((c for c in candidates if c in adata.obs.columns), None)


def _prepare(
    adata: ad.AnnData,
    cfg: SingleCellConfig,
    *,
    sample_key: str | None,
    patient_key: str | None,
    default_sample: str,
) -> _Input:
    source = _source_of(adata)
    if adata.n_obs == 0:
        raise SingleCellInputError("the object has no cells", path=source)
    skey = _resolve_key(adata, sample_key, cfg.sample_key_candidates, "sample", source)
    pkey = _resolve_key(adata, patient_key, cfg.patient_key_candidates, "patient", source)
    if skey is not None:
        svals = adata.obs[skey]
        if svals.isna().any():
            raise SingleCellInputError(
                f"sample key {skey!r} has {int(svals.isna().sum())} missing values", path=source
            )
        codes, uniq = pd.factorize(svals.astype(str), sort=False)
        names = [str(u) for u in uniq]
    else:
        codes = np.zeros(adata.n_obs, dtype=np.int64)
        names = [default_sample]
    patients: list[str] = []
    pvals = adata.obs[pkey].astype(str).to_numpy() if pkey is not None else None
    for i, s in enumerate(names):
        if pvals is None:
            patients.append(s)
            continue
        pv = pd.unique(pvals[codes == i])
        if len(pv) != 1:
            raise SingleCellInputError(
                f"sample {s!r} maps to {len(pv)} patients in obs[{pkey!r}]: {sorted(pv)[:5]}",
                path=source,
            )
        patients.append(str(pv[0]))

    protein, _, _ = _find_obsm_protein(adata, cfg.protein.obsm_keys, source)
    mat, var = _count_matrix(adata, source)
    keep = np.ones(var.shape[0], dtype=bool)
    if "feature_types" in var:
        ft = var["feature_types"].astype(str).str.strip().str.lower()
        ab = ft.isin(_ANTIBODY_TYPES).to_numpy()
        if ab.any() and protein is None:
            protein = _protein_frame(
                mat[:, np.flatnonzero(ab)], [str(n) for n in var.index[ab]], adata.obs_names
            )
        keep = (ft == "gene expression").to_numpy()
    counts: sp.csr_matrix | None = None
    symbols = np.array([], dtype=object)
    if keep.any():
        m = mat if keep.all() else mat[:, np.flatnonzero(keep)]
        counts = m if isinstance(m, sp.csr_matrix) else sp.csr_matrix(m)
        vsub = var if keep.all() else var[keep]
        gnames = pd.Index(vsub.index.astype(str))
        if len(gnames) and gnames.str.match(r"^ENS[A-Z]*G\d+").mean() > 0.5:
            col = next((c for c in _SYMBOL_COLUMNS if c in vsub.columns), None)
            if col is not None:
                gnames = pd.Index(vsub[col].astype(str))
        symbols = np.asarray(gnames.str.upper(), dtype=object)
    if counts is None and protein is None:
        raise SingleCellInputError("the object has no genes and no protein", path=source)
    return _Input(
        source=source,
        n_obs=adata.n_obs,
        counts=counts,
        symbols=symbols,
        protein=protein,
        sample=np.asarray(codes, dtype=np.int64),
        sample_names=names,
        sample_key=skey,
        patient_of_sample=patients,
        patient_key=pkey,
    )


# =========================================================================== cell QC
def _cell_qc(inp: _Input, cfg: SingleCellConfig) -> tuple[np.ndarray, dict[str, Any]]:
    q = cfg.cell_qc
    ok = np.ones(inp.n_obs, dtype=bool)
    rules: list[str] = []
    if inp.counts is None:
        return ok, {"rules": ["none (no RNA)"]}
    n_genes_total = inp.counts.shape[1]
    if n_genes_total >= q.min_panel_genes:
        ngen = np.diff(inp.counts.indptr)
        lib = np.asarray(inp.counts.sum(axis=1)).ravel()
        ok &= ngen >= q.min_genes
        ok &= lib >= q.min_counts
        rules += [f"genes >= {q.min_genes}", f"counts >= {q.min_counts}"]
        mito = np.flatnonzero(np.char.startswith(inp.symbols.astype(str), q.mito_prefix.upper()))
        if mito.size:
            mt = np.asarray(inp.counts[:, mito].sum(axis=1)).ravel()
            ok &= 100.0 * mt / np.maximum(lib, 1.0) <= q.max_mito_pct
            rules.append(f"mitochondrial % <= {q.max_mito_pct:g} ({mito.size} genes)")
    else:
        rules.append(
            f"gene/count rules skipped: {n_genes_total} genes < min_panel_genes {q.min_panel_genes}"
        )
    return ok, {"rules": rules}


# =========================================================================== mixtures
def _expit(x: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64))))


def _logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    return np.asarray(np.log(q) - np.log1p(-q))


def _otsu(v: np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample (128-bin histogram)."""
    lo, hi = float(np.min(v)), float(np.max(v))
    if hi <= lo:
        return lo
    h, e = np.histogram(v, bins=128, range=(lo, hi))
    c = (e[:-1] + e[1:]) / 2
    w0 = np.cumsum(h).astype(float)
    w1 = w0[-1] - w0
    m0 = np.cumsum(h * c)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 / w0[-1] - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(e[int(np.argmax(between)) + 1])


@dataclass
class _GMM:
    """A two-component 1-D Gaussian mixture (component 0 low, 1 high) and its threshold."""

    mu: np.ndarray
    sd: np.ndarray
    w: np.ndarray
    n: int
    separation: float
    ok: bool
    threshold: float
    method: str = "mixture"

    def prob(self, v: np.ndarray) -> np.ndarray:
        """P(high | v), made monotone in ``v`` and consistent with the threshold."""
        if self.method.startswith("rule"):
            return _expit((v - self.threshold) / max(float(self.sd[0]) / 2.0, 1e-3))
        lp = [
            np.log(self.w[k]) - np.log(self.sd[k]) - 0.5 * ((v - self.mu[k]) / self.sd[k]) ** 2
            for k in (0, 1)
        ]
        p = _expit(lp[1] - lp[0])
        p = np.where(v <= self.mu[0], np.minimum(p, 0.5), p)
        p = np.where(v >= self.mu[1], np.maximum(p, 0.5), p)
        p = np.where(v < self.threshold, np.minimum(p, 0.5), np.maximum(p, 0.5))
        return np.asarray(p)

    def as_dict(self) -> dict[str, Any]:
        return {
            "threshold": float(self.threshold),
            "method": self.method,
            "separation": float(self.separation),
            "n_cells": int(self.n),
            "mean_low": float(self.mu[0]),
            "mean_high": float(self.mu[1]),
            "sd_low": float(self.sd[0]),
            "sd_high": float(self.sd[1]),
            "weight_high": float(self.w[1]),
        }


def _fit_gmm(v: np.ndarray, spec: ProteinSpec) -> _GMM:
    """EM for a 1-D two-component Gaussian mixture on a 256-bin histogram.

    EM runs from four starts at once (Otsu's split and splits at the 50th, 75th and 90th
    percentiles) for 25 iterations, then continues from the most likely one. Binning makes a fit cost the
    same for 50 or 50,000 cells; the bin width (1/256 of the range) is far below the
    components' spread.
    """
    v = np.asarray(v, dtype=np.float64)
    n = v.size
    spread = float(np.ptp(v)) if n else 0.0
    floor = max(0.05, 0.02 * spread)
    mu0 = float(np.mean(v)) if n else 0.0
    degenerate = _GMM(
        np.array([mu0, mu0]), np.array([floor, floor]), np.array([1.0, 1e-12]), n, 0.0, False, mu0
    )
    if n < 4 or spread <= 0:
        return degenerate
    h, e = np.histogram(v, bins=256)
    x = (e[:-1] + e[1:]) / 2
    keep = h > 0
    x, c = x[keep], h[keep].astype(np.float64)
    starts = np.array([_otsu(v), *np.quantile(v, [0.5, 0.75, 0.9])])
    r1 = (x[None, :] > starts[:, None]).astype(np.float64)  # (starts, bins)

    def m_step(r1: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        r = np.stack([1.0 - r1, r1], axis=1) * c  # (starts, 2, bins)
        wsum = r.sum(axis=2)
        safe = np.maximum(wsum, 1e-12)
        mu = (r * x).sum(axis=2) / safe
        var = (r * (x[None, None, :] - mu[:, :, None]) ** 2).sum(axis=2) / safe
        return wsum / n, mu, np.maximum(np.sqrt(var), floor)

    w, mu, sd = m_step(r1)
    valid = (w * n >= 2).all(axis=1)
    if not valid.any():
        return degenerate
    w, mu, sd = w[valid], mu[valid], sd[valid]
    prev = np.full(w.shape[0], -np.inf)
    tot = prev
    for it in range(spec.max_iter):
        if it == 25 and w.shape[0] > 1:  # continue only from the best start so far
            keep_best = int(np.argmax(np.where((w > 1e-9).all(axis=1), tot, -np.inf)))
            w, mu, sd = w[[keep_best]], mu[[keep_best]], sd[[keep_best]]
            prev, tot = prev[[keep_best]], tot[[keep_best]]
        wc = np.maximum(w, 1e-300)
        lp = (
            np.log(wc)[:, :, None]
            - np.log(sd)[:, :, None]
            - 0.5 * ((x[None, None, :] - mu[:, :, None]) / sd[:, :, None]) ** 2
        )
        top = lp.max(axis=1)
        ll = top + np.log(np.exp(lp[:, 0] - top) + np.exp(lp[:, 1] - top))
        tot = ll @ c
        r1 = np.exp(lp[:, 1] - ll)
        w, mu, sd = m_step(r1)
        if np.all(np.abs(tot - prev) < 1e-6 * np.abs(tot)):
            break
        prev = tot
    ok_w = (w > 1e-9).all(axis=1)
    if not ok_w.any():
        return degenerate
    best = int(np.argmax(np.where(ok_w, tot, -np.inf)))
    mu, sd, w = mu[best].copy(), sd[best].copy(), w[best].copy()
    if mu[0] > mu[1]:
        mu, sd, w = mu[::-1].copy(), sd[::-1].copy(), w[::-1].copy()
    w = np.clip(w, 1e-12, 1.0)
    sep = float(np.sqrt(2.0) * abs(mu[1] - mu[0]) / np.sqrt(sd[0] ** 2 + sd[1] ** 2))
    ok = bool(sep >= spec.min_separation and w.min() >= spec.min_weight)
    grid = np.linspace(mu[0], mu[1], 512)
    d = (np.log(w[1]) - np.log(sd[1]) - 0.5 * ((grid - mu[1]) / sd[1]) ** 2) - (
        np.log(w[0]) - np.log(sd[0]) - 0.5 * ((grid - mu[0]) / sd[0]) ** 2
    )
    cross = np.flatnonzero(d >= 0)
    thr = float(grid[cross[0]]) if cross.size else float(grid[-1])
    return _GMM(mu, sd, w, n, sep, ok, thr)


def _rule_gmm(v: np.ndarray, k: float) -> _GMM:
    """Threshold ``median + k * MAD`` for markers whose positives are a small minority."""
    med = float(np.median(v))
    mad = max(float(np.median(np.abs(v - med))) * 1.4826, 0.05)
    thr = med + k * mad
    frac = float(np.mean(v > thr))
    return _GMM(
        np.array([med, med + 2 * k * mad]),
        np.array([mad, mad]),
        np.array([1 - frac, frac]),
        int(v.size),
        float("nan"),
        True,
        thr,
        method="rule_rare_positive",
    )


@dataclass
class _Gate:
    """A per-sample protein gate: P(positive) over QC cells (NaN outside the parent)."""

    prob: np.ndarray
    fits: dict[str, dict[str, Any]]
    available: bool


def _protein_gate(
    values: np.ndarray,
    parent: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    marker: str,
    spec: ProteinSpec,
) -> _Gate:
    prob = np.full(values.shape[0], np.nan)
    fits: dict[str, dict[str, Any]] = {}
    if not parent.any():
        return _Gate(prob, fits, False)
    pooled = _fit_gmm(values[parent], spec)
    rare = marker in spec.rare_positive
    any_ok = False
    for s, name in enumerate(sample_names):
        sel = parent & (groups == s)
        if not sel.any():
            continue
        v = values[sel]
        fit: _GMM | None = None
        if v.size >= spec.min_cells_per_fit:
            f = _fit_gmm(v, spec)
            fit = f if f.ok else None
        if fit is None and pooled.ok:
            fit = _GMM(
                pooled.mu,
                pooled.sd,
                pooled.w,
                pooled.n,
                pooled.separation,
                True,
                pooled.threshold,
                "pooled_mixture",
            )
        if fit is None and rare:
            ref = v if v.size >= spec.min_cells_per_fit else values[parent]
            fit = _rule_gmm(ref, spec.rule_k_mad)
        if fit is None:
            fits[name] = {
                "method": "unavailable",
                "n_cells": int(v.size),
                "threshold": float("nan"),
            }
            continue
        any_ok = True
        prob[sel] = fit.prob(v)
        d = fit.as_dict()
        d["n_cells"] = int(v.size)
        fits[name] = d
    return _Gate(prob, fits, any_ok)


# --------------------------------------------------------------------------- count mixtures
def _nb_rates(
    X: np.ndarray,
    X2: np.ndarray,
    lib: np.ndarray,
    p: np.ndarray,
    prior_umis: float,
    glob: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-UMI rates of the two states (weights ``p`` / ``1-p``) and a shared NB dispersion.

    Rates are shrunk towards the global rate by ``prior_umis`` pseudo-UMIs; the dispersion
    ``theta`` of each gene is the method-of-moments estimate within states, clipped to
    [0.5, 1000] (1000 is practically Poisson). ``X2`` is ``X**2``. Everything reduces to
    matrix-vector products, so one call costs a few passes over ``X``.
    """
    q = 1.0 - p
    lib2 = lib * lib
    # np.dot, not @: 1-D @ 1-D takes a slow path in some numpy builds
    pl, ql = float(np.dot(p, lib)), float(np.dot(q, lib))
    pl2, ql2 = float(np.dot(p, lib2)), float(np.dot(q, lib2))
    r1 = (p @ X + prior_umis * glob) / (pl + prior_umis)
    r0 = (q @ X + prior_umis * glob) / (ql + prior_umis)
    # sum_i w_i [(x - L r)^2 - L r] = w.x2 - 2 r (w L).x + r^2 w.L^2 - r w.L
    excess = (
        p @ X2
        - 2 * r1 * ((p * lib) @ X)
        + r1**2 * pl2
        - r1 * pl
        + q @ X2
        - 2 * r0 * ((q * lib) @ X)
        + r0**2 * ql2
        - r0 * ql
    )
    second = r1**2 * pl2 + r0**2 * ql2
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(excess > 0, second / excess, 1000.0)
    return r1, r0, np.clip(np.nan_to_num(theta, nan=1000.0), 0.5, 1000.0)


def _nb_loglik(X: np.ndarray, lib: np.ndarray, r: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """Per-cell NB log-likelihood up to terms that do not depend on the state."""
    mu = lib[:, None] * r[None, :]
    lt = np.log(theta)[None, :]
    lmt = np.log(mu + theta[None, :])
    return np.asarray((X * (np.log(mu) - lmt) + theta[None, :] * (lt - lmt)).sum(axis=1))


@dataclass
class _BinFit:
    """A two-state negative-binomial mixture on a gene set, library size as exposure."""

    genes: list[str]
    rate_high: np.ndarray
    rate_low: np.ndarray
    theta: np.ndarray
    log_prior: np.ndarray  # logit P(high) per sample (pooled for samples without cells)
    weights: dict[str, float]
    fold: float
    ok: bool
    n_cells: int
    n_iter: int
    note: str = ""
    sec_genes: list[str] = field(default_factory=list)
    sec_log_ratio: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sec_rate_diff: float = 0.0

    def llr(self, X: np.ndarray, lib: np.ndarray, Xs: np.ndarray | None = None) -> np.ndarray:
        """Per-cell log-likelihood ratio high vs low (without the prior)."""
        out = _nb_loglik(X, lib, self.rate_high, self.theta) - _nb_loglik(
            X, lib, self.rate_low, self.theta
        )
        if Xs is not None and self.sec_genes:
            out = out + Xs @ self.sec_log_ratio - lib * self.sec_rate_diff
        return np.asarray(out)

    def as_dict(self) -> dict[str, Any]:
        return {
            "genes": list(self.genes),
            "rate_high_per_10k": np.asarray(self.rate_high * 1e4, dtype=float),
            "rate_low_per_10k": np.asarray(self.rate_low * 1e4, dtype=float),
            "nb_theta": np.asarray(self.theta, dtype=float),
            "secondary_genes": list(self.sec_genes),
            "secondary_log_rate_ratio": np.asarray(self.sec_log_ratio, dtype=float),
            "prior_positive": {k: float(v) for k, v in self.weights.items()},
            "fold": float(self.fold),
            "ok": bool(self.ok),
            "n_cells": int(self.n_cells),
            "n_iter": int(self.n_iter),
            "note": self.note,
        }


def _sample_prior(
    p: np.ndarray, groups: np.ndarray, n_groups: int, kappa: float
) -> tuple[np.ndarray, float]:
    """Per-sample P(high), shrunk towards the pooled value by ``kappa`` pseudo-cells."""
    pooled = float(np.clip(p.mean(), 1e-4, 1 - 1e-4)) if p.size else 0.5
    s1 = np.bincount(groups, weights=p, minlength=n_groups)
    cnt = np.bincount(groups, minlength=n_groups)
    pi = (s1 + kappa * pooled) / np.maximum(cnt + kappa, 1e-12)
    return np.clip(pi, 1e-4, 1 - 1e-4), pooled


def _finish_prior(
    fit: _BinFit, p: np.ndarray, groups: np.ndarray, sample_names: Sequence[str], kappa: float
) -> None:
    n_groups = len(sample_names)
    pi, pooled = _sample_prior(p, groups, n_groups, kappa)
    counts = np.bincount(groups, minlength=n_groups)
    fit.log_prior = np.where(counts > 0, _logit(pi), _logit(pooled))
    fit.weights = {str(s): float(pi[i]) for i, s in enumerate(sample_names) if counts[i] > 0}


def _fit_count_mixture(
    X: np.ndarray,
    lib: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    init: np.ndarray,
    orient: np.ndarray,
    genes: list[str],
    spec: RNASpec,
) -> tuple[_BinFit, np.ndarray]:
    """EM for a two-state NB mixture; the fit and the per-cell posteriors P(high).

    ``orient`` is +1 for genes marking the high state and -1 for genes marking the low one:
    the mean oriented log fold change names the states and decides whether two states were
    found at all (``rna.min_fold``). Rates and dispersions are fitted on at most
    ``rna.max_fit_cells`` cells (every sample represented in proportion); the per-sample
    priors and posteriors are then computed on all cells.
    """
    n_groups = len(sample_names)
    m = X.shape[0]
    fit_idx = np.arange(m)
    if m > spec.max_fit_cells:
        fit_idx = np.sort(np.random.default_rng(0).choice(m, spec.max_fit_cells, replace=False))
    Xf, libf, gf = X[fit_idx], lib[fit_idx], groups[fit_idx]
    X2f = Xf**2
    glob = (Xf.sum(axis=0) + 1e-3) / max(float(libf.sum()), 1.0)
    p = np.clip(init[fit_idx], 0.02, 0.98)
    prev = -np.inf
    n_iter = 0
    r1 = r0 = glob
    theta = np.full(X.shape[1], 1000.0)
    for it in range(1, spec.max_iter + 1):
        n_iter = it
        r1, r0, theta = _nb_rates(Xf, X2f, libf, p, spec.prior_umis, glob)
        pi, _ = _sample_prior(p, gf, n_groups, spec.sample_prior_cells)
        l1 = _nb_loglik(Xf, libf, r1, theta) + np.log(pi[gf])
        l0 = _nb_loglik(Xf, libf, r0, theta) + np.log1p(-pi[gf])
        top = np.maximum(l0, l1)
        ll = float(np.sum(top + np.log(np.exp(l0 - top) + np.exp(l1 - top))))
        p = _expit(l1 - l0)
        if abs(ll - prev) <= spec.tol * Xf.shape[0]:
            break
        prev = ll
    lr = np.log(r1) - np.log(r0)
    if float(np.dot(orient, lr)) < 0:  # "high" is the state the up genes mark
        r1, r0, lr = r0, r1, -lr
    fold = float(np.exp(np.mean(orient * lr)))
    ok = fold >= spec.min_fold
    note = "" if ok else f"states not separable (mean fold {fold:.2f} < {spec.min_fold:g})"
    fit = _BinFit(list(genes), r1, r0, theta, np.zeros(n_groups), {}, fold, ok, m, n_iter, note)
    # per-sample priors and posteriors of all cells with the rates fixed
    llr = fit.llr(X, lib)
    q = _expit(llr)
    for _ in range(100):
        pi, _ = _sample_prior(q, groups, n_groups, spec.sample_prior_cells)
        q_new = _expit(llr + _logit(pi)[groups])
        done = float(np.max(np.abs(q_new - q))) < 1e-6
        q = q_new
        if done:
            break
    _finish_prior(fit, q, groups, sample_names, spec.sample_prior_cells)
    return fit, q


def _add_secondary(
    fit: _BinFit,
    p: np.ndarray,
    Xs: np.ndarray,
    lib: np.ndarray,
    base_llr: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    sec_genes: list[str],
    spec: RNASpec,
) -> np.ndarray:
    """Learn secondary-gene rates from anchor cells and return the updated posteriors.

    Secondary genes add Poisson evidence with each gene's log rate ratio capped at
    ``rna.max_secondary_log_ratio``, so they sway uncertain cells but not confident ones.
    """
    hi = p >= spec.anchor_posterior
    lo = p <= 1 - spec.anchor_posterior
    if hi.sum() < 10 or lo.sum() < 10 or Xs.shape[1] == 0:
        return p
    a = spec.prior_umis
    glob = (Xs.sum(axis=0) + 1e-3) / max(float(lib.sum()), 1.0)
    r1 = (Xs[hi].sum(axis=0) + a * glob) / (lib[hi].sum() + a)
    r0 = (Xs[lo].sum(axis=0) + a * glob) / (lib[lo].sum() + a)
    cap = spec.max_secondary_log_ratio
    lr = np.clip(np.log(r1) - np.log(r0), -cap, cap)
    gm = np.sqrt(r1 * r0)
    fit.sec_genes = list(sec_genes)
    fit.sec_log_ratio = lr
    fit.sec_rate_diff = float((gm * (np.exp(lr / 2) - np.exp(-lr / 2))).sum())
    data_llr = base_llr + Xs @ lr - lib * fit.sec_rate_diff
    n_groups = len(sample_names)
    q = p
    for _ in range(100):
        pi, _ = _sample_prior(q, groups, n_groups, spec.sample_prior_cells)
        q_new = _expit(data_llr + _logit(pi)[groups])
        done = float(np.max(np.abs(q_new - q))) < 1e-6
        q = q_new
        if done:
            break
    _finish_prior(fit, q, groups, sample_names, spec.sample_prior_cells)
    return np.asarray(q)


# =========================================================================== RNA block
class _RNA:
    """Counts of the signature genes (dense, QC-passed cells) and matched-control scores."""

    def __init__(
        self, counts: sp.csr_matrix, rows: np.ndarray, symbols: np.ndarray, spec: RNASpec
    ) -> None:
        self.spec = spec
        lib_all = np.asarray(counts.sum(axis=1), dtype=np.float64).ravel()
        self.lib = lib_all[rows]
        n_all, g = counts.shape
        sym_index: dict[str, int] = {}
        for j, s in enumerate(symbols):
            sym_index.setdefault(str(s), j)
        wanted: list[str] = []
        for sig in spec.signatures.values():
            for gname in (*sig.up, *sig.down, *sig.secondary):
                u = gname.upper()
                if u in sym_index and u not in wanted:
                    wanted.append(u)
        self.present = set(wanted)
        # expression-matched controls: bin all genes by mean normalised expression
        # (an evenly spaced subset of at most 20,000 QC-passed cells ranks genes well enough)
        sub = rows[np.linspace(0, rows.size - 1, min(rows.size, 20_000)).astype(np.int64)]
        w = spec.target_sum / np.maximum(lib_all[sub], 1.0)
        gene_mean = np.asarray(counts[sub].T @ w).ravel() / max(sub.size, 1)
        sig_cols = {sym_index[x] for x in wanted}
        order = np.argsort(gene_mean, kind="stable")
        bins = np.empty(g, dtype=np.int64)
        bins[order] = (np.arange(g) * spec.n_bins) // max(g, 1)
        rng = np.random.default_rng(spec.control_seed)
        ctrl_cols: list[int] = []
        ctrl_bin: list[int] = []
        for b in range(spec.n_bins):
            pool = np.array(
                [j for j in np.flatnonzero(bins == b) if j not in sig_cols], dtype=np.int64
            )
            if pool.size == 0:
                continue
            pick = np.sort(
                rng.choice(pool, size=min(spec.n_ctrl_per_bin, pool.size), replace=False)
            )
            ctrl_cols += [int(x) for x in pick]
            ctrl_bin += [b] * len(pick)
        cols = [sym_index[x] for x in wanted]
        block = counts[:, cols + ctrl_cols]
        if rows.size < n_all:
            block = block[rows]
        dense = np.asarray(block.toarray(), dtype=np.float32)
        self.X = np.ascontiguousarray(dense[:, : len(cols)])
        self.col = {x: i for i, x in enumerate(wanted)}
        self.gene_bin = {x: int(bins[sym_index[x]]) for x in wanted}
        self.scale = (spec.target_sum / np.maximum(self.lib, 1.0)).astype(np.float32)
        ctrl = np.log1p(dense[:, len(cols) :] * self.scale[:, None])
        cb = np.asarray(ctrl_bin, dtype=np.int64)
        self.ctrl_mean = np.zeros((rows.size, spec.n_bins), dtype=np.float32)
        for b in np.unique(cb):
            self.ctrl_mean[:, b] = ctrl[:, cb == b].mean(axis=1)
        self.n_ctrl_genes = len(ctrl_cols)

    def genes(self, names: Sequence[str]) -> list[str]:
        out: list[str] = []
        for g in names:
            u = g.upper()
            if u in self.col and u not in out:
                out.append(u)
        return out

    def counts(self, genes: Sequence[str], rows: np.ndarray | None = None) -> np.ndarray:
        idx = [self.col[g] for g in genes]
        X = self.X[:, idx] if rows is None else self.X[np.ix_(rows, idx)]
        return np.asarray(X, dtype=np.float64)

    def set_score(self, genes: Sequence[str]) -> np.ndarray | None:
        """Mean log-normalised expression of the genes minus that of matched controls."""
        gs = self.genes(genes)
        if not gs:
            return None
        idx = [self.col[g] for g in gs]
        ln = np.log1p(self.X[:, idx] * self.scale[:, None])
        ctrl = self.ctrl_mean[:, [self.gene_bin[g] for g in gs]]
        return np.asarray((ln - ctrl).mean(axis=1), dtype=np.float64)

    def score(self, sig: SignatureSpec) -> np.ndarray | None:
        up = self.set_score(sig.up)
        if up is None:
            return None
        down = self.set_score(sig.down) if sig.down else None
        return up if down is None else up - down


def _fit_signature(
    rna: _RNA,
    name: str,
    rows: np.ndarray,
    groups: np.ndarray,
    sample_names: Sequence[str],
    spec: RNASpec,
    scores: Mapping[str, np.ndarray],
) -> tuple[_BinFit | None, np.ndarray | None]:
    """Fit one signature's count mixture on ``rows``; the fit and posteriors for ``rows``.

    EM starts from Otsu's split of the gene-set score (top 20% if the score is constant).
    """
    sig = spec.signatures[name]
    up = rna.genes(sig.up)
    genes = up + [g for g in rna.genes(sig.down) if g not in up]
    if not up or rows.size < spec.min_cells_per_fit:
        return None, None
    X = rna.counts(genes, rows)
    lib = rna.lib[rows]
    sc = scores.get(name)
    s = sc[rows] if sc is not None else X[:, : len(up)].sum(axis=1)
    thr = _otsu(s) if np.ptp(s) > 0 else float(np.median(s))
    init = np.where(s >= thr, 0.9, 0.1)
    if init.min() == init.max():
        init = np.where(s > np.quantile(s, 0.8), 0.9, 0.1)
    g = groups[rows]
    orient = np.array([1.0] * len(up) + [-1.0] * (len(genes) - len(up)))
    fit, p = _fit_count_mixture(X, lib, g, sample_names, init, orient, genes, spec)
    if fit.ok and sig.secondary:
        sec = [x for x in rna.genes(sig.secondary) if x not in genes]
        if sec:
            Xs = rna.counts(sec, rows)
            p = _add_secondary(fit, p, Xs, lib, fit.llr(X, lib), g, sample_names, sec, spec)
    return fit, p


def _predict_signature(rna: _RNA, fit: _BinFit, rows: np.ndarray, groups: np.ndarray) -> np.ndarray:
    X = rna.counts(fit.genes, rows)
    Xs = rna.counts(fit.sec_genes, rows) if fit.sec_genes else None
    return _expit(fit.llr(X, rna.lib[rows], Xs) + fit.log_prior[groups[rows]])


# =========================================================================== annotation core
@dataclass
class _Labels:
    """Per-cell results over the QC-passed cells (length ``m``)."""

    m: int
    t_prob: np.ndarray
    t_call: np.ndarray
    cell_type: np.ndarray
    lineage: np.ndarray
    lineage_conf: np.ndarray
    mem_prob: np.ndarray  # (m, 4): naive, CM, EM, TEMRA
    tim3: np.ndarray  # P(positive); NaN where not applicable or not estimable
    pd1: np.ndarray
    treg: np.ndarray
    evidence: dict[str, str]  # label -> description of the estimator
    kind: dict[str, str]  # label -> "protein" / "RNA" / "protein+RNA" / "prefiltered"
    scores: dict[str, np.ndarray]
    clr: pd.DataFrame | None
    params: dict[str, Any]


def _clr(prot: pd.DataFrame, axis: str, pseudocount: float) -> pd.DataFrame:
    lg = np.log(np.clip(prot.to_numpy(dtype=np.float64), 0.0, None) + pseudocount)
    lg = lg - (lg.mean(axis=1, keepdims=True) if axis == "cell" else lg.mean(axis=0, keepdims=True))
    return pd.DataFrame(lg, index=prot.index, columns=prot.columns)


def _kind(*sources: str) -> str:
    has_p = any("protein" in s for s in sources)
    has_r = any("RNA" in s for s in sources)
    return "protein+RNA" if has_p and has_r else "protein" if has_p else "RNA" if has_r else ""


class _Annotator:
    """Runs the label cascade over the QC-passed cells of one object."""

    def __init__(self, inp: _Input, qc: np.ndarray, cfg: SingleCellConfig) -> None:
        self.inp = inp
        self.cfg = cfg
        self.rows = np.flatnonzero(qc)
        self.m = self.rows.size
        self.groups = inp.sample[self.rows]
        self.names = inp.sample_names
        self.params: dict[str, Any] = {"protein": {}, "rna": {"models": {}}}
        self.rna: _RNA | None = None
        self.scores: dict[str, np.ndarray] = {}
        if inp.counts is not None and self.m:
            rna = _RNA(inp.counts, self.rows, inp.symbols, cfg.rna)
            if rna.present:
                self.rna = rna
                for nm, sig in cfg.rna.signatures.items():
                    s = rna.score(sig)
                    if s is not None:
                        self.scores[nm] = s
                self.params["rna"]["missing_genes"] = {
                    nm: [g for g in (*sig.up, *sig.down) if g.upper() not in rna.present]
                    for nm, sig in cfg.rna.signatures.items()
                    if any(g.upper() not in rna.present for g in (*sig.up, *sig.down))
                }
                self.params["rna"]["n_control_genes"] = int(rna.n_ctrl_genes)
        self.clr: pd.DataFrame | None = None
        if inp.protein is not None and self.m:
            self.clr = _clr(
                inp.protein.iloc[self.rows], cfg.protein.clr_axis, cfg.protein.pseudocount
            )
            self.params["protein"] = {
                "clr_axis": cfg.protein.clr_axis,
                "markers": [str(c) for c in self.clr.columns],
                "gates": {},
            }

    # ------------------------------------------------------------------ helpers
    def gate(self, marker: str, parent: np.ndarray, scope: str = "") -> _Gate | None:
        """Per-sample gate of ``marker`` within ``parent``; None if absent or never placed."""
        if self.clr is None or marker not in self.clr.columns:
            return None
        g = _protein_gate(
            self.clr[marker].to_numpy(), parent, self.groups, self.names, marker, self.cfg.protein
        )
        self.params["protein"]["gates"][f"{marker}@{scope}" if scope else marker] = g.fits
        return g if g.available else None

    def fuse(self, marker: str, prob: np.ndarray, rows: np.ndarray) -> bool:
        """Add RNA evidence to a weak protein gate (``protein.fuse_rna``), in place on rows.

        The RNA rates of the two states are estimated once from the cells weighted by the
        protein posterior (no EM, so the states stay the protein-defined ones); each cell's
        log-likelihood ratio is added to the logit of its protein posterior.
        """
        sig_name = self.cfg.protein.fuse_rna.get(marker)
        if self.rna is None or sig_name is None or sig_name not in self.cfg.rna.signatures:
            return False
        sig = self.cfg.rna.signatures[sig_name]
        genes = self.rna.genes([*sig.up, *sig.down])
        rows = rows[~np.isnan(prob[rows])]
        if not genes or rows.size < self.cfg.rna.min_cells_per_fit:
            return False
        X = self.rna.counts(genes, rows)
        lib = self.rna.lib[rows]
        w = prob[rows]
        glob = (X.sum(axis=0) + 1e-3) / max(float(lib.sum()), 1.0)
        r1, r0, theta = _nb_rates(X, X**2, lib, w, self.cfg.rna.prior_umis, glob)
        cap = self.cfg.protein.fuse_max_log_ratio
        llr = np.clip(_nb_loglik(X, lib, r1, theta) - _nb_loglik(X, lib, r0, theta), -cap, cap)
        lr = np.log(r1) - np.log(r0)
        prob[rows] = _expit(_logit(w) + llr)
        self.params["protein"].setdefault("fused_rna", {})[marker] = {
            "gene_set": sig_name,
            "genes": genes,
            "log_rate_ratio": lr,
            "n_cells": int(rows.size),
        }
        return True

    def fit(
        self, name: str, rows: np.ndarray, scope: str
    ) -> tuple[_BinFit | None, np.ndarray | None]:
        key = f"{name}@{scope}"
        if self.rna is None:
            return None, None
        fit, p = _fit_signature(
            self.rna, name, rows, self.groups, self.names, self.cfg.rna, self.scores
        )
        if fit is None:
            self.params["rna"]["models"][key] = {
                "ok": False,
                "note": "no genes of the set present or too few cells",
                "n_cells": int(rows.size),
            }
            return None, None
        self.params["rna"]["models"][key] = fit.as_dict()
        return fit, p

    def posterior(self, name: str, rows: np.ndarray, scope: str) -> np.ndarray | None:
        """P(high) over QC cells (NaN outside ``rows``), or None if the set is unusable."""
        fit, p = self.fit(name, rows, scope)
        if fit is None or p is None or not fit.ok:
            return None
        out = np.full(self.m, np.nan)
        out[rows] = p
        return out

    def by_lineage(self, name: str, scopes: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """Fit a gene set per lineage; a lineage with too few cells or no separable states
        uses one fit over all lineages together. P(high) over QC cells and the scopes used."""
        out = np.full(self.m, np.nan)
        used: list[str] = []
        pooled: _BinFit | None = None
        tried = False
        for scope, rows in scopes.items():
            if not rows.size:
                continue
            if rows.size >= self.cfg.rna.min_cells_per_fit:
                fit, p = self.fit(name, rows, scope)
                if fit is not None and p is not None and fit.ok:
                    out[rows] = p
                    used.append(scope)
                    continue
            if not tried:
                tried = True
                both = np.sort(np.concatenate([r for r in scopes.values() if r.size]))
                pooled, _ = self.fit(name, both, "+".join(k for k, r in scopes.items() if r.size))
            if pooled is not None and pooled.ok and self.rna is not None:
                out[rows] = _predict_signature(self.rna, pooled, rows, self.groups)
                used.append(f"{scope} (fit pooled over lineages)")
        return out, used

    def genes_of(self, name: str) -> list[str]:
        sig = self.cfg.rna.signatures[name]
        return self.rna.genes([*sig.up, *sig.down]) if self.rna is not None else []

    # ------------------------------------------------------------------ cascade
    def run(self) -> _Labels:
        m, cfg, src = self.m, self.cfg, self.inp.source
        evidence: dict[str, str] = {}
        if m == 0:  # nothing passed cell QC: every sample fails QC, nothing to annotate
            empty = np.zeros(0)
            none = "no QC-passed cells"
            return _Labels(
                m=0,
                t_prob=empty,
                t_call=np.zeros(0, dtype=bool),
                cell_type=np.zeros(0, dtype=object),
                lineage=np.zeros(0, dtype=object),
                lineage_conf=empty,
                mem_prob=np.zeros((0, 4)),
                tim3=empty,
                pd1=empty,
                treg=empty,
                evidence={k: none for k in ("t_cell", "lineage", "memory", "tim3", "pd1", "treg")},
                kind={},
                scores={},
                clr=None,
                params=self.params,
            )
        everyone = np.ones(m, dtype=bool)

        # T cells --------------------------------------------------------------
        t_prob = np.full(m, np.nan)
        if cfg.t_cells_prefiltered:
            t_prob[:] = 1.0
            evidence["t_cell"] = "prefiltered (config t_cells_prefiltered: every QC-passed cell)"
        elif (g3 := self.gate("CD3", everyone)) is not None:
            t_prob = np.nan_to_num(g3.prob, nan=0.0)
            evidence["t_cell"] = "protein: CD3 (CLR, per-sample mixture)"
        else:
            t_prob, evidence["t_cell"] = self._rna_t_cells()
        t_call = t_prob >= 0.5
        tix = np.flatnonzero(t_call)

        # coarse cell type of the others (RNA scores) ------------------------------
        cell_type = np.where(t_call, "T", "non_T").astype(object)
        if all(k in self.scores for k in ("b_cell", "nk", "myeloid")):
            st = np.column_stack([self.scores["b_cell"], self.scores["nk"], self.scores["myeloid"]])
            best = np.array(["B", "NK", "myeloid"], dtype=object)[np.argmax(st, axis=1)]
            best = np.where(st.max(axis=1) > 0, best, "other")
            cell_type = np.where(t_call, "T", best).astype(object)

        # CD4 / CD8 ------------------------------------------------------------------
        lineage = np.where(t_call, "other", "non_T").astype(object)
        lin_conf = np.where(t_call, np.nan, 1.0 - t_prob)
        g4 = self.gate("CD4", t_call)
        g8 = self.gate("CD8", t_call) if g4 is not None else None
        if g4 is not None and g8 is not None:
            p4, p8 = g4.prob[tix], g8.prob[tix]
            probs = np.column_stack([p4 * (1 - p8), p8 * (1 - p4), p4 * p8 + (1 - p4) * (1 - p8)])
            lineage[tix] = np.array(["CD4", "CD8", "other"], dtype=object)[np.argmax(probs, axis=1)]
            lin_conf[tix] = probs.max(axis=1)
            evidence["lineage"] = "protein: CD4, CD8 (CLR, per-sample mixtures within T cells)"
        elif (p := self.posterior("cd8_vs_cd4", tix, "T")) is not None:
            pp = p[tix]
            lineage[tix] = np.where(pp >= 0.5, "CD8", "CD4")
            lin_conf[tix] = np.maximum(pp, 1 - pp)
            evidence["lineage"] = (
                f"RNA: cd8_vs_cd4 gene sets [{', '.join(self.genes_of('cd8_vs_cd4'))}] "
                "(NB mixture + secondary genes)"
            )
        elif tix.size:
            sig = cfg.rna.signatures["cd8_vs_cd4"]
            raise SingleCellInputError(
                "cannot call CD4/CD8 T cells: no usable CD4 and CD8 protein and the genes "
                f"{sig.up + sig.down} are absent or do not separate two states",
                path=src,
            )
        else:
            evidence["lineage"] = "no T cells"
        is8, is4 = lineage == "CD8", lineage == "CD4"
        scopes = {"CD8": np.flatnonzero(is8), "CD4": np.flatnonzero(is4)}

        mem, evidence["memory"] = self._memory(t_call, lineage, scopes)
        tim3, evidence["tim3"] = self._state("TIM3", "checkpoint", scopes)
        pd1, evidence["pd1"] = self._state("PD1", "pd1", scopes)
        treg, evidence["treg"] = self._treg(is4, scopes)
        treg[is8] = 0.0
        kind = {k: _kind(v) for k, v in evidence.items()}
        if cfg.t_cells_prefiltered:
            kind["t_cell"] = "prefiltered"
        return _Labels(
            m=m,
            t_prob=t_prob,
            t_call=t_call,
            cell_type=cell_type,
            lineage=lineage,
            lineage_conf=lin_conf,
            mem_prob=mem,
            tim3=tim3,
            pd1=pd1,
            treg=treg,
            evidence=evidence,
            kind=kind,
            scores=self.scores,
            clr=self.clr,
            params=self.params,
        )

    def _rna_t_cells(self) -> tuple[np.ndarray, str]:
        """T cells from the t_cell gene set: a two-state NB mixture, or, when the set does not
        separate two populations but is detected in most cells, a homogeneous T population
        (T-cell-sorted data)."""
        cfg, m = self.cfg, self.m
        genes = self.genes_of("t_cell")
        fit, p = self.fit("t_cell", np.arange(m), "all")
        if fit is not None and p is not None and fit.ok:
            return p, f"RNA: t_cell gene set [{', '.join(genes)}] (NB mixture)"
        detected = (
            self.rna.counts(genes).sum(axis=1) > 0 if self.rna is not None and genes else None
        )
        if detected is not None and detected.mean() >= cfg.rna.homogeneous_min_detected:
            share = float(detected.mean())
            return np.where(detected, 1.0, share), (
                f"RNA: homogeneous T-cell population (t_cell set [{', '.join(genes)}] detected "
                f"in {100 * share:.0f}% of cells, no second population)"
            )
        have = f"{len(self.inp.symbols)} genes" if self.inp.counts is not None else "no RNA"
        prot = list(self.inp.protein.columns) if self.inp.protein is not None else "none"
        why = (
            f"the genes {genes} do not separate T cells from other cells and are detected in "
            f"only {100 * float(detected.mean()):.0f}% of cells"
            if detected is not None
            else f"none of the T-cell genes {cfg.rna.signatures['t_cell'].up} is present"
        )
        raise SingleCellInputError(
            f"cannot call T cells: no usable CD3 protein and {why} ({have}; protein: {prot})",
            path=self.inp.source,
        )

    def _memory(
        self, t_call: np.ndarray, lineage: np.ndarray, scopes: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, str]:
        """Quadrants of a CCR7 axis and a CD45RA axis (protein, else RNA surrogates)."""
        m = self.m
        g_ccr7 = self.gate("CCR7", t_call)
        g_ra = self.gate("CD45RA", t_call)
        ra_name = "CD45RA"
        if g_ra is None and (g_ro := self.gate("CD45RO", t_call)) is not None:
            g_ra = _Gate(1.0 - g_ro.prob, g_ro.fits, True)
            ra_name = "CD45RO (inverted)"
        ccr7 = np.full(m, np.nan)
        ra_hi = np.full(m, np.nan)  # P(CD45RA+) in the CCR7+ branch (naive vs CM)
        ra_lo = np.full(m, np.nan)  # P(CD45RA+) in the CCR7- branch (TEMRA vs EM)
        src_c: set[str] = set()
        src_r: set[str] = set()
        pooled: dict[str, _BinFit | None] = {}
        if g_ccr7 is not None:
            ccr7 = g_ccr7.prob.copy()
            if self.fuse("CCR7", ccr7, np.flatnonzero(t_call)):
                src_c.add("protein CCR7 + RNA ccr7 set (fused)")
            else:
                src_c.add("protein CCR7")
        if g_ra is not None:
            ra_hi, ra_lo = g_ra.prob.copy(), g_ra.prob.copy()
            src_r.add(f"protein {ra_name}")
        if self.rna is not None:
            if g_ccr7 is None:
                c_rna, c_used = self.by_lineage("ccr7", scopes)
                if c_used:
                    ccr7 = c_rna
                    src_c.add("RNA ccr7 set")
            for scope, rows in scopes.items():
                if not rows.size:
                    continue
                if g_ra is None:
                    c = ccr7[rows]
                    if np.isnan(c).all():
                        continue
                    used = 0
                    for sig_name, sub, target in (
                        ("naive_vs_cm", rows[c >= 0.5], ra_hi),
                        ("temra_vs_em", rows[c < 0.5], ra_lo),
                    ):
                        fit, _ = self.fit(sig_name, sub, scope)
                        if fit is None or not fit.ok:
                            # too few cells in this lineage's branch: fit on CD4 + CD8 together
                            fit = pooled.get(sig_name)
                            if sig_name not in pooled:
                                both = np.concatenate(list(scopes.values()))
                                cb = ccr7[both]
                                branch = both[
                                    (cb >= 0.5) if sig_name == "naive_vs_cm" else (cb < 0.5)
                                ]
                                fit, _ = self.fit(sig_name, np.sort(branch), "T")
                                pooled[sig_name] = fit
                        if fit is not None and fit.ok:
                            target[rows] = _predict_signature(self.rna, fit, rows, self.groups)
                            used += 1
                    if used == 2:
                        src_r.add("RNA naive_vs_cm / temra_vs_em sets")
        mem = np.column_stack(
            [ccr7 * ra_hi, ccr7 * (1 - ra_hi), (1 - ccr7) * (1 - ra_lo), (1 - ccr7) * ra_lo]
        )
        mem[~t_call] = np.nan
        if not src_c or not src_r:
            mem[:] = np.nan
            have = " and ".join(sorted(src_c | src_r)) or "neither axis"
            return mem, f"unavailable: need a CCR7 axis and a CD45RA axis (have {have})"
        return (
            mem,
            f"CCR7 axis: {', '.join(sorted(src_c))}; CD45RA axis: {', '.join(sorted(src_r))}",
        )

    def _state(
        self, marker: str, sig_name: str, scopes: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, str]:
        """A T-cell state per lineage: protein gate if the marker is present, else gene set."""
        out = np.full(self.m, np.nan)
        if self.clr is not None and marker in self.clr.columns:
            placed = []
            for scope, rows in scopes.items():
                sub = np.zeros(self.m, dtype=bool)
                sub[rows] = True
                if rows.size and (g := self.gate(marker, sub, scope)) is not None:
                    out[rows] = g.prob[rows]
                    placed.append(scope)
            if placed:
                return out, (
                    f"protein: {marker} (CLR, per-sample threshold within "
                    f"{' and '.join(placed)} T cells)"
                )
        est, used = self.by_lineage(sig_name, scopes)
        if used:
            return est, (
                f"RNA: {sig_name} gene set [{', '.join(self.genes_of(sig_name))}] (NB "
                f"mixture per lineage: {', '.join(used)}; fraction = mean posterior)"
            )
        return out, f"unavailable: no {marker} protein and no separable {sig_name} gene set"

    def _treg(self, is4: np.ndarray, scopes: dict[str, np.ndarray]) -> tuple[np.ndarray, str]:
        """CD25+ CD127lo within CD4: one gate on CLR(CD25) - CLR(CD127), the diagonal a flow
        gater draws on CD25 vs CD127 (rare positive); CD25 alone without CD127 protein."""
        out = np.full(self.m, np.nan)
        clr = self.clr
        if clr is not None and "CD25" in clr.columns:
            if "CD127" in clr.columns:
                clr["CD25-CD127"] = clr["CD25"] - clr["CD127"]
                g = self.gate("CD25-CD127", is4)
                del clr["CD25-CD127"]
                what = "CD25+ CD127lo (gate on CLR CD25 - CLR CD127)"
            else:
                g = self.gate("CD25", is4)
                what = "CD25+ (no CD127 protein)"
            if g is not None:
                out[is4] = g.prob[is4]
                return out, f"protein: {what} within CD4, per-sample threshold"
        rows = scopes["CD4"]
        if rows.size and (p := self.posterior("treg", rows, "CD4")) is not None:
            out[rows] = p[rows]
            return out, (
                f"RNA: treg gene set [{', '.join(self.genes_of('treg'))}] (NB mixture; "
                "fraction = mean posterior)"
            )
        return out, "unavailable: no CD25 protein and no separable treg gene set"


def _single_blas_thread() -> contextlib.AbstractContextManager[Any]:
    """Limit BLAS to one thread: the many small matrix-vector products here are otherwise
    dominated by waking BLAS worker threads (x20 slower, worse on a loaded machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _run_annotator(inp: _Input, qc: np.ndarray, cfg: SingleCellConfig) -> _Labels:
    with _single_blas_thread():
        return _Annotator(inp, qc, cfg).run()


def _tim3_estimator(lab: _Labels) -> str:
    e = lab.evidence.get("tim3", "unavailable")
    if e.startswith("protein"):
        return "protein:TIM3(CD366):per_sample_threshold"
    if e.startswith("RNA"):
        found = re.search(r"\[(.*?)\]", e)
        genes = found.group(1).replace(" ", "") if found else ""
        return f"rna_checkpoint_set:{genes}:mixture_posterior_mean"
    return "unavailable"


# =========================================================================== obs output
def _obs_frame(
    inp: _Input, qc: np.ndarray, lab: _Labels, index: pd.Index
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    n = inp.n_obs
    rows = np.flatnonzero(qc)

    def full(values: np.ndarray, fill: Any, dtype: Any) -> np.ndarray:
        out = np.full(n, fill, dtype=dtype)
        out[rows] = values
        return out

    mem_ok = ~np.isnan(lab.mem_prob).any(axis=1)
    mem_filled = np.nan_to_num(lab.mem_prob, nan=-1.0)
    memory = np.where(
        mem_ok, np.array(MEMORY_LABELS, dtype=object)[np.argmax(mem_filled, axis=1)], "NA"
    )
    mem_conf = np.where(mem_ok, mem_filled.max(axis=1), np.nan)
    t_conf = np.where(lab.t_call, lab.t_prob, 1 - lab.t_prob)

    obs = pd.DataFrame(index=index)
    obs["bp_qc_pass"] = qc
    obs["bp_cell_type"] = pd.Categorical(
        full(lab.cell_type, "NA", object), categories=list(CELL_TYPE_LABELS)
    )
    obs["bp_t_cell"] = full(lab.t_call, False, bool)
    obs["bp_lineage"] = pd.Categorical(
        full(lab.lineage, "NA", object), categories=list(LINEAGE_LABELS)
    )
    obs["bp_memory"] = pd.Categorical(full(memory, "NA", object), categories=[*MEMORY_LABELS, "NA"])
    confs: dict[str, np.ndarray] = {
        "t_cell": full(t_conf, np.nan, np.float64),
        "lineage": full(lab.lineage_conf, np.nan, np.float64),
        "memory": full(mem_conf, np.nan, np.float64),
    }
    applies: dict[str, np.ndarray] = {
        "t_cell": np.ones(lab.m, dtype=bool),
        "lineage": lab.t_call,
        "memory": mem_ok,
    }
    for name, p in (("tim3", lab.tim3), ("pd1", lab.pd1), ("treg", lab.treg)):
        vals = full(p, np.nan, np.float64)
        known = ~np.isnan(vals)
        call = pd.array([pd.NA] * n, dtype="boolean")
        call[known] = vals[known] >= 0.5
        obs[f"bp_{name}"] = call
        obs[f"bp_{name}_prob"] = vals
        confs[name] = np.where(known, np.maximum(vals, 1 - vals), np.nan)
        applies[name] = ~np.isnan(p)
    applies["treg"] = applies["treg"] & (lab.lineage == "CD4")
    for name, c in confs.items():
        obs[f"bp_{name}_conf"] = c
    conf_mat = np.column_stack(list(confs.values()))
    some = ~np.isnan(conf_mat).all(axis=1)
    overall = np.full(n, np.nan)
    overall[some] = np.nanmin(conf_mat[some], axis=1)
    obs["bp_confidence"] = overall
    # per cell: the kinds of evidence behind the labels that apply to it
    has_p = np.zeros(lab.m, dtype=bool)
    has_r = np.zeros(lab.m, dtype=bool)
    for name, a in applies.items():
        k = lab.kind.get(name, "")
        if "protein" in k:
            has_p |= a
        if "RNA" in k:
            has_r |= a
    kinds = np.where(
        has_p & has_r, "protein+RNA", np.where(has_p, "protein", np.where(has_r, "RNA", "none"))
    )
    if lab.kind.get("t_cell") == "prefiltered":
        kinds = np.where(kinds == "none", "prefiltered", kinds)
    obs["bp_evidence"] = pd.Categorical(
        full(kinds.astype(object), "none", object), categories=list(EVIDENCE_LABELS)
    )
    for nm, s in lab.scores.items():
        obs[f"bp_score_{nm}"] = full(s.astype(np.float32), np.nan, np.float32)
    clr_full = None
    if lab.clr is not None:
        arr = np.full((n, lab.clr.shape[1]), np.nan)
        arr[rows] = lab.clr.to_numpy()
        clr_full = pd.DataFrame(arr, index=index, columns=lab.clr.columns)
    return obs, clr_full


def _uns_params(
    inp: _Input, qc: np.ndarray, qc_info: dict[str, Any], lab: _Labels, cfg: SingleCellConfig
) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "config_name": cfg.name,
        "config_version": cfg.version,
        "sample_key": inp.sample_key or "",
        "samples": list(inp.sample_names),
        "cell_qc": {
            "rules": list(qc_info["rules"]),
            "n_pass": {s: int(qc[inp.sample == i].sum()) for i, s in enumerate(inp.sample_names)},
        },
        "evidence": dict(lab.evidence),
        "tim3_estimator": _tim3_estimator(lab),
        "fraction_estimator": cfg.fraction_estimator,
        "protein": lab.params["protein"],
        "rna": lab.params["rna"],
    }


def annotate(
    adata: ad.AnnData,
    *,
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None = None,
    sample_key: str | None = None,
    copy: bool = False,
) -> ad.AnnData:
    """Label cells: T cells, CD4/CD8, naive/CM/EM/TEMRA, TIM3/checkpoint-high, PD-1, Treg.

    Parameters
    ----------
    adata
        An object as :func:`read_single_cell` returns (raw counts in ``layers['counts']`` or
        ``X``; protein in ``obsm``), possibly holding many samples.
    config
        A :class:`SingleCellConfig`, a mapping, a YAML path, or ``None`` for the default.
    sample_key
        ``obs`` column of the sample: protein thresholds and state priors are per sample.
        ``None`` uses the first of ``config.sample_key_candidates`` present, else treats the
        object as one sample.
    copy
        Return an annotated copy instead of writing into ``adata``.

    Returns
    -------
    AnnData
        ``adata`` (or its copy) with, in ``obs``: ``bp_qc_pass``; ``bp_cell_type``
        (T/B/NK/myeloid/other/non_T); ``bp_t_cell`` (bool); ``bp_lineage``
        (CD4/CD8/other/non_T; ``NA`` for QC-failed cells); ``bp_memory``
        (naive/CM/EM/TEMRA; ``NA`` where not applicable or not determinable); ``bp_tim3``,
        ``bp_pd1``, ``bp_treg`` (nullable booleans, ``<NA>`` where not applicable or not
        estimable) with ``bp_<state>_prob``; ``bp_evidence`` (protein/RNA/protein+RNA/
        prefiltered/none: the evidence behind the cell's labels); ``bp_confidence`` (0-1, the
        smallest of the cell's per-label confidences ``bp_<label>_conf``); gene-set scores
        ``bp_score_<set>``. ``obsm['bp_protein_clr']`` holds the CLR-normalised protein, and
        ``uns['blinaprofile']`` the estimator behind each label (``evidence``), the TIM3
        estimator, per-sample protein thresholds (``protein.gates.<marker>.<sample>``) and the
        RNA mixture parameters (``rna.models.<set>@<scope>``).

    Raises
    ------
    SingleCellInputError
        ``sample_key`` is not an ``obs`` column, the counts are not raw counts, or neither
        protein nor genes allow calling T cells and CD4/CD8 (the message names the file).
    """
    cfg = _resolve_config(config)
    target = adata.copy() if copy else adata
    inp = _prepare(target, cfg, sample_key=sample_key, patient_key=None, default_sample="sample")
    qc, qc_info = _cell_qc(inp, cfg)
    lab = _run_annotator(inp, qc, cfg)
    obs, clr = _obs_frame(inp, qc, lab, target.obs_names)
    for c in obs.columns:
        target.obs[c] = (
            obs[c].array if not isinstance(obs[c].dtype, np.dtype) else obs[c].to_numpy()
        )
    if clr is not None:
        target.obsm["bp_protein_clr"] = clr
    info = dict(target.uns.get("blinaprofile", {}))
    info.update(_uns_params(inp, qc, qc_info, lab, cfg))
    target.uns["blinaprofile"] = info
    return target


# =========================================================================== features
def _pct(num: float, den: float) -> float:
    return 100.0 * num / den if den > 0 else float("nan")


def _features_for_sample(
    lab: _Labels, sel: np.ndarray, n_events: int, cfg: SingleCellConfig
) -> tuple[dict[str, float], list[str]]:
    q = cfg.sample_qc
    soft = cfg.fraction_estimator == "posterior_mean"
    t = sel & lab.t_call
    c8 = sel & (lab.lineage == "CD8")
    c4 = sel & (lab.lineage == "CD4")
    n_live = int(sel.sum())
    n3, n4, n8 = int(t.sum()), int(c4.sum()), int(c8.sum())
    den = (
        int((sel & (lab.cell_type != "myeloid")).sum())
        if cfg.cd3_denominator == "lymphocytes"
        else n_live
    )
    f: dict[str, float] = {name: float("nan") for name in feature_names()}
    f["cd3_pct_lymph"] = float("nan") if cfg.t_cells_prefiltered else _pct(n3, den)
    f["cd4_pct_cd3"] = _pct(n4, n3)
    f["cd8_pct_cd3"] = _pct(n8, n3)
    f["cd4_cd8_ratio"] = n4 / n8 if n8 else float("nan")

    def frac(p: np.ndarray, parent: np.ndarray) -> float:
        v = p[parent]
        v = v[~np.isnan(v)]
        if v.size == 0:
            return float("nan")
        return float(100.0 * (v.mean() if soft else (v >= 0.5).mean()))

    for lin, parent in (("cd8", c8), ("cd4", c4)):
        mp = lab.mem_prob[parent]
        mp = mp[~np.isnan(mp).any(axis=1)]
        if mp.shape[0]:
            share = (
                mp.mean(axis=0)
                if soft
                else np.bincount(np.argmax(mp, axis=1), minlength=4) / mp.shape[0]
            )
            share = share / share.sum()
            for k, label in enumerate(MEMORY_LABELS):
                f[f"{lin}_{label.lower()}_pct_{lin}"] = float(100.0 * share[k])
    f["cd8_tim3_pct_cd8"] = frac(lab.tim3, c8)
    f["cd8_pd1_pct_cd8"] = frac(lab.pd1, c8)
    f["cd4_treg_pct_cd4"] = frac(lab.treg, c4)

    reasons: list[str] = []
    if n_live < q.min_cells:
        reasons.append(f"only {n_live} QC-passed cells (< {q.min_cells})")
        f["cd3_pct_lymph"] = float("nan")
    if n3 < q.min_cd3:
        reasons.append(f"only {n3} T cells (< {q.min_cd3})")
        for name in ("cd4_pct_cd3", "cd8_pct_cd3", "cd4_cd8_ratio"):
            f[name] = float("nan")
    for lin, n_lin, min_lin in (("cd8", n8, q.min_cd8), ("cd4", n4, q.min_cd4)):
        if n_lin < min_lin:
            reasons.append(f"only {n_lin} {lin.upper()} T cells (< {min_lin})")
            for name in f:
                if name.endswith(f"_pct_{lin}"):
                    f[name] = float("nan")
            f["cd4_cd8_ratio"] = float("nan")
    f.update(
        {
            "n_events": float(n_events),
            "n_live": float(n_live),
            "n_cd3": float(n3),
            "n_cd4": float(n4),
            "n_cd8": float(n8),
        }
    )
    return f, reasons


def featurize_single_cell(
    data: ad.AnnData | PathLike,
    *,
    sample_key: str | None = None,
    patient_key: str | None = None,
    config: SingleCellConfig | Mapping[str, Any] | PathLike | None = None,
) -> pd.DataFrame:
    """Per-sample features in the versioned schema from a single-cell object.

    Parameters
    ----------
    data
        A path (anything :func:`read_single_cell` reads) or an AnnData (left unmodified).
    sample_key, patient_key
        ``obs`` columns of the sample and the patient. ``None`` uses the first of
        ``config.sample_key_candidates`` / ``patient_key_candidates`` present; without a
        sample column the whole object is one sample named after the file (or ``sample``);
        without a patient column each sample is its own patient.
    config
        A :class:`SingleCellConfig`, a mapping, a YAML path, or ``None`` for the default.

    Returns
    -------
    DataFrame
        One row per sample (in order of first appearance): ``sample_id``, ``patient_id``,
        ``modality`` (``"single_cell"``), ``schema_version``, every feature of
        :func:`blinaprofile.schema.feature_names` (flow-only ones NaN), the QC columns
        ``n_events`` (cells read), ``n_live`` (QC-passed cells), ``n_cd3``, ``n_cd4``,
        ``n_cd8``, then ``qc_pass``, ``qc_reasons`` (``""`` when passing, else ``"; "``-joined
        reasons) and ``tim3_estimator``. Percent features are 0-100 of the schema's parent;
        lineage shares come from the hard calls (``cd4_cd8_ratio = n_cd4 / n_cd8``), memory
        and state shares are the mean posterior over the parent's cells
        (``fraction_estimator``). Features whose parent has too few cells are NaN.
        ``df.attrs['blinaprofile']`` holds the evidence per label and the keys used.

    Raises
    ------
    SingleCellInputError
        Unreadable input, unknown sample/patient key, a sample spanning several patients, or
        neither protein nor genes to call T cells and CD4/CD8 (the message names the file).
    """
    cfg = _resolve_config(config)
    if isinstance(data, ad.AnnData):
        adata = data
        default = "sample"
    else:
        adata = read_single_cell(data, sample_key=sample_key)
        p = Path(data)
        base = p.parent if p.name.lower().endswith((".mtx", ".mtx.gz")) else p
        default = re.sub(r"\.(h5ad|h5|hdf5)$", "", base.name, flags=re.IGNORECASE)
    inp = _prepare(
        adata, cfg, sample_key=sample_key, patient_key=patient_key, default_sample=default
    )
    qc, _ = _cell_qc(inp, cfg)
    lab = _run_annotator(inp, qc, cfg)
    grp_qc = inp.sample[qc]
    n_events = np.bincount(inp.sample, minlength=len(inp.sample_names))
    estimator = _tim3_estimator(lab)
    rows = []
    for i, sid in enumerate(inp.sample_names):
        f, reasons = _features_for_sample(lab, grp_qc == i, int(n_events[i]), cfg)
        row: dict[str, Any] = {
            "sample_id": sid,
            "patient_id": inp.patient_of_sample[i],
            "modality": "single_cell",
            "schema_version": SCHEMA_VERSION,
        }
        row.update({k: f[k] for k in feature_names()})
        row.update({k: int(f[k]) for k in QC_COLUMNS})
        row["qc_pass"] = not reasons
        row["qc_reasons"] = "; ".join(reasons)
        row["tim3_estimator"] = estimator
        rows.append(row)
    cols = [
        "sample_id",
        "patient_id",
        "modality",
        "schema_version",
        *feature_names(),
        *QC_COLUMNS,
        "qc_pass",
        "qc_reasons",
        "tim3_estimator",
    ]
    df = pd.DataFrame(rows, columns=cols)
    df["qc_pass"] = df["qc_pass"].astype(bool)
    df.attrs["blinaprofile"] = {
        "source": inp.source or "",
        "sample_key": inp.sample_key or "",
        "patient_key": inp.patient_key or "",
        "evidence": dict(lab.evidence),
        "fraction_estimator": cfg.fraction_estimator,
    }
    return df
