"""Orchestrator core: cases, planning jobs, events, resume, cancellation, feedback, references
and export. The loop itself is ``radpilot.loop.run_loop``: here it is wired to the other services
(``ports.py``) and to the job store, one thread per job. Every iteration is stored before the
next starts; a restarted orchestrator resumes unfinished jobs after their last stored iteration.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np

from radpilot.agents.references import (
    ReferencePlan,
    anatomy_features,
    load_library,
    nearest,
    reference_dvh,
)
from radpilot.agents.step import JOB_AGENTS, check_agent, evaluator_agent
from radpilot.case_store import CaseStore
from radpilot.cases import builtin_case_id, load_builtin
from radpilot.cases.helpers import check_helpers
from radpilot.dicom.read import import_dicom
from radpilot.dicom.upload import unpack_zip
from radpilot.errors import (
    AgentNotConfiguredError,
    CaseNotFoundError,
    FailedPreconditionError,
    HelperError,
    StepFailedError,
    StorageFullError,
    StorageReadOnlyError,
    UnavailableError,
)
from radpilot.evaluation.metrics import PlanDose
from radpilot.llm.prompts import PHYSICIAN_LIMIT
from radpilot.loop import ArtefactRef, IterationRecord, LoopResult, LoopSettings, run_loop
from radpilot.loop.core import (
    DEFAULT_RETRY_BUDGET_S,
    MAX_CANDIDATES,
    OptimizerPort,
    SequencingOptimizer,
    best_iteration,
    finished,
)
from radpilot.protocol import Protocol, ProtocolError, load_protocol_text
from radpilot.report import PlanReport
from radpilot.v1 import types_pb2
from radpilot.wire import from_ndarray
from services.common.metrics import JOBS
from services.orchestrator.ports import (
    Clients,
    Deadlines,
    GrpcEvaluator,
    GrpcOptimizer,
    GrpcPlanner,
    JobContext,
    JobSink,
    LlmInfo,
    StoppedError,
    llm_status,
)
from services.orchestrator.store import TERMINAL, JobStore, LeaseLostError

log = logging.getLogger(__name__)
NUM_REFERENCES = 3
MAX_ITERATIONS = 50
MAX_MEMORY = 20
DEFAULT_LEASE_S = 30.0


def default_owner() -> str:
    """Who holds a job's lease when no instance id is configured: host and process."""
    return f"{socket.gethostname()}:pid{os.getpid()}"


def _check_names(protocol: Any, manifest: dict[str, Any]) -> None:
    """Protocol structures against the stored case's (from its manifest; no matrix is loaded)."""
    kinds = {s["name"]: s["kind"] for s in manifest["structures"]}
    missing = sorted(protocol.used_structures - set(kinds))
    if missing:
        raise ProtocolError(
            f"protocol {protocol.name!r} names structure(s) {missing} that the case lacks; "
            f"it has {sorted(kinds)}"
        )
    try:
        check_helpers(list(protocol.all_helpers), set(kinds))
    except HelperError as exc:
        raise ProtocolError(f"protocol {protocol.name!r}: {exc}") from None
    if kinds[protocol.target] != "target":
        raise ProtocolError(
            f"protocol target {protocol.target!r} is not a target structure in the case"
        )


class Orchestrator:
    def __init__(
        self,
        jobs: JobStore,
        cases: CaseStore,
        clients: Clients,
        deadlines: Deadlines | None = None,
        references_dir: str | Path | None = None,
        num_references: int = NUM_REFERENCES,
        retry_budget_s: float = DEFAULT_RETRY_BUDGET_S,
        lease_s: float = DEFAULT_LEASE_S,
        owner: str = "",
    ) -> None:
        self.jobs = jobs
        # a job runs only in the orchestrator holding its lease (renewed every lease_s / 3);
        # a crashed orchestrator's jobs are taken over once their leases expire
        self.lease_s = lease_s
        self._launching = threading.Lock()
        self.owner = owner or default_owner()
        self.cases = cases
        self.clients = clients
        self.deadlines = deadlines or Deadlines()
        self.retry_budget_s = retry_budget_s
        migrated = self.jobs.migrate_records(self._store_legacy_fluence)
        if migrated:
            log.info("job store: %d iteration record(s) migrated to the typed format", migrated)
        self.num_references = num_references
        self._features: dict[str, dict[str, float]] = {}
        self._views: OrderedDict[tuple[str, str, float], _DoseView] = OrderedDict()
        self._views_lock = threading.Lock()
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
        self._keeper: threading.Thread | None = None

    def _store_legacy_fluence(self, case_id: str, fluence_hex: str) -> ArtefactRef:
        array = from_ndarray(types_pb2.NDArray.FromString(bytes.fromhex(fluence_hex)))
        path, sha = self.cases.put_artefact(case_id, "fluence", array)
        return ArtefactRef(path, sha)

    # -- cases ---------------------------------------------------------------------------------
    def create_case(self, builtin: str, parameters: dict[str, str]) -> tuple[str, list[str]]:
        if not builtin:
            raise ValueError("builtin is empty: name a built-in case, e.g. tg119-cshape")
        case_id = builtin_case_id(builtin, **parameters)  # checks the name and parameters
        if case_id in self.cases:  # stored: its geometry names it (the matrix stays on disk)
            return case_id, self.cases.load(case_id, matrix=False).structure_names
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
        physician_feedback: str = "",
        candidates: int = 0,
    ) -> str:
        agent = agent or "rules"
        check_agent(agent, JOB_AGENTS)
        candidates = candidates or 1
        if not 1 <= candidates <= MAX_CANDIDATES:
            raise ValueError(
                f"candidates must be within 0..{MAX_CANDIDATES} (0 = one plan per round), "
                f"got {candidates}"
            )
        if not 1 <= max_iterations <= MAX_ITERATIONS:
            raise ValueError(
                f"max_iterations must be within 1..{MAX_ITERATIONS}, got {max_iterations}"
            )
        memory_length = memory_length or 4
        if not 1 <= memory_length <= MAX_MEMORY:
            raise ValueError(f"memory_length must be within 1..{MAX_MEMORY}, got {memory_length}")
        if not case_id:
            raise ValueError("case_id is empty: call CreateCase first")
        _check_feedback(physician_feedback)
        protocol = load_protocol_text(protocol_yaml, "protocol_yaml")  # size, YAML, ranges
        if case_id not in self.cases:
            raise CaseNotFoundError(f"case {case_id!r} does not exist: call CreateCase first")
        _check_names(protocol, self.cases.manifest(case_id))
        llm = ""
        if agent == "llm":
            status = llm_status(self.clients)
            # recorded only when both answered (one that is down now is checked at resume)
            llm = _llm_identity(status) if len(status) == 2 else ""
            missing = [name for name, info in status.items() if not info.configured]
            if missing:
                which = " and ".join(missing) + (
                    " services have" if len(missing) > 1 else " service has"
                )
                raise AgentNotConfiguredError(
                    f"agent 'llm' needs an LLM endpoint and the {which} none: set OPENAI_BASE_URL "
                    "(and OPENAI_API_KEY if it needs one) there and restart, or start the job "
                    "with agent rules or bo"
                )
        job, created = self.jobs.create_job(
            case_id,
            protocol_yaml,
            max_iterations,
            memory_length,
            agent,
            idempotency_key or None,
            llm,
            physician_feedback.strip(),
            candidates,
        )
        if created:
            JOBS.labels("started").inc()
            self._launch(job.job_id)
        return job.job_id

    def resume_unfinished(self) -> list[str]:
        """Resume the unfinished jobs no other orchestrator holds, and from now on keep the
        leases of running jobs and take over jobs whose holder's lease expired."""
        resumed = [job_id for job_id in self.jobs.claimable(self.owner) if self._launch(job_id)]
        for job_id in resumed:
            log.info("resumed job %s", job_id)
        if self._keeper is None:
            self._keeper = threading.Thread(
                target=self._keep_leases, name="job-leases", daemon=True
            )
            self._keeper.start()
        return resumed

    def _running_here(self, job_id: str) -> bool:
        with self._guard:
            t = self._threads.get(job_id)
            return t is not None and t.is_alive()

    def _launch(self, job_id: str) -> bool:
        """Run a job in this process if its lease can be taken; False when another holds it."""
        # one launch at a time: StartPlanning and the lease keeper may launch the same job at
        # once, and both would pass the check and claim (a claim extends our own lease)
        with self._launching:
            if self._stop.is_set() or self._running_here(job_id):
                return False
            holder = self.jobs.claim(job_id, self.owner, self.lease_s)
            if holder:
                log.info("job %s is run by orchestrator %s; not starting it here", job_id, holder)
                return False
            with self._guard:
                self._cancel[job_id] = threading.Event()
                t = threading.Thread(
                    target=self._run, args=(job_id,), name=f"job-{job_id[:8]}", daemon=True
                )
                self._threads[job_id] = t
            t.start()
        return True

    def _keep_leases(self) -> None:
        while not self._stop.wait(max(0.1, self.lease_s / 3)):
            try:
                with self._guard:
                    held = [j for j, t in self._threads.items() if t.is_alive()]
                for job_id in self.jobs.renew(held, self.owner, self.lease_s):
                    flag = self._cancel[job_id]
                    if not flag.is_set():  # said once: the job stops at its next step or write
                        log.warning(
                            "job %s: lease lost to another orchestrator; stopping here", job_id
                        )
                    flag.set()
                for job_id in self.jobs.claimable(self.owner):
                    if self._launch(job_id):
                        log.info("took over job %s (its orchestrator's lease expired)", job_id)
            except Exception:  # a busy or failing database must not end lease keeping
                log.exception("keeping job leases failed; retrying")

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
        _check_feedback(text)
        job = self.jobs.job(job_id)
        if job.state in TERMINAL:
            raise FailedPreconditionError(
                f"job {job_id} is {job.state}; feedback can no longer apply"
            )
        # an iteration reads the feedback in force once its FMO is done, just before it is
        # judged: the first iteration whose FMO is not done yet is the first to see this text
        # (records are stored only after the planner's proposal: counting them is too early)
        optimised = [
            int(e.get("iteration", 0))
            for _, e in self.jobs.events_since(job_id, 0)
            if e.get("kind") == "fmo_done"
        ]
        applies_from = max([len(self.jobs.iterations(job_id)), *optimised]) + 1
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
        """Stop running jobs between steps (they stay 'running' in the store, their leases
        released, to be resumed by this or another orchestrator)."""
        self._stop.set()
        for t in list(self._threads.values()):
            t.join(timeout)
        if self._keeper is not None:
            self._keeper.join(timeout)

    # -- the loop ------------------------------------------------------------------------------
    def _run(self, job_id: str) -> None:
        try:
            self._loop(job_id)
        except StoppedError:
            log.info("job %s paused or cancelled", job_id)
        except LeaseLostError as exc:
            log.warning("%s", exc)
        except StepFailedError as exc:
            self._fail(job_id, str(exc))
        except Exception as exc:
            log.exception("job %s failed", job_id)
            self._fail(job_id, f"{type(exc).__name__}: {exc}")
        finally:
            self.jobs.release(job_id, self.owner)

    def _fail(self, job_id: str, msg: str) -> None:
        try:
            if not self.jobs.set_state(
                job_id,
                "failed",
                error=msg,
                event={"kind": "failed", "message": msg},
                owner=self.owner,
            ):
                log.info("job %s ended meanwhile (cancelled); not failing it: %s", job_id, msg)
                return
        except LeaseLostError:
            log.warning("job %s: not failing it (another orchestrator holds it): %s", job_id, msg)
            return
        except (StorageFullError, StorageReadOnlyError, UnavailableError) as exc:
            # the job stays 'running' and is tried again once the database can be written
            log.error("job %s: cannot record its failure (%s): %s", job_id, msg, exc)
            return
        JOBS.labels("failed").inc()
        log.warning("job %s failed: %s", job_id, msg)

    def _loop(self, job_id: str) -> None:
        job = self.jobs.job(job_id)
        protocol = load_protocol_text(job.protocol_yaml, "protocol_yaml")
        if not finished(self.jobs.iterations(job_id)) and not self.jobs.mark_running(job_id):
            return  # cancelled before it started
        ctx = JobContext(
            job_id,
            job.case_id,
            job.protocol_yaml,
            job.agent,
            protocol.prescription_gy,
            protocol.coverage_pct,
            protocol.target,
            protocol.all_helpers,
        )
        c, d = self.clients, self.deadlines
        if job.agent == "llm":
            status = llm_status(c)
            now = _llm_identity(status)
            if job.llm and len(status) == 2 and now != job.llm:
                # never send a job's data to an endpoint or model it was not started with
                self._fail(
                    job_id,
                    f"this job was started with the LLM endpoints {job.llm}; the services now "
                    f"use {now}: not resumed here. Start a new job to plan with them.",
                )
                return
            d = d.for_llm(status)
            log.info(
                "job %s: LLM step deadlines evaluate %.0f s, propose %.0f s",
                job_id,
                d.evaluate_s,
                d.propose_s,
            )

        def references() -> list[tuple[ReferencePlan, float]]:
            return self._references(job.case_id, protocol.name)

        optimizer = GrpcOptimizer(c.optimizer, self.cases, ctx, d.optimize_s)
        port: OptimizerPort = optimizer
        delivery = protocol.delivery
        if delivery is not None and delivery.every_iteration:
            port = SequencingOptimizer(
                optimizer,
                # the first try only (segment weights fitted to the optimal dose); the best
                # plan is sequenced again at the end, with the goal-keeping retries
                lambda fluence: optimizer.sequence(fluence, delivery, protocol.num_fractions, []),
                (StepFailedError,),
            )
        result = run_loop(
            list(protocol.objectives),
            port,
            GrpcEvaluator(c.evaluator, ctx, evaluator_agent(job.agent), d.evaluate_s, references),
            GrpcPlanner(c.planner, ctx, references, d.propose_s),
            JobSink(self.jobs, job_id, self._stop, self._cancel[job_id], self.owner, job.agent),
            LoopSettings(
                job.max_iterations,
                job.memory_length,
                job.agent,
                self.retry_budget_s,
                candidates=job.candidates,
                **protocol.improvement_settings(),
            ),
        )
        self._sequence(job_id, protocol, result, optimizer)
        self._finish(job_id, result)

    def _sequence(
        self, job_id: str, protocol: Protocol, result: LoopResult, optimizer: GrpcOptimizer
    ) -> None:
        """Leaf-sequence the best plan on an optimizer replica and keep it with the job; a plan
        the MLC cannot deliver is kept fluence-optimal, with the reason in the report."""
        if protocol.delivery is None or self.jobs.job(job_id).state == "cancelled":
            return
        best = result.best
        fluence = best.fluence
        if fluence is None:
            return
        report = self.report(job_id, result.records)
        started = time.perf_counter()
        try:
            plan, dose = report.sequence_keeping_goals(
                lambda settings, terms: optimizer.sequence(
                    fluence, settings, protocol.num_fractions, terms
                ),
                lambda ref: self.cases.get_artefact(ref.path, ref.sha256),
                protocol.delivery,
                best.objectives,
            )
        except (StepFailedError, UnavailableError) as exc:
            log.warning("job %s: the best plan was not sequenced: %s", job_id, exc)
            self.jobs.set_delivery(job_id, best.iteration, None, None, str(exc), self.owner)
            return
        # every try, on the replica and back: the part of the job's time sequencing took
        plan["summary"]["seconds"] = round(time.perf_counter() - started, 3)
        self.jobs.set_delivery(job_id, best.iteration, plan, dose, owner=self.owner)
        s = plan["summary"]
        self.jobs.add_event(
            job_id,
            {
                "kind": "sequenced",
                "iteration": best.iteration,
                "message": f"best plan sequenced: {s['segments']} segments, "
                f"{s['total_mu']:.0f} MU per fraction",
            },
            owner=self.owner,
        )

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
        protocol = load_protocol_text(job.protocol_yaml, "protocol_yaml")
        iteration = iteration or _best_of(records, protocol)
        rec = next((r for r in records if r.iteration == iteration), None)
        if rec is None or rec.dose is None:
            raise ValueError(f"job {job_id} has no iteration {iteration}; it has 1..{len(records)}")
        check = rec.check
        if not check.all_hard_passed:
            raise FailedPreconditionError(
                f"iteration {iteration} of job {job_id} misses hard goal(s) "
                f"{[r.goal.label for r in check.failed if r.goal.hard]}; a reference plan must "
                "meet every hard goal"
            )
        if len(description) > 2000:
            raise ValueError("description is limited to 2000 characters")
        case = self.cases.load(job.case_id, matrix=False)
        plan = PlanDose(case, self.cases.get_artefact(rec.dose.path, rec.dose.sha256))
        plan.reuse_stats(rec.stats)
        ref = ReferencePlan(
            protocol=protocol.name,
            description=description or f"approved plan (agent {job.agent}, iteration {iteration})",
            features=self._case_features(job.case_id),
            objectives=list(rec.objectives),
            goals=[r.to_dict() for r in check.results],
            stats=[s.to_dict() for s in plan.stats()],
            source="approved",
            dvh=reference_dvh(plan, protocol.prescription_gy),
        )
        self.jobs.add_reference(ref.reference_id, ref.protocol, ref.to_dict())
        return ref.reference_id, ref.protocol, len(self.jobs.references(ref.protocol))

    def _finish(self, job_id: str, result: LoopResult) -> None:
        if self.jobs.job(job_id).state == "cancelled":
            return
        best = result.best_iteration
        msg = f"best plan: iteration {best} of {len(result.records)}" + (
            " (meets the protocol)" if result.met_at else ""
        )
        if self.jobs.set_state(
            job_id,
            "succeeded",
            best_iteration=best,
            event={"kind": "finished", "iteration": best, "message": msg},
            owner=self.owner,
        ):
            JOBS.labels("succeeded").inc()

    # -- export --------------------------------------------------------------------------------
    def report(self, job_id: str, records: list[IterationRecord] | None = None) -> PlanReport:
        """The job's report from its stored records (geometry only: no matrix is loaded)."""
        job = self.jobs.job(job_id)
        records = self.jobs.iterations(job_id) if records is None else records
        if not records:
            raise FailedPreconditionError(
                f"job {job_id} has no completed iteration yet; export later"
            )
        protocol = load_protocol_text(job.protocol_yaml, "protocol_yaml")
        case = self.cases.load(job.case_id, matrix=False)
        best = _best_of(records, protocol)
        report = PlanReport.from_records(
            case,
            protocol,
            job.agent,
            records,
            best,
            lambda ref: self.cases.get_artefact(ref.path, ref.sha256),
        )
        delivered = self.jobs.delivery(job_id)
        if delivered is not None and delivered[0] == best:
            _, plan, dose, error = delivered
            if dose is not None:
                report.use_deliverable(plan, self.cases.get_artefact(dose.path, dose.sha256))
            report.delivery_error = error
        return report

    def recent_jobs(self, limit: int = 100) -> list[tuple[Any, str, int, float, float]]:
        """The newest jobs: (job, protocol name, iterations stored, created, updated)."""
        if not 0 <= limit <= 1000:
            raise ValueError(f"limit {limit} is out of range: ask for 1..1000 jobs (0 = 100)")
        out = []
        for job, count, created, updated in self.jobs.recent_jobs(limit or 100):
            try:
                name = load_protocol_text(job.protocol_yaml, "protocol_yaml").name
            except ValueError:
                name = ""
            out.append((job, name, count, created, updated))
        return out

    def iteration_view(self, job_id: str, iteration: int, slice_index: int) -> dict[str, Any]:
        """One iteration's DVH curves and, for ``slice_index`` >= 0, that axial slice as a PNG
        (for a review page: the case's geometry and the stored dose, no matrix)."""
        job = self.jobs.job(job_id)
        records = self.jobs.iterations(job_id)
        number = iteration or job.best_iteration or (records[-1].iteration if records else 0)
        record = next((r for r in records if r.iteration == number), None)
        if record is None or record.dose is None:
            raise FailedPreconditionError(
                f"job {job_id} has no stored dose for iteration {number}: "
                f"it has {len(records)} iteration(s) so far"
            )
        protocol = load_protocol_text(job.protocol_yaml, "protocol_yaml")
        key = (job.case_id, record.dose.sha256, protocol.prescription_gy)
        view = self._dose_view(key, record.dose)
        grid = view.plan.case.grid
        nz = grid.shape[0]
        if not -1 <= slice_index < nz:
            raise ValueError(f"slice {slice_index} is out of range: the dose grid has {nz} slices")
        png = view.slice_png(slice_index) if slice_index >= 0 else b""
        z_mm = grid.origin_mm[0] + max(slice_index, 0) * grid.spacing_mm[0]
        return {
            "iteration": number,
            "levels_gy": view.levels,
            "dvh": view.curves,
            "num_slices": nz,
            "start_slice": view.start,
            "slice_png": png,
            "slice_z_mm": float(z_mm),
            "prescription_gy": float(protocol.prescription_gy),
        }

    def _dose_view(self, key: tuple[str, str, float], dose: ArtefactRef) -> _DoseView:
        """The review view of one stored dose, built once and kept for the last few doses."""
        with self._views_lock:
            view = self._views.get(key)
            if view is not None:
                self._views.move_to_end(key)
                return view
        case = self.cases.load(key[0], matrix=False)
        view = _DoseView.of(PlanDose(case, self.cases.get_artefact(dose.path, dose.sha256)), key[2])
        with self._views_lock:
            self._views[key] = view
            while len(self._views) > REVIEW_VIEWS:
                self._views.popitem(last=False)
        return view

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


REVIEW_VIEWS = 4  # stored doses a review page's views are kept for


@dataclass
class _DoseView:
    """One stored dose as a review page sees it: the DVH curves and the slice to start on,
    computed once; slices rendered on request by one slicer (cube and masks built once)."""

    plan: PlanDose
    prescription_gy: float
    levels: np.ndarray
    curves: dict[str, np.ndarray]
    start: int
    _render: Callable[[int], bytes] | None = None

    @classmethod
    def of(cls, plan: PlanDose, prescription_gy: float) -> _DoseView:
        levels = np.arange(0.0, float(plan.dose_rows.max()) * 1.05 + 0.5, 0.5)
        hot = plan.hottest_point()
        grid = plan.case.grid
        start = grid.index_of(hot[1])[0] if hot is not None else grid.shape[0] // 2
        return cls(plan, prescription_gy, levels, plan.dvh_curves(levels), int(start))

    def slice_png(self, index: int) -> bytes:
        if self._render is None:
            from radpilot.evaluation.images import isodose_slicer

            self._render = isodose_slicer(self.plan, self.prescription_gy)
        return self._render(index)


def _llm_identity(status: dict[str, LlmInfo]) -> str:
    """The LLM endpoints and models of the evaluator and the planner, as stored with a job."""
    return json.dumps({name: info.identity() for name, info in sorted(status.items())})


MAX_FEEDBACK_CHARS = 10_000


def _check_feedback(text: str) -> None:
    if len(text) > MAX_FEEDBACK_CHARS:
        raise ValueError(
            f"physician feedback is {len(text)} characters; keep it under {MAX_FEEDBACK_CHARS} "
            f"(the LLM agents read the first {PHYSICIAN_LIMIT:,})"
        )


def _best_of(records: list[IterationRecord], protocol: Protocol) -> int:
    """The job's best iteration, chosen as its loop chose it (the protocol's improvement gain)."""
    return best_iteration(records, LoopSettings(**protocol.improvement_settings()).best_min_gain)
