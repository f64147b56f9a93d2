"""Plan metrics: structure statistics, Dx/Vx, HI and CI (GPT-RadPlan Eqs. 2, 3), DVH table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from radpilot.case import NORMAL_TISSUE, OUTSIDE_TARGETS, Case, CaseError, StructureKind
from radpilot.dosimetry import (
    cumulative_dvh,
    dose_at_volume,
    mean_dose,
    metric_value,
)


@dataclass(frozen=True)
class StructureStats:
    name: str
    kind: str
    volume_cc: float
    min_gy: float
    mean_gy: float
    max_gy: float
    d95_gy: float
    d50_gy: float
    d5_gy: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def homogeneity_index(
    target_dose: np.ndarray, prescription_gy: float, weights: np.ndarray | None = None
) -> float:
    """HI = (D5 - D95) / prescription * 100 (Eq. 2), in % of the prescription; 0 is uniform."""
    d5 = dose_at_volume(target_dose, 5, weights)
    return (d5 - dose_at_volume(target_dose, 95, weights)) / prescription_gy * 100


def conformity_index(
    target_dose: np.ndarray,
    body_dose: np.ndarray,
    prescription_gy: float,
    target_weights: np.ndarray | None = None,
    body_weights: np.ndarray | None = None,
) -> float:
    """CI = TV95_PTV^2 / (TV * TV95_Body) (Eq. 3, dimensionless); 1 is ideal.

    TV is the target volume, TV95_PTV the target volume receiving at least 95 % of the
    prescription, TV95_Body the body volume receiving it (``body_dose`` covers the whole body,
    target included). Volumes are voxel fractions summed (equal voxel size).
    """
    level = 0.95 * prescription_gy
    tw = np.ones(target_dose.size) if target_weights is None else target_weights
    bw = np.ones(body_dose.size) if body_weights is None else body_weights
    tv = float(np.sum(tw, dtype=np.float64))
    tv95_ptv = float(np.sum(tw[target_dose >= level], dtype=np.float64))
    tv95_body = float(np.sum(bw[body_dose >= level], dtype=np.float64))
    if tv == 0 or tv95_body == 0:
        return 0.0
    return tv95_ptv**2 / (tv * tv95_body)


# a hot spot: (dose Gy, the voxel centre as (x, y, z) mm, the structures it lies in)
HotSpot = tuple[float, tuple[float, float, float], list[str]]


class PlanDose:
    """A dose on a case, with per-structure access to the voxel doses."""

    def __init__(self, case: Case, dose_rows: np.ndarray) -> None:
        if dose_rows.shape != (case.row_voxels.size,):
            raise CaseError(
                f"dose has {dose_rows.size} values; "
                f"case {case.name} has {case.row_voxels.size} rows"
            )
        self.case = case
        self.dose_rows = np.asarray(dose_rows, dtype=np.float32)
        self._cache: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        # the dose never changes: statistics and DVH tables are computed once, however many
        # readers (evaluator, LLM experts, report) ask for them
        self._stats: list[StructureStats] | None = None
        self._tables: dict[tuple[float | None, tuple[str, ...] | None], DVHTable] = {}
        self._once: dict[str, Any] = {}

    def of(self, structure: str) -> np.ndarray:
        """The structure's dose where dosimetry reads it (``Case.dose_in``)."""
        if structure not in self._cache:
            self._cache[structure] = self.case.dose_in(structure, self.dose_rows)
        return self._cache[structure][0]

    def cube(self) -> np.ndarray:
        return self.case.dose_cube(self.dose_rows)

    def weights(self, structure: str) -> np.ndarray | None:
        """The volume each dose value of ``of`` stands for (in voxels), or None (whole voxels)."""
        self.of(structure)
        return self._cache[structure][1]

    def hottest_outside_targets(self) -> HotSpot | None:
        """The hottest voxel with no volume in any target (inside the external contour, where
        the case has one): (dose Gy, its centre as (x, y, z) mm in the case's frame, the
        organs it lies in); None when every voxel with dose is in a target."""
        if "outside" not in self._once:
            self._once["outside"] = self._hottest(outside_targets=True)
        return self._once["outside"]

    def hottest_point(self) -> HotSpot | None:
        """The global maximum (inside the external contour, where the case has one): (dose Gy,
        its centre as (x, y, z) mm, the targets and organs it lies in)."""
        if "global" not in self._once:
            self._once["global"] = self._hottest(outside_targets=False)
        return self._once["global"]

    def _hottest(self, outside_targets: bool) -> HotSpot | None:
        case = self.case
        ext = case.external
        pool = ext.voxel_indices if ext is not None else case.row_voxels
        targets = [t.voxel_indices for t in case.targets]
        if targets and outside_targets:
            pool = pool[~np.isin(pool, np.concatenate(targets))]
        if pool.size == 0:
            return None
        dose = self.dose_rows[np.searchsorted(case.row_voxels, pool)]
        k = int(np.argmax(dose))
        voxel = int(pool[k])
        z, y, x = case.grid.centre_of(voxel)
        inside = [
            s.name
            for s in case.structures
            if s.kind in (StructureKind.OAR, StructureKind.TARGET)
            and s.name != NORMAL_TISSUE
            and bool(np.isin(voxel, s.voxel_indices))
        ]
        return float(dose[k]), (float(x), float(y), float(z)), inside

    def volume_cc_at_least(self, structure: str, dose_gy: float) -> float:
        """The structure's volume (cc) receiving at least ``dose_gy``."""
        d, w = self.of(structure), self.weights(structure)
        hot = d >= dose_gy
        vox = float(w[hot].sum(dtype=np.float64)) if w is not None else float(hot.sum())
        return vox * self.case.grid.voxel_volume_cc

    def metric(self, structure: str, name: str) -> float:
        if structure == OUTSIDE_TARGETS:  # only its maximum is a goal (the protocol says so)
            if name != "max":
                raise CaseError(f"{OUTSIDE_TARGETS} has a maximum only, not {name}")
            hottest = self.hottest_outside_targets()
            return hottest[0] if hottest is not None else 0.0
        return metric_value(self.of(structure), name, self.weights(structure))

    def stats(self) -> list[StructureStats]:
        if self._stats is None:
            self._stats = self._compute_stats()
        return list(self._stats)

    def reuse_stats(self, stats: list[dict[str, Any]]) -> None:
        """Take statistics an evaluator already computed for this dose (same structures)."""
        if [d.get("name") for d in stats] == self.case.structure_names:
            self._stats = [StructureStats(**d) for d in stats]

    def _compute_stats(self) -> list[StructureStats]:
        out = []
        for s in self.case.structures:
            d, w = self.of(s.name), self.weights(s.name)
            out.append(
                StructureStats(
                    name=s.name,
                    kind=s.kind.value,
                    volume_cc=s.volume_voxels * self.case.grid.voxel_volume_cc,
                    min_gy=float(d.min()),
                    mean_gy=mean_dose(d, w),
                    max_gy=float(d.max()),
                    d95_gy=dose_at_volume(d, 95, w),
                    d50_gy=dose_at_volume(d, 50, w),
                    d5_gy=dose_at_volume(d, 5, w),
                )
            )
        return out

    def target_indices(self) -> dict[str, dict[str, float]]:
        """HI and CI of every target (CI against the external contour, or all rows)."""
        ext = self.case.external
        body = self.of(ext.name) if ext else self.dose_rows
        rx = self.case.prescription_gy
        body_w = self.weights(ext.name) if ext else None
        return {
            t.name: {
                "HI": homogeneity_index(self.of(t.name), rx, self.weights(t.name)),
                "CI": conformity_index(self.of(t.name), body, rx, self.weights(t.name), body_w),
            }
            for t in self.case.targets
        }

    def dvh_curves(self, levels_gy: np.ndarray) -> dict[str, np.ndarray]:
        return {
            s.name: cumulative_dvh(self.of(s.name), levels_gy, self.weights(s.name))
            for s in self.case.structures
        }

    def dvh_table(
        self, step_gy: float | None = None, structures: list[str] | None = None
    ) -> DVHTable:
        """The DVH as a table: rows are dose levels, columns structures, cells % volume >= dose."""
        key = (step_gy, tuple(structures) if structures else None)
        if key not in self._tables:
            self._tables[key] = self._compute_dvh_table(step_gy, structures)
        return self._tables[key]

    def _compute_dvh_table(self, step_gy: float | None, structures: list[str] | None) -> DVHTable:
        names = structures or [s.name for s in self.case.structures]
        top = float(self.dose_rows.max()) if self.dose_rows.size else 0.0
        step = step_gy or max(1.0, round(self.case.prescription_gy / 25.0))
        # up to the first level above the maximum, so every column ends at 0 %
        levels = np.arange(0.0, (np.floor(top / step) + 1.5) * step, step)
        return DVHTable(
            levels,
            names,
            np.stack([cumulative_dvh(self.of(n), levels, self.weights(n)) for n in names], axis=1),
        )


@dataclass
class DVHTable:
    levels_gy: np.ndarray
    structures: list[str]
    volume_pct: np.ndarray  # [level, structure]

    def to_text(self) -> str:
        """Plain-text table (what an LLM evaluator reads): one line per dose level."""
        head = "dose_Gy | " + " | ".join(self.structures)
        lines = [head, "-" * len(head)]
        for i, lvl in enumerate(self.levels_gy):
            cells = " | ".join(f"{v:6.1f}" for v in self.volume_pct[i])
            lines.append(f"{lvl:7.1f} | {cells}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "levels_gy": [float(v) for v in self.levels_gy],
            "volume_pct": {
                s: [round(float(v), 3) for v in self.volume_pct[:, j]]
                for j, s in enumerate(self.structures)
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DVHTable:
        names = list(d.get("volume_pct", {}))
        levels = np.asarray(d.get("levels_gy", []), dtype=np.float64)
        if not names:
            return cls(levels, [], np.zeros((levels.size, 0)))
        return cls(
            levels,
            names,
            np.stack([np.asarray(d["volume_pct"][n], dtype=np.float64) for n in names], axis=1),
        )

    def compact(
        self, prescription_gy: float, skip: tuple[str, ...] = ("NormalTissue",)
    ) -> DVHTable:
        """The same DVH on a coarse step (about a tenth of the prescription; the reference plans'
        step), interpolated between this table's levels: what a planner's memory keeps of a plan.
        """
        step = compact_dvh_step(prescription_gy)
        top = float(self.levels_gy[-1]) if self.levels_gy.size else 0.0
        levels = np.arange(0.0, top + step, step)
        keep = [j for j, n in enumerate(self.structures) if n not in skip]
        cols = [np.interp(levels, self.levels_gy, self.volume_pct[:, j]) for j in keep]
        return DVHTable(
            levels,
            [self.structures[j] for j in keep],
            np.stack(cols, axis=1) if cols else np.zeros((levels.size, 0)),
        )


def compact_dvh_step(prescription_gy: float) -> float:
    """The dose step of compact DVH tables (reference plans, the planner's memory)."""
    return float(max(1.0, round(prescription_gy / 10.0)))
