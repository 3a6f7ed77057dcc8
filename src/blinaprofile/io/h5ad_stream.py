"""A large ``.h5ad`` read in blocks of rows: the cells' sums over every gene and the columns of
a gene panel, without holding (or densifying) the whole matrix.

Why our own code rather than anndata or scanpy: the annotator needs, per cell, the library
size, the number of detected genes and a few hundred columns (gene-set, control and
mitochondrial genes); anndata's backed mode reads a block of rows with every gene and has no
column-subset reader for CSR rows, and scanpy reads whole objects. This module reads the CSR
groups (``data``, ``indices``, ``indptr``) with h5py a block of rows at a time (a few million
stored values, so memory stays flat for any number of cells) and keeps only what is needed.

Every per-cell number is computed by the same scipy/numpy operations, on the same row, as
:func:`~blinaprofile.io.singlecell.read_single_cell` followed by the annotator on the whole
object, and the matrix kind is decided from the same values, so a panel gives bit-identical
labels and features (``tests/test_singlecell.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from blinaprofile.annotate.config import PathLike, ProteinSpec
from blinaprofile.errors import SingleCellInputError
from blinaprofile.io.singlecell import (
    DETECT_SAMPLE_VALUES,
    GENE_PANEL_KEY,
    PANEL_DETECTED_COLUMN,
    PANEL_TOTAL_COLUMN,
    X_KINDS,
    MatrixInfo,
    constant_row_total,
    detect_rows,
    detect_x_kind_from,
    find_obsm_protein,
    gene_symbols,
    linear_row_sums,
    linear_values,
)

__all__ = ["DEFAULT_BLOCK_VALUES", "H5adStream", "PanelBlock", "read_obs", "streamable"]

#: stored values read per block (data + indices: 8 bytes each, so about 32 MB per block)
DEFAULT_BLOCK_VALUES = 4_000_000
#: objects with at most this many genes are read whole (small, and possibly cytometry)
_MIN_STREAM_GENES = 300


@dataclass
class PanelBlock:
    """The cells ``start:stop`` of the file: the panel columns and the sums over every gene.

    Attributes
    ----------
    start, stop
        Row range in the file.
    matrix
        float32 CSR, cells x panel genes (the file's column order).
    total
        Each cell's sum over every gene on the linear scale (float32 for raw counts, as
        ``X.sum(axis=1)`` of the float32 matrix; float64 for normalised data).
    detected
        Each cell's number of stored values (genes detected).
    """

    start: int
    stop: int
    matrix: sp.csr_matrix
    total: np.ndarray
    detected: np.ndarray


def _gather(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored values, column indices and lengths of the CSR rows ``rows`` (sorted), as
    new arrays."""
    n = indptr.size - 1
    lengths = indptr[rows + 1] - indptr[rows]
    if rows.size == n:
        return data.copy(), indices.copy(), lengths
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:  # one run of rows
        a, b = int(indptr[rows[0]]), int(indptr[rows[-1] + 1])
        return data[a:b].copy(), indices[a:b].copy(), lengths
    picked = np.zeros(n, dtype=bool)
    picked[rows] = True
    keep = np.repeat(picked, np.diff(indptr))
    return data[keep], indices[keep], lengths


def _stack(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_vars: int) -> sp.csr_matrix:
    """One float32 CSR matrix from ``(values, indices, row lengths)`` parts, in order."""
    if not parts:
        return sp.csr_matrix((0, n_vars), dtype=np.float32)
    data = np.concatenate([p[0] for p in parts]).astype(np.float32, copy=False)
    idx = np.concatenate([p[1] for p in parts])
    lengths = np.concatenate([p[2] for p in parts])
    ptr = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=ptr[1:])
    return sp.csr_matrix((data, idx, ptr), shape=(lengths.size, n_vars))


def _frame(node: Any) -> pd.DataFrame:
    """An ``obs``/``var`` group as a DataFrame (anndata's reader)."""
    out = ad.io.read_elem(node)
    if not isinstance(out, pd.DataFrame):
        raise TypeError(f"{node.name} is not a dataframe")
    return out


def _mapping(node: Any) -> dict[str, Any]:
    """An ``uns``/``obsm`` group as a dict (anndata's reader)."""
    out = ad.io.read_elem(node)
    if not isinstance(out, dict):
        raise TypeError(f"{node.name} is not a mapping")
    return out


def _csr_group(f: h5py.File, path: str) -> h5py.Group | None:
    if path not in f:
        return None
    g = f[path]
    if not isinstance(g, h5py.Group) or g.attrs.get("encoding-type") != "csr_matrix":
        return None
    return g


def read_obs(path: PathLike) -> pd.DataFrame:
    """Every cell's ``obs`` of an ``.h5ad`` file, without reading its matrices.

    Raises
    ------
    SingleCellInputError
        The file is not an ``.h5ad`` with an ``obs`` dataframe (the message names it).
    """
    try:
        with h5py.File(path, "r") as f:
            return _frame(f["obs"])
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise SingleCellInputError(f"cannot read as .h5ad: {err}", path=str(path)) from None


def streamable(path: PathLike) -> bool:
    """Whether :class:`H5adStream` can read ``path`` in blocks (else read it whole).

    True for an ``.h5ad`` whose RNA matrix (``layers/counts``, ``X`` or ``raw/X``) is stored
    as CSR, with more than 300 genes, all of them Gene Expression features (antibody capture
    or other features in ``X`` are split off by :func:`read_single_cell`, which reads the
    whole object).
    """
    p = Path(path)
    if not (p.is_file() and p.name.lower().endswith(".h5ad")):
        return False
    try:
        with h5py.File(p, "r") as f:
            groups = [g for g in ("layers/counts", "X", "raw/X") if g in f]
            if not groups or any(_csr_group(f, g) is None for g in groups):
                return False
            for var_path in ("var", "raw/var"):
                if var_path not in f:
                    continue
                var = _frame(f[var_path])
                if var.shape[0] <= _MIN_STREAM_GENES:
                    return False
                if "feature_types" in var:
                    ft = var["feature_types"].astype(str).str.strip().str.lower()
                    if not (ft == "gene expression").all():
                        return False
            return True
    except (OSError, KeyError, ValueError, TypeError):
        return False


class H5adStream:
    """An ``.h5ad`` file read in blocks of rows (see the module docstring).

    Parameters
    ----------
    path
        The file (check :func:`streamable` first).
    sample_key
        ``obs`` column of the sample; checked to exist.
    x_kind
        As :func:`~blinaprofile.io.singlecell.read_single_cell`.
    block_values
        Stored values read per block.

    Attributes
    ----------
    obs : DataFrame
        Every cell's ``obs``.
    var : DataFrame
        The RNA matrix's genes (names made unique as :func:`read_single_cell` does).
    info : MatrixInfo
        What the matrix holds, as the annotator sees it after :func:`read_single_cell`.
    protein : DataFrame or None
        CITE-seq counts with canonical names (``obsm['protein']`` of :func:`read_single_cell`).
    meta : dict
        ``uns['blinaprofile']`` as :func:`read_single_cell` writes it.
    """

    def __init__(
        self,
        path: PathLike,
        *,
        sample_key: str | None = None,
        x_kind: str = "auto",
        block_values: int = DEFAULT_BLOCK_VALUES,
    ) -> None:
        self.path = Path(path)
        self.source = str(self.path)
        self.block_values = max(int(block_values), 1)
        if x_kind not in ("auto", *X_KINDS):
            raise SingleCellInputError(
                f"x_kind must be one of auto, {', '.join(X_KINDS)}; got {x_kind!r}",
                path=self.source,
            )
        try:
            self._f = h5py.File(self.path, "r")
            self.obs = _frame(self._f["obs"])
            uns = _mapping(self._f["uns"]) if "uns" in self._f else {}
            obsm = _mapping(self._f["obsm"]) if "obsm" in self._f else {}
        except (OSError, KeyError, ValueError, TypeError) as err:
            raise SingleCellInputError(f"cannot read as .h5ad: {err}", path=self.source) from None
        if sample_key is not None and sample_key not in self.obs.columns:
            cols = ", ".join(map(str, self.obs.columns)) or "no columns"
            raise SingleCellInputError(
                f"sample key {sample_key!r} is not an obs column (obs has: {cols})",
                path=self.source,
            )
        self.n_obs = int(self.obs.shape[0])
        if self.n_obs == 0:
            raise SingleCellInputError("the object has no cells", path=self.source)
        light = ad.AnnData(obs=self.obs, obsm=dict(obsm), uns=dict(uns))
        prot, originals, key = find_obsm_protein(light, ProteinSpec().obsm_keys, self.source)
        self.protein = prot
        group, var_path, info = self._choose_matrix(x_kind, uns)
        self._group = self._f[group]
        self._buffers: dict[str, np.ndarray] = {}
        self._indptr = np.asarray(self._group["indptr"][:], dtype=np.int64)
        var = _frame(self._f[var_path]).copy()
        var.index = var.index.astype(str)
        holder = ad.AnnData(var=var)
        holder.var_names_make_unique()
        self.var = holder.var
        self.n_vars = int(self.var.shape[0])
        self.info = info
        meta = dict(uns.get("blinaprofile", {})) if isinstance(uns, dict) else {}
        meta.update(
            {
                "source": self.source,
                "x_kind": info.kind,
                "x_kind_note": info.note,
                "protein_source": key or "",
                "protein_names_original": {str(k): str(v) for k, v in originals.items()},
                "dropped_feature_types": [],
            }
        )
        self.meta = meta
        self.uns = {k: v for k, v in uns.items() if k != "blinaprofile"}

    # ------------------------------------------------------------------ matrix kind
    def _values(self, group: str) -> tuple[np.ndarray, float]:
        """The detection sample of the stored values and their maximum (one pass)."""
        data = self._f[group]["data"]
        nnz = int(data.shape[0])
        if nnz == 0:
            return np.zeros(0), 0.0
        pos = np.linspace(0, nnz - 1, DETECT_SAMPLE_VALUES).astype(np.int64)
        if nnz <= DETECT_SAMPLE_VALUES:
            pos = np.arange(nnz)
        vals = np.empty(pos.size)
        vmax = -np.inf
        buf = np.empty(min(nnz, self.block_values), dtype=data.dtype)
        for a in range(0, nnz, self.block_values):
            b = min(nnz, a + self.block_values)
            block = buf[: b - a]
            data.read_direct(block, np.s_[a:b], np.s_[0 : b - a])
            vmax = max(vmax, float(np.max(block)))
            lo, hi = np.searchsorted(pos, [a, b])
            vals[lo:hi] = block[pos[lo:hi] - a]
        return vals, vmax

    def _detect(self, group: str, declared: str, where: str) -> MatrixInfo:
        vals, vmax = self._values(group)
        g = self._f[group]
        shape = tuple(int(x) for x in g.attrs["shape"])
        indptr = np.asarray(g["indptr"][:], dtype=np.int64)
        rows = detect_rows(shape[0])
        sub = self._rows_of(g, indptr, rows, shape[1])

        def total_of(base: str) -> float:
            return constant_row_total(linear_row_sums(sub, base))

        try:
            return detect_x_kind_from(vals, vmax, total_of, declared=declared, where=where)
        except SingleCellInputError as err:
            raise SingleCellInputError(err.message, path=self.source) from None

    def _choose_matrix(self, x_kind: str, uns: Any) -> tuple[str, str, MatrixInfo]:
        """The matrix :func:`read_single_cell` would use and its kind as the annotator sees it
        afterwards (raw counts end in ``layers['counts']``)."""
        counts_info = MatrixInfo(
            "counts", "layers['counts']", True, "", float("nan"), "raw counts (layers['counts'])"
        )
        if x_kind in ("auto", "counts"):
            if "layers/counts" in self._f:
                self._detect("layers/counts", "counts", "layers['counts']")
                return "layers/counts", "var", counts_info
            info = self._detect("X", "auto", "X")
            if info.is_counts:
                return "X", "var", counts_info
            raw_ok = "raw/X" in self._f and int(self._f["raw/X"].attrs["shape"][0]) == self.n_obs
            if raw_ok and self._detect("raw/X", "auto", "raw.X").is_counts:
                return "raw/X", "raw/var", counts_info
            if x_kind == "counts":
                raise SingleCellInputError(
                    "x_kind='counts' but X holds non-integer values and there is no "
                    "layers['counts'] or .raw with raw counts",
                    path=self.source,
                )
            recorded = uns.get("blinaprofile", {}) if isinstance(uns, dict) else {}
            rec_kind = recorded.get("x_kind") if isinstance(recorded, dict) else None
            if rec_kind in X_KINDS and rec_kind != "counts" and rec_kind != info.kind:
                info = self._detect("X", str(rec_kind), "X")
            return "X", "var", info
        return "X", "var", self._detect("X", x_kind, "X")

    # ------------------------------------------------------------------ rows
    def _rows_of(
        self, g: h5py.Group, indptr: np.ndarray, rows: np.ndarray, n_vars: int
    ) -> sp.csr_matrix:
        """Full rows ``rows`` (sorted) of the CSR group ``g`` (one read per row run)."""
        data_parts: list[np.ndarray] = []
        idx_parts: list[np.ndarray] = []
        lengths = indptr[rows + 1] - indptr[rows]
        runs = np.split(rows, np.flatnonzero(np.diff(rows) != 1) + 1) if rows.size else []
        for run in runs:
            a, b = int(indptr[run[0]]), int(indptr[run[-1] + 1])
            data_parts.append(np.asarray(g["data"][a:b]))
            idx_parts.append(np.asarray(g["indices"][a:b]))
        data = np.concatenate(data_parts) if data_parts else np.zeros(0, np.float32)
        idx = np.concatenate(idx_parts) if idx_parts else np.zeros(0, np.int32)
        ptr = np.concatenate([[0], np.cumsum(lengths)])
        return sp.csr_matrix((data, idx, ptr), shape=(rows.size, n_vars))

    def _blocks(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """Row ranges holding about ``block_values`` stored values each."""
        stop = self.n_obs if stop is None else stop
        a = start
        while a < stop:
            want = self._indptr[a] + self.block_values
            b = int(np.searchsorted(self._indptr, want, side="right")) - 1
            b = min(max(b, a + 1), stop)
            yield a, b
            a = b

    def _read(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Stored values ``lo:hi`` of ``data``/``indices`` into a buffer reused from block to
        block (no new memory, and no page faults, per block). Valid until the next read."""
        dset = self._group[name]
        buf = self._buffers.get(name)
        if buf is None or buf.size < hi - lo:
            buf = self._buffers[name] = np.empty(max(hi - lo, self.block_values), dset.dtype)
        out = buf[: hi - lo]
        if hi > lo:
            dset.read_direct(out, np.s_[lo:hi], np.s_[0 : hi - lo])
        return out

    def _block(self, a: int, b: int) -> sp.csr_matrix:
        """Rows ``a:b`` as float32 CSR (as :func:`read_single_cell` stores ``X``); its arrays
        are reused by the next block."""
        lo, hi = int(self._indptr[a]), int(self._indptr[b])
        data = self._read("data", lo, hi).astype(np.float32, copy=False)
        idx = self._read("indices", lo, hi)
        ptr = (self._indptr[a : b + 1] - lo).astype(idx.dtype, copy=False)
        return sp.csr_matrix((data, idx, ptr), shape=(b - a, self.n_vars), copy=False)

    def read_rows(self, rows: np.ndarray) -> ad.AnnData:
        """The cells ``rows`` with every gene, as ``read_single_cell(path)[rows]`` holds them.

        Parameters
        ----------
        rows
            Row numbers (sorted, unique).

        Returns
        -------
        AnnData
        """
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self._indptr[rows + 1] - self._indptr[rows]
        ptr = np.zeros(rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=ptr[1:])
        data = np.empty(int(ptr[-1]), dtype=np.float32)
        idx = np.empty(int(ptr[-1]), dtype=self._group["indices"].dtype)
        for a, b in self._blocks():
            lo, hi = np.searchsorted(rows, [a, b])
            if hi > lo:
                blk = self._block(a, b)
                d, i, _ = _gather(blk.data, blk.indices, blk.indptr, rows[lo:hi] - a)
                data[ptr[lo] : ptr[hi]] = d
                idx[ptr[lo] : ptr[hi]] = i
        x = sp.csr_matrix((data, idx, ptr), shape=(rows.size, self.n_vars))
        return self._anndata(x, rows, self.var)

    def _anndata(
        self, x: sp.csr_matrix, rows: np.ndarray, var: pd.DataFrame, panel: bool = False
    ) -> ad.AnnData:
        obs = self.obs.iloc[rows].copy()
        adata = ad.AnnData(X=x, obs=obs, var=var.copy())
        if self.info.is_counts:
            adata.layers["counts"] = adata.X
        if self.protein is not None:
            adata.obsm["protein"] = self.protein.iloc[rows]
        adata.uns.update(self.uns)
        meta = dict(self.meta)
        if panel:
            meta[GENE_PANEL_KEY] = dict(self._panel_meta)
        adata.uns["blinaprofile"] = meta
        return adata

    # ------------------------------------------------------------------ panel
    def panel_columns(self, genes: Sequence[str], mito_prefix: str) -> np.ndarray:
        """Columns whose symbol (chosen as the annotator chooses it, from ``genes``) is one of
        ``genes`` or starts with ``mito_prefix``, in file order."""
        symbols, src = gene_symbols(self.var, list(genes))
        want = {g.upper() for g in genes}
        sym = symbols.astype(str)
        keep = np.isin(sym, list(want)) | np.char.startswith(sym, mito_prefix.upper())
        self._panel_meta = {
            "n_genes": self.n_vars,
            "symbol_source": src,
            "kind": self.info.kind,
            "where": self.info.where,
            "declared": self.info.declared,
            "log_base": self.info.log_base,
            "row_total": self.info.row_total,
            "note": self.info.note,
        }
        return np.flatnonzero(keep)

    def panel_blocks(self) -> Iterator[PanelBlock]:
        """Every cell, a block at a time: the panel columns (:meth:`set_panel`) and the sums
        over every gene (the same operations as the annotator's on the whole matrix)."""
        cols = self._panel_cols
        for a, b in self._blocks():
            blk = self._block(a, b)
            if self.info.is_counts:
                total = np.asarray(blk.sum(axis=1)).ravel()
            else:
                lin = blk.copy()
                lin.data = linear_values(lin.data, self.info)
                total = np.asarray(lin.sum(axis=1)).ravel()
            yield PanelBlock(a, b, sp.csr_matrix(blk[:, cols]), total, np.diff(blk.indptr))

    def panel(self, block: PanelBlock | Sequence[PanelBlock], rows: np.ndarray) -> ad.AnnData:
        """A gene-panel AnnData of ``rows`` (file rows, all within the given blocks).

        ``X`` holds the panel columns; ``obs`` carries the sums over every gene
        (:data:`~blinaprofile.io.singlecell.PANEL_TOTAL_COLUMN`,
        :data:`~blinaprofile.io.singlecell.PANEL_DETECTED_COLUMN`) and ``uns['blinaprofile']
        ['gene_panel']`` the matrix kind and symbol source decided on the whole matrix.
        """
        blocks = [block] if isinstance(block, PanelBlock) else list(block)
        rows = np.asarray(rows, dtype=np.int64)
        parts, tots, dets = [], [], []
        for blk in blocks:
            lo, hi = np.searchsorted(rows, [blk.start, blk.stop])
            loc = rows[lo:hi] - blk.start
            m = blk.matrix
            parts.append(_gather(m.data, m.indices, m.indptr, loc))
            tots.append(blk.total[loc])
            dets.append(blk.detected[loc])
        var = self.var.iloc[self._panel_cols]
        x = _stack(parts, len(self._panel_cols))
        adata = self._anndata(x, rows, var, panel=True)
        adata.obs[PANEL_TOTAL_COLUMN] = np.concatenate(tots)
        adata.obs[PANEL_DETECTED_COLUMN] = np.concatenate(dets).astype(np.int64)
        return adata

    def set_panel(self, genes: Sequence[str], mito_prefix: str) -> np.ndarray:
        """Choose the panel columns (see :meth:`panel_columns`) for :meth:`panel`."""
        self._panel_cols = self.panel_columns(genes, mito_prefix)
        return self._panel_cols

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    def __enter__(self) -> H5adStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
