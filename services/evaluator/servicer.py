"""EvaluatorService: protobuf in, core call, protobuf out. No physics here."""

from __future__ import annotations

import grpc

from radpilot.agents.llm_evaluator import step_budget_s
from radpilot.agents.step import EVALUATOR_AGENTS
from radpilot.evaluation.rules import Decision
from radpilot.v1 import evaluator_pb2, evaluator_pb2_grpc, types_pb2
from services.common.convert import (
    dvh_to_proto,
    goal_result_to_proto,
    llm_call_to_proto,
    llm_capabilities,
    reference_from_proto,
    stats_to_proto,
)
from services.common.metrics import observe_llm_calls
from services.evaluator.core import EvaluatorCore

DECISIONS = {
    Decision.NEEDS_IMPROVEMENT: evaluator_pb2.DECISION_NEEDS_IMPROVEMENT,
    Decision.MEETS_PROTOCOL: evaluator_pb2.DECISION_MEETS_PROTOCOL,
}


class EvaluatorServicer(evaluator_pb2_grpc.EvaluatorServiceServicer):
    def __init__(self, core: EvaluatorCore) -> None:
        self.core = core

    def GetEvaluatorCapabilities(
        self, request: evaluator_pb2.GetEvaluatorCapabilitiesRequest, context: grpc.ServicerContext
    ) -> evaluator_pb2.GetEvaluatorCapabilitiesResponse:
        return evaluator_pb2.GetEvaluatorCapabilitiesResponse(
            **llm_capabilities(EVALUATOR_AGENTS, self.core.llm, step_budget_s)
        )

    def Evaluate(
        self, request: evaluator_pb2.EvaluateRequest, context: grpc.ServicerContext
    ) -> evaluator_pb2.EvaluateResponse:
        if not request.case_id or not request.dose.path:
            raise ValueError(
                "case_id and dose.path are required: send the Optimize response's dose"
            )
        if not request.protocol_yaml.strip():
            raise ValueError("protocol_yaml is empty: send the protocol's YAML text")
        out = self.core.evaluate(
            request.case_id,
            request.dose.path,
            request.dose.sha256,
            request.protocol_yaml,
            request.agent,
            request.include_images,
            references=[reference_from_proto(r) for r in request.references],
            physician=request.physician_feedback,
        )
        ev = out.evaluation
        observe_llm_calls(out.llm_calls)
        return evaluator_pb2.EvaluateResponse(
            decision=DECISIONS[ev.decision],
            goals=[goal_result_to_proto(r) for r in ev.check.results],
            structures=[stats_to_proto(s) for s in out.stats],
            dvh=dvh_to_proto(out.dvh),
            findings=ev.findings,
            images={
                name: types_pb2.ArtefactRef(case_id=request.case_id, path=path, sha256=sha)
                for name, (path, sha) in out.images.items()
            },
            all_hard_goals_met=ev.check.all_hard_passed,
            llm_decision=out.llm_decision,
            disagreement=out.disagreement,
            llm_calls=[llm_call_to_proto(c.to_dict()) for c in out.llm_calls],
        )
