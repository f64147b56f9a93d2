"""Conversions between the core's objects and ``radpilot.v1`` messages."""

from __future__ import annotations

from typing import Any

from radpilot.evaluation.metrics import StructureStats
from radpilot.evaluation.protocol_check import GoalResult
from radpilot.fmo import ObjectiveTerm
from radpilot.fmo.objectives import ObjectiveError
from radpilot.protocol import ClinicalGoal
from radpilot.v1 import types_pb2

COMPARATORS = {"<=": types_pb2.COMPARATOR_AT_MOST, ">=": types_pb2.COMPARATOR_AT_LEAST}
COMPARATOR_TEXT = {v: k for k, v in COMPARATORS.items()}


def terms_from_proto(terms: list[types_pb2.ObjectiveTerm]) -> list[ObjectiveTerm]:
    if not terms:
        raise ObjectiveError("objectives is empty: send at least one objective term")
    return [ObjectiveTerm(t.structure, t.kind, t.dose_gy, t.weight) for t in terms]


def terms_to_proto(terms: list[ObjectiveTerm]) -> list[types_pb2.ObjectiveTerm]:
    return [
        types_pb2.ObjectiveTerm(
            structure=t.structure, kind=t.kind, dose_gy=t.dose_gy, weight=t.weight
        )
        for t in terms
    ]


def fmo_stats_to_proto(stats: dict[str, Any]) -> types_pb2.FmoStats:
    keys = (
        "objective",
        "objective_normalized",
        "iterations",
        "seconds",
        "backend",
        "converged",
        "stop_reason",
        "scale_factor",
        "sparse_products",
    )
    return types_pb2.FmoStats(**{k: stats[k] for k in keys})


def goal_result_to_proto(r: GoalResult) -> types_pb2.GoalResult:
    g = r.goal
    return types_pb2.GoalResult(
        goal=types_pb2.ClinicalGoal(
            structure=g.structure,
            metric=g.metric,
            comparator=COMPARATORS[g.comparator],
            limit=g.limit,
            priority=g.priority,
            hard=g.hard,
        ),
        achieved=r.achieved,
        passed=r.passed,
        margin=r.margin,
    )


def goal_result_from_proto(r: types_pb2.GoalResult) -> GoalResult:
    g = r.goal
    if g.comparator not in COMPARATOR_TEXT:
        raise ValueError(f"goal {g.structure} {g.metric}: comparator is unspecified")
    goal = ClinicalGoal(
        g.structure, g.metric, COMPARATOR_TEXT[g.comparator], g.limit, g.priority or 1, g.hard
    )
    return GoalResult(goal, r.achieved, r.passed, r.margin)


def stats_to_proto(s: StructureStats) -> types_pb2.StructureStats:
    return types_pb2.StructureStats(**s.to_dict())
