"""The four services as separate processes on loopback (the launcher behind `radpilot serve`):
load spread over two optimizer replicas, a replica killed mid-job, the orchestrator killed
mid-job and restarted; the evaluator and planner killed mid-job and restarted (the loop waits
for them), a job started while a service is down."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import orchestrator_pb2_grpc
from services.common.auth import BearerToken
from services.launcher import LocalCluster, launch
from tests.paths import REPO_ROOT

PROTOCOLS = REPO_ROOT / "protocols"
IMPOSSIBLE = (
    (PROTOCOLS / "tg119_cshape_harder.yaml").read_text().replace("limit: 10.0", "limit: 0.5")
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("local-cluster")
    c = launch(root / "store", root / "run", optimizer_replicas=2)
    try:
        yield c
    finally:
        c.stop()


def _stub(c: LocalCluster) -> tuple[grpc.Channel, orchestrator_pb2_grpc.OrchestratorServiceStub]:
    raw = grpc.insecure_channel(c.orchestrator)
    return raw, orchestrator_pb2_grpc.OrchestratorServiceStub(
        grpc.intercept_channel(raw, BearerToken(c.token))
    )


def _case(stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> str:
    req = pb.CreateCaseRequest(builtin="analytic-cshape", parameters={"spacing_mm": "8"})
    return stub.CreateCase(iter([req]), timeout=120).case_id


def test_candidates_of_a_round_are_optimised_side_by_side_on_both_replicas(
    cluster: LocalCluster,
) -> None:
    raw, stub = _stub(cluster)
    with raw:
        start = pb.StartPlanningRequest(
            case_id=_case(stub), protocol_yaml=IMPOSSIBLE, max_iterations=3, candidates=2
        )
        job_id = stub.StartPlanning(start, timeout=30).job_id
        events = list(stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=300))
        job = stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    its = list(job.iterations)
    assert [(r.iteration, r.round, r.candidate) for r in its] == [
        (1, 1, 0),
        (2, 2, 0),
        (3, 2, 1),
        (4, 3, 0),
        (5, 3, 1),
    ]
    served = {
        (e.round, e.candidate): e.message.removeprefix("served by ")
        for e in events
        if e.kind == pb.EVENT_KIND_FMO_DONE
    }
    for rnd in (2, 3):  # the two candidates of a round went to different replicas
        assert {served[(rnd, 0)], served[(rnd, 1)]} == {"optimizer-0", "optimizer-1"}
    # the last record of a round carries the next round's candidates
    assert [len(r.proposals) for r in its] == [2, 0, 2, 0, 0]
    assert [list(its[1].objectives), list(its[2].objectives)] == [
        list(p.terms) for p in its[0].proposals
    ]
    assert [list(its[3].objectives), list(its[4].objectives)] == [
        list(p.terms) for p in its[2].proposals
    ]
    started = [e for e in events if e.kind == pb.EVENT_KIND_ITERATION_STARTED]
    assert sorted((e.round, e.candidate) for e in started) == [
        (1, 0),
        (2, 0),
        (2, 1),
        (3, 0),
        (3, 1),
    ]
    _no_duplicate_loop_events(events)


def test_replicas_share_the_work_and_one_may_die(cluster: LocalCluster) -> None:
    raw, stub = _stub(cluster)
    with raw:
        start = pb.StartPlanningRequest(
            case_id=_case(stub), protocol_yaml=IMPOSSIBLE, max_iterations=8
        )
        job_id = stub.StartPlanning(start, timeout=30).job_id
        served, killed_at = [], None
        for e in stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=300):
            if e.kind == pb.EVENT_KIND_FMO_DONE:
                served.append((e.iteration, e.message.removeprefix("served by ")))
                if killed_at is None and len({r for _, r in served}) == 2:
                    cluster.kill("optimizer-0")  # mid-job, without warning
                    killed_at = e.iteration
        job = stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert len(job.iterations) == 8
    assert {r for _, r in served} == {"optimizer-0", "optimizer-1"}
    assert killed_at is not None
    assert all(r == "optimizer-1" for it, r in served if it > killed_at)


def test_orchestrator_killed_mid_job_resumes(cluster: LocalCluster) -> None:
    raw, stub = _stub(cluster)
    with raw:
        start = pb.StartPlanningRequest(
            case_id=_case(stub), protocol_yaml=IMPOSSIBLE, max_iterations=6
        )
        job_id = stub.StartPlanning(start, timeout=30).job_id
        try:
            for e in stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=300):
                if e.kind == pb.EVENT_KIND_PROPOSAL:
                    break
        except grpc.RpcError:
            pass
    cluster.kill("orchestrator")
    cluster.restart("orchestrator")
    raw, stub = _stub(cluster)
    with raw:
        deadline = time.monotonic() + 300
        while True:
            job = stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30)
            if (
                job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED)
                or time.monotonic() > deadline
            ):
                break
            time.sleep(0.2)
        events = _events(stub, job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert [it.iteration for it in job.iterations] == list(range(1, 7))
    _no_duplicate_loop_events(events)  # the resumed iteration does not start twice


def _events(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, job_id: str) -> list[Any]:
    return list(stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=60))


def _no_duplicate_loop_events(events: list[Any]) -> None:
    seen = [(e.kind, e.iteration) for e in events if e.kind != pb.EVENT_KIND_FAILED]
    assert len(seen) == len(set(seen)), f"duplicate events: {seen}"


def _kill_and_restart_during(
    cluster: LocalCluster, service: str, trigger: int, max_iterations: int = 5
) -> None:
    raw, stub = _stub(cluster)
    with raw:
        start = pb.StartPlanningRequest(
            case_id=_case(stub), protocol_yaml=IMPOSSIBLE, max_iterations=max_iterations
        )
        job_id = stub.StartPlanning(start, timeout=30).job_id
        killed = False
        for e in stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=300):
            if not killed and e.kind == trigger and e.iteration == 2:
                cluster.kill(service)  # mid-job: the next step finds it gone
                time.sleep(2.0)
                cluster.restart(service)
                killed = True
        job = stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30)
        events = _events(stub, job_id)
    assert killed
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert [it.iteration for it in job.iterations] == list(range(1, max_iterations + 1))
    _no_duplicate_loop_events(events)


def test_evaluator_killed_mid_job_and_restarted(cluster: LocalCluster) -> None:
    _kill_and_restart_during(cluster, "evaluator", pb.EVENT_KIND_FMO_DONE)


def test_planner_killed_mid_job_and_restarted(cluster: LocalCluster) -> None:
    _kill_and_restart_during(cluster, "planner", pb.EVENT_KIND_EVALUATED)


def test_a_job_started_while_a_service_is_down_waits_for_it(cluster: LocalCluster) -> None:
    raw, stub = _stub(cluster)
    with raw:
        case_id = _case(stub)
        cluster.kill("evaluator")
        start = pb.StartPlanningRequest(case_id=case_id, protocol_yaml=IMPOSSIBLE, max_iterations=2)
        job_id = stub.StartPlanning(start, timeout=30).job_id
        time.sleep(3.0)
        assert (
            stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30).state
            == pb.JOB_STATE_RUNNING
        )
        cluster.restart("evaluator")
        events = _events(stub, job_id)
        job = stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert [it.iteration for it in job.iterations] == [1, 2]
    _no_duplicate_loop_events(events)
