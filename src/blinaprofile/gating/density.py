"""One-dimensional population structure of a gate's parent: binned density, modes, valleys.

The building blocks of per-sample gate placement (:mod:`blinaprofile.gating.placement`).
Everything works on a histogram of the parent's values on a uniform grid of an axis with
``apply``/``inverse`` (placement uses the sample's own :class:`ScaleFreeAxis`,
``asinh(x / s)``). The histogram is built from the raw values against inverse-mapped bin
edges, so no event is transformed: binning 100,000 events costs well under a millisecond.

Methods (written for this package after the published descriptions):

* Axis: :class:`ScaleFreeAxis`, linear over the noise and logarithmic beyond, its scale
  a scale statistic of the values, so a brightness change leaves the histogram unchanged.
* Bandwidth: the improved Sheather-Jones plug-in (Botev, Grotowski and Kroese 2010,
  *Ann. Stat.* 38:2916), solved on the binned data through its discrete cosine transform;
  Silverman's rule of thumb when the fixed-point equation has no root. Never narrower
  than :data:`MIN_BANDWIDTH_BINS` bins nor than a quarter of Silverman's bandwidth, so that
  sampling noise of small parents does not create valleys.
* Valleys: local minima of the smoothed density between two groups of events; the
  *depth* of a valley is ``1 - f(valley) / min(highest density below, highest density
  above)``: 0 when the "second population" is only a shoulder, 1 for an empty gap (the
  valley criterion of OpenCyto's ``mindensity`` and flowDensity's ``deGate``, as a number).
* Tail: the main population's mode (refined by a parabola through the density's top) and
  its robust standard deviation from the half facing away from the minority, mirrored (a
  Gaussian's half holds 31.7% of its mass beyond one SD), so a shoulder or a small
  population cannot widen it (the idea of OpenCyto's ``tailgate`` and flowDensity's
  ``upper``/``lower`` tail gates).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MIN_BANDWIDTH_BINS",
    "N_BINS",
    "Density",
    "ScaleFreeAxis",
    "TailFit",
    "Valley",
    "binned_density",
    "brentq",
    "dct2",
    "isj_bandwidth",
    "raw_quantiles",
    "silverman_bandwidth",
    "smooth",
    "tail_fit",
    "valleys",
]

#: bins of the uniform grid the density is estimated on
N_BINS = 1024
#: the bandwidth is at least this many bins wide
MIN_BANDWIDTH_BINS = 1.5
# share of a Gaussian below mode - 1 SD, as a share of the half below the mode
_ONE_SD_OF_HALF = 0.31731


@dataclass(frozen=True)
class Density:
    """A parent's values binned on a uniform grid and smoothed.

    Attributes
    ----------
    grid
        Bin centres (transformed units), uniform with spacing ``step``.
    counts
        Events per bin.
    f
        Gaussian-smoothed counts (events per bin, same scale as ``counts``).
    bandwidth
        Smoothing bandwidth (transformed units).
    n
        Events binned.
    """

    grid: np.ndarray
    counts: np.ndarray
    f: np.ndarray
    bandwidth: float
    n: int

    @property
    def step(self) -> float:
        """Grid spacing (transformed units)."""
        return float(self.grid[1] - self.grid[0])

    def index(self, t: float) -> int:
        """Index of the grid point nearest ``t`` (clipped to the grid)."""
        i = round((t - float(self.grid[0])) / self.step)
        return min(max(i, 0), self.grid.size - 1)

    def share_below(self, t: float) -> float:
        """Share of the binned events below ``t`` (bins split linearly)."""
        if self.n == 0:
            return 0.0
        pos = (t - float(self.grid[0])) / self.step + 0.5
        k = int(np.floor(pos))
        if k <= 0:
            return 0.0 if pos <= 0 else float(self.counts[0]) * pos / self.n
        if k >= self.grid.size:
            return 1.0
        below = float(self.counts[:k].sum()) + float(self.counts[k]) * (pos - k)
        return below / self.n


@dataclass(frozen=True)
class Valley:
    """A density minimum separating the events into a low and a high group.

    Attributes
    ----------
    position
        Where the threshold goes (transformed units): the middle of the valley floor.
    depth
        ``1 - f(valley) / min(peak below, peak above)`` (0-1).
    share_below
        Share of the events below ``position``.
    peak_below, peak_above
        Positions of the highest density on either side.
    """

    position: float
    depth: float
    share_below: float
    peak_below: float
    peak_above: float


@dataclass(frozen=True)
class TailFit:
    """A threshold placed off the main population's tail.

    Attributes
    ----------
    position
        ``mode + k * sd`` (minority above) or ``mode - k * sd`` (minority below).
    mode
        Position of the main population's mode.
    sd
        Robust SD of the main population from its half facing away from the minority.
    share_beyond
        Share of all events beyond ``position`` (on the minority's side).
    purity
        Estimated share of the events beyond ``position`` that are *not* the main
        population's own tail (its far half is assumed to mirror the near half); 0-1.
    """

    position: float
    mode: float
    sd: float
    share_beyond: float
    purity: float


@dataclass(frozen=True)
class ScaleFreeAxis:
    """``u = asinh(x / scale)``: the sample's own axis for finding its populations.

    ``scale`` is a scale statistic of the parent's values (:meth:`from_values`), so
    multiplying every value by ``c`` multiplies ``scale`` by ``c`` and leaves ``u``
    unchanged: densities, valleys, modes and tails found on this axis, mapped back
    through :meth:`inverse`, move exactly with a brightness change. Near zero the axis is
    linear over the width of the negative (noise) population, beyond it logarithmic,
    like a logicle display whose linear width is fitted to the sample.
    """

    scale: float

    @classmethod
    def from_values(cls, raw: np.ndarray) -> ScaleFreeAxis:
        """Scale ``max(|5th percentile|, |median| / 10)`` of ``raw`` (1.0 if that is 0)."""
        q05, q50 = _raw_quantiles(raw, (0.05, 0.5))
        return cls.from_quantiles(q05, q50)

    @classmethod
    def from_quantiles(cls, q05: float, q50: float) -> ScaleFreeAxis:
        """:meth:`from_values` given the values' 5th percentile and median."""
        s = max(abs(float(q05)), 0.1 * abs(float(q50)))
        return cls(s if s > 0 and np.isfinite(s) else 1.0)

    def apply(self, x: Any) -> np.ndarray:
        """Raw values to the axis."""
        return np.arcsinh(np.asarray(x, dtype=np.float64) / self.scale)

    def inverse(self, u: Any) -> np.ndarray:
        """Axis positions to raw values."""
        return self.scale * np.sinh(np.asarray(u, dtype=np.float64))


def raw_quantiles(raw: np.ndarray, qs: Sequence[float]) -> tuple[float, ...]:
    """Quantiles of at most ~20,000 evenly strided values (deterministic, cheap).

    Each quantile is the same whichever others are asked for in the same call: one call
    serves :meth:`ScaleFreeAxis.from_values` and the range of :func:`binned_density`.
    """
    stride = max(1, raw.size // 20_000)
    return tuple(float(q) for q in np.quantile(raw[::stride], qs))


def _raw_quantiles(raw: np.ndarray, qs: tuple[float, float]) -> tuple[float, float]:
    lo, hi = raw_quantiles(raw, qs)
    return lo, hi


def binned_density(
    raw: np.ndarray,
    transform: Any,
    *,
    include: tuple[float, float] | None = None,
    n_bins: int = N_BINS,
    bandwidth: float | None = None,
    value_range: tuple[float, float] | None = None,
) -> Density:
    """Histogram a parent's values on a uniform grid in transformed units and smooth it.

    Parameters
    ----------
    raw
        Untransformed values (compensated where the dimension is), finite.
    transform
        Object with ``apply`` and ``inverse`` (monotone increasing), or ``None`` when
        ``raw`` already is in gate units.
    include
        Transformed interval the grid must cover (the search range).
    n_bins
        Grid size.
    bandwidth
        Smoothing bandwidth; default :func:`isj_bandwidth` (bounded, see the module doc).
    value_range
        ``raw_quantiles(raw, (0.0005, 0.9995))`` when already known.
    """
    lo_r, hi_r = value_range or _raw_quantiles(raw, (0.0005, 0.9995))
    if transform is None:
        lo_t, hi_t = lo_r, hi_r
    else:
        lo_t, hi_t = (float(v) for v in np.asarray(transform.apply(np.array([lo_r, hi_r]))))
    if include is not None:
        lo_t, hi_t = min(lo_t, include[0]), max(hi_t, include[1])
    span = max(hi_t - lo_t, 1e-6)
    lo_t -= 0.08 * span
    hi_t += 0.08 * span
    edges_t = np.linspace(lo_t, hi_t, n_bins + 1)
    edges = edges_t if transform is None else np.asarray(transform.inverse(edges_t), np.float64)
    if not np.all(np.diff(edges) > 0):
        # the inverse lost precision at an extreme: bin transformed values instead
        vals = raw if transform is None else np.asarray(transform.apply(raw), np.float64)
        counts = np.histogram(vals, bins=edges_t)[0]
    else:
        counts = np.histogram(raw, bins=edges)[0]
    counts = counts.astype(np.float64)
    grid = 0.5 * (edges_t[:-1] + edges_t[1:])
    step = float(edges_t[1] - edges_t[0])
    h = bandwidth if bandwidth is not None else bounded_bandwidth(counts, grid)
    return Density(grid, counts, smooth(counts, h / step), float(h), int(counts.sum()))


def smooth(counts: np.ndarray, h_bins: float) -> np.ndarray:
    """Convolve binned counts with a Gaussian of SD ``h_bins`` bins (zero outside the grid)."""
    half = max(1, int(np.ceil(4.0 * h_bins)))
    k = np.exp(-0.5 * (np.arange(-half, half + 1) / h_bins) ** 2)
    k /= k.sum()
    if half >= counts.size:
        pad = np.concatenate([np.zeros(half), counts, np.zeros(half)])
        return np.convolve(pad, k, mode="same")[half:-half]
    return np.convolve(counts, k, mode="same")


def _weighted_quantile(grid: np.ndarray, counts: np.ndarray, q: float) -> float:
    c = np.cumsum(counts)
    return float(np.interp(q * c[-1], c, grid))


def silverman_bandwidth(counts: np.ndarray, grid: np.ndarray) -> float:
    """Silverman's rule ``0.9 min(sd, IQR / 1.34) n^(-1/5)`` on binned data."""
    n = float(counts.sum())
    if n < 2:
        return float(grid[1] - grid[0])
    mean = float((counts * grid).sum() / n)
    sd = float(np.sqrt(max((counts * (grid - mean) ** 2).sum() / n, 0.0)))
    iqr = _weighted_quantile(grid, counts, 0.75) - _weighted_quantile(grid, counts, 0.25)
    spread = min(sd, iqr / 1.34) if iqr > 0 else sd
    return float(0.9 * max(spread, float(grid[1] - grid[0])) * n ** (-0.2))


def isj_bandwidth(counts: np.ndarray, step: float) -> float | None:
    """Improved Sheather-Jones bandwidth of binned data (``None`` if it has no solution).

    Botev et al.'s fixed point ``t = xi * gamma^[l](t)`` with ``l = 7`` stages, solved on
    the discrete cosine transform of the histogram; the grid is rescaled to the unit
    interval, so the bandwidth is ``sqrt(t) * grid range``.
    """
    n = float(counts.sum())
    m = counts.size
    if n < 2 or m < 8:
        return None
    a2 = dct2(counts / n)[1:] ** 2
    k2 = np.arange(1, m, dtype=np.float64) ** 2
    decay = -k2 * np.pi**2
    ell = 7
    # weights of the functionals ||f^(s)||^2, s = 2..7: 0.5 pi^(2s) k^(2s) a_k^2
    weights = {s: 0.5 * np.pi ** (2 * s) * k2**s * a2 for s in range(2, ell + 1)}
    consts = {}
    for s in range(2, ell):
        odd = float(np.prod(np.arange(1, 2 * s, 2, dtype=np.float64)))
        consts[s] = 2.0 * (1 + 0.5 ** (s + 0.5)) / 3.0 * odd / np.sqrt(2 * np.pi) / n

    def fixed_point(t: float) -> float:
        f = float(weights[ell] @ np.exp(decay * t))
        for s in range(ell - 1, 1, -1):
            if f <= 0:
                return -1.0
            tau = (consts[s] / f) ** (2.0 / (3.0 + 2.0 * s))
            f = float(weights[s] @ np.exp(decay * tau))
        if f <= 0:
            return -1.0
        return float(t - (2 * n * np.sqrt(np.pi) * f) ** (-0.4))

    seen: dict[float, float] = {}

    def once(t: float) -> float:
        """``fixed_point(t)``, each ``t`` computed once: the bracket's low end is tried
        again every widening, and Brent's method starts from both ends."""
        v = seen.get(t)
        if v is None:
            v = seen[t] = fixed_point(t)
        return v

    hi = max(0.01, 5.0 / m**2)
    for _ in range(6):
        try:
            if once(1e-12) * once(hi) < 0:
                t = brentq(once, 1e-12, hi, xtol=1e-10, rtol=1e-4)
                return float(np.sqrt(t) * m * step)
        except (ValueError, OverflowError, FloatingPointError):
            return None
        hi *= 3.0
    return None


def dct2(x: np.ndarray) -> np.ndarray:
    """Unnormalised DCT-II, ``y[k] = 2 sum_n x[n] cos(pi k (2n + 1) / (2N))`` (SciPy's
    ``dct(x, type=2)``), from numpy's FFT of the even extension: no SciPy import, which
    would cost ``gate`` and ``score`` a third of a second."""
    x = np.asarray(x, dtype=np.float64)
    m = x.size
    spectrum = np.fft.rfft(np.concatenate([x, x[::-1]]))[:m]
    return (np.exp(-0.5j * np.pi * np.arange(m) / m) * spectrum).real


def brentq(
    f: Callable[[float], float],
    a: float,
    b: float,
    *,
    xtol: float = 2e-12,
    rtol: float = 4 * np.finfo(float).eps,
    maxiter: int = 100,
) -> float:
    """A root of ``f`` in ``[a, b]`` by Brent's method (inverse quadratic interpolation,
    secant and bisection steps), step for step as ``scipy.optimize.brentq``.

    Raises
    ------
    ValueError
        ``f(a)`` and ``f(b)`` have the same sign, or ``f`` returned NaN.
    RuntimeError
        No convergence in ``maxiter`` iterations.
    """

    def value(x: float) -> float:
        v = float(f(x))
        if v != v:
            raise ValueError(f"the function value at x={x} is NaN")
        return v

    xpre, xcur = float(a), float(b)
    fpre, fcur = value(xpre), value(xcur)
    if fpre * fcur > 0:
        raise ValueError("f(a) and f(b) must have different signs")
    if fpre == 0:
        return xpre
    if fcur == 0:
        return xcur
    xblk = fblk = spre = scur = 0.0
    for _ in range(maxiter):
        if fpre != 0 and fcur != 0 and (fpre < 0) != (fcur < 0):
            xblk, fblk = xpre, fpre
            spre = scur = xcur - xpre
        if abs(fblk) < abs(fcur):
            xpre, xcur, xblk = xcur, xblk, xcur
            fpre, fcur, fblk = fcur, fblk, fcur
        delta = (xtol + rtol * abs(xcur)) / 2
        sbis = (xblk - xcur) / 2
        if fcur == 0 or abs(sbis) < delta:
            return xcur
        if abs(spre) > delta and abs(fcur) < abs(fpre):
            if xpre == xblk:  # secant
                stry = -fcur * (xcur - xpre) / (fcur - fpre)
            else:  # inverse quadratic interpolation
                dpre = (fpre - fcur) / (xpre - xcur)
                dblk = (fblk - fcur) / (xblk - xcur)
                stry = -fcur * (fblk * dblk - fpre * dpre) / (dblk * dpre * (fblk - fpre))
            if 2 * abs(stry) < min(abs(spre), 3 * abs(sbis) - delta):
                spre, scur = scur, stry
            else:
                spre = scur = sbis
        else:
            spre = scur = sbis
        xpre, fpre = xcur, fcur
        xcur += scur if abs(scur) > delta else (delta if sbis > 0 else -delta)
        fcur = value(xcur)
    raise RuntimeError(f"no convergence in {maxiter} iterations")


def bounded_bandwidth(counts: np.ndarray, grid: np.ndarray) -> float:
    """ISJ bandwidth, at least a quarter of Silverman's and :data:`MIN_BANDWIDTH_BINS` bins."""
    step = float(grid[1] - grid[0])
    silverman = silverman_bandwidth(counts, grid)
    with np.errstate(over="ignore", under="ignore"):
        # on a 4x coarser grid first (4x cheaper); the fine grid when that cannot resolve it
        coarse = counts[: counts.size // 4 * 4].reshape(-1, 4).sum(axis=1)
        isj = isj_bandwidth(coarse, 4 * step)
        if isj is not None and isj < 8 * step:
            isj = isj_bandwidth(counts, step)
    h = silverman if isj is None or not np.isfinite(isj) else isj
    return float(max(h, 0.25 * silverman, MIN_BANDWIDTH_BINS * step))


def valleys(
    d: Density, low: float, high: float, *, min_share: float, limit: int = 3
) -> list[Valley]:
    """The deepest local minima of the density in ``[low, high]`` splitting off ``min_share``.

    Returns at most ``limit`` valleys with their depth (see :class:`Valley`), deepest
    first.
    """
    f = d.f
    m = f.size
    if m < 3 or d.n == 0:
        return []
    left_max = np.maximum.accumulate(f)
    right_max = np.maximum.accumulate(f[::-1])[::-1]
    idx = np.flatnonzero((f[1:-1] <= f[:-2]) & (f[1:-1] < f[2:])) + 1
    idx = idx[(d.grid[idx] >= low) & (d.grid[idx] <= high)]
    if idx.size == 0:
        return []
    cum = np.cumsum(d.counts)
    share = (cum[idx - 1] + 0.5 * d.counts[idx]) / d.n
    top = np.minimum(left_max[idx], right_max[idx])
    ok = (share >= min_share) & (share <= 1.0 - min_share) & (top > 0)
    idx, share, top = idx[ok], share[ok], top[ok]
    depth = np.clip(1.0 - f[idx] / np.where(top > 0, top, 1.0), 0.0, 1.0)
    order = np.argsort(-depth, kind="stable")[:limit]
    out: list[Valley] = []
    for o in order:
        j = int(idx[o])
        fj, tj = float(f[j]), float(top[o])
        # the valley floor: where the density stays within 5% of the dip's height of it,
        # between the two peaks (flat-bottomed gaps between well separated populations)
        floor = fj + 0.05 * (tj - fj)
        a = j
        while a - 1 >= 0 and f[a - 1] <= floor and f[a - 1] < left_max[a - 1]:
            a -= 1
        b = j
        while b + 1 < m and f[b + 1] <= floor and f[b + 1] < right_max[b + 1]:
            b += 1
        mid = _vertex(d, j) if a == b else float(0.5 * (d.grid[a] + d.grid[b]))
        pos = min(max(mid, low), high)
        il = int(np.argmax(f[: j + 1]))
        ir = j + int(np.argmax(f[j:]))
        out.append(
            Valley(pos, float(depth[o]), float(share[o]), float(d.grid[il]), float(d.grid[ir]))
        )
    return out


def tail_fit(d: Density, *, side: str, k: float, mode_near: float | None = None) -> TailFit:
    """Place a threshold ``k`` robust SDs from the main population's mode.

    Parameters
    ----------
    d
        The parent's density.
    side
        ``"above"``: the minority lies above the main population (threshold
        ``mode + k sd``, SD from the lower half); ``"below"``: the mirror image;
        ``"auto"``: the side where more events lie beyond ``k`` SDs than the mirrored
        half predicts.
    k
        Number of SDs.
    mode_near
        When given, the main population is the highest mode on the far side of this
        position (below it for ``"above"``); default the highest mode overall.
    """
    if side == "auto":
        up = tail_fit(d, side="above", k=k)
        down = tail_fit(d, side="below", k=k)
        excess_up = up.share_beyond * up.purity
        excess_down = down.share_beyond * down.purity
        return up if excess_up >= excess_down else down
    f = d.f
    if mode_near is not None:
        cut = d.index(mode_near)
        below = side == "above"  # the main population lies below the minority
        i_mode = int(np.argmax(f[: cut + 1])) if below else cut + int(np.argmax(f[cut:]))
    else:
        i_mode = int(np.argmax(f))
    mode = _vertex(d, i_mode)
    sd = _half_sd(d, i_mode, mode, below=side == "above")
    if side == "above":
        pos = mode + k * sd
        beyond = 1.0 - d.share_below(pos)
        mirror = d.share_below(mode - k * sd)
    else:
        pos = mode - k * sd
        beyond = d.share_below(pos)
        mirror = 1.0 - d.share_below(mode + k * sd)
    purity = 0.0 if beyond <= 0 else float(min(1.0, max(0.0, 1.0 - mirror / beyond)))
    return TailFit(float(pos), mode, float(sd), float(beyond), purity)


def _vertex(d: Density, i: int) -> float:
    """Position of the extremum at grid point ``i``, refined by a parabola through 3 points."""
    f = d.f
    if 0 < i < f.size - 1:
        den = f[i - 1] - 2.0 * f[i] + f[i + 1]
        if den != 0:
            off = float(np.clip(0.5 * (f[i - 1] - f[i + 1]) / den, -0.5, 0.5))
            return float(d.grid[i]) + off * d.step
    return float(d.grid[i])


def _half_sd(d: Density, i_mode: int, mode: float, *, below: bool) -> float:
    """Robust SD of the population at ``i_mode`` from one half, mirrored.

    A Gaussian's half below its mode holds 31.7% of that half's mass more than one SD
    from the mode; the same point of the observed half gives the SD.
    """
    counts, grid = d.counts, d.grid
    if below:
        half = counts[: i_mode + 1]
        c = np.cumsum(half)
        xs = grid[: i_mode + 1]
    else:
        half = counts[i_mode:][::-1]
        c = np.cumsum(half)
        xs = grid[i_mode:][::-1]
    total = float(c[-1]) - 0.5 * float(half[-1])
    if total <= 0:
        return d.step
    at = float(np.interp(_ONE_SD_OF_HALF * total, c, xs))
    return max(abs(mode - at), d.step)
