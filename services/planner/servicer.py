"""PlannerService: protobuf in, core call, protobuf out."""

from __future__ import annotations

import math

import grpc

from radpilot.agents.llm_planner import step_budget_s
from radpilot.agents.step import PLANNER_AGENTS
from radpilot.agents.types import MemoryEntry
from radpilot.v1 import planner_pb2, planner_pb2_grpc, types_pb2
from services.common.convert import (
    check_from_proto,
    dvh_from_proto,
    llm_call_to_proto,
    llm_capabilities,
    reference_from_proto,
    stats_from_proto,
    terms_from_proto,
    terms_to_proto,
)
from services.common.metrics import observe_llm_calls
from services.planner.core import PlannerCore


class PlannerServicer(planner_pb2_grpc.PlannerServiceServicer):
    def __init__(self, core: PlannerCore | None = None) -> None:
        self.core = core or PlannerCore()

    def GetPlannerCapabilities(
        self, request: planner_pb2.GetPlannerCapabilitiesRequest, context: grpc.ServicerContext
    ) -> planner_pb2.GetPlannerCapabilitiesResponse:
        return planner_pb2.GetPlannerCapabilitiesResponse(
            **llm_capabilities(PLANNER_AGENTS, self.core.llm, step_budget_s)
        )

    def Propose(
        self, request: planner_pb2.ProposeRequest, context: grpc.ServicerContext
    ) -> planner_pb2.ProposeResponse:
        if not request.memory:
            raise ValueError("memory is empty: send at least the last evaluated iteration")
        memory = [
            MemoryEntry(
                m.iteration,
                terms_from_proto(list(m.objectives)),
                check_from_proto(list(m.goals)),
                m.physician_feedback,
                tuple(m.findings),
                tuple(stats_from_proto(st) for st in m.stats),
                dvh_from_proto(m.dvh).to_dict() if m.dvh.structures else {},
                _scale(m.scale_factor),
            )
            for m in request.memory
        ]
        references = [reference_from_proto(r) for r in request.references]
        out = self.core.propose(
            request.agent,
            request.protocol_yaml,
            terms_from_proto(list(request.current)),
            memory,
            references,
            request.physician_feedback,
            request.candidates or 1,
        )
        observe_llm_calls(out.calls)
        return planner_pb2.ProposeResponse(
            objectives=terms_to_proto(out.objectives),
            rationale=out.rationale,
            llm_calls=[llm_call_to_proto(c.to_dict()) for c in out.calls],
            fallback=out.fallback,
            alternatives=[
                types_pb2.ParameterSet(terms=terms_to_proto(a)) for a in out.alternatives
            ],
        )


def _scale(value: float) -> float:
    """A plan's normalisation factor from the wire (0: not sent, taken as 1)."""
    if value == 0:
        return 1.0
    if not (math.isfinite(value) and 0 < value < 1e3):
        raise ValueError(f"memory scale_factor must be a positive finite number, got {value}")
    return float(value)
