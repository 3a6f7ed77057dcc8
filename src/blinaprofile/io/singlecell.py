"""Reading single-cell objects: ``.h5ad``, 10x matrix folders and 10x ``.h5`` into AnnData with raw counts in ``X``/``layers["counts"]`` and CITE-seq protein in ``obsm["protein"]``."""

from __future__ import annotations

import gzip
import re
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from blinaprofile.annotate.config import PathLike, ProteinSpec
from blinaprofile.errors import SingleCellInputError
from blinaprofile.gating.panel import canonical_marker

# =========================================================================== reading
_DEFAULT_OBSM_KEYS: tuple[str, ...] = tuple(ProteinSpec().obsm_keys)
SYMBOL_COLUMNS: tuple[str, ...] = (
    "gene_symbols",
    "gene_symbol",
    "feature_name",
    "gene_name",
    "gene_names",
    "symbol",
)
ANTIBODY_TYPES = {"antibody capture", "antibody_capture", "adt", "protein"}
_REAGENT_SUFFIX = re.compile(r"[_\-.\s]*(totalseq[abc]?|adt|antibody)$", re.IGNORECASE)


def _clean_antibody_name(name: str) -> str:
    """Canonical marker (``CD197_TotalSeqB`` -> ``CCR7``), else the name without reagent suffix."""
    canon = canonical_marker(name)
    if canon:
        return canon
    stripped = _REAGENT_SUFFIX.sub("", str(name).strip())
    return canonical_marker(stripped) or stripped or str(name)


def protein_frame(values: Any, names: Sequence[str], index: pd.Index) -> pd.DataFrame:
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


def find_obsm_protein(
    adata: ad.AnnData, keys: Sequence[str], source: str | None
) -> tuple[pd.DataFrame | None, dict[str, str], str | None]:
    """Protein counts from ``obsm`` (a DataFrame, or an array with names in ``uns``)."""
    for key in keys:
        if key not in adata.obsm:
            continue
        val = adata.obsm[key]
        if isinstance(val, pd.DataFrame):
            names = [str(c) for c in val.columns]
            frame = protein_frame(val.to_numpy(), names, adata.obs_names)
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
            frame = protein_frame(arr, names, adata.obs_names)
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


def count_matrix(adata: ad.AnnData, source: str | None) -> tuple[Any, pd.DataFrame]:
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
    prot, originals, key = find_obsm_protein(adata, _DEFAULT_OBSM_KEYS, source)
    mat, var = count_matrix(adata, source)
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
        ab = ft.isin(ANTIBODY_TYPES).to_numpy()
        other = ~ab & (ft != "gene expression").to_numpy()
        if ab.any() and prot is None:
            xmat = sp.csr_matrix(adata.X)
            prot = protein_frame(
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
