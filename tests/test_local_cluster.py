"""The four services as separate processes on loopback (the launcher behind `radpilot serve`):
load spread over two optimizer replicas, a replica killed mid-job, the orchestrator killed
mid-job and restarted."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import orchestrator_pb2_grpc
from services.common.auth import BearerToken
from services.launcher import LocalCluster, launch

PROTOCOLS = Path(__file__).resolve().parent.parent / "protocols"
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
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert [it.iteration for it in job.iterations] == list(range(1, 7))
