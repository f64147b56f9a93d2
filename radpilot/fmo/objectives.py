"""Objective kinds for fluence map optimisation, one small class each, registered by name.

Every kind here is a mean squared penalty of a *shaped residual* over a structure's voxels:

    f(d) = w / n * sum_i h(d_i - D)^2,     df/dd_i = 2 w / n * h(d_i - D) * h'(d_i - D) ... (*)

where ``D`` is the objective dose and ``h`` is the identity (squared deviation), ``max(0, r)``
(squared overdose) or ``min(0, r)`` (squared underdose). For these shapes ``h * h' = h``, so (*)
simplifies to ``2 w / n * h``. ``value_and_gradient`` gives both from one shaped residual; the
solver's exact line search works on ``shaped`` and ``slope`` directly. Arrays may be NumPy or
CuPy: the array namespace ``xp`` is passed in, so one code path serves both.

To add a kind: subclass :class:`ObjectiveKind`, implement ``shaped`` and ``slope``, decorate with
``@register("name")``. The solver never branches on kind names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from radpilot.errors import ObjectiveError

_REGISTRY: dict[str, type[ObjectiveKind]] = {}


def register(name: str) -> Any:
    def wrap(cls: type[ObjectiveKind]) -> type[ObjectiveKind]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def objective_kind(name: str) -> ObjectiveKind:
    try:
        return _REGISTRY[name]()
    except KeyError:
        raise ObjectiveError(
            f"unknown objective kind {name!r}; known kinds: {', '.join(sorted(_REGISTRY))}"
        ) from None


def objective_kinds() -> list[str]:
    return sorted(_REGISTRY)


class ObjectiveKind:
    name: ClassVar[str] = ""

    def shaped(self, r: Any, xp: Any) -> Any:
        """h(r): the part of the residual this kind penalises."""
        raise NotImplementedError

    def slope(self, r: Any, xp: Any) -> Any:
        """h'(r): 1 where the penalty is active, 0 elsewhere."""
        raise NotImplementedError

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
        """Both at once, sharing the shaped residual (what the solver calls)."""
        h = self.shaped(dose - dose_gy, xp)
        if n is None:
            n = float(dose.size) if vw is None else float(xp.sum(vw, dtype=xp.float64))
        m = max(n, 1e-12)
        wh = h if vw is None else vw * h
        return weight * float(xp.sum(wh * h, dtype=xp.float64)) / m, (2.0 * weight / m) * wh

    def near_active(self, r: Any, band: float, xp: Any) -> Any:
        """Voxels whose residual is within ``band`` of making the penalty active (a superset)."""
        return self.slope(r + band, xp) + self.slope(r - band, xp) > 0


@register("squared_deviation")
class SquaredDeviation(ObjectiveKind):
    """Penalise any departure from the objective dose (targets)."""

    def shaped(self, r: Any, xp: Any) -> Any:
        return r

    def slope(self, r: Any, xp: Any) -> Any:
        return xp.ones_like(r)


@register("squared_overdose")
class SquaredOverdose(ObjectiveKind):
    """Penalise dose above the objective dose (OARs, target hot spots, spillage)."""

    def shaped(self, r: Any, xp: Any) -> Any:
        return xp.maximum(r, 0)

    def slope(self, r: Any, xp: Any) -> Any:
        return (r > 0).astype(r.dtype)


@register("squared_underdose")
class SquaredUnderdose(ObjectiveKind):
    """Penalise dose below the objective dose (target cold spots)."""

    def shaped(self, r: Any, xp: Any) -> Any:
        return xp.minimum(r, 0)

    def slope(self, r: Any, xp: Any) -> Any:
        return (r < 0).astype(r.dtype)


MAX_WEIGHT = 1e6  # weights span at most 12 orders of magnitude: [0, 1e6]
MAX_OBJECTIVE_DOSE_GY = 300.0  # twice the highest prescription a protocol may have
TERM_FIELDS = ("structure", "kind", "dose_gy", "weight")


@dataclass(frozen=True)
class ObjectiveTerm:
    """One term of the FMO objective: (structure, kind, objective dose in Gy, weight)."""

    structure: str
    kind: str
    dose_gy: float
    weight: float

    def __post_init__(self) -> None:
        if self.kind not in _REGISTRY:
            objective_kind(self.kind)  # raises with the list of known kinds
        if not self.structure:
            raise ObjectiveError("an objective term needs a structure name")
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

    def key(self) -> str:
        """Stable identifier of the term within a protocol: ``structure:kind``."""
        return f"{self.structure}:{self.kind}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "structure": self.structure,
            "kind": self.kind,
            "dose_gy": self.dose_gy,
            "weight": self.weight,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ObjectiveTerm:
        missing = set(TERM_FIELDS) - set(d)
        if missing:
            raise ObjectiveError(f"objective term {d} lacks {sorted(missing)}")
        unknown = set(d) - set(TERM_FIELDS)
        if unknown:
            raise ObjectiveError(
                f"objective term for {d.get('structure')!r} has unknown field(s) "
                f"{sorted(map(str, unknown))}; a term has {', '.join(TERM_FIELDS)}"
            )
        try:
            if isinstance(d["dose_gy"], bool) or isinstance(d["weight"], bool):
                raise TypeError("a boolean is not a number")
            dose, weight = float(d["dose_gy"]), float(d["weight"])
        except (TypeError, ValueError, OverflowError) as exc:
            raise ObjectiveError(f"objective term {d}: dose_gy and weight must be numbers") from exc
        return cls(str(d["structure"]), str(d["kind"]), dose, weight)


def validate_terms(terms: list[ObjectiveTerm]) -> None:
    if not terms:
        raise ObjectiveError("the objective needs at least one term")
    keys = [t.key() for t in terms]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ObjectiveError(f"objective terms repeat structure:kind {dup}; merge them into one")
    if all(t.weight == 0 for t in terms):
        raise ObjectiveError("every objective weight is zero; at least one must be positive")
