"""The orchestrator over real gRPC with the other three services: jobs, events, persistence,
resume after a restart, idempotency, feedback, cancel, export, access and bad input."""

from __future__ import annotations

import io
import json
import sqlite3
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import orchestrator_pb2_grpc
from radpilot.wire import to_ndarray
from services.common.auth import BearerToken
from services.evaluator.config import EvaluatorConfig
from services.evaluator.server import serve as serve_evaluator
from services.optimizer.config import OptimizerConfig
from services.optimizer.server import serve as serve_optimizer
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.server import serve as serve_orchestrator
from services.planner.config import PlannerConfig
from services.planner.server import serve as serve_planner
from tests.paths import REPO_ROOT, with_safety

PROTOCOLS = REPO_ROOT / "protocols"
HARDER = (PROTOCOLS / "tg119_cshape_harder.yaml").read_text()
# a core limit no plan can meet: the job runs its whole budget
IMPOSSIBLE = HARDER.replace("limit: 10.0", "limit: 0.5")
TOKEN = "t0ken"


class Cluster:
    def __init__(self, root: Path, **orchestrator: Any) -> None:
        self.root = root
        store = str(root / "store")
        self.workers = [
            serve_optimizer(
                OptimizerConfig(address="127.0.0.1:0", case_store=store, replica=f"o{k}")
            )
            for k in range(2)
        ]
        self.workers.append(
            serve_evaluator(EvaluatorConfig(address="127.0.0.1:0", case_store=store))
        )
        self.workers.append(serve_planner(PlannerConfig(address="127.0.0.1:0")))
        self.config = OrchestratorConfig(
            address="127.0.0.1:0",
            case_store=store,
            optimizers=tuple(f"127.0.0.1:{w.port}" for w in self.workers[:2]),
            evaluator=f"127.0.0.1:{self.workers[2].port}",
            planner=f"127.0.0.1:{self.workers[3].port}",
            **orchestrator,
        )
        self.start_orchestrator()

    def start_orchestrator(self) -> None:
        self.orch = serve_orchestrator(self.config, token=TOKEN)
        self.raw = grpc.insecure_channel(f"127.0.0.1:{self.orch.port}")
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(
            grpc.intercept_channel(self.raw, BearerToken(TOKEN))
        )

    def stop_orchestrator(self) -> None:
        self.raw.close()
        self.orch.stop(1.0)

    def close(self) -> None:
        self.stop_orchestrator()
        for w in self.workers:
            w.stop(1.0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("orch"))
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def case_id(cluster: Cluster) -> str:
    resp = cluster.stub.CreateCase(
        iter([pb.CreateCaseRequest(builtin="analytic-cshape", parameters={"spacing_mm": "8"})]),
        timeout=120,
    )
    assert {"PTV", "Core", "BODY", "NormalTissue"} <= set(resp.structures)
    return resp.case_id


def _wait(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub, job_id: str, timeout: float = 120
) -> pb.GetPlanningJobResponse:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=10)
        if job.state in (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish")


def test_job_runs_streams_events_and_exports(cluster: Cluster, case_id: str) -> None:
    start = pb.StartPlanningRequest(
        case_id=case_id,
        protocol_yaml=HARDER,
        max_iterations=4,
        memory_length=3,
        idempotency_key="k1",
    )
    job_id = cluster.stub.StartPlanning(start, timeout=30).job_id
    assert cluster.stub.StartPlanning(start, timeout=30).job_id == job_id  # idempotent
    events = list(cluster.stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=120))
    kinds = [e.kind for e in events]
    assert kinds[0] == pb.EVENT_KIND_ITERATION_STARTED and kinds[-1] == pb.EVENT_KIND_FINISHED
    assert pb.EVENT_KIND_FMO_DONE in kinds and pb.EVENT_KIND_EVALUATED in kinds
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))
    job = _wait(cluster.stub, job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED
    assert 1 <= len(job.iterations) <= 4 and job.best_iteration >= 1
    assert {it.dose_basis for it in job.iterations} == {"fluence-optimal"}
    assert not any(it.delivery_json for it in job.iterations)
    assert all(it.fmo.iterations > 0 for it in job.iterations)
    bundle = cluster.stub.ExportPlan(pb.ExportPlanRequest(job_id=job_id), timeout=120)
    with zipfile.ZipFile(io.BytesIO(bundle.bundle)) as z:
        names = set(z.namelist())
        summary = json.loads(z.read("summary.json"))
    assert {"report.html", "summary.json", "dvh.png", "dose_axial.png"} <= names
    assert summary["best_iteration"] == job.best_iteration
    # the best plan was leaf-sequenced on an optimizer replica: judged on its deliverable dose,
    # exported as an RT Plan that the RTDOSE references
    assert summary["dose_basis"] == "deliverable", summary["delivery_error"]
    assert {"dicom/RTPLAN.dcm", "delivery.json", "dvh_deliverable.png"} <= names
    assert summary["deliverable"]["total_mu"] > 0
    assert summary["deliverable"]["seconds"] > 0  # the job's time breakdown counts it apart
    assert pb.EVENT_KIND_SEQUENCED in kinds
    # a late watcher replays everything from the store
    again = list(
        cluster.stub.WatchPlanning(
            pb.WatchPlanningRequest(job_id=job_id, from_sequence=2), timeout=30
        )
    )
    assert again[0].sequence == 3 and again[-1].kind == pb.EVENT_KIND_FINISHED


def test_every_iteration_is_judged_as_delivered_through_the_services(
    cluster: Cluster, case_id: str
) -> None:
    start = pb.StartPlanningRequest(
        case_id=case_id,
        protocol_yaml=HARDER + "\ndelivery: {every_iteration: true}\n",
        max_iterations=2,
        memory_length=2,
    )
    job_id = cluster.stub.StartPlanning(start, timeout=30).job_id
    events = list(cluster.stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=120))
    done = [e.message for e in events if e.kind == pb.EVENT_KIND_FMO_DONE]
    assert done and all("judged as delivered" in m for m in done), done
    job = _wait(cluster.stub, job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert all(it.dose_basis == "deliverable" for it in job.iterations)
    assert all(json.loads(it.delivery_json)["segments"] > 0 for it in job.iterations)
    bundle = cluster.stub.ExportPlan(pb.ExportPlanRequest(job_id=job_id), timeout=120)
    with zipfile.ZipFile(io.BytesIO(bundle.bundle)) as z:
        summary = json.loads(z.read("summary.json"))
    per = summary["per_iteration"]
    assert len(per) == len(job.iterations)
    assert all(it["dose_basis"] == "deliverable" and it["delivery"]["segments"] > 0 for it in per)
    assert summary["dose_basis"] == "deliverable" and summary["deliverable"]["total_mu"] > 0


# the shipped protocol's ring (0-10 mm), moved out so that the job builds a helper of its own
RING = "inner_mm: 0, outer_mm: 10}"
assert HARDER.count(RING) == 1
WITH_RING = HARDER.replace(RING, "inner_mm: 8, outer_mm: 24}")


def test_a_protocol_with_a_helper_structure_plans_through_the_services(
    cluster: Cluster, case_id: str
) -> None:
    start = pb.StartPlanningRequest(
        case_id=case_id, protocol_yaml=WITH_RING, max_iterations=2, memory_length=2
    )
    job = _wait(cluster.stub, cluster.stub.StartPlanning(start, timeout=30).job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    assert all(any(t.structure == "PTV_ring" for t in it.objectives) for it in job.iterations)
    assert list((cluster.root / "store" / "cases" / case_id / "helpers").glob("*.npz"))
    bundle = cluster.stub.ExportPlan(pb.ExportPlanRequest(job_id=job.job_id), timeout=120)
    with zipfile.ZipFile(io.BytesIO(bundle.bundle)) as z:
        assert "PTV_ring" in z.read("report.html").decode()
    # a helper built from a structure the case lacks is refused before the job starts
    bad = WITH_RING.replace("of: PTV, inner_mm", "of: Rectum, inner_mm")
    with pytest.raises(grpc.RpcError) as info:
        cluster.stub.StartPlanning(
            pb.StartPlanningRequest(case_id=case_id, protocol_yaml=bad, max_iterations=2),
            timeout=30,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Rectum" in info.value.details()


def test_a_hot_spot_goal_is_worked_on_through_the_services(cluster: Cluster, case_id: str) -> None:
    # a strict limit on the hottest point outside the PTV: the first plan misses it, the rules
    # planner puts a term on the OutsideTargets region, which the optimizer builds from the
    # definition the orchestrator sends
    strict = with_safety(HARDER, "{outside_targets_max_pct: 101, target_max_pct: null}")
    start = pb.StartPlanningRequest(
        case_id=case_id, protocol_yaml=strict, max_iterations=2, memory_length=2
    )
    job = _wait(cluster.stub, cluster.stub.StartPlanning(start, timeout=30).job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    first, second = job.iterations[:2]
    hot = next(g for g in first.goals if g.goal.structure == "OutsideTargets")
    assert hot.goal.metric == "max" and hot.goal.limit == pytest.approx(50.5) and not hot.passed
    assert any(f.startswith("global maximum: ") for f in first.findings)
    assert not any(t.structure == "OutsideTargets" for t in first.objectives)
    assert any(t.structure == "OutsideTargets" for t in second.objectives), second.objectives
    assert "OutsideTargets max <= 50.5 Gy missed" in first.rationale
    bundle = cluster.stub.ExportPlan(pb.ExportPlanRequest(job_id=job.job_id), timeout=120)
    with zipfile.ZipFile(io.BytesIO(bundle.bundle)) as z:
        summary = json.loads(z.read("summary.json"))
    assert summary["safety"]["outside_targets_max_pct"] == 101
    assert [g["structure"] for g in summary["goals"] if g["implicit"]] == ["OutsideTargets"]


def test_orchestrator_restart_resumes_the_job(cluster: Cluster, case_id: str) -> None:
    start = pb.StartPlanningRequest(case_id=case_id, protocol_yaml=IMPOSSIBLE, max_iterations=8)
    job_id = cluster.stub.StartPlanning(start, timeout=30).job_id
    for e in cluster.stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=120):
        if e.kind == pb.EVENT_KIND_PROPOSAL:
            break  # one iteration is stored; stop the orchestrator mid-job
    cluster.stop_orchestrator()
    cluster.start_orchestrator()
    assert job_id in cluster.orch.resumed
    job = _wait(cluster.stub, job_id)
    assert job.state == pb.JOB_STATE_SUCCEEDED
    numbers = [it.iteration for it in job.iterations]
    assert numbers == list(range(1, 9))  # resumed: the whole budget, no iteration repeated or lost
    replicas = {r.fmo.replica for r in cluster.orch.core.jobs.iterations(job_id)}
    assert replicas == {"o0", "o1"}  # round robin over both optimizer replicas


def test_feedback_cancel_and_bad_input(cluster: Cluster, case_id: str) -> None:
    stub = cluster.stub

    def code(fn, req) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as info:
            r = fn(req, timeout=30)
            if hasattr(r, "__iter__") and not hasattr(r, "DESCRIPTOR"):
                list(r)
        return info.value.code(), info.value.details()

    S = pb.StartPlanningRequest
    bad = [
        (
            S(case_id="nope", protocol_yaml=HARDER, max_iterations=3),
            grpc.StatusCode.NOT_FOUND,
            "CreateCase",
        ),
        (
            S(case_id=case_id, protocol_yaml="goals: [", max_iterations=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "YAML",
        ),
        (
            S(
                case_id=case_id,
                protocol_yaml=HARDER.replace("structure: Core", "structure: Rectum"),
                max_iterations=3,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "Rectum",
        ),
        (
            S(
                case_id=case_id,
                protocol_yaml=HARDER.replace("limit: 10.0", "limit: 60.0").replace(
                    'metric: D10, comparator: "<=", limit: 55.0',
                    'metric: D95, comparator: "<=", limit: 40.0',
                ),
                max_iterations=3,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "contradictory",
        ),
        (
            S(
                case_id=case_id,
                protocol_yaml=HARDER.replace("weight: 100.0}", "weight: -1}"),
                max_iterations=3,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "within 0..1e+06",
        ),
        (
            S(case_id=case_id, protocol_yaml=HARDER, max_iterations=0),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_iterations",
        ),
        (
            S(case_id=case_id, protocol_yaml=HARDER, max_iterations=10**6),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_iterations",
        ),
        (
            S(case_id=case_id, protocol_yaml=HARDER, max_iterations=3, agent="gpt"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "unknown agent",
        ),
        (
            S(
                case_id=case_id,
                protocol_yaml=HARDER.replace("weight: 100.0}", "weight: .nan}"),
                max_iterations=3,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "finite",
        ),
        (
            S(
                case_id=case_id,
                protocol_yaml=HARDER.split("objectives:")[0] + "objectives: []\n",
                max_iterations=3,
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "objectives must be a non-empty list",
        ),
        (
            S(case_id=case_id, protocol_yaml=HARDER + "#" * (2 << 20), max_iterations=3),
            grpc.StatusCode.INVALID_ARGUMENT,
            "limited to",
        ),
        (
            S(case_id=case_id, protocol_yaml="#" * (40 << 20), max_iterations=3),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "larger than max",
        ),
    ]
    jobs_before = cluster.orch.core.jobs.job_count()
    for req, want, text in bad:
        got, details = code(stub.StartPlanning, req)
        assert got == want, details
        assert text in details, details
    # no half-written job was left behind by the refused requests
    assert cluster.orch.core.jobs.job_count() == jobs_before
    assert (
        code(stub.CreateCase, iter([pb.CreateCaseRequest(builtin="mars")]))[0]
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code(stub.GetPlanningJob, pb.GetPlanningJobRequest(job_id="none"))[0]
        == grpc.StatusCode.NOT_FOUND
    )
    assert (
        code(stub.WatchPlanning, pb.WatchPlanningRequest(job_id="none"))[0]
        == grpc.StatusCode.NOT_FOUND
    )
    job_id = stub.StartPlanning(
        S(case_id=case_id, protocol_yaml=HARDER, max_iterations=20), timeout=30
    ).job_id
    fb = stub.SubmitFeedback(
        pb.SubmitFeedbackRequest(job_id=job_id, text="spare the core more"), timeout=10
    )
    assert fb.applies_from_iteration >= 1
    assert (
        code(stub.SubmitFeedback, pb.SubmitFeedbackRequest(job_id=job_id, text="  "))[0]
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        stub.CancelPlanning(pb.CancelPlanningRequest(job_id=job_id), timeout=10).state
        == pb.JOB_STATE_CANCELLED
    )
    got, details = code(stub.CancelPlanning, pb.CancelPlanningRequest(job_id=job_id))
    assert got == grpc.StatusCode.FAILED_PRECONDITION and "already cancelled" in details
    assert _wait(stub, job_id).state == pb.JOB_STATE_CANCELLED
    # the public API needs the token; health does not
    plain = orchestrator_pb2_grpc.OrchestratorServiceStub(cluster.raw)
    assert (
        code(plain.GetPlanningJob, pb.GetPlanningJobRequest(job_id=job_id))[0]
        == grpc.StatusCode.UNAUTHENTICATED
    )


def test_a_job_store_of_the_previous_format_is_migrated_and_resumed(
    cluster: Cluster, case_id: str
) -> None:
    """Records written before the typed IterationRecord (fluence inline as hex, 'feedback')
    are rewritten on open, with the fluence moved to the case store, and the job resumes."""
    first = cluster.stub.StartPlanning(
        pb.StartPlanningRequest(case_id=case_id, protocol_yaml=IMPOSSIBLE, max_iterations=3),
        timeout=30,
    ).job_id
    assert _wait(cluster.stub, first).state == pb.JOB_STATE_SUCCEEDED
    record = cluster.orch.core.jobs.iterations(first)[0].to_json()
    fluence = cluster.orch.core.cases.get_artefact(record["fluence"]["path"])
    old = {k: v for k, v in record.items() if k not in ("fluence", "physician_feedback", "stats")}
    old["fluence_hex"] = to_ndarray(fluence).SerializeToString().hex()
    old["feedback"] = ""
    db = cluster.orch.core.jobs
    job, _ = db.create_job(case_id, IMPOSSIBLE, 3, 4, "rules", None)
    cluster.stop_orchestrator()
    raw = sqlite3.connect(str(Path(cluster.config.case_store) / "jobs.sqlite"))
    with raw:
        raw.execute(
            "INSERT INTO iterations (job_id, iteration, record) VALUES (?, 1, ?)",
            (job.job_id, json.dumps(old)),
        )
        raw.execute("UPDATE jobs SET state = 'running' WHERE job_id = ?", (job.job_id,))
    raw.close()
    cluster.start_orchestrator()
    assert job.job_id in cluster.orch.resumed
    done = _wait(cluster.stub, job.job_id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert [it.iteration for it in done.iterations] == [1, 2, 3]
    migrated = cluster.orch.core.jobs.iterations(job.job_id)[0]
    assert migrated.fluence is not None and not migrated.legacy_fluence_hex
    assert np.array_equal(cluster.orch.core.cases.get_artefact(migrated.fluence.path), fluence)
