"""Conversions between the core's objects and ``radpilot.v1`` messages."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from radpilot.agents.references import ReferencePlan
from radpilot.agents.step import served_agents
from radpilot.cases.helpers import Helper
from radpilot.evaluation.metrics import DVHTable, StructureStats
from radpilot.evaluation.protocol_check import GoalResult, ProtocolCheck
from radpilot.fmo import ObjectiveTerm
from radpilot.fmo.objectives import ObjectiveError
from radpilot.loop.record import FmoStats, IterationRecord
from radpilot.protocol import ClinicalGoal
from radpilot.v1 import orchestrator_pb2, types_pb2

COMPARATORS = {"<=": types_pb2.COMPARATOR_AT_MOST, ">=": types_pb2.COMPARATOR_AT_LEAST}
COMPARATOR_TEXT = {v: k for k, v in COMPARATORS.items()}


def terms_from_proto(terms: list[types_pb2.ObjectiveTerm]) -> list[ObjectiveTerm]:
    if not terms:
        raise ObjectiveError("objectives is empty: send at least one objective term")
    # proto3 has no null: a parameter of 0 (no kind accepts it) means "not given"
    return [
        ObjectiveTerm(t.structure, t.kind, t.dose_gy, t.weight, t.parameter or None) for t in terms
    ]


def terms_to_proto(terms: list[ObjectiveTerm]) -> list[types_pb2.ObjectiveTerm]:
    return [
        types_pb2.ObjectiveTerm(
            structure=t.structure,
            kind=t.kind,
            dose_gy=t.dose_gy,
            weight=t.weight,
            parameter=t.parameter or 0.0,
        )
        for t in terms
    ]


def helpers_to_proto(helpers: list[Helper]) -> list[types_pb2.HelperStructure]:
    return [
        types_pb2.HelperStructure(
            name=h.name,
            kind=h.kind,
            of=h.of,
            subtract=h.subtract,
            inner_mm=h.inner_mm,
            outer_mm=h.outer_mm,
            margin_mm=h.margin_mm,
        )
        for h in helpers
    ]


def helpers_from_proto(helpers: list[types_pb2.HelperStructure]) -> list[Helper]:
    """Helper definitions (HelperError, i.e. INVALID_ARGUMENT, naming the bad field)."""
    return [
        Helper(h.name, h.kind, h.of, h.subtract, h.inner_mm, h.outer_mm, h.margin_mm)
        for h in helpers
    ]


def fmo_stats_to_proto(stats: FmoStats) -> types_pb2.FmoStats:
    """The one FMO statistics message (fields the proto has; the rest stay in the record)."""
    fields = types_pb2.FmoStats.DESCRIPTOR.fields_by_name
    return types_pb2.FmoStats(**{k: v for k, v in stats.to_json().items() if k in fields})


def fmo_stats_from_proto(m: types_pb2.FmoStats) -> FmoStats:
    return FmoStats.from_json({f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields})


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


def check_from_proto(goals: list[types_pb2.GoalResult]) -> ProtocolCheck:
    return ProtocolCheck([goal_result_from_proto(r) for r in goals])


def record_to_proto(r: IterationRecord) -> orchestrator_pb2.IterationRecord:
    """An iteration record as the API shows it (GetPlanningJob)."""
    return orchestrator_pb2.IterationRecord(
        iteration=r.iteration,
        objectives=terms_to_proto(r.objectives),
        fmo=fmo_stats_to_proto(r.fmo),
        goals=[goal_result_to_proto(g) for g in r.check.results],
        findings=r.findings,
        rationale=r.rationale,
        physician_feedback=r.physician_feedback,
        decision=r.decision,
        llm_decision=r.llm_decision,
        disagreement=r.disagreement,
        llm_calls=[llm_call_to_proto({**c, "iteration": r.iteration}) for c in r.llm_calls],
        reference_ids=r.reference_ids,
        round=r.round,
        candidate=r.candidate,
        proposals=[types_pb2.ParameterSet(terms=terms_to_proto(c)) for c in r.candidates],
        dose_basis=r.dose_basis,
        delivery_json=json.dumps(r.delivery) if r.delivery else "",
        cold_start=r.cold_start,
    )


def stats_to_proto(s: StructureStats | dict[str, Any]) -> types_pb2.StructureStats:
    return types_pb2.StructureStats(**(s if isinstance(s, dict) else s.to_dict()))


def stats_from_proto(m: types_pb2.StructureStats) -> dict[str, Any]:
    """``StructureStats.to_dict()`` of a message."""
    return {f.name: getattr(m, f.name) for f in m.DESCRIPTOR.fields}


def dvh_to_proto(table: DVHTable) -> types_pb2.DvhTable:
    return types_pb2.DvhTable(
        levels_gy=[float(v) for v in table.levels_gy],
        structures=table.structures,
        volume_pct=[float(v) for v in table.volume_pct.ravel()],
    )


def dvh_from_proto(m: types_pb2.DvhTable) -> DVHTable:
    levels = np.asarray(m.levels_gy, dtype=np.float64)
    names = list(m.structures)
    values = np.asarray(m.volume_pct, dtype=np.float64)
    if values.size != levels.size * len(names):
        raise ValueError(
            f"dvh: volume_pct has {values.size} values; expected levels x structures = "
            f"{levels.size} x {len(names)}"
        )
    return DVHTable(levels, names, values.reshape(levels.size, len(names)))


def reference_to_proto(ref: ReferencePlan, distance: float) -> types_pb2.ReferencePlan:
    return types_pb2.ReferencePlan(
        reference_id=ref.reference_id,
        description=ref.description,
        objectives=terms_to_proto(ref.objectives),
        results_text=ref.results_text(),
        distance=distance,
    )


def reference_from_proto(m: types_pb2.ReferencePlan) -> dict[str, Any]:
    """A reference plan as the LLM agents' prompts take it (``ReferencePlan.for_prompt()``)."""
    return {
        "description": m.description,
        "objectives": terms_from_proto(list(m.objectives)) if m.objectives else [],
        "results": m.results_text,
    }


def llm_call_to_proto(c: dict[str, Any]) -> types_pb2.LlmCall:
    """An audit record (``LLMCall.to_dict()``) as a message."""
    return types_pb2.LlmCall(
        iteration=int(c.get("iteration", 0)),
        role=c.get("role", ""),
        model=c.get("model", ""),
        images=int(c.get("images", 0)),
        image_sha256=list(c.get("image_sha256", [])),
        outcome=c.get("outcome", ""),
        validation=c.get("validation", ""),
        error=c.get("error", ""),
        seconds=float(c.get("seconds", 0.0)),
        attempts=int(c.get("attempts", 0)),
        prompt_tokens=int(c.get("prompt_tokens", 0)),
        completion_tokens=int(c.get("completion_tokens", 0)),
        request_json=json.dumps(c.get("request", {}), sort_keys=True),
        response_text=c.get("response_text", ""),
        endpoint=c.get("endpoint", ""),
    )


def llm_call_from_proto(m: types_pb2.LlmCall) -> dict[str, Any]:
    return {
        "iteration": m.iteration,
        "role": m.role,
        "model": m.model,
        "images": m.images,
        "image_sha256": list(m.image_sha256),
        "outcome": m.outcome,
        "validation": m.validation,
        "error": m.error,
        "seconds": m.seconds,
        "attempts": m.attempts,
        "prompt_tokens": m.prompt_tokens,
        "completion_tokens": m.completion_tokens,
        "request": json.loads(m.request_json) if m.request_json else {},
        "response_text": m.response_text,
        "endpoint": m.endpoint,
    }


def llm_capabilities(
    agents: tuple[str, ...], llm: Any, step_budget: Callable[[Any], float]
) -> dict[str, Any]:
    """The fields of a Get*Capabilities answer for a service whose LLM agent is ``llm`` (an
    LLMEvaluator/LLMPlanner, or None without an endpoint)."""
    if llm is None:
        return {"agents": served_agents(agents, False), "llm_configured": False}
    settings = llm.client.settings
    return {
        "agents": served_agents(agents, True),
        "llm_configured": True,
        "llm_step_budget_s": step_budget(settings),
        "llm_model": settings.model,
        "llm_endpoint": settings.describe()["base_url"],
    }
