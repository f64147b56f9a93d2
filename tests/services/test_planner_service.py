"""The planner service over real gRPC: rule-based proposals and clear refusals."""

from __future__ import annotations

import math
from collections.abc import Iterator

import grpc
import pytest

from radpilot.protocol import load_protocol
from radpilot.v1 import planner_pb2, planner_pb2_grpc, types_pb2
from services.common.convert import terms_to_proto
from services.planner.config import PlannerConfig
from services.planner.server import serve
from tests.paths import REPO_ROOT

PROTOCOL_FILE = REPO_ROOT / "protocols" / "tg119_cshape_harder.yaml"
YAML = PROTOCOL_FILE.read_text()
PROTOCOL = load_protocol(PROTOCOL_FILE)


def _goal(
    structure: str, metric: str, comparator: int, limit: float, achieved: float
) -> types_pb2.GoalResult:
    margin = limit - achieved if comparator == types_pb2.COMPARATOR_AT_MOST else achieved - limit
    return types_pb2.GoalResult(
        goal=types_pb2.ClinicalGoal(
            structure=structure,
            metric=metric,
            comparator=comparator,
            limit=limit,
            priority=2,
            hard=True,
        ),
        achieved=achieved,
        passed=margin >= 0,
        margin=margin,
    )


GOALS = [
    _goal("PTV", "D95", types_pb2.COMPARATOR_AT_LEAST, 50, 50),
    _goal("PTV", "D10", types_pb2.COMPARATOR_AT_MOST, 55, 54),
    _goal("Core", "D10", types_pb2.COMPARATOR_AT_MOST, 10, 12.5),
]


@pytest.fixture(scope="module")
def stub() -> Iterator[planner_pb2_grpc.PlannerServiceStub]:
    running = serve(PlannerConfig(address="127.0.0.1:0"))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield planner_pb2_grpc.PlannerServiceStub(channel)
    finally:
        channel.close()
        running.stop(1.0)


def _request(agent: str = "rules", current=None, memory=True) -> planner_pb2.ProposeRequest:
    current = current if current is not None else terms_to_proto(PROTOCOL.objectives)
    mem = (
        [planner_pb2.IterationMemory(iteration=1, objectives=current, goals=GOALS)]
        if memory
        else []
    )
    return planner_pb2.ProposeRequest(protocol_yaml=YAML, agent=agent, current=current, memory=mem)


def test_rules_proposal_pushes_on_the_missed_goal(stub) -> None:
    resp = stub.Propose(_request(), timeout=30)
    core = next(
        t for t in resp.objectives if t.structure == "Core" and t.kind == "squared_overdose"
    )
    assert core.weight > 100.0 and core.dose_gy < 8.0
    assert "Core D10 <= 10 Gy missed by 2.50 Gy" in resp.rationale
    fixed = stub.Propose(_request("fixed"), timeout=30)
    assert [t.weight for t in fixed.objectives] == [t.weight for t in PROTOCOL.objectives]


def test_refusals(stub) -> None:
    bad_terms = terms_to_proto(PROTOCOL.objectives)
    bad_terms[0].weight = math.nan
    cases = [
        (_request(memory=False), grpc.StatusCode.INVALID_ARGUMENT, "memory is empty"),
        (_request("oracle"), grpc.StatusCode.INVALID_ARGUMENT, "unknown planner agent"),
        (_request("llm"), grpc.StatusCode.FAILED_PRECONDITION, "not configured"),
        (_request(current=bad_terms), grpc.StatusCode.INVALID_ARGUMENT, "finite"),
        (
            planner_pb2.ProposeRequest(
                protocol_yaml="name: x",
                current=terms_to_proto(PROTOCOL.objectives),
                memory=_request().memory,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "missing required field",
        ),
    ]
    for req, code, text in cases:
        with pytest.raises(grpc.RpcError) as info:
            stub.Propose(req, timeout=30)
        assert info.value.code() == code, info.value.details()
        assert text in info.value.details()
