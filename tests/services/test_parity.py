"""One loop, two wirings: the same case, protocol and agent planned in process and through the
four services (real gRPC on loopback) give the same iterations: objectives and goal values."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.llm.client import LLMClient
from radpilot.loop.inprocess import plan_loop
from radpilot.protocol import load_protocol_text
from radpilot.v1 import orchestrator_pb2 as pb
from tests.doubles.cluster import LLMCluster
from tests.doubles.llm_server import ScriptedLLMServer, scripted_settings
from tests.paths import PROTOCOLS

HARDER = (PROTOCOLS / "tg119_cshape_harder.yaml").read_text()
PARAMS = {"spacing_mm": "8"}


@pytest.fixture(scope="module")
def services(tmp_path_factory, llm_server) -> Iterator[LLMCluster]:
    c = LLMCluster(tmp_path_factory.mktemp("parity"), scripted_settings(llm_server), "")
    try:
        yield c
    finally:
        c.close()


def _remote(c: LLMCluster, agent: str, max_iterations: int) -> list[pb.IterationRecord]:
    req = pb.CreateCaseRequest(builtin="analytic-cshape", parameters=PARAMS)
    case_id = c.stub.CreateCase(iter([req]), timeout=120).case_id
    job_id = c.stub.StartPlanning(
        pb.StartPlanningRequest(
            case_id=case_id,
            protocol_yaml=HARDER,
            max_iterations=max_iterations,
            memory_length=4,
            agent=agent,
        ),
        timeout=30,
    ).job_id
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        job = c.stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30)
        if job.state == pb.JOB_STATE_SUCCEEDED:
            return list(job.iterations)
        assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING), job.error
        time.sleep(0.2)
    raise AssertionError("the job did not finish")


@pytest.mark.parametrize(("agent", "max_iterations"), [("rules", 6), ("bo", 4), ("llm", 3)])
def test_in_process_and_services_give_the_same_iterations(
    services: LLMCluster, llm_server: ScriptedLLMServer, agent: str, max_iterations: int
) -> None:
    remote = _remote(services, agent, max_iterations)
    case = load_builtin("analytic-cshape", CaseStore(services.root / "store"), **PARAMS)
    llm = LLMClient(scripted_settings(llm_server)) if agent == "llm" else None
    local = plan_loop(
        case,
        load_protocol_text(HARDER, "harder"),
        max_iterations=max_iterations,
        memory_length=4,
        agent=agent,
        llm=llm,
    ).iterations
    assert [r.iteration for r in local] == [r.iteration for r in remote]
    for here, there in zip(local, remote, strict=True):
        assert [(o.structure, o.kind) for o in here.objectives] == [
            (o.structure, o.kind) for o in there.objectives
        ]
        for a, b in zip(here.objectives, there.objectives, strict=True):
            assert a.weight == pytest.approx(b.weight, rel=1e-9)
            assert a.dose_gy == pytest.approx(b.dose_gy, rel=1e-9)
        for a, b in zip(here.check.results, there.goals, strict=True):
            assert a.achieved == pytest.approx(b.achieved, abs=1e-6)
            assert a.passed == b.passed
        assert here.decision == there.decision
        assert here.fmo.iterations == there.fmo.iterations
