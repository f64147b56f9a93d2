"""Orchestrator core: cases, planning jobs and the outer loop (paper Algorithm 1) over gRPC.

Each job runs in its own thread: Optimize -> Evaluate -> store -> Propose -> ... until the
evaluator says the plan meets the protocol (and the deterministic check agrees) or the iteration
budget is spent. Every iteration is stored before the next starts; a restarted orchestrator
resumes unfinished jobs from their last stored iteration.
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from radpilot.agents.references import (
    ReferencePlan,
    anatomy_features,
    load_library,
    nearest,
    reference_dvh,
)
from radpilot.agents.step import JOB_AGENTS, check_agent, evaluator_agent, memory_window
from radpilot.case_store import CaseNotFoundError, CaseStore
from radpilot.cases import load_builtin
from radpilot.dicom.read import import_dicom
from radpilot.dicom.upload import unpack_zip
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import GoalResult, ProtocolCheck
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.protocol import ProtocolError, load_protocol_text
from radpilot.report import IterationRecord, PlanReport
from radpilot.v1 import (
    evaluator_pb2,
    evaluator_pb2_grpc,
    optimizer_pb2,
    optimizer_pb2_grpc,
    planner_pb2,
    planner_pb2_grpc,
    types_pb2,
)
from services.common.convert import (
    goal_result_from_proto,
    goal_result_to_proto,
    llm_call_from_proto,
    terms_to_proto,
)
from services.common.errors import FailedPreconditionError
from services.common.metrics import ITERATIONS, JOBS
from services.orchestrator.store import TERMINAL, JobStore

log = logging.getLogger(__name__)
NUM_REFERENCES = 3
MAX_ITERATIONS = 50
MAX_MEMORY = 20
MAX_PROTOCOL_BYTES = 1 << 20


@dataclass(frozen=True)
class Deadlines:
    optimize_s: float = 600.0
    evaluate_s: float = 120.0
    propose_s: float = 60.0


@dataclass
class Clients:
    optimizer: optimizer_pb2_grpc.OptimizerServiceStub
    evaluator: evaluator_pb2_grpc.EvaluatorServiceStub
    planner: planner_pb2_grpc.PlannerServiceStub


class _StoppedError(Exception):
    """The orchestrator is shutting down: leave the job as it is, to be resumed."""


def _goal_dict(r: types_pb2.GoalResult) -> dict[str, Any]:
    return goal_result_from_proto(r).to_dict()


def _check_from(goals: list[dict[str, Any]]) -> ProtocolCheck:
    return ProtocolCheck([GoalResult.from_dict(g) for g in goals])


def _goals_proto(goals: list[dict[str, Any]]) -> list[types_pb2.GoalResult]:
    return [goal_result_to_proto(r) for r in _check_from(goals).results]


def _check_names(protocol: Any, manifest: dict[str, Any]) -> None:
    """Protocol structures against the stored case's (from its manifest; no matrix is loaded)."""
    kinds = {s["name"]: s["kind"] for s in manifest["structures"]}
    used = (
        {protocol.target}
        | {g.structure for g in protocol.goals}
        | {o.structure for o in protocol.objectives}
    )
    missing = sorted(used - set(kinds))
    if missing:
        raise ProtocolError(
            f"protocol {protocol.name!r} names structure(s) {missing} that the case lacks; "
            f"it has {sorted(kinds)}"
        )
    if kinds[protocol.target] != "target":
        raise ProtocolError(
            f"protocol target {protocol.target!r} is not a target structure in the case"
        )


def best_iteration(records: list[dict[str, Any]]) -> int:
    """The best stored iteration by the protocol's priorities (then by how far goals are missed)."""
    if not records:
        return 0
    scored = [(_check_from(r["goals"]), r["iteration"]) for r in records]
    return max(scored, key=lambda s: (*s[0].rank(), -s[1]))[1]


class Orchestrator:
    def __init__(
        self,
        jobs: JobStore,
        cases: CaseStore,
        clients: Clients,
        deadlines: Deadlines | None = None,
        references_dir: str | Path | None = None,
        num_references: int = NUM_REFERENCES,
    ) -> None:
        self.jobs = jobs
        self.cases = cases
        self.clients = clients
        self.deadlines = deadlines or Deadlines()
        self.num_references = num_references
        self._features: dict[str, dict[str, float]] = {}
        if references_dir is not None:
            seeded = sum(
                self.jobs.add_reference(r.reference_id, r.protocol, r.to_dict())
                for r in load_library(references_dir)
            )
            log.info("reference library: %d new plan(s) from %s", seeded, references_dir)
        self._cancel: dict[str, threading.Event] = {}
        self._threads: dict[str, threading.Thread] = {}
        self._stop = threading.Event()
        self._guard = threading.Lock()

    # -- cases ---------------------------------------------------------------------------------
    def create_case(self, builtin: str, parameters: dict[str, str]) -> tuple[str, list[str]]:
        if not builtin:
            raise ValueError("builtin is empty: name a built-in case, e.g. tg119-cshape")
        case = load_builtin(builtin, self.cases, **parameters)
        return case.case_id, case.structure_names

    def create_case_from_dicom(
        self, zip_file: IO[bytes], protocol_yaml: str
    ) -> tuple[str, list[str], list[str]]:
        """Import an uploaded CT + RTSTRUCT zip; stored only when the whole import succeeded."""
        if not protocol_yaml.strip():
            raise ValueError(
                "protocol_yaml is empty: a DICOM import needs the protocol (structure names, "
                "beams) in the first message"
            )
        protocol = load_protocol_text(protocol_yaml, "protocol_yaml")
        with tempfile.TemporaryDirectory(prefix="radpilot-upload-") as tmp:
            unpack_zip(zip_file, Path(tmp))
            case, notes = import_dicom(tmp, protocol, self.cases)
        if case.case_id not in self.cases:
            self.cases.save(case, case.case_id, recipe={"builder": "dicom"})
        log.info("imported DICOM case %s (%d structures)", case.case_id, len(case.structures))
        return case.case_id, case.structure_names, notes

    # -- jobs ----------------------------------------------------------------------------------
    def start(
        self,
        case_id: str,
        protocol_yaml: str,
        max_iterations: int,
        memory_length: int,
        agent: str,
        idempotency_key: str = "",
    ) -> str:
        agent = agent or "rules"
        check_agent(agent, JOB_AGENTS)
        if not 1 <= max_iterations <= MAX_ITERATIONS:
            raise ValueError(
                f"max_iterations must be within 1..{MAX_ITERATIONS}, got {max_iterations}"
            )
        memory_length = memory_length or 4
        if not 1 <= memory_length <= MAX_MEMORY:
            raise ValueError(f"memory_length must be within 1..{MAX_MEMORY}, got {memory_length}")
        if not case_id:
            raise ValueError("case_id is empty: call CreateCase first")
        if len(protocol_yaml.encode()) > MAX_PROTOCOL_BYTES:
            raise ValueError(
                f"protocol_yaml is {len(protocol_yaml.encode())} bytes; protocols are limited to "
                f"{MAX_PROTOCOL_BYTES} bytes"
            )
        if case_id not in self.cases:
            raise CaseNotFoundError(f"case {case_id!r} does not exist: call CreateCase first")
        protocol = load_protocol_text(protocol_yaml, "protocol_yaml")
        _check_names(protocol, self.cases.manifest(case_id))
        job, created = self.jobs.create_job(
            case_id, protocol_yaml, max_iterations, memory_length, agent, idempotency_key or None
        )
        if created:
            JOBS.labels("started").inc()
            self._launch(job.job_id)
        return job.job_id

    def resume_unfinished(self) -> list[str]:
        ids = self.jobs.unfinished()
        for job_id in ids:
            log.info("resuming job %s", job_id)
            self._launch(job_id)
        return ids

    def _launch(self, job_id: str) -> None:
        with self._guard:
            self._cancel[job_id] = threading.Event()
            t = threading.Thread(
                target=self._run, args=(job_id,), name=f"job-{job_id[:8]}", daemon=True
            )
            self._threads[job_id] = t
        t.start()

    def cancel(self, job_id: str) -> str:
        job = self.jobs.job(job_id)
        if job.state in TERMINAL:
            raise FailedPreconditionError(f"job {job_id} is already {job.state}; nothing to cancel")
        with self._guard:
            flag = self._cancel.setdefault(job_id, threading.Event())
        flag.set()
        JOBS.labels("cancelled").inc()
        self.jobs.set_state(
            job_id, "cancelled", event={"kind": "cancelled", "message": "cancelled on request"}
        )
        return "cancelled"

    def submit_feedback(self, job_id: str, text: str) -> int:
        if not text.strip():
            raise ValueError("feedback text is empty")
        job = self.jobs.job(job_id)
        if job.state in TERMINAL:
            raise FailedPreconditionError(
                f"job {job_id} is {job.state}; feedback can no longer apply"
            )
        applies_from = len(self.jobs.iterations(job_id)) + 1
        self.jobs.add_feedback(job_id, text.strip(), applies_from)
        return applies_from

    def watch(
        self, job_id: str, from_seq: int, context: grpc.ServicerContext | None = None
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        self.jobs.job(job_id)  # NOT_FOUND before the stream starts
        seq = from_seq
        while True:
            for number, event in self.jobs.events_since(job_id, seq):
                seq = number
                yield number, event
            if self.jobs.job(job_id).state in TERMINAL and not self.jobs.events_since(job_id, seq):
                return
            if context is not None and not context.is_active():
                return
            with self.jobs.changed:
                self.jobs.changed.wait(timeout=1.0)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop running jobs between steps (they stay 'running' in the store, to be resumed)."""
        self._stop.set()
        for t in list(self._threads.values()):
            t.join(timeout)

    def wait(self, job_id: str, timeout: float) -> None:
        t = self._threads.get(job_id)
        if t is not None:
            t.join(timeout)

    # -- the loop ------------------------------------------------------------------------------
    def _check_stop(self, job_id: str) -> None:
        if self._stop.is_set():
            raise _StoppedError
        if self._cancel[job_id].is_set() or self.jobs.job(job_id).state == "cancelled":
            raise _StoppedError

    def _run(self, job_id: str) -> None:
        try:
            self._loop(job_id)
        except _StoppedError:
            log.info("job %s paused or cancelled", job_id)
        except grpc.RpcError as exc:
            JOBS.labels("failed").inc()
            msg = f"{exc.code().name}: {exc.details()}"
            log.warning("job %s failed: %s", job_id, msg)
            self.jobs.set_state(
                job_id, "failed", error=msg, event={"kind": "failed", "message": msg}
            )
        except Exception as exc:
            JOBS.labels("failed").inc()
            log.exception("job %s failed", job_id)
            msg = f"{type(exc).__name__}: {exc}"
            self.jobs.set_state(
                job_id, "failed", error=msg, event={"kind": "failed", "message": msg}
            )

    def _loop(self, job_id: str) -> None:
        job = self.jobs.job(job_id)
        protocol = load_protocol_text(job.protocol_yaml, "protocol_yaml")
        records = self.jobs.iterations(job_id)
        if records:
            last = records[-1]
            if last["decision"] == "meets_protocol" or not last["proposal"]:
                self._finish(job_id, records)
                return
            objectives = [ObjectiveTerm.from_dict(o) for o in last["proposal"]]
            warm = types_pb2.NDArray.FromString(bytes.fromhex(last["fluence_hex"]))
        else:
            objectives, warm = list(protocol.objectives), None
        if not self.jobs.mark_running(job_id):
            return  # cancelled before it started
        c, d = self.clients, self.deadlines
        for it in range(len(records) + 1, job.max_iterations + 1):
            self._check_stop(job_id)
            self.jobs.add_event(job_id, {"kind": "iteration_started", "iteration": it})
            opt = c.optimizer.Optimize(
                optimizer_pb2.OptimizeRequest(
                    case_id=job.case_id,
                    objectives=terms_to_proto(objectives),
                    normalize_to=protocol.target,
                    warm_start=warm,
                    prescription_gy=protocol.prescription_gy,
                    coverage_pct=protocol.coverage_pct,
                ),
                timeout=d.optimize_s,
            )
            fmo = {f.name: getattr(opt.stats, f.name) for f in opt.stats.DESCRIPTOR.fields}
            fmo["replica"] = opt.replica
            self.jobs.add_event(
                job_id,
                {
                    "kind": "fmo_done",
                    "iteration": it,
                    "fmo": fmo,
                    "message": f"served by {opt.replica}",
                },
            )
            self._check_stop(job_id)
            ev = c.evaluator.Evaluate(
                evaluator_pb2.EvaluateRequest(
                    case_id=job.case_id,
                    dose=opt.dose,
                    protocol_yaml=job.protocol_yaml,
                    agent=evaluator_agent(job.agent),
                ),
                timeout=d.evaluate_s,
            )
            goals = [_goal_dict(r) for r in ev.goals]
            llm_calls = [llm_call_from_proto(c) for c in ev.llm_calls]
            # the guardrail: "meets protocol" only when the numbers say so, whatever the agent says
            meets = ev.decision == evaluator_pb2.DECISION_MEETS_PROTOCOL and all(
                g["passed"] for g in goals
            )
            self.jobs.add_event(
                job_id,
                {
                    "kind": "evaluated",
                    "iteration": it,
                    "goals": goals,
                    "message": "; ".join(ev.findings),
                },
            )
            record: dict[str, Any] = {
                "iteration": it,
                "objectives": [o.to_dict() for o in objectives],
                "fmo": fmo,
                "goals": goals,
                "findings": list(ev.findings),
                "decision": "meets_protocol" if meets else "needs_improvement",
                "dose": {"path": opt.dose.path, "sha256": opt.dose.sha256},
                "fluence_hex": opt.fluence.SerializeToString().hex(),
                "feedback": "\n".join(self.jobs.feedback_until(job_id, it)),
                "proposal": [],
                "rationale": "",
                "llm_decision": ev.llm_decision,
                "disagreement": ev.disagreement,
                "reference_ids": [],
                "llm_calls": llm_calls,
            }
            if not meets and it < job.max_iterations:
                self._check_stop(job_id)
                memory = memory_window(job.agent, [*records, record], job.memory_length)
                refs = self._references(job.case_id, protocol.name) if job.agent == "llm" else []
                record["reference_ids"] = [r.reference_id for r, _ in refs]
                prop = c.planner.Propose(
                    planner_pb2.ProposeRequest(
                        protocol_yaml=job.protocol_yaml,
                        agent=job.agent,
                        current=terms_to_proto(objectives),
                        memory=[
                            planner_pb2.IterationMemory(
                                iteration=m["iteration"],
                                objectives=terms_to_proto(
                                    [ObjectiveTerm.from_dict(o) for o in m["objectives"]]
                                ),
                                goals=_goals_proto(m["goals"]),
                                findings=m["findings"],
                                physician_feedback=m["feedback"],
                            )
                            for m in memory
                        ],
                        physician_feedback=record["feedback"],
                        references=[
                            types_pb2.ReferencePlan(
                                reference_id=r.reference_id,
                                description=r.description,
                                objectives=terms_to_proto(r.objectives),
                                results_text=r.results_text(),
                                distance=dist,
                            )
                            for r, dist in refs
                        ],
                    ),
                    timeout=d.propose_s,
                )
                record["llm_calls"] += [llm_call_from_proto(c) for c in prop.llm_calls]
                record["proposal"] = [
                    {
                        "structure": t.structure,
                        "kind": t.kind,
                        "dose_gy": t.dose_gy,
                        "weight": t.weight,
                    }
                    for t in prop.objectives
                ]
                record["rationale"] = prop.rationale
            self._check_stop(job_id)
            self.jobs.add_iteration(
                job_id,
                it,
                record,
                {
                    "kind": "proposal",
                    "iteration": it,
                    "proposal": record["proposal"],
                    "message": record["rationale"],
                },
            )
            records.append(record)
            ITERATIONS.labels(job.agent).inc()
            proposal = [ObjectiveTerm.from_dict(o) for o in record["proposal"]]
            if meets or proposal == objectives:
                break  # done, or the planner would repeat the same plan
            objectives = proposal
            warm = opt.fluence
        self._finish(job_id, records)

    # -- reference plans ------------------------------------------------------------------------
    def _case_features(self, case_id: str) -> dict[str, float]:
        if case_id not in self._features:
            grid, structures = self.cases.structures(case_id)
            self._features[case_id] = anatomy_features(grid, structures)
        return self._features[case_id]

    def _references(self, case_id: str, protocol: str) -> list[tuple[ReferencePlan, float]]:
        library = [ReferencePlan.from_dict(d) for d in self.jobs.references(protocol)]
        return nearest(library, protocol, self._case_features(case_id), self.num_references)

    def approve(
        self, job_id: str, iteration: int = 0, description: str = ""
    ) -> tuple[str, str, int]:
        """Add a finished job's plan (its best iteration unless named) to the reference library."""
        job = self.jobs.job(job_id)
        if job.state != "succeeded":
            raise FailedPreconditionError(
                f"job {job_id} is {job.state}; only a finished (succeeded) job can be approved"
            )
        records = self.jobs.iterations(job_id)
        iteration = iteration or best_iteration(records)
        rec = next((r for r in records if r["iteration"] == iteration), None)
        if rec is None:
            raise ValueError(f"job {job_id} has no iteration {iteration}; it has 1..{len(records)}")
        check = _check_from(rec["goals"])
        if not check.all_hard_passed:
            raise FailedPreconditionError(
                f"iteration {iteration} of job {job_id} misses hard goal(s) "
                f"{[r.goal.label for r in check.failed if r.goal.hard]}; a reference plan must "
                "meet every hard goal"
            )
        if len(description) > 2000:
            raise ValueError("description is limited to 2000 characters")
        protocol = load_protocol_text(job.protocol_yaml, "protocol_yaml")
        case = self.cases.load(job.case_id)
        plan = PlanDose(case, self.cases.get_artefact(rec["dose"]["path"], rec["dose"]["sha256"]))
        ref = ReferencePlan(
            protocol=protocol.name,
            description=description or f"approved plan (agent {job.agent}, iteration {iteration})",
            features=self._case_features(job.case_id),
            objectives=[ObjectiveTerm.from_dict(o) for o in rec["objectives"]],
            goals=[r.to_dict() for r in check.results],
            stats=[s.to_dict() for s in plan.stats()],
            source="approved",
            dvh=reference_dvh(plan, protocol.prescription_gy),
        )
        self.jobs.add_reference(ref.reference_id, ref.protocol, ref.to_dict())
        return ref.reference_id, ref.protocol, len(self.jobs.references(ref.protocol))

    def _finish(self, job_id: str, records: list[dict[str, Any]]) -> None:
        if self.jobs.job(job_id).state == "cancelled":
            return
        best = best_iteration(records)
        met = any(r["decision"] == "meets_protocol" for r in records)
        msg = f"best plan: iteration {best} of {len(records)}" + (
            " (meets the protocol)" if met else ""
        )
        JOBS.labels("succeeded").inc()
        self.jobs.set_state(
            job_id,
            "succeeded",
            best_iteration=best,
            event={"kind": "finished", "iteration": best, "message": msg},
        )

    # -- export --------------------------------------------------------------------------------
    def report(self, job_id: str) -> PlanReport:
        job = self.jobs.job(job_id)
        records = self.jobs.iterations(job_id)
        if not records:
            raise FailedPreconditionError(
                f"job {job_id} has no completed iteration yet; export later"
            )
        protocol = load_protocol_text(job.protocol_yaml, "protocol_yaml")
        case = self.cases.load(job.case_id)
        best = best_iteration(records)
        rec = next(r for r in records if r["iteration"] == best)
        plan = PlanDose(case, self.cases.get_artefact(rec["dose"]["path"], rec["dose"]["sha256"]))
        iterations = [
            IterationRecord(
                r["iteration"],
                [ObjectiveTerm.from_dict(o) for o in r["objectives"]],
                r["fmo"],
                _check_from(r["goals"]),
                "; ".join(r["findings"])
                + (f" | planner: {r['rationale']}" if r["rationale"] else ""),
                [{**c, "iteration": r["iteration"]} for c in r.get("llm_calls", [])],
            )
            for r in records
        ]
        return PlanReport(
            case.name, protocol, job.agent, plan, _check_from(rec["goals"]), iterations, best
        )

    def export(self, job_id: str) -> tuple[bytes, str]:
        report = self.report(job_id)
        buf = io.BytesIO()
        with tempfile.TemporaryDirectory() as tmp:
            report.write(tmp)
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for p in sorted(Path(tmp).rglob("*")):
                    if p.is_file():
                        z.write(p, p.relative_to(tmp).as_posix())
        return buf.getvalue(), f"radpilot-{job_id[:8]}.zip"
