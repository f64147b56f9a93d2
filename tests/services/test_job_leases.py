"""One orchestrator per job: two orchestrators on one job database, over real gRPC. Each job runs
in exactly one of them; a stopped orchestrator's job is taken over by the other only after its
lease expires, and no iteration is run twice. An orchestrator too slow to renew its lease loses
the job, and its late writes are refused (the lease fences the job store)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from radpilot.evaluation.protocol_check import ProtocolCheck
from radpilot.loop.record import FmoStats, IterationRecord
from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import orchestrator_pb2_grpc
from services.common.auth import BearerToken
from services.orchestrator.server import serve as serve_orchestrator
from services.orchestrator.store import JobStore, LeaseLostError
from tests.services.test_orchestrator import IMPOSSIBLE, TOKEN, Cluster, _wait

LEASE_S = 4.0  # renewed every 1.3 s: a loaded 2-core machine can stall a thread 2 s
WAIT_S = 400.0  # jobs run side by side in one process, beside another test worker: no hurry


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
        jobs = [_start(c.stub, case_id, 2), _start(stub_b, case_id, 2), _start(c.stub, case_id, 2)]
        for job_id in jobs:
            job = _wait(c.stub, job_id, WAIT_S)
            assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
            assert [it.iteration for it in job.iterations] == [1, 2]
        assert not set(a._threads) & set(b._threads)  # no job ran in both
        assert set(a._threads) | set(b._threads) == set(jobs)

        # the first orchestrator "crashes" mid-job: it stops without releasing its lease
        job_id = _start(c.stub, case_id, 4)
        for e in c.stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=WAIT_S):
            if e.kind == pb.EVENT_KIND_PROPOSAL:
                break
        monkeypatch.setattr(a.jobs, "release", lambda *args: None)
        a.shutdown()
        lease = b.jobs.lease(job_id)
        assert lease is not None and lease[0] == a.owner
        if time.time() < lease[1] - 0.5:
            assert job_id not in b._threads  # not before the lease expires
        job = _wait(stub_b, job_id, WAIT_S)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert job_id in b._threads
        assert [it.iteration for it in job.iterations] == [1, 2, 3, 4]  # none twice or lost
    finally:
        raw.close()
        second.stop(1.0)
        c.close()


def test_once_another_orchestrator_takes_a_job_the_first_can_no_longer_write_to_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "jobs.db"
    a, b = JobStore(path), JobStore(path)  # two orchestrators' connections to one database
    job, _ = a.create_job("case-1", "protocol", 3, 2, "rules", None)
    record = IterationRecord(1, [], FmoStats(), ProtocolCheck([]))
    assert a.claim(job.job_id, "orch-a", 0.05) == ""
    a.add_event(job.job_id, {"kind": "iteration_started", "iteration": 1}, owner="orch-a")
    time.sleep(0.1)  # orch-a's lease expires unrenewed; nobody else wants the job yet
    a.add_iteration(job.job_id, record, {"kind": "proposal", "iteration": 1}, "orch-a")

    assert b.claim(job.job_id, "orch-b", 30.0) == ""  # expired: orch-b takes the job over
    before = b.events_since(job.job_id, 0)
    late = IterationRecord(2, [], FmoStats(), ProtocolCheck([]))
    writes = [
        lambda: a.add_iteration(job.job_id, late, {"kind": "proposal", "iteration": 2}, "orch-a"),
        lambda: a.add_event(job.job_id, {"kind": "fmo_done", "iteration": 2}, owner="orch-a"),
        lambda: a.set_state(job.job_id, "failed", error="late", owner="orch-a"),
        lambda: a.set_delivery(job.job_id, 1, {"segments": 1}, None, owner="orch-a"),
    ]
    for write in writes:
        with pytest.raises(LeaseLostError, match="orch-b"):
            write()
    assert [r.iteration for r in b.iterations(job.job_id)] == [1]  # nothing of orch-a's kept
    assert b.events_since(job.job_id, 0) == before
    assert b.job(job.job_id).state == "queued" and b.delivery(job.job_id) is None

    b.add_iteration(job.job_id, late, {"kind": "proposal", "iteration": 2}, "orch-b")
    a.set_state(job.job_id, "cancelled")  # a request, not a job's run: never fenced
    assert b.job(job.job_id).state == "cancelled"
    # the run's last step ends after the cancel: the job stays cancelled, no event is added
    events = b.events_since(job.job_id, 0)
    assert not b.set_state(job.job_id, "succeeded", best_iteration=2, owner="orch-b")
    assert not b.set_state(job.job_id, "failed", error="late", owner="orch-b")
    assert b.job(job.job_id).state == "cancelled" and b.events_since(job.job_id, 0) == events
    assert [r.iteration for r in a.iterations(job.job_id)] == [1, 2]

    other, _ = a.create_job("case-1", "protocol", 3, 2, "rules", None)
    assert b.claim(other.job_id, "orch-b", 30.0) == ""
    assert b.set_state(other.job_id, "succeeded", best_iteration=1, owner="orch-b")
    assert a.job(other.job_id).state == "succeeded"


def test_an_orchestrator_that_stops_renewing_loses_the_job_and_writes_nothing_more(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = Cluster(tmp_path, lease_s=LEASE_S)
    a = c.orch.core
    second = raw = None
    try:
        case_id = c.stub.CreateCase(
            iter([pb.CreateCaseRequest(builtin="analytic-cshape", parameters={"spacing_mm": "8"})]),
            timeout=120,
        ).case_id
        job_id = _start(c.stub, case_id, 4)
        for e in c.stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=WAIT_S):
            if e.kind == pb.EVENT_KIND_PROPOSAL:
                break
        # the first orchestrator stalls: its lease keeper stops renewing, and its job thread
        # makes its next write only once the second orchestrator has taken the job over
        monkeypatch.setattr(a.jobs, "renew", lambda *args: [])
        taken, refused = threading.Event(), []
        add_event = a.jobs.add_event

        def late(job: str, event: dict[str, Any], **kw: Any) -> bool:
            if job == job_id and not taken.is_set():
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline and not taken.is_set():
                    lease = a.jobs.lease(job_id)
                    if lease is not None and lease[0] != a.owner:
                        taken.set()
                    time.sleep(0.05)
                try:
                    return add_event(job, event, **kw)
                except LeaseLostError as exc:
                    refused.append(str(exc))
                    raise
            return add_event(job, event, **kw)

        monkeypatch.setattr(a.jobs, "add_event", late)
        second = serve_orchestrator(c.config, token=TOKEN)
        raw, stub_b = _stub(second.port)
        job = _wait(stub_b, job_id, WAIT_S)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert taken.is_set() and refused and second.core.owner in refused[0]
        assert [it.iteration for it in job.iterations] == [1, 2, 3, 4]  # none twice or lost
        assert job_id in second.core._threads
        a._threads[job_id].join(30)
        assert not a._threads[job_id].is_alive()  # the first stopped at its refused write
        watch = pb.WatchPlanningRequest(job_id=job_id)
        kinds = [e.kind for e in stub_b.WatchPlanning(watch, timeout=30)]
        assert pb.EVENT_KIND_FAILED not in kinds and kinds.count(pb.EVENT_KIND_FINISHED) == 1
    finally:
        if raw is not None:
            raw.close()
        if second is not None:
            second.stop(1.0)
        c.close()
