"""Reference plans: approved plans per protocol, retrieved by anatomical similarity.

A reference plan keeps what an LLM planner can learn from — the objective terms that produced an
approved plan, its goal results and dose statistics — plus anatomy features of its case (structure
volumes, and how much of each organ at risk lies within 10 mm of the targets). It keeps no case id,
patient name or date: only structure names and numbers.

Retrieval (the paper leaves it as future work) takes the k plans of the same protocol whose
anatomy features are nearest: distance over the log volumes and near-target fractions of the
structures both cases have, with a fixed penalty for each structure only one of them has.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radpilot.case import DERIVED, Grid, StructureKind
from radpilot.cases.derived import expand
from radpilot.errors import ReferencePlanError
from radpilot.evaluation.metrics import DVHTable, PlanDose, compact_dvh_step
from radpilot.evaluation.protocol_check import GoalResult, ProtocolCheck
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.llm.prompts import goals_text, stats_lines

NEAR_MM = 10.0
MISSING_PENALTY = 1.0
REFERENCE_FORMAT = 1


def anatomy_features(grid: Grid, structures: list[tuple[str, str, np.ndarray]]) -> dict[str, float]:
    """``vol:<name>`` (cc) for every structure and ``near:<name>`` (fraction of the organ within
    10 mm of any target) for organs at risk. ``structures`` holds (name, kind, voxel indices)."""
    cc = grid.voxel_volume_cc
    feats: dict[str, float] = {}
    target = np.zeros(grid.num_voxels, dtype=bool)
    for name, kind, idx in structures:
        feats[f"vol:{name}"] = round(float(idx.size * cc), 3)
        if kind == StructureKind.TARGET.value:
            target[idx] = True
    if target.any():
        near = expand(target.reshape(grid.shape), grid, NEAR_MM).ravel()
        for name, kind, idx in structures:
            if kind == StructureKind.OAR.value and idx.size:
                feats[f"near:{name}"] = round(float(near[idx].mean()), 4)
    return feats


def feature_distance(a: dict[str, float], b: dict[str, float]) -> float:
    total = 0.0
    for key in set(a) | set(b):
        if key not in a or key not in b:
            total += MISSING_PENALTY
        elif key.startswith("vol:"):
            total += (math.log1p(a[key]) - math.log1p(b[key])) ** 2
        else:
            total += (a[key] - b[key]) ** 2
    return math.sqrt(total)


@dataclass(frozen=True)
class ReferencePlan:
    protocol: str
    description: str
    features: dict[str, float]
    objectives: list[ObjectiveTerm]
    goals: list[dict[str, Any]]  # GoalResult.to_dict() of the approved plan
    stats: list[dict[str, Any]] = field(default_factory=list)  # StructureStats.to_dict()
    source: str = "shipped"  # shipped | approved
    dvh: dict[str, Any] = field(default_factory=dict)  # DVHTable.to_dict() on a coarse dose step

    @property
    def reference_id(self) -> str:
        body = json.dumps(
            [self.protocol, self.features, [o.to_dict() for o in self.objectives], self.goals],
            sort_keys=True,
        )
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def results_text(self) -> str:
        check = ProtocolCheck([GoalResult.from_dict(g) for g in self.goals])
        lines = [goals_text(check)]
        lines += stats_lines(self.stats)
        if self.dvh:
            lines.append("DVH (% of each structure's volume at or above each dose):")
            lines.append(self.dvh_table().to_text())
        return "\n".join(lines)

    def dvh_table(self) -> DVHTable:
        return DVHTable.from_dict(self.dvh)

    def for_prompt(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "objectives": self.objectives,
            "results": self.results_text(),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": REFERENCE_FORMAT,
            "protocol": self.protocol,
            "description": self.description,
            "features": self.features,
            "objectives": [o.to_dict() for o in self.objectives],
            "goals": self.goals,
            "stats": self.stats,
            "source": self.source,
            "dvh": self.dvh,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReferencePlan:
        try:
            return cls(
                protocol=str(d["protocol"]),
                description=str(d.get("description", "")),
                features={str(k): float(v) for k, v in d["features"].items()},
                objectives=[ObjectiveTerm.from_dict(o) for o in d["objectives"]],
                goals=list(d["goals"]),
                stats=list(d.get("stats", [])),
                source=str(d.get("source", "shipped")),
                dvh=dict(d.get("dvh", {})),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ReferencePlanError(f"malformed reference plan: {exc}") from exc


def reference_dvh(plan: PlanDose, prescription_gy: float) -> dict[str, Any]:
    """A compact DVH for a reference plan: one row per 10 % of the prescription, no derived
    structures."""
    names = [s.name for s in plan.case.structures if s.name not in DERIVED]
    return plan.dvh_table(step_gy=compact_dvh_step(prescription_gy), structures=names).to_dict()


def nearest(
    library: list[ReferencePlan], protocol: str, features: dict[str, float], k: int = 3
) -> list[tuple[ReferencePlan, float]]:
    """The k reference plans of ``protocol`` nearest to ``features`` (closest first)."""
    same = [r for r in library if r.protocol == protocol]
    scored = sorted(
        ((r, feature_distance(features, r.features)) for r in same),
        key=lambda rd: (rd[1], rd[0].reference_id),
    )
    return scored[:k]


def load_library(folder: str | Path) -> list[ReferencePlan]:
    """Every ``*.json`` file in ``folder``: a list of reference plans (or one)."""
    out: list[ReferencePlan] = []
    for p in sorted(Path(folder).glob("*.json")):
        data = json.loads(p.read_text())
        items = data["references"] if isinstance(data, dict) and "references" in data else data
        if isinstance(items, dict):
            items = [items]
        for item in items:
            try:
                out.append(ReferencePlan.from_dict(item))
            except ReferencePlanError as exc:
                raise ReferencePlanError(f"{p}: {exc}") from exc
    return out


def shipped_library_dir() -> Path:
    """The reference plans that ship with RadPilot (``protocols/references``)."""
    return Path(__file__).resolve().parents[2] / "protocols" / "references"
