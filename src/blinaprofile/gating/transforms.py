"""Per-channel scale transforms, parameterised as FlowKit 1.3 parameterises them.

What is ours, and why (speed)
-----------------------------
The gate engine (:mod:`blinaprofile.gating.events`) is fast because it does not
transform events: each bound of a range gate is mapped once to raw units with
:meth:`Transform.inverse` and compared with raw (compensated) values; only the few
events within rounding distance of a bound go through the forward transform
(``apply_reference``). What the engine needs from this module is therefore:

* transform objects: frozen dataclasses holding FlowKit's parameters, validated at
  construction (:class:`~blinaprofile.errors.GatingError`), hashable and picklable so
  they key the engine's caches and cross process boundaries, convertible to and from
  FlowKit objects (:meth:`Transform.to_flowkit`, :func:`from_flowkit`);
* monotone non-decreasing transforms with an ``inverse`` for gate bounds (one call per
  bound, so closed-form inverses suffice);
* ``LinearTransform`` in both directions and the inverse of ``WSPLogTransform`` (which
  FlowKit lacks) as one-line closed forms, written as FlowKit writes them, so strategies
  on linear scatter channels never import FlowKit.

What is delegated to flowutils / FlowKit
----------------------------------------
All other arithmetic, by the very calls FlowKit's own transform classes make, so values
are bit-identical to FlowKit's (flowutils' ``-1`` for NaN, +-inf and values its logicle
/ hyperlog iteration cannot transform included):

* ``LogTransform`` (``flog``), ``AsinhTransform`` (``fasinh``), ``LogicleTransform``
  (``logicle``), ``HyperlogTransform`` (``hyperlog``): ``flowutils.transforms.<kind>``
  and ``<kind>_inverse`` (logicle/hyperlog: flowutils' C Halley iteration and its C
  closed-form inverse);
* ``WSPLogTransform`` (``wsp_log``) forward, ``WSPBiexTransform`` (``wsp_biex``) both
  ways: the methods of FlowKit's class of the same name (FlowJo biex is FlowKit's
  4097-point lookup table, interpolated by ``scipy.interpolate.interp1d``).

Every class has a FlowKit counterpart of the same name, with parameters ``param_t``,
``param_w``, ``param_m``, ``param_a`` (GatingML) or our field names (FlowJo). FlowKit's
``RatioTransform`` has none here. flowutils and FlowKit are imported on first use.
``apply`` and ``inverse`` take any real array, convert it to float64 (as FlowKit's
events are) and return a new float64 array of the same shape, without FP warnings.

Mapping gate thresholds to raw space
------------------------------------
``lo <= f(x) < hi`` equals ``inverse(lo) <= x < inverse(hi)`` on raw values, except:

* saturating transforms are only invertible on their unsaturated part:
  ``WSPLogTransform`` maps every ``x <= offset`` to 0 and ``WSPBiexTransform`` clamps
  below and above its table;
* ``LogTransform`` maps ``x <= 0`` to ``-inf``/NaN, and logicle/hyperlog map NaN and
  +-inf to ``-1``: such events must be classified from :meth:`Transform.apply`;
* the forward transform is accurate to a few ulps only, so an event within a few ulps of
  ``inverse(lo)`` can fall on the other side in transformed space; the engine re-decides
  events in a narrow band around each raw bound with ``apply_reference`` / ``apply``.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, fields
from types import ModuleType
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from blinaprofile.errors import GatingError

__all__ = [
    "AsinhTransform",
    "HyperlogTransform",
    "LinearTransform",
    "LogTransform",
    "LogicleTransform",
    "Transform",
    "WSPBiexTransform",
    "WSPLogTransform",
    "from_flowkit",
]

FloatArray = npt.NDArray[np.float64]


def _flowutils() -> ModuleType:
    """``flowutils.transforms`` (FlowKit's numerical backend), imported on first use."""
    import flowutils.transforms

    return flowutils.transforms


@functools.lru_cache(maxsize=64)
def _flowkit_twin(transform: Transform) -> Any:
    """The FlowKit object for ``transform``, built once per parameter set.

    Building FlowKit's ``WSPBiexTransform`` computes its lookup table, so the object is
    kept rather than rebuilt for every call.
    """
    return transform.to_flowkit()


class Transform(ABC):
    """Base class of all channel transforms.

    Subclasses are small frozen dataclasses holding FlowKit's parameters. They are
    hashable, comparable and picklable, so they can key caches and cross process
    boundaries.
    """

    #: Short name of the transform family (the GatingML element name where one exists).
    kind: ClassVar[str]
    #: FlowKit's name of a parameter is this prefix + our field name.
    _flowkit_prefix: ClassVar[str]

    def apply(self, x: npt.ArrayLike) -> FloatArray:
        """Transform raw values into display (gate) space.

        Parameters
        ----------
        x
            Raw (compensated) event values; any real dtype, shape and strides.

        Returns
        -------
        numpy.ndarray
            A new float64 array of the same shape, equal to what FlowKit's transform
            returns for ``x`` converted to float64.
        """
        return _elementwise(self._forward, x)

    def inverse(self, y: npt.ArrayLike) -> FloatArray:
        """Map display (gate) space values back to raw values.

        The main use is converting gate thresholds into raw-space thresholds so that a
        range gate can be evaluated on untransformed events (see the module docstring
        for the caveats).

        Parameters
        ----------
        y
            Transformed values; any real dtype and shape.

        Returns
        -------
        numpy.ndarray
            A new float64 array of the same shape. Values whose raw equivalent exceeds
            the float64 range map to +-inf.
        """
        return _elementwise(self._backward, y)

    def to_flowkit(self, transform_id: str | None = None) -> Any:
        """Build the equivalent FlowKit transform object.

        Parameters
        ----------
        transform_id
            Accepted for symmetry with ``GatingStrategy.add_transform(transform_id,
            transform)``. FlowKit >= 1.0 transforms do not store an ID (the gating
            strategy keys them), so the value is not used.

        Returns
        -------
        flowkit.transforms.Transform
            A new instance of the FlowKit class of the same name, with exactly this
            object's parameters (see the module docstring).
        """
        from flowkit import transforms as fkt

        fk_class = getattr(fkt, type(self).__name__)
        return fk_class(**{fk: getattr(self, ours) for ours, fk in self._flowkit_names().items()})

    @classmethod
    def from_flowkit(cls, obj: Any) -> Self:
        """Convert a FlowKit transform object (see :func:`from_flowkit`).

        Called on a subclass, the result must be of that subclass.

        Raises
        ------
        GatingError
            If ``obj`` is not a supported FlowKit transform or not of the requested kind.
        """
        result = from_flowkit(obj)
        if not isinstance(result, cls):
            raise GatingError(
                f"FlowKit transform {obj!r} converts to {type(result).__name__}, not {cls.__name__}"
            )
        return result

    @classmethod
    def _flowkit_names(cls) -> dict[str, str]:
        """Our field name -> FlowKit's parameter name (FlowKit's class has our class's name)."""
        return {f.name: cls._flowkit_prefix + f.name for f in fields(cls)}  # type: ignore[arg-type]

    @abstractmethod
    def _forward(self, x: FloatArray) -> FloatArray:
        """The transform of the 1-D contiguous float64 ``x``, as a new array."""

    @abstractmethod
    def _backward(self, y: FloatArray) -> FloatArray:
        """The inverse transform of the 1-D contiguous float64 ``y``, as a new array."""

    def _post_init_floats(self) -> None:
        """Coerce every dataclass field to a finite Python float."""
        for fld in fields(self):  # type: ignore[arg-type]
            raw = getattr(self, fld.name)
            try:
                value = float(raw)
            except (TypeError, ValueError) as err:
                raise GatingError(
                    f"{type(self).__name__}: parameter {fld.name}={raw!r} is not a number"
                ) from err
            if not math.isfinite(value):
                raise GatingError(
                    f"{type(self).__name__}: parameter {fld.name}={raw!r} is not finite"
                )
            object.__setattr__(self, fld.name, value)

    def _require(self, ok: bool, reason: str) -> None:
        """Raise :class:`GatingError` naming this transform unless ``ok``."""
        if not ok:
            raise GatingError(f"{self!r} is not a valid transform: {reason}")


def _elementwise(func: Callable[[FloatArray], FloatArray], x: npt.ArrayLike) -> FloatArray:
    """Apply ``func`` (1-D float64 in, new 1-D array out) to any real array, keeping its shape.

    Floating-point warnings are silenced: ``log`` of 0 or of a negative value, overflow
    of an inverse and the like give FlowKit's ``-inf``/NaN/inf values by design.
    """
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"expected a real numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        return np.empty(arr.shape, dtype=np.float64)
    flat = np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)
    with np.errstate(all="ignore"):
        out = func(flat)
    return np.asarray(out, dtype=np.float64).reshape(arr.shape)


# -- GatingML flin, flog, fasinh ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinearTransform(Transform):
    """GatingML 2.0 ``flin``: ``(x + A) / (T + A)``.

    Maps ``[-A, T]`` onto ``[0, 1]``; defined for all real ``x``. Computed here with
    FlowKit's own expression (no FlowKit import).

    Parameters
    ----------
    t
        Top of scale ``T`` (FlowKit ``param_t``).
    a
        Offset ``A`` (FlowKit ``param_a``); ``T + A`` must not be 0.
    """

    kind: ClassVar[str] = "flin"
    _flowkit_prefix: ClassVar[str] = "param_"

    t: float
    a: float = 0.0

    def __post_init__(self) -> None:
        self._post_init_floats()
        self._require(self.t + self.a != 0, "T + A must not be 0")

    def _forward(self, x: FloatArray) -> FloatArray:
        return (x + self.a) / (self.t + self.a)

    def _backward(self, y: FloatArray) -> FloatArray:
        return (y * (self.t + self.a)) - self.a


@dataclass(frozen=True, slots=True)
class LogTransform(Transform):
    """GatingML 2.0 ``flog``: ``(1 / M) * log10(x / T) + 1`` (``flowutils.transforms.log``).

    ``T`` maps to 1 and ``M`` decades map onto ``[0, 1]``. As in FlowKit, ``x == 0``
    maps to ``-inf`` and ``x < 0`` (and NaN) to NaN.

    Parameters
    ----------
    t
        Top of scale ``T`` (FlowKit ``param_t``), > 0.
    m
        Number of decades ``M`` (FlowKit ``param_m``), > 0.
    """

    kind: ClassVar[str] = "flog"
    _flowkit_prefix: ClassVar[str] = "param_"

    t: float
    m: float

    def __post_init__(self) -> None:
        self._post_init_floats()
        self._require(self.t > 0, "T must be > 0")
        self._require(self.m > 0, "M must be > 0")

    def _forward(self, x: FloatArray) -> FloatArray:
        return _flowutils().log(x, None, t=self.t, m=self.m)

    def _backward(self, y: FloatArray) -> FloatArray:
        return _flowutils().log_inverse(y, None, t=self.t, m=self.m)


@dataclass(frozen=True, slots=True)
class AsinhTransform(Transform):
    """GatingML 2.0 ``fasinh`` (``flowutils.transforms.asinh``).

    ``(asinh(x * sinh(M ln10) / T) + A ln10) / ((M + A) ln10)``: ``T`` maps to 1, large
    values behave like a log scale of ``M`` decades and ``A`` extra negative decades are
    brought on scale. FlowKit also uses this for FlowJo's ``fasinh`` transform.

    Parameters
    ----------
    t
        Top of scale ``T`` (FlowKit ``param_t``), > 0.
    m
        Decades ``M`` (FlowKit ``param_m``), > 0.
    a
        Extra negative decades ``A`` (FlowKit ``param_a``); ``M + A`` must be > 0.
    """

    kind: ClassVar[str] = "fasinh"
    _flowkit_prefix: ClassVar[str] = "param_"

    t: float
    m: float
    a: float = 0.0

    def __post_init__(self) -> None:
        self._post_init_floats()
        self._require(self.t > 0, "T must be > 0")
        self._require(self.m > 0, "M must be > 0")
        self._require(self.m + self.a > 0, "M + A must be > 0")

    def _forward(self, x: FloatArray) -> FloatArray:
        return _flowutils().asinh(x, None, t=self.t, m=self.m, a=self.a)

    def _backward(self, y: FloatArray) -> FloatArray:
        return _flowutils().asinh_inverse(y, None, t=self.t, m=self.m, a=self.a)


# -- Logicle and hyperlog: one implementation, flowutils' C code both ways ---------------


@dataclass(frozen=True, slots=True)
class _RootTransform(Transform):
    """Logicle and hyperlog: ``f(x) = root(B(y) - x)`` for a biexponential-like ``B``.

    Both have the GatingML parameters ``T, W, M, A`` with the same constraints, no
    closed-form forward transform (flowutils runs a per-event Halley iteration) and a
    closed-form inverse ``B``. Subclasses only set ``kind``, which names the flowutils
    functions (``logicle`` / ``logicle_inverse``, ``hyperlog`` / ``hyperlog_inverse``).
    """

    _flowkit_prefix: ClassVar[str] = "param_"

    t: float
    w: float
    m: float
    a: float = 0.0

    def __post_init__(self) -> None:
        self._post_init_floats()
        self._require(self.t > 0, "T must be > 0")
        self._require(self.m > 0, "M must be > 0")
        self._require(self.w >= 0, "W must be >= 0")
        self._require(2 * self.w <= self.m, "W must be <= M / 2")
        self._require(-self.w <= self.a <= self.m - 2 * self.w, "A must lie in [-W, M - 2W]")
        if self.kind == "hyperlog":
            self._require(self.w > 0, "W must be > 0 for hyperlog")

    def _flowutils_call(self, name: str, values: FloatArray) -> FloatArray:
        func = getattr(_flowutils(), name)
        return func(values, None, t=self.t, m=self.m, w=self.w, a=self.a)

    def _forward(self, x: FloatArray) -> FloatArray:
        return self._flowutils_call(self.kind, x)

    def _backward(self, y: FloatArray) -> FloatArray:
        return self._flowutils_call(f"{self.kind}_inverse", y)

    def apply_reference(self, x: npt.ArrayLike) -> FloatArray:
        """Forward transform with FlowKit's arithmetic (flowutils' C iteration).

        The engine calls this to re-decide events within rounding distance of a raw-space
        bound. Since :meth:`apply` also calls flowutils, both give the same values
        (``-1`` for NaN, +-inf and values flowutils cannot transform).

        Parameters
        ----------
        x
            Raw (compensated) event values; any real dtype and shape.

        Returns
        -------
        numpy.ndarray
            A new float64 array of the same shape, bit-identical to flowutils' result.
        """
        return self.apply(x)


@dataclass(frozen=True, slots=True)
class LogicleTransform(_RootTransform):
    """GatingML 2.0 ``logicle`` (Moore & Parks 2012), FlowKit's ``LogicleTransform``.

    ``logicle(x) = root(B(y) - x)`` with ``B(y) = a e^(by) - c e^(-dy) - f``: ``T`` maps
    to 1, ``M`` decades of log-like scale, ``W`` decades of quasi-linear region around
    zero and ``A`` extra negative decades. FlowJo workspace ``logicle`` transforms map
    here too. NaN and +-inf map to -1, as in flowutils.

    Parameters
    ----------
    t
        Top of scale ``T`` (FlowKit ``param_t``), > 0.
    w
        Linearisation width ``W`` (FlowKit ``param_w``), ``0 <= W <= M/2``.
    m
        Decades ``M`` (FlowKit ``param_m``), > 0.
    a
        Extra negative decades ``A`` (FlowKit ``param_a``), ``-W <= A <= M - 2W``.
    """

    kind: ClassVar[str] = "logicle"


@dataclass(frozen=True, slots=True)
class HyperlogTransform(_RootTransform):
    """GatingML 2.0 ``hyperlog`` (Bagwell 2005), FlowKit's ``HyperlogTransform``.

    ``hyperlog(x) = root(EH(y) - x)`` with ``EH(y) = a e^(by) + c y - f``; parameters as
    for :class:`LogicleTransform` (``W`` must be > 0). NaN and +-inf map to -1, as in
    flowutils.

    Parameters
    ----------
    t
        Top of scale ``T`` (FlowKit ``param_t``), > 0.
    w
        Linearisation width ``W`` (FlowKit ``param_w``), ``0 < W <= M/2``.
    m
        Decades ``M`` (FlowKit ``param_m``), > 0.
    a
        Extra negative decades ``A`` (FlowKit ``param_a``), ``-W <= A <= M - 2W``.
    """

    kind: ClassVar[str] = "hyperlog"


# -- FlowJo 10 transforms (FlowKit's implementations) ------------------------------------


@dataclass(frozen=True, slots=True)
class WSPLogTransform(Transform):
    """FlowJo 10 ``log`` as FlowKit implements it (FlowKit ``WSPLogTransform``).

    ``(log10(max(x, offset)) - log10(offset)) / decades``: values at or below ``offset``
    map to 0 (``inverse`` of 0 is ``offset``; FlowKit has no inverse, ours is
    ``offset * 10 ** (y * decades)``).

    Parameters
    ----------
    offset
        FlowJo ``offset`` (> 0).
    decades
        FlowJo ``decades`` (> 0).
    """

    kind: ClassVar[str] = "wsp_log"
    _flowkit_prefix: ClassVar[str] = ""

    offset: float
    decades: float

    def __post_init__(self) -> None:
        self._post_init_floats()
        self._require(self.offset > 0, "offset must be > 0")
        self._require(self.decades > 0, "decades must be > 0")

    def _forward(self, x: FloatArray) -> FloatArray:
        return _flowkit_twin(self).apply(x)

    def _backward(self, y: FloatArray) -> FloatArray:
        return np.power(10.0, y * self.decades) * self.offset


@dataclass(frozen=True, slots=True)
class WSPBiexTransform(Transform):
    """FlowJo 10 ``biex`` as FlowKit implements it (FlowKit ``WSPBiexTransform``).

    A 4097-point lookup table from raw values to channel values ``0..4096`` with linear
    interpolation, clamped to ``[0, 4096]`` outside the table. Note the output range is
    0-4096, not 0-1 (FlowJo gate coordinates for biex channels are in this range). Both
    directions are FlowKit's (``scipy.interpolate.interp1d`` over its table).

    Parameters
    ----------
    negative
        FlowJo ``neg`` (extra negative decades; values < 0 act as 0).
    width
        FlowJo ``width`` basis (< 0, e.g. -10 or -100).
    positive
        FlowJo ``pos`` (decades).
    max_value
        FlowJo ``maxRange`` (top of scale).
    """

    kind: ClassVar[str] = "wsp_biex"
    _flowkit_prefix: ClassVar[str] = ""

    negative: float = 0.0
    width: float = -10.0
    positive: float = 4.418540
    max_value: float = 262144.000029

    def __post_init__(self) -> None:
        self._post_init_floats()
        self._require(self.width < 0, "width must be < 0")
        self._require(self.positive > 0, "positive must be > 0")
        self._require(self.max_value > 0, "max_value must be > 0")

    def _forward(self, x: FloatArray) -> FloatArray:
        return _flowkit_twin(self).apply(x)

    def _backward(self, y: FloatArray) -> FloatArray:
        return _flowkit_twin(self).inverse(y)


# -- FlowKit conversion ------------------------------------------------------------------

_CLASSES: tuple[type[Transform], ...] = (
    LinearTransform,
    LogTransform,
    AsinhTransform,
    LogicleTransform,
    HyperlogTransform,
    WSPLogTransform,
    WSPBiexTransform,
)


def from_flowkit(obj: Any) -> Transform:
    """Convert a FlowKit transform object into the equivalent blinaprofile transform.

    Parameters
    ----------
    obj
        An instance of one of ``flowkit.transforms.LinearTransform``, ``LogTransform``,
        ``AsinhTransform``, ``LogicleTransform``, ``HyperlogTransform``,
        ``WSPLogTransform`` or ``WSPBiexTransform``.

    Returns
    -------
    Transform
        The blinaprofile class of the same name, with the same parameters.

    Raises
    ------
    GatingError
        If ``obj`` is of another type (e.g. ``RatioTransform``) or its parameters are
        invalid; the message names the transform.
    """
    from flowkit import transforms as fkt

    for cls in _CLASSES:
        if type(obj) is getattr(fkt, cls.__name__):
            try:
                kwargs = {ours: getattr(obj, fk) for ours, fk in cls._flowkit_names().items()}
            except AttributeError as err:
                raise GatingError(
                    f"FlowKit transform {obj!r} lacks the expected parameter: {err}"
                ) from err
            return cls(**kwargs)
    raise GatingError(
        f"FlowKit transform {obj!r} (type {type(obj).__name__}) is not supported; "
        f"supported types: {', '.join(cls.__name__ for cls in _CLASSES)}"
    )
