"""The RNA block of the annotator: the gene sets' genes as a dense matrix over the QC-passed
cells, their log-normalised values, and gene-set scores against expression-matched controls.

The control genes are chosen once, on the training cohort (:class:`Controls`), and looked up
by symbol in every object labelled afterwards, so a cell's score depends on that cell only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from blinaprofile.annotate.config import RNASpec, SignatureSpec
from blinaprofile.io.singlecell import MatrixInfo, linear_values

#: counts per cell that every kind of matrix is brought to before log1p
TARGET_PER_CELL = 1e4


@dataclass(frozen=True)
class Controls:
    """Expression-matched control genes: each gene-set gene's expression bin and the control
    genes drawn from each bin (symbols), chosen on the training cohort."""

    gene_bin: dict[str, int]
    bins: list[list[str]]


def _linear_row_sums(matrix: Any, info: MatrixInfo, chunk: int = 20_000) -> np.ndarray:
    csr = matrix if sp.issparse(matrix) and matrix.format == "csr" else sp.csr_matrix(matrix)
    if info.is_counts:
        return np.asarray(csr.sum(axis=1), dtype=np.float64).ravel()
    out = np.empty(csr.shape[0])
    for start in range(0, csr.shape[0], chunk):
        part = csr[start : start + chunk].copy()
        part.data = linear_values(part.data, info)
        out[start : start + chunk] = np.asarray(part.sum(axis=1)).ravel()
    return out


class RNABlock:
    """Gene-set genes of the QC-passed cells: counts (raw-count data), log-normalised values
    and matched-control backgrounds.

    Parameters
    ----------
    matrix
        Cells x genes (RNA genes only), raw counts or normalised as ``info`` says.
    info
        What ``matrix`` holds (:func:`blinaprofile.io.singlecell.detect_x_kind`).
    rows
        The QC-passed cells.
    symbols
        Upper-case gene symbol per column.
    spec
        RNA settings (gene sets, control bins).
    controls
        The control genes learned when fitting; ``None`` chooses them from this object
        (fitting) and keeps them in :attr:`controls`.
    total
        Each cell's linear sum over every gene when ``matrix`` holds only some genes (a gene
        panel, :class:`~blinaprofile.annotate.inputs.PanelSums`); ``None`` sums ``matrix``.
    """

    def __init__(
        self,
        matrix: Any,
        info: MatrixInfo,
        rows: np.ndarray,
        symbols: np.ndarray,
        spec: RNASpec,
        controls: Controls | None,
        total: np.ndarray | None = None,
    ) -> None:
        self.spec = spec
        self.info = info
        self.is_counts = info.is_counts
        csr = matrix if sp.issparse(matrix) and matrix.format == "csr" else sp.csr_matrix(matrix)
        total_all = (
            _linear_row_sums(csr, info)
            if total is None
            else np.asarray(total, dtype=np.float64).ravel()
        )
        n_all = csr.shape[0]
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
        # per-cell factor to ``target_sum`` per cell: the cell's total (counts, or data
        # normalised to a shared total), else the kind's convention (per 10k or per million)
        if info.is_counts:
            factor_all = spec.target_sum / np.maximum(total_all, 1.0)
        elif np.isfinite(info.row_total):
            factor_all = spec.target_sum / np.maximum(total_all, 1e-12)
        else:
            per = TARGET_PER_CELL if info.kind == "log1p-cp10k" else 1e6
            factor_all = np.full(n_all, spec.target_sum / per)
        if controls is None:
            controls, ctrl_cols, ctrl_bin = self._choose_controls(
                csr, rows, symbols, sym_index, wanted, total_all, factor_all
            )
        else:
            ctrl_cols, ctrl_bin = [], []
            for b, names in enumerate(controls.bins):
                for nm in names:
                    if nm in sym_index:
                        ctrl_cols.append(sym_index[nm])
                        ctrl_bin.append(b)
        self.controls = controls
        self.n_ctrl_genes = len(ctrl_cols)
        self.n_ctrl_wanted = sum(len(b) for b in controls.bins)
        cols = [sym_index[x] for x in wanted]
        block = csr[:, cols + ctrl_cols]
        if rows.size < n_all:
            block = block[rows]
        dense = np.asarray(block.toarray(), dtype=np.float32)
        self.col = {x: i for i, x in enumerate(wanted)}
        self.gene_bin = {x: controls.gene_bin[x] for x in wanted if x in controls.gene_bin}
        if info.is_counts:
            self.lib = total_all[rows]
            self.X = np.ascontiguousarray(dense[:, : len(cols)])
            self.scale = (spec.target_sum / np.maximum(self.lib, 1.0)).astype(np.float32)
            self.ln = np.log1p(self.X * self.scale[:, None])
            ctrl = np.log1p(dense[:, len(cols) :] * self.scale[:, None])
        else:
            self.lib = total_all[rows]
            self.X = np.zeros((rows.size, 0), dtype=np.float32)
            self.scale = factor_all[rows].astype(np.float32)
            lin = linear_values(dense, info).astype(np.float32)
            self.ln = np.log1p(lin[:, : len(cols)] * self.scale[:, None])
            ctrl = np.log1p(lin[:, len(cols) :] * self.scale[:, None])
        cb = np.asarray(ctrl_bin, dtype=np.int64)
        n_bins = len(controls.bins)
        self.ctrl_mean = np.full((rows.size, n_bins), np.nan, dtype=np.float32)
        for b in np.unique(cb):
            self.ctrl_mean[:, b] = ctrl[:, cb == b].mean(axis=1)

    def _choose_controls(
        self,
        csr: sp.csr_matrix,
        rows: np.ndarray,
        symbols: np.ndarray,
        sym_index: dict[str, int],
        wanted: list[str],
        total_all: np.ndarray,
        factor_all: np.ndarray,
    ) -> tuple[Controls, list[int], list[int]]:
        """Bin all genes by mean normalised expression and draw seeded controls per bin (an
        evenly spaced subset of at most 20,000 QC-passed cells ranks genes well enough)."""
        spec = self.spec
        g = csr.shape[1]
        sub = rows[np.linspace(0, rows.size - 1, min(rows.size, 20_000)).astype(np.int64)]
        if self.is_counts:
            w = spec.target_sum / np.maximum(total_all[sub], 1.0)
            gene_mean = np.asarray(csr[sub].T @ w).ravel() / max(sub.size, 1)
        else:
            part = csr[sub].copy()
            part.data = linear_values(part.data, self.info)
            gene_mean = np.asarray(part.T @ factor_all[sub]).ravel() / max(sub.size, 1)
        sig_cols = {sym_index[x] for x in wanted}
        order = np.argsort(gene_mean, kind="stable")
        bins = np.empty(g, dtype=np.int64)
        bins[order] = (np.arange(g) * spec.n_bins) // max(g, 1)
        rng = np.random.default_rng(spec.control_seed)
        ctrl_cols: list[int] = []
        ctrl_bin: list[int] = []
        names: list[list[str]] = [[] for _ in range(spec.n_bins)]
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
            names[b] = [str(symbols[int(x)]) for x in pick]
        gene_bin = {x: int(bins[sym_index[x]]) for x in wanted}
        return Controls(gene_bin, names), ctrl_cols, ctrl_bin

    def genes(self, names: Sequence[str]) -> list[str]:
        """The given genes present here (upper case, first occurrence order)."""
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

    def detected(self, genes: Sequence[str]) -> np.ndarray:
        """Whether any of the genes is detected in each cell."""
        idx = [self.col[g] for g in genes if g in self.col]
        return (
            np.asarray((self.ln[:, idx] > 0).any(axis=1))
            if idx
            else np.zeros(self.ln.shape[0], dtype=bool)
        )

    def set_score(self, genes: Sequence[str]) -> np.ndarray | None:
        """Mean log-normalised expression of the genes minus that of matched controls."""
        gs = [g for g in self.genes(genes) if g in self.gene_bin]
        if not gs:
            return None
        idx = [self.col[g] for g in gs]
        ctrl = self.ctrl_mean[:, [self.gene_bin[g] for g in gs]]
        return np.asarray((self.ln[:, idx] - ctrl).mean(axis=1), dtype=np.float64)

    def score_of(self, up: Sequence[str], down: Sequence[str]) -> np.ndarray | None:
        s_up = self.set_score(up)
        if s_up is None:
            return None
        s_down = self.set_score(down) if down else None
        return s_up if s_down is None else s_up - s_down

    def score(self, sig: SignatureSpec) -> np.ndarray | None:
        return self.score_of(sig.up, sig.down)
