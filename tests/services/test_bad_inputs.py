"""The bad-input and fault suite: every kind of bad value a careless client or an attacker sends,
over real sockets to all four services. Each must be refused at the door with the status that
names the fault (never OK and a failure later, never INTERNAL/UNKNOWN), nothing may be left
behind, and every service stays SERVING. The run prints its counts (tests/conftest.py)."""

from __future__ import annotations

import io
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pydicom
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from radpilot.v1 import (
    evaluator_pb2,
    evaluator_pb2_grpc,
    optimizer_pb2,
    optimizer_pb2_grpc,
    orchestrator_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    types_pb2,
)
from radpilot.v1 import orchestrator_pb2 as pb
from services.common.auth import BearerToken
from services.evaluator.config import EvaluatorConfig
from services.evaluator.server import serve as serve_evaluator
from services.optimizer.config import OptimizerConfig
from services.optimizer.server import serve as serve_optimizer
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.server import serve as serve_orchestrator
from services.planner.config import PlannerConfig
from services.planner.server import serve as serve_planner
from tests.conftest import BAD_INPUT_PROPERTY
from tests.doubles.dicom_data import write_patient
from tests.paths import PROTOCOLS

TOKEN = "bad-input-t0ken"
HARDER = (PROTOCOLS / "tg119_cshape_harder.yaml").read_text()
C = grpc.StatusCode
CLIENT_ERRORS = {
    C.INVALID_ARGUMENT,
    C.NOT_FOUND,
    C.FAILED_PRECONDITION,
    C.ALREADY_EXISTS,
    C.OUT_OF_RANGE,
    C.RESOURCE_EXHAUSTED,
}


@dataclass
class Services:
    root: Path
    servers: dict[str, Any]
    channels: list[grpc.Channel]
    orch: orchestrator_pb2_grpc.OrchestratorServiceStub
    opt: optimizer_pb2_grpc.OptimizerServiceStub
    ev: evaluator_pb2_grpc.EvaluatorServiceStub
    plan: planner_pb2_grpc.PlannerServiceStub
    case_id: str = ""
    job_id: str = ""

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.servers[name].port}"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    root = tmp_path_factory.mktemp("bad-inputs")
    store = str(root / "store")
    servers: dict[str, Any] = {
        "optimizer": serve_optimizer(
            OptimizerConfig(address="127.0.0.1:0", case_store=store, replica="o0"), token=TOKEN
        ),
        "evaluator": serve_evaluator(
            EvaluatorConfig(address="127.0.0.1:0", case_store=store), token=TOKEN
        ),
        "planner": serve_planner(PlannerConfig(address="127.0.0.1:0"), token=TOKEN),
    }
    servers["orchestrator"] = serve_orchestrator(
        OrchestratorConfig(
            address="127.0.0.1:0",
            case_store=store,
            optimizers=(f"127.0.0.1:{servers['optimizer'].port}",),
            evaluator=f"127.0.0.1:{servers['evaluator'].port}",
            planner=f"127.0.0.1:{servers['planner'].port}",
        ),
        token=TOKEN,
    )
    channels = {
        name: grpc.intercept_channel(
            grpc.insecure_channel(f"127.0.0.1:{s.port}"), BearerToken(TOKEN)
        )
        for name, s in servers.items()
    }
    s = Services(
        root,
        servers,
        list(channels.values()),
        orchestrator_pb2_grpc.OrchestratorServiceStub(channels["orchestrator"]),
        optimizer_pb2_grpc.OptimizerServiceStub(channels["optimizer"]),
        evaluator_pb2_grpc.EvaluatorServiceStub(channels["evaluator"]),
        planner_pb2_grpc.PlannerServiceStub(channels["planner"]),
    )
    s.case_id = s.orch.CreateCase(
        iter([pb.CreateCaseRequest(builtin="analytic-cshape", parameters={"spacing_mm": "8"})]),
        timeout=120,
    ).case_id
    job = pb.StartPlanningRequest(
        case_id=s.case_id, protocol_yaml=HARDER, max_iterations=1, idempotency_key="key-1"
    )
    s.job_id = s.orch.StartPlanning(job, timeout=30).job_id
    for _ in s.orch.WatchPlanning(pb.WatchPlanningRequest(job_id=s.job_id), timeout=120):
        pass
    try:
        yield s
    finally:
        for ch in s.channels:
            ch.close()
        for server in servers.values():
            server.stop(1.0)


def _protocol(old: str, new: str) -> str:
    assert old in HARDER, old
    return HARDER.replace(old, new, 1)


def _start(s: Services, **fields: Any) -> Any:
    req = {"case_id": s.case_id, "protocol_yaml": HARDER, "max_iterations": 2, **fields}
    return s.orch.StartPlanning(pb.StartPlanningRequest(**req), timeout=30)


def _case(s: Services, *messages: pb.CreateCaseRequest) -> Any:
    return s.orch.CreateCase(iter(messages), timeout=120)


def _builtin(s: Services, **params: str) -> Any:
    return _case(s, pb.CreateCaseRequest(builtin="analytic-cshape", parameters=params))


def _zip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def _truncated_ct_zip(folder: Path) -> bytes:
    write_patient(folder)
    ct = sorted(p for p in folder.iterdir() if p.name.startswith("IMG"))[2]
    ds = pydicom.dcmread(ct)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(ct)
    return _zip({p.name: p.read_bytes() for p in folder.iterdir()})


def _term(**kw: Any) -> types_pb2.ObjectiveTerm:
    base = {"structure": "PTV", "kind": "squared_deviation", "dose_gy": 50.0, "weight": 1.0}
    return types_pb2.ObjectiveTerm(**{**base, **kw})


OBJ_LINE = "kind: squared_deviation, dose_gy: 50.0, weight: 100.0}"
ALIAS_BOMB = "intent: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"z{k}: &z{k} [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n" for k in range(6)
)


def bad_inputs(s: Services, tmp: Path) -> list[tuple[str, Callable[[], Any], grpc.StatusCode]]:
    """(what, the call, the status that names the fault)."""
    IA, NF, FP = C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION
    opt = optimizer_pb2.OptimizeRequest
    return [
        # -- StartPlanning: the protocol ---------------------------------------------------
        ("objective dose 0", lambda: _start(s, protocol_yaml=_protocol(OBJ_LINE, OBJ_LINE.replace("50.0", "0"))), IA),
        ("objective dose 1e308", lambda: _start(s, protocol_yaml=_protocol(OBJ_LINE, OBJ_LINE.replace("50.0", "1e308"))), IA),
        ("objective dose above 2x Rx", lambda: _start(s, protocol_yaml=_protocol(OBJ_LINE, OBJ_LINE.replace("50.0", "101"))), IA),
        ("weight 1e308", lambda: _start(s, protocol_yaml=_protocol(OBJ_LINE, OBJ_LINE.replace("100.0", "1e308"))), IA),
        ("negative weight", lambda: _start(s, protocol_yaml=_protocol(OBJ_LINE, OBJ_LINE.replace("100.0", "-1"))), IA),
        ("prescription 1e308", lambda: _start(s, protocol_yaml=_protocol("dose_gy: 50.0\n", "dose_gy: 1e308\n")), IA),
        ("prescription 0", lambda: _start(s, protocol_yaml=_protocol("dose_gy: 50.0\n", "dose_gy: 0\n")), IA),
        ("coverage 100", lambda: _start(s, protocol_yaml=_protocol("coverage_pct: 95", "coverage_pct: 100")), IA),
        ("unknown field in an objective", lambda: _start(s, protocol_yaml=_protocol(OBJ_LINE, OBJ_LINE[:-1] + ", shape: 2}")), IA),
        ("unknown top-level field", lambda: _start(s, protocol_yaml=HARDER + "extra: 1\n"), IA),
        ("unknown prescription field", lambda: _start(s, protocol_yaml=_protocol("coverage_pct: 95", "coverage_pct: 95\n  boost: 1")), IA),
        ("nested 100,000 levels", lambda: _start(s, protocol_yaml=HARDER + "x: " + "[" * 100_000 + "]" * 100_000), IA),
        ("YAML alias bomb", lambda: _start(s, protocol_yaml=HARDER.replace("intent:", "old_intent:") + ALIAS_BOMB), IA),
        ("protocol over 1 MiB", lambda: _start(s, protocol_yaml=HARDER + "#" + "x" * (1 << 20) + "\n"), IA),
        ("not YAML", lambda: _start(s, protocol_yaml="name: [unclosed"), IA),
        ("empty protocol", lambda: _start(s, protocol_yaml=""), IA),
        ("goal limit 1e308", lambda: _start(s, protocol_yaml=_protocol("limit: 10.0", "limit: 1e308")), IA),
        ("unknown structure", lambda: _start(s, protocol_yaml=_protocol("structure: Core", "structure: Liver")), IA),
        # -- StartPlanning: the job's numbers --------------------------------------------
        ("max_iterations 0", lambda: _start(s, max_iterations=0), IA),
        ("max_iterations 1,000,000", lambda: _start(s, max_iterations=1_000_000), IA),
        ("max_iterations -1", lambda: _start(s, max_iterations=-1), IA),
        ("memory_length 1000", lambda: _start(s, memory_length=1000), IA),
        ("candidates 99", lambda: _start(s, candidates=99), IA),
        ("candidates -1", lambda: _start(s, candidates=-1), IA),
        ("unknown agent", lambda: _start(s, agent="gpt"), IA),
        ("physician feedback of 20,000 characters", lambda: _start(s, physician_feedback="x" * 20000), IA),
        ("llm agent without an endpoint", lambda: _start(s, agent="llm"), FP),
        ("empty case id", lambda: _start(s, case_id=""), IA),
        ("unknown case id", lambda: _start(s, case_id="nope-123"), NF),
        ("path in a case id", lambda: _start(s, case_id="../../etc"), NF),
        ("idempotency key reused for another request", lambda: _start(s, max_iterations=3, idempotency_key="key-1"), C.ALREADY_EXISTS),
        # -- CreateCase --------------------------------------------------------------------
        ("spacing_mm 0", lambda: _builtin(s, spacing_mm="0"), IA),
        ("spacing_mm 1e308", lambda: _builtin(s, spacing_mm="1e308"), IA),
        ("spacing_mm inf", lambda: _builtin(s, spacing_mm="inf"), IA),
        ("spacing_mm nan", lambda: _builtin(s, spacing_mm="nan"), IA),
        ("spacing_mm -5", lambda: _builtin(s, spacing_mm="-5"), IA),
        ("spacing_mm 0.1 (a huge grid)", lambda: _builtin(s, spacing_mm="0.1"), IA),
        ("bixel_mm 0", lambda: _builtin(s, bixel_mm="0"), IA),
        ("num_beams 0", lambda: _builtin(s, num_beams="0"), IA),
        ("num_beams 1000", lambda: _builtin(s, num_beams="1000"), IA),
        ("num_beams abc", lambda: _builtin(s, num_beams="abc"), IA),
        ("unknown case parameter", lambda: _builtin(s, colour="red"), IA),
        ("unknown builtin", lambda: _case(s, pb.CreateCaseRequest(builtin="liver")), IA),
        ("empty stream", lambda: _case(s), IA),
        ("builtin and a zip", lambda: _case(s, pb.CreateCaseRequest(builtin="analytic-cshape", dicom_zip_chunk=b"PK")), IA),
        ("zip without a protocol", lambda: _case(s, pb.CreateCaseRequest(dicom_zip_chunk=_zip({"a.dcm": b"x"}))), IA),
        ("not a zip", lambda: _case(s, pb.CreateCaseRequest(protocol_yaml=HARDER, dicom_zip_chunk=b"hello")), IA),
        ("zip without DICOM", lambda: _case(s, pb.CreateCaseRequest(protocol_yaml=HARDER, dicom_zip_chunk=_zip({"a.txt": b"x"}))), IA),
        ("zip bomb (a member declares 300 MiB)", lambda: _case(s, pb.CreateCaseRequest(protocol_yaml=HARDER, dicom_zip_chunk=_zip({"a.dcm": bytes(300 << 20)}))), IA),
        ("CT with PixelData cut to 100 bytes", lambda: _case(s, pb.CreateCaseRequest(protocol_yaml=HARDER, dicom_zip_chunk=_truncated_ct_zip(tmp / "patient"))), IA),
        # -- jobs ----------------------------------------------------------------------------
        ("unknown job (get)", lambda: s.orch.GetPlanningJob(pb.GetPlanningJobRequest(job_id="nope"), timeout=10), NF),
        ("unknown job (watch)", lambda: list(s.orch.WatchPlanning(pb.WatchPlanningRequest(job_id="nope"), timeout=10)), NF),
        ("unknown job (export)", lambda: s.orch.ExportPlan(pb.ExportPlanRequest(job_id="nope"), timeout=10), NF),
        ("cancel a finished job", lambda: s.orch.CancelPlanning(pb.CancelPlanningRequest(job_id=s.job_id), timeout=10), FP),
        ("feedback to a finished job", lambda: s.orch.SubmitFeedback(pb.SubmitFeedbackRequest(job_id=s.job_id, text="more"), timeout=10), FP),
        ("empty feedback", lambda: s.orch.SubmitFeedback(pb.SubmitFeedbackRequest(job_id=s.job_id, text=" "), timeout=10), IA),
        ("feedback of 20,000 characters", lambda: s.orch.SubmitFeedback(pb.SubmitFeedbackRequest(job_id=s.job_id, text="x" * 20000), timeout=10), IA),
        ("approve a missing iteration", lambda: s.orch.ApprovePlan(pb.ApprovePlanRequest(job_id=s.job_id, iteration=99), timeout=30), IA),
        # -- the worker services --------------------------------------------------------------
        ("optimize: unknown case", lambda: s.opt.Optimize(opt(case_id="nope", objectives=[_term()]), timeout=30), NF),
        ("optimize: weight 1e308", lambda: s.opt.Optimize(opt(case_id=s.case_id, objectives=[_term(weight=1e308)]), timeout=30), IA),
        ("optimize: objective dose nan", lambda: s.opt.Optimize(opt(case_id=s.case_id, objectives=[_term(dose_gy=float("nan"))]), timeout=30), IA),
        ("optimize: unknown kind", lambda: s.opt.Optimize(opt(case_id=s.case_id, objectives=[_term(kind="magic")]), timeout=30), IA),
        ("optimize: prescription 1e308", lambda: s.opt.Optimize(opt(case_id=s.case_id, objectives=[_term()], prescription_gy=1e308), timeout=30), IA),
        ("optimize: max_iterations 10^9", lambda: s.opt.Optimize(opt(case_id=s.case_id, objectives=[_term()], max_iterations=10**9), timeout=30), IA),
        ("optimize: no objectives", lambda: s.opt.Optimize(opt(case_id=s.case_id), timeout=30), IA),
        ("optimize: wrong warm-start length", lambda: s.opt.Optimize(opt(case_id=s.case_id, objectives=[_term()], warm_start=types_pb2.NDArray(dtype="float32", shape=[3], data=bytes(12))), timeout=30), IA),
        ("evaluate: no dose", lambda: s.ev.Evaluate(evaluator_pb2.EvaluateRequest(case_id=s.case_id, protocol_yaml=HARDER), timeout=30), IA),
        ("evaluate: dose outside the store", lambda: s.ev.Evaluate(evaluator_pb2.EvaluateRequest(case_id=s.case_id, protocol_yaml=HARDER, dose=types_pb2.ArtefactRef(case_id=s.case_id, path="../../etc/passwd")), timeout=30), NF),
        ("evaluate: alias bomb protocol", lambda: s.ev.Evaluate(evaluator_pb2.EvaluateRequest(case_id=s.case_id, protocol_yaml=ALIAS_BOMB, dose=types_pb2.ArtefactRef(case_id=s.case_id, path="x")), timeout=30), IA),
        ("propose: no memory", lambda: s.plan.Propose(planner_pb2.ProposeRequest(protocol_yaml=HARDER, current=[_term()]), timeout=30), IA),
        ("propose: nested protocol", lambda: s.plan.Propose(planner_pb2.ProposeRequest(protocol_yaml="a: " + "[" * 50_000, current=[_term()], memory=[planner_pb2.IterationMemory(iteration=1, objectives=[_term()])]), timeout=30), IA),
        ("propose: candidates 99", lambda: s.plan.Propose(planner_pb2.ProposeRequest(protocol_yaml=HARDER, current=[_term()], candidates=99, memory=[planner_pb2.IterationMemory(iteration=1, objectives=[_term()])]), timeout=30), IA),
        ("propose: llm without an endpoint", lambda: s.plan.Propose(planner_pb2.ProposeRequest(protocol_yaml=HARDER, agent="llm", current=[_term()], memory=[planner_pb2.IterationMemory(iteration=1, objectives=[_term()])]), timeout=30), FP),
    ]  # fmt: skip


def _leftovers() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("radpilot-upload-*")}


def test_every_bad_input_is_refused_at_the_door_with_the_status_that_names_it(
    svc: Services, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    before = _leftovers()
    jobs_before = svc.servers["orchestrator"].core.jobs.job_count()
    cases_before = sorted(p.name for p in (svc.root / "store" / "cases").iterdir())
    answers: list[tuple[str, grpc.StatusCode, grpc.StatusCode, str]] = []
    for what, call, expected in bad_inputs(svc, tmp_path):
        try:
            call()
            code, details = C.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
        answers.append((what, expected, code, details))
    wrong = [a for a in answers if a[2] != a[1] or not a[3].strip()]
    clear = sum(a[2] == a[1] and a[2] in CLIENT_ERRORS for a in answers)
    record_property(BAD_INPUT_PROPERTY, {"tried": len(answers), "clear": clear})
    assert not wrong, "\n".join(
        f"{w}: expected {e.name}, got {c.name}: {d}" for w, e, c, d in wrong
    )
    # nothing was created or left behind, and every service still serves
    assert svc.servers["orchestrator"].core.jobs.job_count() == jobs_before
    assert sorted(p.name for p in (svc.root / "store" / "cases").iterdir()) == cases_before
    assert not list((svc.root / "store" / "tmp").iterdir())
    assert _leftovers() <= before
    for name in svc.servers:
        with grpc.insecure_channel(svc.address(name)) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        assert status.status == health_pb2.HealthCheckResponse.SERVING, name


def test_every_service_refuses_calls_without_the_right_token(
    svc: Services, record_property: Callable[[str, object], None]
) -> None:
    probes: list[tuple[str, Callable[[grpc.Channel], Any]]] = [
        ("orchestrator", lambda ch: orchestrator_pb2_grpc.OrchestratorServiceStub(ch).GetPlanningJob(pb.GetPlanningJobRequest(job_id=svc.job_id), timeout=10)),
        ("orchestrator", lambda ch: orchestrator_pb2_grpc.OrchestratorServiceStub(ch).CreateCase(iter([pb.CreateCaseRequest(builtin="analytic-cshape")]), timeout=10)),
        ("optimizer", lambda ch: optimizer_pb2_grpc.OptimizerServiceStub(ch).Optimize(optimizer_pb2.OptimizeRequest(case_id=svc.case_id, objectives=[_term()]), timeout=10)),
        ("optimizer", lambda ch: optimizer_pb2_grpc.OptimizerServiceStub(ch).PrepareCase(optimizer_pb2.PrepareCaseRequest(case_id=svc.case_id), timeout=10)),
        ("evaluator", lambda ch: evaluator_pb2_grpc.EvaluatorServiceStub(ch).Evaluate(evaluator_pb2.EvaluateRequest(case_id=svc.case_id), timeout=10)),
        ("evaluator", lambda ch: evaluator_pb2_grpc.EvaluatorServiceStub(ch).GetEvaluatorCapabilities(evaluator_pb2.GetEvaluatorCapabilitiesRequest(), timeout=10)),
        ("planner", lambda ch: planner_pb2_grpc.PlannerServiceStub(ch).Propose(planner_pb2.ProposeRequest(), timeout=10)),
        ("planner", lambda ch: planner_pb2_grpc.PlannerServiceStub(ch).GetPlannerCapabilities(planner_pb2.GetPlannerCapabilitiesRequest(), timeout=10)),
    ]  # fmt: skip
    held = tried = 0
    for service, call in probes:
        for token in (None, "wrong", "", TOKEN + "x", "Bearer"):
            raw = grpc.insecure_channel(svc.address(service))
            ch = grpc.intercept_channel(raw, BearerToken(token)) if token is not None else raw
            tried += 1
            try:
                call(ch)
                code = C.OK
            except grpc.RpcError as exc:
                code = exc.code()
            finally:
                raw.close()
            held += code == C.UNAUTHENTICATED
            assert code == C.UNAUTHENTICATED, f"{service} with token {token!r}: {code.name}"
    record_property(BAD_INPUT_PROPERTY, {"auth_tried": tried, "auth_held": held})
