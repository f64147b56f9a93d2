"""Objective kinds for fluence map optimisation, one small class each, registered by name.

Two families share one interface (``value_and_gradient`` for the solver's gradient, ``along`` for
its exact line search, ``near_active`` for its working set). Arrays may be NumPy or CuPy: the array
namespace ``xp`` is passed in, so one code path serves both.

*Voxel penalties* are a mean squared penalty of a shaped residual over a structure's voxels:

    f(d) = w / n * sum_i v_i h(d_i - D)^2,        df/dd_i = 2 w / n * v_i h(d_i - D)

with ``D`` the objective dose, ``v_i`` each voxel's volume fraction and ``h`` the identity (squared
deviation), ``max(0, r)`` (squared overdose) or ``min(0, r)`` (squared underdose); for these shapes
``h h' = h``. The dose-volume kinds (matRad's max-DVH and min-DVH) are voxel penalties whose
shape also depends on ``D_v``, the dose that ``v`` % of the structure's volume receives: max-DVH
("at most v % above D") penalises the voxels between ``D`` and ``D_v``, the ones that would have
to come down for the goal to hold; min-DVH ("at least v % above D") the voxels between ``D_v`` and
``D``. ``D_v`` is held fixed within one gradient and one line search, as matRad does.

*Structure penalties* square the overshoot of one number computed from the whole structure,
``f(d) = w * max(0, s (M(d) - D))^2`` with ``s = +1`` (upper bound) or ``-1`` (lower bound):
the mean dose, the generalised EUD ``(sum_i v_i d_i^a / n)^(1/a)`` and a smooth maximum
``T ln sum_i v_i exp(d_i / T)`` (between the maximum and the maximum + ``T ln N``, so bounding it
bounds the maximum). Their value has the same unit (Gy^2) as the voxel penalties, so weights
compare.

Some kinds take a parameter (``ObjectiveTerm.parameter``): the gEUD exponent ``a``, the DVH
volume in %, the smooth maximum's softness ``T`` in Gy. To add a kind: subclass
:class:`VoxelPenalty` (``shaped`` and ``slope``) or :class:`StructurePenalty` (``measure``),
decorate with ``@register("name")``. The solver never branches on kind names.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp

from radpilot.errors import ObjectiveError

_REGISTRY: dict[str, type[ObjectiveKind]] = {}

LineDerivatives = Callable[[float], tuple[float, float]]


def register(name: str) -> Any:
    def wrap(cls: type[ObjectiveKind]) -> type[ObjectiveKind]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _kind_class(name: str) -> type[ObjectiveKind]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ObjectiveError(
            f"unknown objective kind {name!r}; known kinds: {', '.join(sorted(_REGISTRY))}"
        ) from None


def objective_kind(name: str, parameter: float | None = None) -> ObjectiveKind:
    """An instance of a registered kind (with its parameter, or the kind's default)."""
    cls = _kind_class(name)
    return cls(cls.checked_parameter(parameter))


def kind_of(term: ObjectiveTerm) -> ObjectiveKind:
    return objective_kind(term.kind, term.parameter)


def objective_kinds() -> list[str]:
    return sorted(_REGISTRY)


def kind_class(name: str) -> type[ObjectiveKind]:
    """A registered kind's class: its ``summary`` and ``parameter`` (no parameter checked)."""
    return _kind_class(name)


@dataclass(frozen=True)
class Parameter:
    """What a kind's parameter means and the values it may take."""

    name: str  # what the docs, errors and the LLM prompt call it
    low: float
    high: float
    default: float | None = None  # None: a term of this kind must give it
    low_open: bool = False  # the bound itself is excluded
    high_open: bool = False

    def check(self, kind: str, value: float | None) -> float:
        if value is None:
            if self.default is None:
                raise ObjectiveError(
                    f"objective kind {kind} needs a parameter: {self.name} "
                    f"within {self.describe_range()}"
                )
            return self.default
        ok = math.isfinite(value) and (
            (self.low < value if self.low_open else self.low <= value)
            and (value < self.high if self.high_open else value <= self.high)
        )
        if not ok:
            raise ObjectiveError(
                f"objective kind {kind}: parameter {self.name} must be within "
                f"{self.describe_range()}, got {value}"
            )
        return float(value)

    def describe_range(self) -> str:
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"{left}{self.low:g}, {self.high:g}{right}"


class ObjectiveKind:
    name: ClassVar[str] = ""
    parameter: ClassVar[Parameter | None] = None  # None: the kind takes no parameter
    summary: ClassVar[str] = ""  # one line for the docs and the LLM prompt
    # the value depends on every voxel of the structure (a mean, a percentile): the working set
    # keeps the structure whole
    whole_structure: ClassVar[bool] = False

    def __init__(self, parameter: float | None = None) -> None:
        self.p = parameter

    @classmethod
    def checked_parameter(cls, value: float | None) -> float | None:
        if cls.parameter is None:
            if value is not None:
                raise ObjectiveError(f"objective kind {cls.name} takes no parameter, got {value}")
            return None
        return cls.parameter.check(cls.name, value)

    def bound(self) -> int:
        """+1: an upper bound on dose (lowering dose lowers it), -1: a lower bound, 0: both."""
        return 0

    # ``vw`` is each voxel's volume fraction in the structure (None: whole voxels), so the mean
    # is volume-weighted; ``n`` is the structure's volume in voxels (the mean's denominator). It
    # defaults to the sum of ``vw`` (or ``dose.size``) and differs only when the solver passes a
    # subset of the voxels (the ones that can be active).

    def value(
        self,
        dose: Any,
        dose_gy: float,
        weight: float,
        xp: Any,
        n: float | None = None,
        vw: Any = None,
    ) -> float:
        return self.value_and_gradient(dose, dose_gy, weight, xp, n, vw)[0]

    def value_and_gradient(
        self,
        dose: Any,
        dose_gy: float,
        weight: float,
        xp: Any,
        n: float | None = None,
        vw: Any = None,
    ) -> tuple[float, Any]:
        """Both at once, sharing the intermediate arrays (what the solver calls)."""
        raise NotImplementedError

    def along(
        self,
        dose: Any,
        q: Any,
        dose_gy: float,
        weight: float,
        xp: Any,
        n: float,
        vw: Any = None,
    ) -> LineDerivatives:
        """``t -> (f'(t), f''(t))`` of the value at ``dose + t q`` (the exact line search)."""
        raise NotImplementedError

    def curvature(
        self,
        dose: Any,
        dose_gy: float,
        weight: float,
        xp: Any,
        n: float,
        vw: Any = None,
        band: float = 0.0,
    ) -> Any:
        """The value's second derivative in each voxel's own dose (the Hessian's diagonal in
        dose space, for the warm-start preconditioner), counting a voxel within ``band`` Gy of
        turning active as active; None where the Hessian is not diagonal (structure penalties:
        their curvature is left to the L-BFGS pairs)."""
        return None

    def near_active(self, r: Any, band: float, xp: Any) -> Any:
        """Voxels whose residual ``r = d - D`` is within ``band`` of making the penalty active
        (a superset of those that matter; the working set iterates on them). By default every
        voxel: what a ``whole_structure`` kind needs."""
        return xp.ones(r.shape, dtype=bool)


def _volume(dose: Any, xp: Any, n: float | None, vw: Any) -> float:
    if n is None:
        n = float(dose.size) if vw is None else float(xp.sum(vw, dtype=xp.float64))
    return max(n, 1e-12)


class VoxelPenalty(ObjectiveKind):
    """``w / n * sum_i v_i h(d_i - D)^2``: subclasses give ``h`` (``shaped``) and ``h'``."""

    def shaped(self, r: Any, xp: Any) -> Any:
        """h(r): the part of the residual this kind penalises."""
        raise NotImplementedError

    def slope(self, r: Any, xp: Any) -> Any:
        """h'(r): 1 where the penalty is active, 0 elsewhere."""
        raise NotImplementedError

    def fixed_for(self, dose: Any, xp: Any, n: float, vw: Any) -> Any:
        """What the shape depends on besides the residual, fixed for one evaluation."""
        return None

    def shape(self, r: Any, fixed: Any, xp: Any) -> tuple[Any, Any]:
        return self.shaped(r, xp), self.slope(r, xp)

    def value_and_gradient(
        self,
        dose: Any,
        dose_gy: float,
        weight: float,
        xp: Any,
        n: float | None = None,
        vw: Any = None,
    ) -> tuple[float, Any]:
        m = _volume(dose, xp, n, vw)
        h, _ = self.shape(dose - dose_gy, self.fixed_for(dose, xp, m, vw), xp)
        wh = h if vw is None else vw * h
        return weight * float(xp.sum(wh * h, dtype=xp.float64)) / m, (2.0 * weight / m) * wh

    def along(
        self,
        dose: Any,
        q: Any,
        dose_gy: float,
        weight: float,
        xp: Any,
        n: float,
        vw: Any = None,
    ) -> LineDerivatives:
        # dose is linear along the line, so the value is piecewise quadratic in t
        r = dose - dose_gy
        wq = q if vw is None else vw * q
        c = 2.0 * weight / max(n, 1e-12)
        fixed = self.fixed_for(dose, xp, n, vw)

        def at(t: float) -> tuple[float, float]:
            h, s = self.shape(r + t * q, fixed, xp)
            return (
                c * float(xp.sum(h * wq, dtype=xp.float64)),
                c * float(xp.sum(s * wq * q, dtype=xp.float64)),
            )

        return at

    def curvature(
        self,
        dose: Any,
        dose_gy: float,
        weight: float,
        xp: Any,
        n: float,
        vw: Any = None,
        band: float = 0.0,
    ) -> Any:
        # 2 w / n v_i h'(r_i): h h' = h makes the second derivative of h^2 equal 2 h'
        fixed, r = self.fixed_for(dose, xp, n, vw), dose - dose_gy
        _, s = self.shape(r + band, fixed, xp)
        if band > 0:
            s = xp.maximum(s, self.shape(r - band, fixed, xp)[1])
        c = (2.0 * weight / max(n, 1e-12)) * s
        return c if vw is None else c * vw

    def near_active(self, r: Any, band: float, xp: Any) -> Any:
        if self.whole_structure:
            return super().near_active(r, band, xp)
        return self.slope(r + band, xp) + self.slope(r - band, xp) > 0


@register("squared_deviation")
class SquaredDeviation(VoxelPenalty):
    summary = "pulls every voxel's dose towards dose_gy from both sides (targets)"

    def shaped(self, r: Any, xp: Any) -> Any:
        return r

    def slope(self, r: Any, xp: Any) -> Any:
        return xp.ones_like(r)


@register("squared_overdose")
class SquaredOverdose(VoxelPenalty):
    summary = "penalises dose above dose_gy in every voxel (organs, target hot spots, spillage)"

    def bound(self) -> int:
        return 1

    def shaped(self, r: Any, xp: Any) -> Any:
        return xp.maximum(r, 0)

    def slope(self, r: Any, xp: Any) -> Any:
        return (r > 0).astype(r.dtype)


@register("squared_underdose")
class SquaredUnderdose(VoxelPenalty):
    summary = "penalises dose below dose_gy in every voxel (target cold spots)"

    def bound(self) -> int:
        return -1

    def shaped(self, r: Any, xp: Any) -> Any:
        return xp.minimum(r, 0)

    def slope(self, r: Any, xp: Any) -> Any:
        return (r < 0).astype(r.dtype)


def dose_at_volume_xp(dose: Any, pct: float, xp: Any, n: float, vw: Any = None) -> float:
    """The dose that ``pct`` % of ``n`` voxels' volume receives (at least), on either backend."""
    order = xp.argsort(-dose)
    share = xp.ones_like(dose) if vw is None else vw
    covered = xp.cumsum(share[order], dtype=xp.float64)
    i = int(xp.searchsorted(covered, xp.asarray([pct / 100.0 * n]))[0])
    if i >= dose.size:
        return 0.0  # the voxels present cover less than pct % of the structure
    return float(dose[order[i]])


DVH_VOLUME = Parameter("volume_pct", 0.0, 100.0, low_open=True, high_open=True)


class _DosePercentile(VoxelPenalty):
    """A dose-volume penalty: which voxels count depends on ``D_v`` (the parameter's volume)."""

    parameter = DVH_VOLUME
    whole_structure = True  # D_v is a percentile of the whole structure

    def fixed_for(self, dose: Any, xp: Any, n: float, vw: Any) -> Any:
        # voxels on the penalised side of D_v (fixed within one evaluation)
        d_v = dose_at_volume_xp(dose, float(self.p or 0.0), xp, n, vw)
        return self._side(dose, d_v).astype(dose.dtype)

    def _side(self, dose: Any, d_v: float) -> Any:
        raise NotImplementedError

    def shape(self, r: Any, fixed: Any, xp: Any) -> tuple[Any, Any]:
        return self.shaped(r, xp) * fixed, self.slope(r, xp) * fixed


@register("max_dvh")
class MaxDVH(_DosePercentile, SquaredOverdose):
    summary = (
        "at most parameter % of the volume above dose_gy: penalises the voxels above dose_gy "
        "that lie below the dose the parameter's volume receives"
    )

    def _side(self, dose: Any, d_v: float) -> Any:
        return dose < d_v  # the voxel at D_v completes the volume allowed above


@register("min_dvh")
class MinDVH(_DosePercentile, SquaredUnderdose):
    summary = (
        "at least parameter % of the volume at or above dose_gy: penalises the voxels below "
        "dose_gy that lie above the dose the parameter's volume receives"
    )

    def _side(self, dose: Any, d_v: float) -> Any:
        return dose >= d_v  # the voxel at D_v completes the volume required above


class StructurePenalty(ObjectiveKind):
    """``w * max(0, s (M(d) - D))^2`` for one number ``M`` of the whole structure."""

    whole_structure = True

    def measure(
        self, dose: Any, xp: Any, n: float, vw: Any, q: Any = None
    ) -> tuple[float, Any, float, float]:
        """``M``, ``dM/dd`` per voxel, and along ``q``: ``M'`` and ``M''`` (0, 0 without q)."""
        raise NotImplementedError

    def bound(self) -> int:
        return 1

    def value_and_gradient(
        self,
        dose: Any,
        dose_gy: float,
        weight: float,
        xp: Any,
        n: float | None = None,
        vw: Any = None,
    ) -> tuple[float, Any]:
        m, grad_m, _, _ = self.measure(dose, xp, _volume(dose, xp, n, vw), vw)
        s = self.bound()
        over = max(s * (m - dose_gy), 0.0)
        return weight * over * over, (2.0 * weight * s * over) * grad_m

    def along(
        self,
        dose: Any,
        q: Any,
        dose_gy: float,
        weight: float,
        xp: Any,
        n: float,
        vw: Any = None,
    ) -> LineDerivatives:
        s = self.bound()

        def at(t: float) -> tuple[float, float]:
            m, _, m1, m2 = self.measure(dose + t * q, xp, n, vw, q)
            over = max(s * (m - dose_gy), 0.0)
            active = 1.0 if over > 0 else 0.0
            # f = w over^2: f' = 2 w s over M', f'' = 2 w (active M'^2 + s over M'')
            return 2.0 * weight * s * over * m1, 2.0 * weight * (active * m1 * m1 + s * over * m2)

        return at


@register("mean_dose")
class MeanDose(StructurePenalty):
    summary = "penalises the structure's mean dose above dose_gy"

    def measure(
        self, dose: Any, xp: Any, n: float, vw: Any, q: Any = None
    ) -> tuple[float, Any, float, float]:
        share = xp.ones_like(dose) if vw is None else vw
        m = float(xp.sum(share * dose, dtype=xp.float64)) / n
        m1 = 0.0 if q is None else float(xp.sum(share * q, dtype=xp.float64)) / n
        return m, share / n, m1, 0.0


GEUD_FLOOR_GY = 1e-3  # doses below this count as this (a negative exponent needs d > 0)


@register("geud")
class GeneralisedEUD(StructurePenalty):
    summary = (
        "generalised EUD (sum v d^a / n)^(1/a) with a = parameter: a >= 1 penalises it above "
        "dose_gy (organs: a = 1 is the mean, large a nears the maximum), a <= -1 below dose_gy "
        "(targets)"
    )
    parameter = Parameter("a", -100.0, 100.0)

    @classmethod
    def checked_parameter(cls, value: float | None) -> float | None:
        a = super().checked_parameter(value)
        if a is not None and -1.0 < a < 1.0:
            raise ObjectiveError(
                f"objective kind geud: parameter a must be >= 1 (an upper bound, organs) or "
                f"<= -1 (a lower bound, targets), got {a}"
            )
        return a

    def bound(self) -> int:
        return 1 if (self.p or 1.0) > 0 else -1

    def measure(
        self, dose: Any, xp: Any, n: float, vw: Any, q: Any = None
    ) -> tuple[float, Any, float, float]:
        a = float(self.p or 1.0)
        d = xp.maximum(dose.astype(xp.float64), GEUD_FLOOR_GY)
        share = xp.ones_like(d) if vw is None else vw.astype(xp.float64)
        # scale by the largest (a > 0) or smallest (a < 0) dose so no power overflows
        scale = float(d.max() if a > 0 else d.min())
        u = d / scale
        e = scale * (float(xp.sum(share * u**a)) / n) ** (1.0 / a)
        ratio = d / e
        grad = share / n * ratio ** (a - 1.0)  # dE/dd_i
        if q is None:
            return e, grad, 0.0, 0.0
        qq = q.astype(xp.float64)
        m1 = float(xp.sum(grad * qq))
        s2 = float(xp.sum(share / n * ratio ** (a - 2.0) * qq * qq))
        return e, grad, m1, (a - 1.0) / e * (s2 - m1 * m1)


@register("smooth_max")
class SmoothMax(StructurePenalty):
    summary = (
        "penalises a smooth maximum T ln(sum v exp(d / T)) above dose_gy, T = parameter in Gy "
        "(at least the maximum dose, so it keeps the maximum below dose_gy)"
    )
    parameter = Parameter("softness_gy", 0.05, 20.0, default=1.0)
    whole_structure = False  # see near_active
    REACH = 40.0  # voxels more than REACH x T below the objective dose weigh < e^-40 each

    def measure(
        self, dose: Any, xp: Any, n: float, vw: Any, q: Any = None
    ) -> tuple[float, Any, float, float]:
        temp = float(self.p or 1.0)
        d = dose.astype(xp.float64)
        top = float(d.max())
        e = xp.exp((d - top) / temp)
        if vw is not None:
            e = e * vw
        z = float(xp.sum(e))
        p = e / z  # softmax: dS/dd_i
        s = top + temp * math.log(z)
        if q is None:
            return s, p, 0.0, 0.0
        qq = q.astype(xp.float64)
        m1 = float(xp.sum(p * qq))
        return s, p, m1, (float(xp.sum(p * qq * qq)) - m1 * m1) / temp

    def near_active(self, r: Any, band: float, xp: Any) -> Any:
        # the voxels far below the objective dose hardly move the smooth maximum
        return r > -(band + self.REACH * float(self.p or 1.0))


MAX_WEIGHT = 1e6  # weights span at most 12 orders of magnitude: [0, 1e6]
MAX_OBJECTIVE_DOSE_GY = 300.0  # twice the highest prescription a protocol may have
TERM_FIELDS = ("structure", "kind", "dose_gy", "weight")
ALL_BEAMS = "AllBeams"  # the structure name of fluence-space terms: they act on every beam


class FluencePenalty(ObjectiveKind):
    """A penalty on the fluence itself, not on dose: ``f(x) = w / P * |D x|^2`` for a sparse
    difference operator ``D`` (``P`` rows) built from the case's beam geometry. Its terms name
    the structure ``AllBeams``; their objective dose is not used. The solver adds it to the dose
    terms in beamlet space (host arrays), so both backends share it."""

    fluence_space: ClassVar[bool] = True

    def value_and_gradient_x(self, x: Any, D: Any, weight: float) -> tuple[float, Any]:
        dx = D @ x
        p = max(D.shape[0], 1)
        return weight / p * float(dx @ dx), (2.0 * weight / p) * (D.T @ dx)

    def hessian_x(self, D: Any, weight: float) -> Any:
        """The (constant) Hessian in beamlet space, sparse."""
        return (2.0 * weight / max(D.shape[0], 1)) * (D.T @ D)

    def along_x(self, x: Any, step: Any, D: Any, weight: float) -> tuple[float, float]:
        """(a, b) with f'(t) = a + b t along ``x + t step``."""
        dx, ds = D @ x, D @ step
        p = max(D.shape[0], 1)
        return 2.0 * weight / p * float(dx @ ds), 2.0 * weight / p * float(ds @ ds)


@register("fluence_smoothness")
class FluenceSmoothness(FluencePenalty):
    summary = (
        "mean squared difference between neighbouring beamlets of each beam (along and across "
        "the leaves): smoother fluence, fewer segments and MU after leaf sequencing; only on "
        "the structure AllBeams, with dose_gy 0"
    )


def is_fluence_kind(name: str) -> bool:
    return bool(getattr(_kind_class(name), "fluence_space", False))


def fluence_differences(beams: list[Any]) -> Any:
    """The sparse operator whose rows are ``x_i - x_j`` for every pair of beamlets of one beam
    that are neighbours on its grid (along x and along z); ``beams`` are the case's Beams."""
    rows: list[tuple[int, int]] = []
    start = 0
    for k, b in enumerate(beams):
        if b.beamlets_mm is None or b.bixel_mm <= 0:
            raise ObjectiveError(
                f"fluence_smoothness needs beamlet positions, which beam {k + 1} of this case "
                "lacks (stored before RadPilot kept them): rebuild the case"
            )
        grid = np.rint(b.beamlets_mm / b.bixel_mm).astype(np.int64)
        index = {(int(c), int(r)): j for j, (c, r) in enumerate(grid)}
        for (c, r), j in index.items():
            for other in (index.get((c + 1, r)), index.get((c, r + 1))):
                if other is not None:
                    rows.append((start + j, start + other))
        start += b.num_beamlets
    pairs = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    m = pairs.shape[0]
    data = np.concatenate([np.ones(m), -np.ones(m)])
    pair_rows = np.concatenate([np.arange(m), np.arange(m)])
    cols = np.concatenate([pairs[:, 0], pairs[:, 1]])
    return sp.csr_matrix((data, (pair_rows, cols)), shape=(m, start))


OPTIONAL_TERM_FIELDS = ("parameter",)


@dataclass(frozen=True)
class ObjectiveTerm:
    """One term of the FMO objective: (structure, kind, objective dose in Gy, weight), and the
    kind's parameter where it takes one (filled with the kind's default when omitted)."""

    structure: str
    kind: str
    dose_gy: float
    weight: float
    parameter: float | None = None

    def __post_init__(self) -> None:
        cls = _kind_class(self.kind)  # raises with the list of known kinds
        if not self.structure:
            raise ObjectiveError("an objective term needs a structure name")
        if getattr(cls, "fluence_space", False) != (self.structure == ALL_BEAMS):
            raise ObjectiveError(
                f"{self.kind} on {self.structure!r}: fluence kinds act on the structure "
                f"{ALL_BEAMS!r} (every beam), and {ALL_BEAMS!r} takes only fluence kinds"
            )
        if not (math.isfinite(self.dose_gy) and 0 <= self.dose_gy <= MAX_OBJECTIVE_DOSE_GY):
            raise ObjectiveError(
                f"objective dose for {self.structure} ({self.kind}) must be a finite number "
                f"within 0..{MAX_OBJECTIVE_DOSE_GY:g} Gy, got {self.dose_gy}"
            )
        if not (math.isfinite(self.weight) and 0 <= self.weight <= MAX_WEIGHT):
            raise ObjectiveError(
                f"weight for {self.structure} ({self.kind}) must be a finite number within "
                f"0..{MAX_WEIGHT:g}, got {self.weight}"
            )
        try:
            checked = cls.checked_parameter(self.parameter)
        except ObjectiveError as exc:
            raise ObjectiveError(f"objective term for {self.structure}: {exc}") from None
        object.__setattr__(self, "parameter", checked)

    def key(self) -> str:
        """Stable identifier of the term within a protocol: ``structure:kind``."""
        return f"{self.structure}:{self.kind}"

    def label(self) -> str:
        """One line for reports: ``Rectum max_dvh 40 Gy (volume_pct 30) w=20``."""
        spec = _kind_class(self.kind).parameter
        extra = f" ({spec.name} {self.parameter:g})" if spec and self.parameter is not None else ""
        return f"{self.structure} {self.kind} {self.dose_gy:g} Gy{extra} w={self.weight:g}"

    def with_values(self, dose_gy: float, weight: float) -> ObjectiveTerm:
        """The same term (kind and parameter) with another objective dose and weight."""
        return replace(self, dose_gy=dose_gy, weight=weight)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "structure": self.structure,
            "kind": self.kind,
            "dose_gy": self.dose_gy,
            "weight": self.weight,
        }
        if self.parameter is not None:
            out["parameter"] = self.parameter
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectiveTerm:
        missing = set(TERM_FIELDS) - set(d)
        if missing:
            raise ObjectiveError(f"objective term {d} lacks {sorted(missing)}")
        unknown = set(d) - set(TERM_FIELDS) - set(OPTIONAL_TERM_FIELDS)
        if unknown:
            raise ObjectiveError(
                f"objective term for {d.get('structure')!r} has unknown field(s) "
                f"{sorted(map(str, unknown))}; a term has {', '.join(TERM_FIELDS)} and, for "
                "the kinds that take one, parameter"
            )
        raw_parameter = d.get("parameter")
        try:
            if any(isinstance(d.get(k), bool) for k in ("dose_gy", "weight", "parameter")):
                raise TypeError("a boolean is not a number")
            dose, weight = float(d["dose_gy"]), float(d["weight"])
            parameter = None if raw_parameter is None else float(raw_parameter)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ObjectiveError(
                f"objective term {d}: dose_gy, weight and parameter must be numbers"
            ) from exc
        return cls(str(d["structure"]), str(d["kind"]), dose, weight, parameter)


def validate_terms(terms: list[ObjectiveTerm]) -> None:
    if not terms:
        raise ObjectiveError("the objective needs at least one term")
    keys = [t.key() for t in terms]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ObjectiveError(f"objective terms repeat structure:kind {dup}; merge them into one")
    if all(t.weight == 0 for t in terms):
        raise ObjectiveError("every objective weight is zero; at least one must be positive")
