"""Per-sample event access for the engine: FCS scaling, compensation, the gate kernels.

:class:`EventCache` reads each needed channel once (with the FCS ``$PnG``/``$PnE``/
``$TIMESTEP`` scaling of :func:`fcs_scaling`), compensates only the channels and rows the
gates need, and transforms lazily. The kernels decide membership on raw values against
inverse-mapped bounds and re-decide events within rounding distance of a bound or a
polygon edge with FlowKit's arithmetic, so membership is identical to FlowKit's. Written
here rather than calling FlowKit because FlowKit re-compensates and re-transforms the
whole sample for every gate (this path is 35-40x faster on 1M events).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from blinaprofile.errors import GatingError
from blinaprofile.gating.gates import (
    FCS_COMP,
    FILE_COMP,
    UNCOMPENSATED,
    Dim,
    Gate,
    Ratio,
    make_transform,
)

if TYPE_CHECKING:
    from blinaprofile.io.fcs import FCSData

__all__ = ["EventCache", "fcs_scaling", "gate_rows", "points_in_polygon"]

# relative width of the band around a bound inside which events are decided again with
# FlowKit's arithmetic (our fast path agrees with it to ~1e-13 relative)
_BAND = 1e-9
# absolute width (raw units) of that band for compensated values
_ABS_BAND = 1e-6


class StrategyView(Protocol):
    """What :class:`EventCache` needs of a bound strategy (a :class:`GateTree`)."""

    @property
    def transforms(self) -> Mapping[str, Any]: ...

    @property
    def matrices(self) -> Mapping[str, tuple[Sequence[str], np.ndarray]]: ...

    @property
    def gates(self) -> Sequence[Gate]: ...


# ---------------------------------------------------------------------- FCS scaling
def fcs_scaling(data: FCSData) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """Per-channel scaling of stored values as FlowKit/flowio and FlowJo apply it.

    ``$PnE`` log-amplified channels become ``10 ** (decades * x / $PnR) * offset``
    (offset 0 read as 1), then non-time channels with ``$PnG`` other than 0 or 1 are
    divided by the gain, and the ``Time`` channel is multiplied by ``$TIMESTEP``.
    Channels needing none of this are absent from the result.
    """
    out: dict[str, Callable[[np.ndarray], np.ndarray]] = {}
    kw = {k.upper(): v for k, v in data.keywords.items()}
    n = len(data.channels)
    gains = list(data.gains) + [None] * (n - len(data.gains))
    decs = list(data.decades) + [None] * (n - len(data.decades))
    rngs = list(data.ranges) + [float("nan")] * (n - len(data.ranges))
    step: float | None = None
    raw_step = kw.get("$TIMESTEP", "").strip()
    if raw_step:
        try:
            step = float(raw_step)
        except ValueError:
            raise GatingError(f"$TIMESTEP {raw_step!r} is not a number", path=data.path) from None
    for ch, gain, dec, prange in zip(data.channels, gains, decs, rngs, strict=True):
        if ch.lower() == "time":
            if step is not None and step != 1.0:
                out[ch] = _time_scaler(step)
            continue
        decades, log0 = dec if dec is not None else (0.0, 0.0)
        log_scale = decades > 0
        if log_scale and log0 == 0:
            log0 = 1.0
        g = gain if gain is not None else 1.0
        use_gain = g not in (0.0, 1.0)
        if not log_scale and not use_gain:
            continue
        if log_scale and not np.isfinite(prange):
            raise GatingError(
                f"channel {ch!r} is log-amplified ($PnE) but has no $PnR", path=data.path
            )
        out[ch] = _channel_scaler(
            float(decades) if log_scale else 0.0, float(log0), float(prange), g if use_gain else 1.0
        )
    return out


def _time_scaler(step: float) -> Callable[[np.ndarray], np.ndarray]:
    def f(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) * step

    return f


def _channel_scaler(
    decades: float, log0: float, prange: float, gain: float
) -> Callable[[np.ndarray], np.ndarray]:
    def f(x: np.ndarray) -> np.ndarray:
        y = np.asarray(x, dtype=np.float64)
        if decades > 0:
            y = (10 ** (decades * y / prange)) * log0
        if gain != 1.0:
            y = y / gain
        return y

    return f


# ---------------------------------------------------------------------- event cache
class _Comp:
    """Lazily compensated channels of one matrix.

    Values are held for a set of computed events: all of them (``pos is None`` and
    ``local`` has ``n`` columns) or the rows first asked for, extended when a gate on
    another branch needs more (``pos`` maps an event to its column in ``local``, -1 if
    not computed yet).
    """

    def __init__(
        self, detectors: list[str], matrix: np.ndarray, cols: list[int], wanted: list[str]
    ):
        self.detectors = detectors
        self.matrix = matrix
        self.cols = cols
        self.inv = np.linalg.inv(matrix)
        self.set_wanted(wanted)

    def set_wanted(self, wanted: list[str]) -> None:
        self.wanted = wanted
        self.index = {c: i for i, c in enumerate(wanted)}
        # (J, k): compensated channel j = sum_i w[j, i] * detector i
        self.w = np.ascontiguousarray(self.inv[:, [self.detectors.index(c) for c in wanted]].T)
        self.local: np.ndarray | None = None  # (J, m)
        self.pos: np.ndarray | None = None  # (n,) int64, -1 = not computed; None = all rows
        self.all_rows = False


# below this share of the events a matrix is applied to the requested rows only;
# above it, one BLAS pass over all events (no gather) is cheaper
_SUBSET_SHARE = 0.3


class EventCache:
    """Scaled, compensated and transformed columns, each computed at most once per sample.

    Parameters
    ----------
    tree
        The bound strategy.
    events, channels
        Stored event matrix and its column names.
    spillover
        The file's ``(detectors, matrix)`` or ``None``.
    path
        The file, for messages.
    scaling
        channel -> scaling function (see :func:`fcs_scaling`).
    """

    def __init__(
        self,
        tree: StrategyView,
        events: np.ndarray,
        channels: list[str],
        spillover: tuple[Sequence[str], np.ndarray] | None,
        path: str | None,
        *,
        scaling: Mapping[str, Callable[[np.ndarray], np.ndarray]] | None = None,
    ) -> None:
        if events.ndim != 2 or events.shape[1] != len(channels):
            raise GatingError(
                f"event matrix has shape {events.shape} but {len(channels)} channels", path=path
            )
        self.tree = tree
        self.events = events
        self.channels = channels
        self.index = {c: i for i, c in enumerate(channels)}
        self.spillover = spillover
        self.path = path
        self.scaling = dict(scaling or {})
        self.n = events.shape[0]
        self._cols: dict[str, np.ndarray] = {}
        self._comps: dict[str, _Comp | None] = {}
        self._xf: dict[tuple[str, str, str | None], np.ndarray] = {}
        self._transforms: dict[str, Any] = {}
        #: per-sample gate placement state (:mod:`blinaprofile.gating.placement`)
        self.placement_state: Any = None

    # -- basics -----------------------------------------------------------------------
    def transform(self, tid: str) -> Any:
        """The transform object for a transform id of the tree."""
        if tid not in self._transforms:
            if tid not in self.tree.transforms:
                raise GatingError(f"unknown transform {tid!r}", path=self.path)
            self._transforms[tid] = make_transform(self.tree.transforms[tid])
        return self._transforms[tid]

    def _col(self, channel: str) -> int:
        col = self.index.get(channel)
        if col is None:
            raise GatingError(f"channel {channel!r} is not in the file", path=self.path)
        return col

    def column(self, channel: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Scaled, uncompensated values of a channel (all events or ``rows``), float64."""
        col = self._col(channel)
        full = self._cols.get(channel)
        if full is not None:
            return full if rows is None else full[rows]
        f = self.scaling.get(channel)
        if rows is None:
            v = self.events[:, col]
            if f is not None:
                v = f(v)
            elif v.dtype != np.float64:
                v = v.astype(np.float64)
            else:
                return v
            self._cols[channel] = v
            return v
        v = self.events[rows, col]
        return f(v) if f is not None else np.asarray(v, dtype=np.float64)

    def block(self, channels: Sequence[str], rows: np.ndarray | None) -> np.ndarray:
        """Scaled values of several channels, ``(rows, channels)`` float64."""
        cols = [self._col(c) for c in channels]
        b = np.take(self.events, cols, axis=1) if rows is None else self.events[np.ix_(rows, cols)]
        b = np.asarray(b, dtype=np.float64)
        for j, c in enumerate(channels):
            f = self.scaling.get(c)
            if f is not None:
                b[:, j] = f(b[:, j])
        return b

    # -- compensation ----------------------------------------------------------------
    def _matrix(self, comp: str) -> tuple[list[str], np.ndarray] | None:
        if comp in (FILE_COMP, FCS_COMP):
            if self.spillover is None:
                if comp == FCS_COMP:
                    return None
                raise GatingError(
                    "the gating strategy compensates with the file's spillover matrix, "
                    "but the file has no $SPILLOVER/$SPILL keyword",
                    path=self.path,
                )
            return list(self.spillover[0]), np.asarray(self.spillover[1], dtype=np.float64)
        if comp in self.tree.matrices:
            det, mat = self.tree.matrices[comp]
            return list(det), np.asarray(mat, dtype=np.float64)
        raise GatingError(f"unknown compensation matrix {comp!r}", path=self.path)

    def _comp_state(self, comp: str) -> _Comp | None:
        if comp in self._comps:
            return self._comps[comp]
        m = self._matrix(comp)
        if m is None:
            self._comps[comp] = None
            return None
        detectors, matrix = m
        if matrix.shape != (len(detectors), len(detectors)):
            raise GatingError(
                f"compensation {comp!r}: matrix shape {matrix.shape} does not match "
                f"{len(detectors)} detectors",
                path=self.path,
            )
        missing = [d for d in detectors if d not in self.index]
        if missing:
            raise GatingError(
                f"spillover matrix names detector(s) {missing} absent from the file",
                path=self.path,
            )
        if abs(np.linalg.det(matrix)) < 1e-12:
            raise GatingError(f"the spillover matrix {comp!r} is singular", path=self.path)
        wanted: dict[str, None] = {}
        for g in self.tree.gates:
            for d in g.dims:
                if d.compensation == comp and d.ratio is None and d.channel in detectors:
                    wanted.setdefault(d.channel, None)
        st = _Comp(detectors, matrix, [self._col(d) for d in detectors], list(wanted))
        self._comps[comp] = st
        return st

    def _span(self, st: _Comp) -> tuple[int, np.ndarray] | None:
        """First column and (J, span) weights to compensate by one strided BLAS pass."""
        if any(c in self.scaling for c in st.detectors) or self.events.dtype != np.float64:
            return None
        lo, hi = min(st.cols), max(st.cols) + 1
        extra = [c for c in range(lo, hi) if c not in st.cols]
        if len(extra) > len(st.cols) or (
            extra and not np.isfinite(self.events[:, extra]).all()
        ):  # 0 * nan would spoil the sum
            return None
        w = np.zeros((st.w.shape[0], hi - lo), dtype=np.float64)
        w[:, [c - lo for c in st.cols]] = st.w
        return lo, w

    def _compensate_rows(self, st: _Comp, rows: np.ndarray | None) -> np.ndarray | None:
        """Make sure ``rows`` are compensated; return their columns in ``st.local``."""
        if st.all_rows:
            return rows
        if st.local is None and (rows is None or rows.size >= _SUBSET_SHARE * self.n):
            span = self._span(st)
            if span is not None:
                lo, w = span
                view = self.events[:, lo : lo + w.shape[1]]
                st.local = w @ view.T
            else:
                b = self.block(st.detectors, None)
                st.local = st.w @ b.T
            st.all_rows = True
            return rows
        if st.local is None:
            assert rows is not None
            b = self.block(st.detectors, rows)
            st.local = st.w @ b.T
            st.pos = np.full(self.n, -1, dtype=np.int64)
            st.pos[rows] = np.arange(rows.size)
            return np.arange(rows.size)
        assert st.pos is not None
        if rows is None:
            rows = np.arange(self.n)
        p = st.pos[rows]
        missing = p < 0
        if missing.any():
            new = rows[missing]
            b = self.block(st.detectors, new)
            m = st.local.shape[1]
            st.local = np.concatenate([st.local, st.w @ b.T], axis=1)
            st.pos[new] = np.arange(m, m + new.size)
            p = st.pos[rows]
        return p

    def raw(self, channel: str, comp: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Compensated (or raw) values of a channel as float64 (all events or ``rows``)."""
        if comp == UNCOMPENSATED:
            return self.column(channel, rows)
        st = self._comp_state(comp)
        if st is None or channel not in st.detectors:
            return self.column(channel, rows)
        if channel not in st.index:
            # a detector no gate asked for with this matrix (adaptive/feature use)
            st.set_wanted([*st.wanted, channel])
        p = self._compensate_rows(st, rows)
        assert st.local is not None
        v = st.local[st.index[channel]]
        return v if p is None else v[p]

    def comp_error_scale(self, comp: str, channel: str) -> float:
        """Absolute error bound of the fast compensation of ``channel`` (0 if not compensated).

        ``k * eps * sum |w| * max |x|`` stays below 1e-8 for values up to 2**22 (any flow
        cytometer's range); the band is set well above it.
        """
        if comp == UNCOMPENSATED:
            return 0.0
        st = self._comp_state(comp)
        if st is None or channel not in st.detectors:
            return 0.0
        return _ABS_BAND

    # -- values in gate space -------------------------------------------------------------
    def _ratio(self, r: Ratio, rows: np.ndarray | None) -> np.ndarray:
        assert r.channels is not None
        x = self.column(r.channels[0], rows)
        y = self.column(r.channels[1], rows)
        return r.a * ((x - r.b) / (y - r.c))

    def transformed(self, dim: Dim, where: np.ndarray | None = None) -> np.ndarray:
        """Transformed values of a dimension (for all events, or the indices ``where``)."""
        if dim.ratio is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = self._ratio(dim.ratio, where)
            if dim.transform is None:
                return x
            return np.asarray(self.transform(dim.transform).apply(x), dtype=np.float64)
        assert dim.channel is not None, "bind the strategy first"
        if dim.transform is None:
            return self.raw(dim.channel, dim.compensation, where)
        key = (dim.channel, dim.compensation, dim.transform)
        full = self._xf.get(key)
        if full is not None:
            return full if where is None else full[where]
        t = self.transform(dim.transform)
        x = self.raw(dim.channel, dim.compensation, where)
        if getattr(t, "kind", "") == "flin":
            y = (x + t.a) / (t.t + t.a)  # FlowKit's expression, one pass
        else:
            y = np.asarray(t.apply(x), dtype=np.float64)
        if where is None:
            self._xf[key] = y
        return y

    def exact(self, dim: Dim, rows: np.ndarray) -> np.ndarray:
        """Values of a dimension at ``rows`` computed with FlowKit's own arithmetic.

        Compensation by ``numpy.linalg.solve`` on the transposed spillover matrix (as
        flowutils does), logicle/hyperlog by flowutils (as FlowKit).
        """
        rows = np.asarray(rows, dtype=np.intp)
        if dim.ratio is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                x = self._ratio(dim.ratio, rows)
        else:
            assert dim.channel is not None
            st = None if dim.compensation == UNCOMPENSATED else self._comp_state(dim.compensation)
            if st is None or dim.channel not in st.detectors:
                x = self.column(dim.channel, rows)
            else:
                # LAPACK takes another code path for a single right-hand side; pad to two
                pad = rows.size == 1
                r2 = np.concatenate([rows, rows]) if pad else rows
                b = self.block(st.detectors, r2)
                sol = np.linalg.solve(st.matrix.T, b.T).T
                x = sol[: rows.size, st.detectors.index(dim.channel)]
        if dim.transform is None:
            return np.asarray(x, dtype=np.float64)
        t = self.transform(dim.transform)
        ref = getattr(t, "apply_reference", None)
        return np.asarray(ref(x) if ref is not None else t.apply(x), dtype=np.float64)


# ---------------------------------------------------------------------- gate kernels
_SAFE_KINDS = ("flin", "fasinh", "logicle", "hyperlog")


def _raw_bound(ev: EventCache, dim: Dim, bound: float) -> float | None:
    """``bound`` mapped to raw units, or ``None`` when the raw shortcut is not exact."""
    if dim.ratio is not None:
        return None
    if dim.transform is None:
        return float(bound)
    t = ev.transform(dim.transform)
    kind = getattr(t, "kind", "")
    if kind not in _SAFE_KINDS:
        return None
    if kind == "flin" and not (t.t + t.a) > 0:
        return None
    rb = float(np.asarray(t.inverse(np.array([bound], dtype=np.float64)))[0])
    return rb if np.isfinite(rb) else None


def _dim_test(
    ev: EventCache, dim: Dim, rows: np.ndarray | None, lo: float | None, hi: float | None
) -> np.ndarray:
    """``lo <= value < hi`` for the events ``rows`` (all when ``None``), exactly as FlowKit."""
    rb_lo = None if lo is None else _raw_bound(ev, dim, lo)
    rb_hi = None if hi is None else _raw_bound(ev, dim, hi)
    fast = (lo is None or rb_lo is not None) and (hi is None or rb_hi is not None)
    if fast:
        assert dim.channel is not None
        x = ev.raw(dim.channel, dim.compensation, rows)
        # the fast value differs from FlowKit's only by compensation rounding (escale) and,
        # with a transform, by the rounding of inverse(bound) versus the forward transform
        escale = ev.comp_error_scale(dim.compensation, dim.channel)
        res: np.ndarray | None = None
        near: np.ndarray | None = None
        for rb, upper in ((rb_lo, False), (rb_hi, True)):
            if rb is None:
                continue
            t = x < rb if upper else x >= rb
            res = t if res is None else (res & t)
            if dim.transform is None and escale == 0.0:
                continue
            tol = max(_BAND * max(1.0, abs(rb)), escale)
            band = np.abs(x - rb) <= tol
            near = band if near is None else (near | band)
        assert res is not None
    else:
        y = ev.transformed(dim, rows)
        res = np.ones(y.shape[0], dtype=bool)
        if lo is not None:
            res &= y >= lo
        if hi is not None:
            res &= y < hi
        near = None
        if dim.ratio is None and (
            dim.compensation != UNCOMPENSATED
            or (
                dim.transform is not None
                and hasattr(ev.transform(dim.transform), "apply_reference")
            )
        ):
            near = np.zeros(y.shape[0], dtype=bool)
            for b in (lo, hi):
                if b is not None:
                    near |= np.abs(y - b) <= _BAND * max(1.0, abs(b))
    if near is not None and near.any():
        idx = np.flatnonzero(near)
        sel = idx if rows is None else rows[idx]
        y = ev.exact(dim, sel)
        ok = np.ones(idx.size, dtype=bool)
        if lo is not None:
            ok &= y >= lo
        if hi is not None:
            ok &= y < hi
        res[idx] = ok
    return res


def _rectangle_rows(
    ev: EventCache, g: Gate, dims: Sequence[Dim], prow: np.ndarray | None
) -> np.ndarray | None:
    rows = prow
    if g.complement:
        inside = np.ones(ev.n if rows is None else rows.size, dtype=bool)
        for d in dims:
            if d.min is None and d.max is None:
                continue
            inside &= _dim_test(ev, d, rows, d.min, d.max)
        keep = ~inside
        return np.flatnonzero(keep) if rows is None else rows[keep]
    for d in dims:
        if d.min is None and d.max is None:
            continue
        ok = _dim_test(ev, d, rows, d.min, d.max)
        rows = np.flatnonzero(ok) if rows is None else rows[ok]
    return rows


def _winding(
    vx: np.ndarray, vy: np.ndarray, x: np.ndarray, y: np.ndarray, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Odd winding number (flowutils' rule) and a mask of points within ``tol`` of a tie.

    Same decisions as flowutils' ``points_in_polygon``: points outside the vertices'
    bounding box are out; otherwise an edge crossed upward (``ay <= py < by``) with the
    point strictly left of it adds 1, an edge crossed downward (``by <= py < ay``) with
    the point strictly right subtracts 1, and an odd total is inside. ``is_left`` is
    computed with flowutils' exact expression. With ``tol > 0``, points whose decision
    could flip under a perturbation of ``tol`` are flagged (for an exact re-check).
    """
    x0, x1, y0, y1 = float(vx.min()), float(vx.max()), float(vy.min()), float(vy.max())
    if tol <= 0:
        return _parity(vx, vy, x, y, (x0, x1, y0, y1)), np.zeros(x.shape[0], dtype=bool)
    inside = np.zeros(x.shape[0], dtype=bool)
    near = np.zeros(x.shape[0], dtype=bool)
    if tol > 0:
        loose = (x >= x0 - tol) & (x <= x1 + tol) & (y >= y0 - tol) & (y <= y1 + tol)
        cand = np.flatnonzero(loose)
        px = x[cand]
        py = y[cand]
        strict = (px >= x0) & (px <= x1) & (py >= y0) & (py <= y1)
        near[cand[~strict]] = True
        cand, px, py = cand[strict], px[strict], py[strict]
    else:
        cand = np.flatnonzero((x >= x0) & (x <= x1) & (y >= y0) & (y <= y1))
        px = x[cand]
        py = y[cand]
    if cand.size == 0:
        return inside, near
    nv = vx.shape[0]
    wind: np.ndarray = np.zeros(cand.size, dtype=np.int32)
    for i in range(nv):
        ax, ay = float(vx[i]), float(vy[i])
        bx, by = float(vx[(i + 1) % nv]), float(vy[(i + 1) % nv])
        if tol > 0:
            ties = np.flatnonzero((np.abs(py - ay) <= tol) | (np.abs(py - by) <= tol))
            near[cand[ties]] = True
        if ay == by:
            continue  # a horizontal edge is never crossed
        upward = ay < by
        lo, hi = (ay, by) if upward else (by, ay)
        cross = np.flatnonzero((py >= lo) & (py < hi))
        if cross.size == 0:
            continue
        cy = py[cross]
        cx = px[cross]
        is_left = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
        hit = cross[is_left > 0] if upward else cross[is_left < 0]
        np.add.at(wind, hit, 1 if upward else -1)
        if tol > 0:
            close = np.abs(is_left) <= tol * (abs(bx - ax) + abs(by - ay) + 1.0)
            near[cand[cross[close]]] = True
    inside[cand] = (wind % 2) != 0
    return inside, near


def _parity(
    vx: np.ndarray,
    vy: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    box: tuple[float, float, float, float],
) -> np.ndarray:
    """Odd winding number by parity: each counted crossing (+1 or -1) flips it.

    Branch-free over all points (no gathers), in preallocated buffers.
    """
    n = x.shape[0]
    inside = np.zeros(n, dtype=bool)
    t1 = np.empty(n, dtype=np.float64)
    t2 = np.empty(n, dtype=np.float64)
    b1 = np.empty(n, dtype=bool)
    b2 = np.empty(n, dtype=bool)
    nv = vx.shape[0]
    for i in range(nv):
        ax, ay = float(vx[i]), float(vy[i])
        bx, by = float(vx[(i + 1) % nv]), float(vy[(i + 1) % nv])
        if ay == by:
            continue
        upward = ay < by
        lo, hi = (ay, by) if upward else (by, ay)
        # is_left = (bx - ax) * (y - ay) - (x - ax) * (by - ay), as flowutils computes it
        np.subtract(y, ay, out=t1)
        np.multiply(t1, bx - ax, out=t1)
        np.subtract(x, ax, out=t2)
        np.multiply(t2, by - ay, out=t2)
        np.subtract(t1, t2, out=t1)
        if upward:
            np.greater(t1, 0.0, out=b1)
        else:
            np.less(t1, 0.0, out=b1)
        np.greater_equal(y, lo, out=b2)
        b1 &= b2
        np.less(y, hi, out=b2)
        b1 &= b2
        inside ^= b1
    x0, x1, y0, y1 = box
    for arr, op, v in (
        (x, np.greater_equal, x0),
        (x, np.less_equal, x1),
        (y, np.greater_equal, y0),
        (y, np.less_equal, y1),
    ):
        op(arr, v, out=b1)
        inside &= b1
    return inside


def points_in_polygon(vertices: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Winding-number point-in-polygon for many points (odd winding count inside).

    Reproduces flowutils' ``points_in_polygon`` (FlowKit's polygon gate) exactly,
    including self-intersecting polygons.
    """
    v = np.asarray(vertices, dtype=np.float64)
    inside, _ = _winding(
        v[:, 0], v[:, 1], np.asarray(x, np.float64), np.asarray(y, np.float64), 0.0
    )
    return inside


def _needs_band(ev: EventCache, dims: Sequence[Dim]) -> bool:
    """Whether the fast values of these dims may differ from FlowKit's in the last bits."""
    for d in dims:
        if d.ratio is not None:
            continue
        if d.compensation != UNCOMPENSATED and ev._comp_state(d.compensation) is not None:
            st = ev._comp_state(d.compensation)
            if st is not None and d.channel in st.detectors:
                return True
        if d.transform is not None and hasattr(ev.transform(d.transform), "apply_reference"):
            return True
    return False


def _polygon_rows(ev: EventCache, g: Gate, prow: np.ndarray | None) -> np.ndarray:
    if len(g.dims) != 2:
        raise GatingError(f"polygon gate {g.id!r} needs exactly 2 dimensions", path=ev.path)
    x = ev.transformed(g.dims[0], prow)
    y = ev.transformed(g.dims[1], prow)
    v = np.asarray(g.vertices, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(v)))) if v.size else 1.0
    tol = _BAND * scale if _needs_band(ev, g.dims) else 0.0
    inside, near = _winding(v[:, 0], v[:, 1], x, y, tol)
    if tol > 0 and near.any():
        idx = np.flatnonzero(near)
        sel = idx if prow is None else prow[idx]
        ex = ev.exact(g.dims[0], sel)
        ey = ev.exact(g.dims[1], sel)
        inside[idx], _ = _winding(v[:, 0], v[:, 1], ex, ey, 0.0)
    if g.complement:
        inside = ~inside
    return np.flatnonzero(inside) if prow is None else prow[inside]


def _ellipsoid_d2(g: Gate, pts: np.ndarray) -> np.ndarray:
    """Squared Mahalanobis distances with flowutils' arithmetic."""
    translated = pts - np.asarray(g.mean, dtype=np.float64)
    inv = np.linalg.inv(np.asarray(g.covariance, dtype=np.float64))
    rot = np.dot(translated, inv)
    return np.asarray((rot * translated).sum(axis=1), dtype=np.float64)


def _ellipsoid_rows(ev: EventCache, g: Gate, prow: np.ndarray | None) -> np.ndarray:
    k = len(g.dims)
    if k < 2 or len(g.mean) != k or len(g.covariance) != k:
        raise GatingError(
            f"ellipsoid gate {g.id!r}: mean/covariance do not match its dims", path=ev.path
        )
    pts = np.column_stack([ev.transformed(d, prow) for d in g.dims])
    d2 = _ellipsoid_d2(g, pts)
    inside = d2 <= g.distance_square
    if _needs_band(ev, g.dims):
        near = np.abs(d2 - g.distance_square) <= _BAND * max(1.0, abs(g.distance_square))
        if near.any():
            idx = np.flatnonzero(near)
            sel = idx if prow is None else prow[idx]
            ex = np.column_stack([ev.exact(d, sel) for d in g.dims])
            inside[idx] = _ellipsoid_d2(g, ex) <= g.distance_square
    if g.complement:
        inside = ~inside
    return np.flatnonzero(inside) if prow is None else prow[inside]


def _boolean_rows(
    g: Gate, masks: Mapping[str, np.ndarray], prow: np.ndarray | None, n: int
) -> np.ndarray:
    if not g.refs:
        raise GatingError(f"boolean gate {g.id!r} has no operands")
    parts = []
    for ref, comp in g.refs:
        if ref not in masks:
            raise GatingError(f"boolean gate {g.id!r} refers to {ref!r}, not evaluated before it")
        parts.append(~masks[ref] if comp else masks[ref])
    if g.op == "or":
        m = np.logical_or.reduce(parts)
    elif g.op == "not":
        m = ~parts[0]
    else:
        m = np.logical_and.reduce(parts)
    if prow is not None:
        return prow[m[prow]]
    return np.flatnonzero(m)


def gate_rows(
    ev: EventCache,
    g: Gate,
    dims: Sequence[Dim],
    prow: np.ndarray | None,
    masks: Mapping[str, np.ndarray],
) -> np.ndarray | None:
    """Row indices (or ``None`` for all rows) of the events inside gate ``g``.

    ``dims`` are the rectangle's dimensions as placed for this sample; ``prow`` the
    parent's rows; ``masks`` the masks of gates already evaluated (boolean gates).
    """
    if g.kind == "rectangle":
        return _rectangle_rows(ev, g, dims, prow)
    if g.kind == "polygon":
        return _polygon_rows(ev, g, prow)
    if g.kind == "ellipsoid":
        return _ellipsoid_rows(ev, g, prow)
    if g.kind == "boolean":
        return _boolean_rows(g, masks, prow, ev.n)
    raise GatingError(f"gate {g.id!r}: unknown kind {g.kind!r}")  # pragma: no cover
