"""One orchestrator per job: two orchestrators on one job database, over real gRPC. Each job runs
in exactly one of them; a stopped orchestrator's job is taken over by the other only after its
lease expires, and no iteration is run twice."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import orchestrator_pb2_grpc
from services.common.auth import BearerToken
from services.orchestrator.server import serve as serve_orchestrator
from tests.services.test_orchestrator import IMPOSSIBLE, TOKEN, Cluster, _wait

LEASE_S = 2.0


def _stub(port: int) -> tuple[grpc.Channel, orchestrator_pb2_grpc.OrchestratorServiceStub]:
    raw = grpc.insecure_channel(f"127.0.0.1:{port}")
    return raw, orchestrator_pb2_grpc.OrchestratorServiceStub(
        grpc.intercept_channel(raw, BearerToken(TOKEN))
    )


def _start(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, case_id: str, n: int) -> str:
    req = pb.StartPlanningRequest(case_id=case_id, protocol_yaml=IMPOSSIBLE, max_iterations=n)
    return stub.StartPlanning(req, timeout=30).job_id


def test_two_orchestrators_on_one_database_never_run_the_same_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Cluster(tmp_path, lease_s=LEASE_S)
    second = serve_orchestrator(c.config, token=TOKEN)  # another port, the same job database
    raw, stub_b = _stub(second.port)
    a, b = c.orch.core, second.core
    try:
        assert a.owner != b.owner
        case_id = c.stub.CreateCase(
            iter([pb.CreateCaseRequest(builtin="analytic-cshape", parameters={"spacing_mm": "8"})]),
            timeout=120,
        ).case_id
        jobs = [_start(c.stub, case_id, 3), _start(stub_b, case_id, 3), _start(c.stub, case_id, 3)]
        for job_id in jobs:
            job = _wait(c.stub, job_id)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            assert [it.iteration for it in job.iterations] == [1, 2, 3]
        assert not set(a._threads) & set(b._threads)  # no job ran in both
        assert set(a._threads) | set(b._threads) == set(jobs)

        # the first orchestrator "crashes" mid-job: it stops without releasing its lease
        job_id = _start(c.stub, case_id, 6)
        for e in c.stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=120):
            if e.kind == pb.EVENT_KIND_PROPOSAL:
                break
        monkeypatch.setattr(a.jobs, "release", lambda *args: None)
        a.shutdown()
        lease = b.jobs.lease(job_id)
        assert lease is not None and lease[0] == a.owner
        if time.time() < lease[1] - 0.5:
            assert job_id not in b._threads  # not before the lease expires
        job = _wait(stub_b, job_id)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert job_id in b._threads
        assert [it.iteration for it in job.iterations] == list(range(1, 7))  # none twice or lost
    finally:
        raw.close()
        second.stop(1.0)
        c.close()
