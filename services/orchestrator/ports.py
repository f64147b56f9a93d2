"""The outer loop's ports wired to the other services over gRPC, and its sink to the job store.

The loop itself is ``radpilot.loop.run_loop``; here are only the translations: objective terms,
goals and stats to and from protos, fluences kept in the case store, and gRPC status codes to
the loop's domain errors (UNAVAILABLE -> ``UnavailableError``: the loop waits and retries the
same step; anything else -> ``StepFailedError``: the job fails with that status and message).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from radpilot.agents.references import ReferencePlan
from radpilot.case_store import CaseStore
from radpilot.cases.helpers import Helper, referenced
from radpilot.delivery.sequencing import SequencingSettings
from radpilot.errors import StepFailedError, UnavailableError
from radpilot.evaluation.metrics import DVHTable
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.loop import ArtefactRef, Evaluated, IterationRecord, Optimized, Proposal
from radpilot.v1 import (
    evaluator_pb2,
    evaluator_pb2_grpc,
    optimizer_pb2,
    optimizer_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    types_pb2,
)
from radpilot.wire import from_ndarray, to_ndarray
from services.common.convert import (
    check_from_proto,
    dvh_from_proto,
    dvh_to_proto,
    fmo_stats_from_proto,
    goal_result_to_proto,
    helpers_to_proto,
    llm_call_from_proto,
    reference_to_proto,
    stats_from_proto,
    stats_to_proto,
    terms_from_proto,
    terms_to_proto,
)
from services.common.metrics import ITERATIONS
from services.orchestrator.store import JobStore

T = TypeVar("T")


LLM_STEP_MARGIN_S = 30.0  # the non-LLM work of an evaluation or a proposal, and the transport


@dataclass(frozen=True)
class Deadlines:
    optimize_s: float = 600.0
    evaluate_s: float = 120.0
    propose_s: float = 60.0

    def for_llm(self, status: dict[str, LlmInfo]) -> Deadlines:
        """Deadlines an LLM step can always meet: at least the service's longest LLM step (every
        call timing out after all its attempts) plus a margin for the step's own work, so a slow
        endpoint ends in the agent's fallback, not in DEADLINE_EXCEEDED."""
        evaluate = status["evaluator"].step_budget_s if "evaluator" in status else 0.0
        propose = status["planner"].step_budget_s if "planner" in status else 0.0
        return Deadlines(
            self.optimize_s,
            max(self.evaluate_s, evaluate + LLM_STEP_MARGIN_S) if evaluate else self.evaluate_s,
            max(self.propose_s, propose + LLM_STEP_MARGIN_S) if propose else self.propose_s,
        )


@dataclass
class Clients:
    optimizer: optimizer_pb2_grpc.OptimizerServiceStub
    evaluator: evaluator_pb2_grpc.EvaluatorServiceStub
    planner: planner_pb2_grpc.PlannerServiceStub


@dataclass(frozen=True)
class LlmInfo:
    """What the evaluator or the planner says of its LLM endpoint."""

    configured: bool
    step_budget_s: float
    model: str
    endpoint: str

    def identity(self) -> str:
        return f"{self.model} at {self.endpoint}" if self.configured else "none"


def llm_status(clients: Clients, timeout_s: float = 10.0) -> dict[str, LlmInfo]:
    """The evaluator's and the planner's LLM endpoints. A service that cannot be reached now is
    left out: the job waits for it like for any step."""
    asks: list[tuple[str, Callable[[], Any]]] = [
        (
            "evaluator",
            lambda: clients.evaluator.GetEvaluatorCapabilities(
                evaluator_pb2.GetEvaluatorCapabilitiesRequest(), timeout=timeout_s
            ),
        ),
        (
            "planner",
            lambda: clients.planner.GetPlannerCapabilities(
                planner_pb2.GetPlannerCapabilitiesRequest(), timeout=timeout_s
            ),
        ),
    ]
    out = {}
    for name, ask in asks:
        try:
            answer = ask()
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise
            continue
        out[name] = LlmInfo(
            bool(answer.llm_configured),
            float(answer.llm_step_budget_s),
            answer.llm_model,
            answer.llm_endpoint,
        )
    return out


class StoppedError(Exception):
    """The orchestrator is shutting down or the job was cancelled: leave it as it is."""


def _call(step: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except grpc.RpcError as exc:
        code = exc.code()
        message = f"{code.name}: {exc.details()}"
        if code is grpc.StatusCode.UNAVAILABLE:
            raise UnavailableError(f"{step}: {message}") from exc
        raise StepFailedError(message) from exc


@dataclass
class JobContext:
    """What every port of one job needs to know."""

    job_id: str
    case_id: str
    protocol_yaml: str
    agent: str
    prescription_gy: float
    coverage_pct: float
    target: str
    helpers: tuple[Helper, ...] = ()  # the protocol's helper structures


class GrpcOptimizer:
    def __init__(
        self,
        stub: optimizer_pb2_grpc.OptimizerServiceStub,
        cases: CaseStore,
        job: JobContext,
        deadline_s: float,
    ) -> None:
        self.stub, self.cases, self.job, self.deadline_s = stub, cases, job, deadline_s

    def optimize(self, objectives: list[ObjectiveTerm], warm: ArtefactRef | None) -> Optimized:
        warm_msg = (
            to_ndarray(self.cases.get_artefact(warm.path, warm.sha256))
            if warm is not None
            else None
        )
        request = optimizer_pb2.OptimizeRequest(
            case_id=self.job.case_id,
            objectives=terms_to_proto(objectives),
            normalize_to=self.job.target,
            warm_start=warm_msg,
            prescription_gy=self.job.prescription_gy,
            coverage_pct=self.job.coverage_pct,
            helpers=helpers_to_proto(
                referenced(list(self.job.helpers), {t.structure for t in objectives})
            ),
        )
        r = _call("optimizer", lambda: self.stub.Optimize(request, timeout=self.deadline_s))
        fmo = fmo_stats_from_proto(r.stats)
        fmo.replica = r.replica
        fmo.case_load_seconds = r.case_load_seconds
        path, sha = self.cases.put_artefact(self.job.case_id, "fluence", from_ndarray(r.fluence))
        return Optimized(ArtefactRef(r.dose.path, r.dose.sha256), ArtefactRef(path, sha), fmo)

    def sequence(
        self,
        fluence: ArtefactRef,
        settings: SequencingSettings,
        fractions: int,
        objectives: list[ObjectiveTerm],
    ) -> tuple[dict[str, Any], ArtefactRef]:
        """The best plan leaf-sequenced on an optimizer replica: (plan JSON, deliverable dose);
        its segment weights are refitted on the plan's own ``objectives``."""
        request = optimizer_pb2.SequenceRequest(
            case_id=self.job.case_id,
            fluence=to_ndarray(self.cases.get_artefact(fluence.path, fluence.sha256)),
            normalize_to=self.job.target,
            prescription_gy=self.job.prescription_gy,
            coverage_pct=self.job.coverage_pct,
            fractions=fractions,
            mlc=settings.mlc,
            levels=settings.levels,
            min_segment_mu=settings.min_segment_mu,
            max_segments_per_beam=settings.max_segments_per_beam,
            refit=settings.refit,
            keep_leaves=not settings.apertures,
            objectives=terms_to_proto(objectives),
            helpers=helpers_to_proto(
                referenced(list(self.job.helpers), {t.structure for t in objectives})
            ),
        )
        r = _call("optimizer", lambda: self.stub.Sequence(request, timeout=self.deadline_s))
        return json.loads(r.plan_json), ArtefactRef(r.dose.path, r.dose.sha256)


class GrpcEvaluator:
    def __init__(
        self,
        stub: evaluator_pb2_grpc.EvaluatorServiceStub,
        job: JobContext,
        evaluator_agent: str,
        deadline_s: float,
        references: Callable[[], list[tuple[ReferencePlan, float]]] | None = None,
    ) -> None:
        self.stub, self.job, self.agent, self.deadline_s = stub, job, evaluator_agent, deadline_s
        self.references = references

    def evaluate(self, dose: ArtefactRef, physician_feedback: str = "") -> Evaluated:
        refs = self.references() if self.agent == "llm" and self.references else []
        request = evaluator_pb2.EvaluateRequest(
            case_id=self.job.case_id,
            dose=types_pb2.ArtefactRef(
                case_id=self.job.case_id, path=dose.path, sha256=dose.sha256
            ),
            protocol_yaml=self.job.protocol_yaml,
            agent=self.agent,
            references=[reference_to_proto(ref, dist) for ref, dist in refs],
            physician_feedback=physician_feedback,
        )
        r = _call("evaluator", lambda: self.stub.Evaluate(request, timeout=self.deadline_s))
        return Evaluated(
            check=check_from_proto(list(r.goals)),
            findings=list(r.findings),
            meets=r.decision == evaluator_pb2.DECISION_MEETS_PROTOCOL,
            llm_decision=r.llm_decision,
            disagreement=r.disagreement,
            llm_calls=[llm_call_from_proto(c) for c in r.llm_calls],
            stats=[stats_from_proto(s) for s in r.structures],
            dvh=(
                dvh_from_proto(r.dvh).compact(self.job.prescription_gy).to_dict()
                if r.dvh.structures
                else {}
            ),
        )


class GrpcPlanner:
    def __init__(
        self,
        stub: planner_pb2_grpc.PlannerServiceStub,
        job: JobContext,
        references: Callable[[], list[tuple[ReferencePlan, float]]],
        deadline_s: float,
    ) -> None:
        self.stub, self.job, self.references, self.deadline_s = stub, job, references, deadline_s

    def propose(
        self,
        current: list[ObjectiveTerm],
        memory: list[IterationRecord],
        physician_feedback: str,
        count: int = 1,
    ) -> Proposal:
        refs = self.references() if self.job.agent == "llm" else []
        request = planner_pb2.ProposeRequest(
            protocol_yaml=self.job.protocol_yaml,
            agent=self.job.agent,
            current=terms_to_proto(current),
            memory=[
                planner_pb2.IterationMemory(
                    iteration=m.iteration,
                    objectives=terms_to_proto(m.objectives),
                    goals=[goal_result_to_proto(g) for g in m.check.results],
                    findings=m.findings,
                    physician_feedback=m.physician_feedback,
                    stats=[stats_to_proto(st) for st in m.stats],
                    dvh=dvh_to_proto(DVHTable.from_dict(m.dvh)) if m.dvh else None,
                    scale_factor=m.fmo.scale_factor,
                )
                for m in memory
            ],
            physician_feedback=physician_feedback,
            references=[reference_to_proto(ref, dist) for ref, dist in refs],
            candidates=count,
        )
        r = _call("planner", lambda: self.stub.Propose(request, timeout=self.deadline_s))
        return Proposal(
            terms_from_proto(list(r.objectives)) if r.objectives else [],
            r.rationale,
            [llm_call_from_proto(c) for c in r.llm_calls],
            [ref.reference_id for ref, _ in refs],
            [terms_from_proto(list(a.terms)) for a in r.alternatives if a.terms],
        )


class JobSink:
    """The loop's records and events in the job store; stop requests from the orchestrator."""

    def __init__(
        self,
        jobs: JobStore,
        job_id: str,
        stop: threading.Event,
        cancel: threading.Event,
        owner: str | None = None,
        agent: str = "",
    ):
        self.jobs, self.job_id, self._stop, self._cancel = jobs, job_id, stop, cancel
        # the orchestrator running the job: writes are refused (LeaseLostError) once another
        # has taken the job over, so a slow orchestrator never writes over its successor
        self.owner = owner
        self.agent = agent  # the label of the stored-iterations counter (metrics endpoint)

    def stored(self) -> list[IterationRecord]:
        return self.jobs.iterations(self.job_id)

    def physician_feedback(self, iteration: int) -> str:
        return "\n".join(self.jobs.feedback_until(self.job_id, iteration))

    def event(self, event: dict[str, Any]) -> None:
        self.jobs.add_event(self.job_id, event, once=True, owner=self.owner)

    def add(self, record: IterationRecord, event: dict[str, Any]) -> None:
        self.jobs.add_iteration(self.job_id, record, event, self.owner)
        ITERATIONS.labels(self.agent).inc()

    def check_stop(self) -> None:
        if self._stop.is_set() or self._cancel.is_set():
            raise StoppedError
        if self.jobs.job(self.job_id).state == "cancelled":
            raise StoppedError
