"""Helper structures: regions a planner draws from the delineated ones to steer the optimiser.

A protocol asks for them (``helpers:``) and objective terms name them like any structure; they
exist for the FMO only (no goal, DVH, image or export uses them). Two kinds:

- ``ring``: the voxels between ``inner_mm`` and ``outer_mm`` from a structure (usually a
  target), outside every target of the case; a term on it holds the dose fall-off (conformity,
  spillage).
- ``minus``: a structure without the voxels within ``margin_mm`` of another: OAR minus PTV
  (+ margin) lets a term spare the organ where it does not overlap the target; target minus
  OAR covers the target where it does not overlap the organ. Each kept voxel keeps its volume
  fraction in the structure it comes from.

Distances are between voxel centres on the dose grid (a Euclidean distance transform with the
grid's spacing). A helper only holds voxels that have rows in the dose influence matrix (the
delineated voxels, the body included where the case has one).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.ndimage import distance_transform_edt

from radpilot.case import Case, CaseError, Structure, StructureKind
from radpilot.errors import HelperError

HELPER_KINDS = ("ring", "minus")
MAX_MARGIN_MM = 100.0
MAX_HELPERS = 32
FIELDS = {
    "ring": ("name", "kind", "of", "inner_mm", "outer_mm"),
    "minus": ("name", "kind", "of", "subtract", "margin_mm"),
}


@dataclass(frozen=True)
class Helper:
    """The definition of one helper structure (what the protocol says; the voxels are built
    from a case by ``build_helper``)."""

    name: str
    kind: str  # ring | minus
    of: str  # ring: the structure it surrounds; minus: the structure kept
    subtract: str = ""  # minus: the structure taken away (grown by margin_mm)
    inner_mm: float = 0.0  # ring: its inner edge, from the surface of ``of``
    outer_mm: float = 0.0  # ring: its outer edge
    margin_mm: float = 0.0  # minus: how far ``subtract`` is grown before it is taken away

    def __post_init__(self) -> None:
        where = f"helper {self.name!r}"
        if not self.name or not self.name.strip():
            raise HelperError("a helper needs a name")
        if self.kind not in HELPER_KINDS:
            raise HelperError(
                f"{where}: kind must be one of {', '.join(HELPER_KINDS)}, got {self.kind!r}"
            )
        if not self.of:
            raise HelperError(f"{where} needs 'of': the structure it is built from")
        for field_name in ("inner_mm", "outer_mm", "margin_mm"):
            v = getattr(self, field_name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and 0 <= v <= MAX_MARGIN_MM):
                raise HelperError(
                    f"{where}: {field_name} is {v!r}; the allowed range is [0, {MAX_MARGIN_MM:g}]"
                )
        if self.kind == "ring":
            if self.subtract or self.margin_mm:
                raise HelperError(f"{where}: a ring has of, inner_mm and outer_mm only")
            if self.outer_mm <= self.inner_mm:
                raise HelperError(
                    f"{where}: outer_mm ({self.outer_mm:g}) must exceed inner_mm "
                    f"({self.inner_mm:g})"
                )
        else:
            if self.inner_mm or self.outer_mm:
                raise HelperError(f"{where}: 'minus' has of, subtract and margin_mm only")
            if not self.subtract:
                raise HelperError(f"{where} needs 'subtract': the structure taken away")
            if self.subtract == self.of:
                raise HelperError(f"{where}: 'of' and 'subtract' name the same structure")

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.of, self.subtract) if self.subtract else (self.of,)

    def describe(self) -> str:
        """One line for people and prompts, e.g. "ring 3-15 mm around PTV"."""
        if self.kind == "ring":
            return f"ring {self.inner_mm:g}-{self.outer_mm:g} mm around {self.of}"
        grown = f" grown by {self.margin_mm:g} mm" if self.margin_mm else ""
        return f"{self.of} minus {self.subtract}{grown}"

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k in FIELDS[self.kind]}

    @classmethod
    def from_dict(cls, raw: Any) -> Helper:
        if not isinstance(raw, dict):
            raise HelperError("a helper must be a mapping: name, kind (ring | minus), of, ...")
        kind = str(raw.get("kind", ""))
        if kind not in FIELDS:
            raise HelperError(
                f"helper {raw.get('name', '?')!r}: kind must be one of {', '.join(HELPER_KINDS)}, "
                f"got {kind or 'none'!r}"
            )
        allowed = FIELDS[kind]
        unknown = sorted(map(str, set(raw) - set(allowed)))
        if unknown:
            raise HelperError(
                f"helper {raw.get('name', '?')!r} ({kind or 'no kind'}) has unknown field(s) "
                f"{unknown}; it takes {', '.join(allowed)}"
            )

        def num(key: str) -> float:
            v = raw.get(key, 0.0)
            if isinstance(v, bool):
                raise HelperError(f"helper {raw.get('name', '?')!r}: {key} must be a number")
            try:
                return float(v)
            except (TypeError, ValueError):
                raise HelperError(
                    f"helper {raw.get('name', '?')!r}: {key} must be a number, got {v!r}"
                ) from None

        return cls(
            name=str(raw.get("name", "")).strip(),
            kind=kind,
            of=str(raw.get("of", "")),
            subtract=str(raw.get("subtract", "")),
            inner_mm=num("inner_mm"),
            outer_mm=num("outer_mm"),
            margin_mm=num("margin_mm"),
        )

    def key(self) -> str:
        """A short id of the definition (the case store caches built helpers under it)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:20]


def check_helpers(helpers: list[Helper], structure_names: set[str]) -> None:
    """Names unique and distinct from the case's structures; sources are case structures."""
    if len(helpers) > MAX_HELPERS:
        raise HelperError(f"{len(helpers)} helpers; at most {MAX_HELPERS}")
    seen: set[str] = set()
    for h in helpers:
        if h.name in seen:
            raise HelperError(f"two helpers are named {h.name!r}")
        seen.add(h.name)
        if h.name in structure_names:
            raise HelperError(
                f"helper {h.name!r} has the name of a structure of the case: rename the helper"
            )
        missing = [s for s in h.sources if s not in structure_names]
        if missing:
            raise HelperError(
                f"helper {h.name!r} is built from {missing}, which the case lacks; "
                f"it has {sorted(structure_names)}"
            )


def _mask(case: Case, name: str) -> np.ndarray:
    return case.structure(name).mask(case.grid)


def build_helper(case: Case, helper: Helper) -> Structure:
    """The helper's voxels on the case's dose grid (raises CaseError when it is empty)."""
    check_helpers([helper], set(case.structure_names))
    grid = case.grid
    if helper.kind == "ring":
        source = _mask(case, helper.of)
        dist = distance_transform_edt(~source, sampling=grid.spacing_mm)
        ring = (dist > helper.inner_mm) & (dist <= helper.outer_mm)
        for t in case.targets:
            ring.flat[t.voxel_indices] = False
        voxels = np.flatnonzero(ring)
        voxels = voxels[np.isin(voxels, case.row_voxels, assume_unique=True)]
        weights = None
        kind = StructureKind.OAR
    else:
        of = case.structure(helper.of)
        away = _mask(case, helper.subtract)
        if helper.margin_mm > 0:
            away = distance_transform_edt(~away, sampling=grid.spacing_mm) <= helper.margin_mm
        keep = ~away.ravel()[of.voxel_indices]
        voxels = of.voxel_indices[keep]
        weights = of.weights[keep] if of.weights is not None else None
        kind = of.kind if of.kind is not StructureKind.EXTERNAL else StructureKind.OAR
    if voxels.size == 0:
        raise CaseError(
            f"helper {helper.name!r} ({helper.describe()}) is empty on the dose grid of case "
            f"{case.name!r}: change its margins"
        )
    return Structure(helper.name, kind, voxels.astype(np.int64), weights)


def referenced(helpers: list[Helper], structures: set[str]) -> list[Helper]:
    """The helpers among ``helpers`` that ``structures`` (terms' structure names) name."""
    return [h for h in helpers if h.name in structures]
