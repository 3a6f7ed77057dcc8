"""Tests of blinaprofile.gating.transforms against FlowKit 1.3 / flowutils.

FlowKit objects are built directly from their own constructors (not via ``to_flowkit``)
so that the parameter mapping itself is under test. Every transform delegates to, or
copies the expression of, what FlowKit computes, so values must be bit-identical.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flowkit import transforms as fkt

import blinaprofile.gating.transforms as bt
from blinaprofile.errors import GatingError

# --------------------------------------------------------------------------------------
# Parameter sets: GatingML 2.0 compliance-suite values, typical cytometry values and
# FlowKit's / FlowJo's defaults.
# --------------------------------------------------------------------------------------
LOGICLE = [
    (1000.0, 1.0, 4.0, 0.0),  # GatingML compliance
    (10000.0, 0.5, 4.5, 0.0),  # GatingML compliance "Logicle_10000_0.5_4.5_0"
    (10000.0, 0.5, 4.0, 0.5),  # GatingML compliance "Logicle_10000_0.5_4_0.5"
    (10000.0, 1.0, 4.0, 0.5),  # GatingML compliance "Logicle_10000_1_4_0.5"
    (262144.0, 0.5, 4.5, 0.0),  # typical cytometry / FlowJo
    (262144.0, 0.5, 4.0, 0.0),  # FlowKit generate_transforms default
    (262144.0, 1.5, 4.5, 0.5),
    (262144.0, 0.0, 4.5, 0.0),  # W = 0 (pure arcsinh shape)
    (1000.0, 1.0, 4.0, -1.0),  # A = -W (lower limit)
    (1.0, 0.5, 4.5, 0.0),  # tiny T
]
HYPERLOG = [
    (10000.0, 1.0, 4.5, 0.0),  # GatingML compliance "Hyperlog_10000_1_4.5_0"
    (1000.0, 1.0, 4.0, 0.0),
    (262144.0, 0.5, 4.5, 0.0),  # FlowKit generate_transforms style
    (10000.0, 0.5, 4.0, 0.5),
]
ASINH = [
    (10000.0, 4.0, 1.0),  # GatingML compliance "AsinH_10000_4_1"
    (262144.0, 3.5, 0.0),  # FlowKit generate_transforms default
    (1000.0, 4.5, 0.5),
]
LINEAR = [(10000.0, 500.0), (262144.0, 0.0), (1.0, 0.0)]  # "Linear_10000_500", defaults
LOG = [(10000.0, 5.0), (262144.0, 4.0), (100.0, 2.0)]
WSP_LOG = [(1.0, 4.5), (10.0, 5.0), (0.5, 3.0)]
WSP_BIEX = [
    (0.0, -10.0, 4.418540, 262144.000029),  # FlowKit's defaults
    (0.0, -100.0, 4.42, 262144.0),
    (1.0, -10.0, 4.418540, 262144.0),
    (0.5, -1000.0, 4.5, 262144.0),
]


def _fk_logicle(t: float, w: float, m: float, a: float) -> Any:
    return fkt.LogicleTransform(param_t=t, param_w=w, param_m=m, param_a=a)


def _fk_hyperlog(t: float, w: float, m: float, a: float) -> Any:
    return fkt.HyperlogTransform(param_t=t, param_w=w, param_m=m, param_a=a)


# (ours, flowkit, top of scale) for every parameter set
CASES: list[tuple[bt.Transform, Any, float]] = (
    [(bt.LogicleTransform(*p), _fk_logicle(*p), p[0]) for p in LOGICLE]
    + [(bt.HyperlogTransform(*p), _fk_hyperlog(*p), p[0]) for p in HYPERLOG]
    + [
        (bt.AsinhTransform(t, m, a), fkt.AsinhTransform(param_t=t, param_m=m, param_a=a), t)
        for t, m, a in ASINH
    ]
    + [(bt.LinearTransform(t, a), fkt.LinearTransform(param_t=t, param_a=a), t) for t, a in LINEAR]
    + [(bt.LogTransform(t, m), fkt.LogTransform(param_t=t, param_m=m), t) for t, m in LOG]
    + [
        (bt.WSPLogTransform(o, d), fkt.WSPLogTransform(offset=o, decades=d), 262144.0)
        for o, d in WSP_LOG
    ]
    + [
        (
            bt.WSPBiexTransform(n, w, p, top),
            fkt.WSPBiexTransform(negative=n, width=w, positive=p, max_value=top),
            top,
        )
        for n, w, p, top in WSP_BIEX
    ]
)
CASE_IDS = [repr(c[0]) for c in CASES]
ITERATIVE = (bt.LogicleTransform, bt.HyperlogTransform)


def sample_values(t: float, n: int = 100_000, seed: int = 0) -> npt.NDArray[np.float64]:
    """~n raw values: negatives, zeros, tiny, integer-valued, large and beyond T."""
    rng = np.random.default_rng(seed)
    q = n // 8
    sign = rng.choice([-1.0, 1.0], size=2 * q)
    parts = [
        rng.uniform(-0.2 * t, 1.2 * t, 2 * q),  # the display range and beyond T
        rng.normal(0.0, 2e-3 * t, 2 * q),  # dense around zero (logicle's linear region)
        np.exp(rng.uniform(math.log(1e-6 * t), math.log(1e3 * t), 2 * q)) * sign,  # log-spaced
        rng.integers(-1000, 1000, q).astype(np.float64),  # integer-valued, many exact zeros
        np.exp(rng.uniform(math.log(1e-300), math.log(1e-6 * t), q)) * sign[:q],  # tiny
        np.array([0.0, -0.0, t, -t, 1.0, -1.0, 5e-324, -5e-324, 2.2250738585072014e-308]),
        np.array([1e3 * t, -1e3 * t, 0.5 * t, 1e-3 * t]),
    ]
    values = np.concatenate(parts)
    rng.shuffle(values)
    return values


def flowkit_apply(fk: Any, x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    # log10 of zero / negative values is part of what is being compared (FlowKit gives
    # -inf / NaN); keep numpy from reporting it as a floating-point error.
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(fk.apply(x), dtype=np.float64)


def assert_identical(ours: npt.NDArray[np.float64], ref: npt.NDArray[np.float64]) -> None:
    """Bit-identical values (NaN where FlowKit has NaN), float64, same shape."""
    assert ours.dtype == np.float64
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


# --------------------------------------------------------------------------------------
# Forward transform vs FlowKit
# --------------------------------------------------------------------------------------


def test_sample_values_cover_the_interesting_regions() -> None:
    x = sample_values(262144.0)
    assert x.size >= 100_000
    assert (x < 0).sum() > 20_000
    assert (x == 0).sum() >= 2
    assert np.signbit(x[x == 0]).any()  # -0.0 is present
    assert (np.abs(x) < 1e-100).sum() > 100  # tiny and denormal
    assert (x > 262144.0).sum() > 5_000  # beyond T
    assert (x >= 262144.0 * 999).sum() >= 1


@pytest.mark.parametrize(("ours", "fk", "top"), CASES, ids=CASE_IDS)
def test_apply_matches_flowkit(ours: bt.Transform, fk: Any, top: float) -> None:
    x = sample_values(top)
    got = ours.apply(x)
    assert_identical(got, flowkit_apply(fk, x))
    # non-vacuous: the outputs really span the scale
    finite = got[np.isfinite(got)]
    assert finite.size > 0.4 * x.size
    assert np.ptp(finite) > 0.5


@pytest.mark.parametrize(("ours", "fk", "top"), CASES, ids=CASE_IDS)
def test_special_values_match_flowkit(ours: bt.Transform, fk: Any, top: float) -> None:
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, top, -top, 1e-310, 1e300, -1e300])
    assert_identical(ours.apply(x), flowkit_apply(fk, x))


def test_logicle_nonfinite_inputs_give_flowutils_sentinel() -> None:
    tr = bt.LogicleTransform(262144.0, 0.5, 4.5, 0.0)
    got = tr.apply(np.array([np.nan, np.inf, -np.inf, 1e300, 0.0]))
    np.testing.assert_array_equal(got[:4], [-1.0, -1.0, -1.0, -1.0])
    assert got[4] == pytest.approx(0.5 / 4.5, abs=1e-16)  # data zero maps to x1 = W/(M+A)


@pytest.mark.parametrize(
    ("cls", "params"),
    [(bt.LogicleTransform, p) for p in [*LOGICLE, (262144.0, 2.0, 4.5, 0.0)]]
    + [(bt.HyperlogTransform, p) for p in HYPERLOG],
)
def test_biex_dense_grid_matches_flowutils(
    cls: type[bt.Transform], params: tuple[float, float, float, float]
) -> None:
    """Dense log-spaced grid from ~T * 1e-15 to ~T * 1e7, both signs, vs flowutils."""
    import flowutils.transforms as fu

    t, w, m, a = params
    mags = np.geomspace(t * 2.0**-50, t * 2.0**24, 200_000)
    x = np.concatenate([mags, -mags])
    got = cls(t, w, m, a).apply(x)  # type: ignore[call-arg]
    ref = getattr(fu, cls.kind)(x, None, t=t, m=m, w=w, a=a)
    assert_identical(got, ref)
    assert np.ptp(got[got != -1]) > 1.0


def test_hyperlog_huge_values_match_flowutils_including_failures() -> None:
    """Above ~1e9*T flowutils' hyperlog iteration stalls for some values (returns -1);
    ours returns -1 for exactly those."""
    import flowutils.transforms as fu

    t, w, m, a = 262144.0, 0.5, 4.5, 0.0
    mags = np.geomspace(t * 1e6, t * 1e15, 50_000)
    x = np.concatenate([mags, -mags])
    got = bt.HyperlogTransform(t, w, m, a).apply(x)
    ref = fu.hyperlog(x, None, t=t, m=m, w=w, a=a)
    assert (ref == -1).sum() > 100  # the failure mode really occurs here
    assert_identical(got, ref)


@pytest.mark.parametrize("params", LOGICLE[:5])
def test_logicle_apply_reference_matches_flowutils(
    params: tuple[float, float, float, float],
) -> None:
    import flowutils.transforms as fu

    t, w, m, a = params
    x = sample_values(t, n=20_000, seed=3)
    got = bt.LogicleTransform(t, w, m, a).apply_reference(x)
    ref = fu.logicle(x, None, t=t, m=m, w=w, a=a)
    np.testing.assert_array_equal(got, ref)  # bit-identical
    assert np.ptp(got) > 0.5


def test_hyperlog_apply_reference_matches_flowutils() -> None:
    import flowutils.transforms as fu

    t, w, m, a = HYPERLOG[0]
    x = sample_values(t, n=20_000, seed=4)
    got = bt.HyperlogTransform(t, w, m, a).apply_reference(x)
    ref = fu.hyperlog(x, None, t=t, m=m, w=w, a=a)
    np.testing.assert_array_equal(got, ref)  # bit-identical
    assert np.ptp(got) > 0.5


# --------------------------------------------------------------------------------------
# Inverse
# --------------------------------------------------------------------------------------


def _roundtrip_domain(tr: bt.Transform, top: float) -> npt.NDArray[np.float64]:
    x = sample_values(top, n=40_000, seed=1)
    x = x[np.abs(x) <= 10 * top]
    if isinstance(tr, bt.LogTransform):
        x = x[x > 1e-6 * top]
    if isinstance(tr, bt.WSPLogTransform):
        x = x[x > tr.offset]
    if isinstance(tr, bt.WSPBiexTransform):
        fk_table = fkt.WSPBiexTransform(tr.negative, tr.width, tr.positive, tr.max_value)
        lo, hi = fk_table._lut_func.x.min(), fk_table._lut_func.x.max()
        x = x[(x >= lo) & (x <= hi)]
    if isinstance(tr, bt.LogicleTransform) and tr.w == 0:
        x = x[np.abs(x) > 1e-8]  # flowutils' W = 0 logicle returns -1 below ~2e-9
    return x


@pytest.mark.parametrize(("ours", "fk", "top"), CASES, ids=CASE_IDS)
def test_inverse_of_apply_is_identity(ours: bt.Transform, fk: Any, top: float) -> None:
    x = _roundtrip_domain(ours, top)
    assert x.size > 5_000
    back = ours.inverse(ours.apply(x))
    np.testing.assert_allclose(back, x, rtol=1e-9, atol=1e-9 * top)


# FlowKit's WSPLogTransform has no inverse (ours is tested in test_wsplog_inverse_is_explicit)
INVERTIBLE = [c for c in CASES if hasattr(c[1], "inverse")]


@pytest.mark.parametrize(("ours", "fk", "top"), INVERTIBLE, ids=[repr(c[0]) for c in INVERTIBLE])
def test_inverse_matches_flowkit(ours: bt.Transform, fk: Any, top: float) -> None:
    y = np.linspace(-0.3, 1.3, 20_001)
    if isinstance(ours, bt.WSPBiexTransform):
        y = np.linspace(-100.0, 4200.0, 20_001)
    got = ours.inverse(y)
    assert_identical(got, np.asarray(fk.inverse(y), dtype=np.float64))
    assert np.ptp(got[np.isfinite(got)]) > 0


def test_wsplog_inverse_is_explicit() -> None:
    tr = bt.WSPLogTransform(offset=2.0, decades=4.0)
    np.testing.assert_allclose(tr.inverse(np.array([0.0, 0.25, 1.0])), [2.0, 20.0, 20000.0])


def test_inverse_maps_gate_thresholds_to_raw_space() -> None:
    """A range gate lo <= f(x) < hi equals inverse(lo) <= x < inverse(hi) on raw data."""
    tr = bt.LogicleTransform(262144.0, 0.5, 4.5, 0.0)
    x = sample_values(262144.0, seed=7)
    lo, hi = 0.31, 0.69
    raw_lo, raw_hi = tr.inverse(np.array([lo, hi]))
    in_transformed = (tr.apply(x) >= lo) & (tr.apply(x) < hi)
    in_raw = (x >= raw_lo) & (x < raw_hi)
    assert 1_000 < in_transformed.sum() < x.size - 1_000
    np.testing.assert_array_equal(in_raw, in_transformed)


# --------------------------------------------------------------------------------------
# Monotonicity, dtypes, shapes, empty input
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ours", "fk", "top"), CASES, ids=CASE_IDS)
def test_monotone_non_decreasing(ours: bt.Transform, fk: Any, top: float) -> None:
    x = np.sort(sample_values(top, n=50_000, seed=2))
    x = x[np.abs(x) > 1e-6 * top]
    if isinstance(ours, bt.LogTransform):
        x = x[x > 0]
    y = ours.apply(x)
    assert np.isfinite(y).all()
    assert (np.diff(y) >= 0).all()
    assert y[-1] > y[0]
    if isinstance(ours, (*ITERATIVE, bt.AsinhTransform, bt.LinearTransform)):
        distinct = np.diff(x) > 1e-9 * np.abs(x[1:])
        assert (np.diff(y)[distinct] > 0).all()  # strictly increasing


@pytest.mark.parametrize(("ours", "fk", "top"), CASES, ids=CASE_IDS)
def test_float32_input(ours: bt.Transform, fk: Any, top: float) -> None:
    x32 = sample_values(top, n=20_000, seed=5).astype(np.float32)
    got = ours.apply(x32)
    assert got.dtype == np.float64
    x64 = x32.astype(np.float64)
    np.testing.assert_array_equal(got, ours.apply(x64))
    assert_identical(got, flowkit_apply(fk, x64))


@pytest.mark.parametrize(("ours", "fk", "top"), CASES, ids=CASE_IDS)
def test_empty_input(ours: bt.Transform, fk: Any, top: float) -> None:
    for shape in [(0,), (0, 3)]:
        for dtype in (np.float64, np.float32):
            out = ours.apply(np.empty(shape, dtype=dtype))
            assert out.shape == shape
            assert out.dtype == np.float64
            back = ours.inverse(np.empty(shape, dtype=dtype))
            assert back.shape == shape
            assert back.dtype == np.float64


def test_shapes_strides_and_integer_input() -> None:
    tr = bt.LogicleTransform(262144.0, 0.5, 4.5, 0.0)
    fk = _fk_logicle(262144.0, 0.5, 4.5, 0.0)
    x = sample_values(262144.0, n=60_000, seed=6)
    flat = tr.apply(x)
    col = x.reshape(-1, 1)  # FlowKit gates pass (n, 1) columns
    np.testing.assert_array_equal(tr.apply(col), flat.reshape(-1, 1))
    assert_identical(tr.apply(col), flowkit_apply(fk, col))
    np.testing.assert_array_equal(tr.apply(x[::3]), flat[::3])  # strided view
    np.testing.assert_array_equal(tr.apply(x[:60_000].reshape(3, -1)), flat[:60_000].reshape(3, -1))
    ints = np.arange(-5000, 5000, dtype=np.int32)
    np.testing.assert_array_equal(tr.apply(ints), tr.apply(ints.astype(np.float64)))
    assert tr.apply(3.0).shape == ()
    assert float(tr.apply(262144.0)) == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(TypeError):
        tr.apply(np.array([1 + 2j]))


def test_input_is_not_modified() -> None:
    x = sample_values(262144.0, n=20_000)
    before = x.copy()
    for tr, _, _ in CASES:
        tr.apply(x)
        tr.inverse(x)
    np.testing.assert_array_equal(x, before)


# --------------------------------------------------------------------------------------
# FlowKit conversion
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ours", "fk", "top"), CASES, ids=CASE_IDS)
def test_flowkit_round_trip(ours: bt.Transform, fk: Any, top: float) -> None:
    converted = bt.from_flowkit(fk)
    assert converted == ours
    assert type(converted) is type(ours)
    assert type(ours).from_flowkit(fk) == ours
    back = ours.to_flowkit("some_id")
    assert type(back) is type(fk)
    assert back == fk  # FlowKit compares public attributes
    assert vars(back) == vars(fk) or isinstance(ours, bt.WSPBiexTransform)
    assert bt.from_flowkit(back) == ours
    x = sample_values(top, n=5_000, seed=8)
    np.testing.assert_array_equal(flowkit_apply(back, x), flowkit_apply(fk, x))


def test_flowkit_wsp_biex_defaults_map_to_ours() -> None:
    ours = bt.from_flowkit(fkt.WSPBiexTransform())
    assert ours == bt.WSPBiexTransform()
    assert ours == bt.WSPBiexTransform(0.0, -10.0, 4.418540, 262144.000029)


def test_from_flowkit_rejects_ratio_and_foreign_objects() -> None:
    ratio = fkt.RatioTransform(["FL2-H", "FL2-A"], param_a=1, param_b=0, param_c=-1)
    with pytest.raises(GatingError, match="RatioTransform"):
        bt.from_flowkit(ratio)
    with pytest.raises(GatingError, match="dict"):
        bt.from_flowkit({"param_t": 1})
    with pytest.raises(GatingError, match="LogicleTransform"):
        bt.LinearTransform.from_flowkit(_fk_logicle(262144.0, 0.5, 4.5, 0.0))


@pytest.mark.parametrize(
    "make",
    [
        lambda: bt.LogicleTransform(-1.0, 0.5, 4.5, 0.0),
        lambda: bt.LogicleTransform(262144.0, 3.0, 4.5, 0.0),  # 2W > M
        lambda: bt.LogicleTransform(262144.0, 0.5, 4.5, -1.0),  # A < -W
        lambda: bt.LogicleTransform(262144.0, 0.5, float("nan"), 0.0),
        lambda: bt.HyperlogTransform(262144.0, 0.0, 4.5, 0.0),  # W = 0
        lambda: bt.AsinhTransform(0.0, 4.5, 0.0),
        lambda: bt.LinearTransform(10.0, -10.0),
        lambda: bt.LogTransform(262144.0, 0.0),
        lambda: bt.WSPLogTransform(0.0, 4.0),
        lambda: bt.WSPBiexTransform(width=10.0),
        lambda: bt.LogicleTransform("big", 0.5, 4.5, 0.0),  # type: ignore[arg-type]
    ],
)
def test_invalid_parameters_raise_gating_error(make: Any) -> None:
    with pytest.raises(GatingError):
        make()


def test_from_flowkit_invalid_parameters_name_the_transform() -> None:
    with pytest.raises(GatingError, match="LogicleTransform"):
        bt.from_flowkit(_fk_logicle(262144.0, 3.0, 4.5, 0.0))


def test_transforms_are_hashable_and_picklable() -> None:
    tr = bt.LogicleTransform(262144, 0.5, 4.5, 0)
    assert isinstance(tr.t, float)
    assert hash(tr) == hash(bt.LogicleTransform(262144.0, 0.5, 4.5, 0.0))
    restored = pickle.loads(pickle.dumps(tr))
    assert restored == tr
    x = sample_values(262144.0, n=5_000)
    np.testing.assert_array_equal(restored.apply(x), tr.apply(x))
    with pytest.raises(AttributeError):
        tr.t = 1.0  # type: ignore[misc]


def test_module_import_does_not_import_flowkit() -> None:
    code = (
        "import sys, blinaprofile.gating.transforms as t\n"
        "assert 'flowkit' not in sys.modules, 'flowkit imported'\n"
        "assert 'flowutils' not in sys.modules, 'flowutils imported'\n"
        "assert 'scipy.interpolate' not in sys.modules\n"
        "print(t.LogicleTransform(262144, 0.5, 4.5, 0).apply([0.0, 262144.0]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1." in done.stdout


# --------------------------------------------------------------------------------------
# Columns of an event matrix (how the engine calls apply)
# --------------------------------------------------------------------------------------


def _event_matrix(n: int = 50_000) -> npt.NDArray[np.float64]:
    rng = np.random.default_rng(11)
    data = np.empty((n, 5))
    data[:, 0] = rng.uniform(0, 262144, n)  # scatter
    data[:, 1] = np.exp(rng.normal(6, 2, n)) - 300  # fluorescence with negatives
    data[:, 2] = rng.normal(0, 150, n)
    data[:, 3] = rng.integers(0, 1024, n)
    data[:, 4] = np.exp(rng.normal(8, 1.5, n))
    return data


@pytest.mark.parametrize("order", ["C", "F"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_apply_to_event_matrix_columns(order: str, dtype: type) -> None:
    """Strided (C order) and contiguous (F order) columns, float32 or float64, as FlowKit."""
    data = np.asarray(_event_matrix(), dtype=dtype, order=order)  # type: ignore[call-overload]
    before = data.copy()
    cases: dict[int, tuple[bt.Transform, Any]] = {
        0: (bt.LinearTransform(262144.0, 0.0), fkt.LinearTransform(param_t=262144.0, param_a=0.0)),
        1: (bt.LogicleTransform(262144.0, 0.5, 4.5, 0.0), _fk_logicle(262144.0, 0.5, 4.5, 0.0)),
        2: (bt.HyperlogTransform(262144.0, 0.5, 4.5, 0.0), _fk_hyperlog(262144.0, 0.5, 4.5, 0.0)),
        4: (bt.WSPBiexTransform(), fkt.WSPBiexTransform()),
    }
    for col, (ours, fk) in cases.items():
        got = ours.apply(data[:, col])
        assert got.shape == (data.shape[0],)
        assert_identical(got, flowkit_apply(fk, data[:, col].astype(np.float64)))
        np.testing.assert_array_equal(got, ours.apply(np.ascontiguousarray(data[:, col])))
    np.testing.assert_array_equal(data, before)
