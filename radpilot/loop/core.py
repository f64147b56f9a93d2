"""The outer loop (paper Algorithm 1), written once: optimise -> evaluate -> remember -> propose.

It speaks to three ports and a sink, plain Python protocols that the in-process runner
(``radpilot.loop.inprocess``) wires to the library and the orchestrator wires to gRPC clients and
its job store. Defined here and nowhere else: the stopping rules, the memory window, the guardrail
("meets the protocol" only when the evaluator says so *and* the exact check passes every goal),
the best-plan ranking, the loop's events, and riding out an unavailable service (the same step
is retried with backoff within a budget; nothing is stored twice).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, TypeVar

from radpilot.agents.step import memory_window
from radpilot.errors import StepFailedError, UnavailableError
from radpilot.evaluation.protocol_check import ProtocolCheck
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.loop.record import MEETS, NEEDS_IMPROVEMENT, ArtefactRef, FmoStats, IterationRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_RETRY_BUDGET_S = 180.0


# -- what the ports answer ---------------------------------------------------------------------
@dataclass
class Optimized:
    dose: ArtefactRef
    fluence: ArtefactRef
    fmo: FmoStats


@dataclass
class Evaluated:
    check: ProtocolCheck
    findings: list[str]
    meets: bool  # the evaluator's decision (the loop applies the guardrail on top)
    llm_decision: str = ""
    disagreement: bool = False
    llm_calls: list[dict[str, Any]] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    dvh: dict[str, Any] = field(default_factory=dict)  # DVHTable.compact().to_dict()


@dataclass
class Proposal:
    objectives: list[ObjectiveTerm]
    rationale: str = ""
    llm_calls: list[dict[str, Any]] = field(default_factory=list)
    reference_ids: list[str] = field(default_factory=list)


# -- the ports ---------------------------------------------------------------------------------
class OptimizerPort(Protocol):
    def optimize(self, objectives: list[ObjectiveTerm], warm: ArtefactRef | None) -> Optimized:
        """One FMO; ``warm`` is the previous iteration's fluence. UnavailableError: retry."""
        ...


class EvaluatorPort(Protocol):
    def evaluate(self, dose: ArtefactRef, physician_feedback: str = "") -> Evaluated:
        """Judge one plan dose against the protocol (and the physician's comments in force).
        UnavailableError: retry."""
        ...


class PlannerPort(Protocol):
    def propose(
        self,
        current: list[ObjectiveTerm],
        memory: list[IterationRecord],
        physician_feedback: str,
    ) -> Proposal:
        """The next objective terms from the remembered iterations. UnavailableError: retry."""
        ...


class IterationSink(Protocol):
    def stored(self) -> list[IterationRecord]:
        """Iterations already stored for this run (resume continues after the last)."""
        ...

    def physician_feedback(self, iteration: int) -> str:
        """The physician's feedback in force at an iteration ("" when none)."""
        ...

    def event(self, event: dict[str, Any]) -> None:
        """A progress event; a sink that resumes must not store the same (kind, iteration) twice."""
        ...

    def add(self, record: IterationRecord, event: dict[str, Any]) -> None:
        """Store a finished iteration and its event together (atomically where it can)."""
        ...

    def check_stop(self) -> None:
        """Raise (any exception) to stop between steps: cancelled, shutting down."""
        ...


@dataclass(frozen=True)
class LoopSettings:
    max_iterations: int = 6
    memory_length: int = 4
    agent: str = "rules"  # the planner's name: BO remembers every iteration
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S  # how long to wait for a service to return
    retry_first_s: float = 0.5  # first backoff; doubles up to retry_max_s
    retry_max_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_iterations < 1:
            raise ValueError("max_iterations must be at least 1")
        if self.memory_length < 1:
            raise ValueError("memory_length must be at least 1")
        if self.retry_budget_s < 0:
            raise ValueError("retry_budget_s must be >= 0")


@dataclass
class LoopResult:
    records: list[IterationRecord]
    best_iteration: int
    met_at: int  # first iteration that met the protocol, 0 = never

    @property
    def best(self) -> IterationRecord:
        return next(r for r in self.records if r.iteration == self.best_iteration)


def best_iteration(records: list[IterationRecord]) -> int:
    """The best iteration by the protocol's priorities, then by how far goals are missed;
    the earliest of equals. 0 when there is none."""
    if not records:
        return 0
    return max(records, key=lambda r: (*r.check.rank(), -r.iteration)).iteration


def first_met(records: list[IterationRecord]) -> int:
    return next((r.iteration for r in records if r.meets), 0)


def finished(records: list[IterationRecord]) -> bool:
    """True when a stored run needs no further iteration (met, or nothing left to try)."""
    last = records[-1] if records else None
    return last is not None and (
        last.meets or not last.proposal or last.proposal == last.objectives
    )


def run_loop(
    objectives: list[ObjectiveTerm],
    optimizer: OptimizerPort,
    evaluator: EvaluatorPort,
    planner: PlannerPort,
    sink: IterationSink,
    settings: LoopSettings,
) -> LoopResult:
    """Run (or resume) the loop from the protocol's initial ``objectives`` until the plan meets
    the protocol, the planner has nothing new, or the iteration budget is spent."""
    records = list(sink.stored())
    if finished(records):
        return _result(records)
    warm: ArtefactRef | None = None
    if records:
        objectives, warm = records[-1].proposal, records[-1].fluence
    for it in range(len(records) + 1, settings.max_iterations + 1):
        sink.check_stop()
        sink.event({"kind": "iteration_started", "iteration": it})
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        opt = _retrying(settings, sink, "optimizer", partial(optimizer.optimize, objectives, warm))
        seconds["optimize"] = time.perf_counter() - t0
        sink.event(
            {
                "kind": "fmo_done",
                "iteration": it,
                "fmo": opt.fmo.to_json(),
                "message": f"served by {opt.fmo.replica or 'this process'}",
            }
        )
        sink.check_stop()
        t0 = time.perf_counter()
        feedback = sink.physician_feedback(it)
        ev = _retrying(settings, sink, "evaluator", partial(evaluator.evaluate, opt.dose, feedback))
        seconds["evaluate"] = time.perf_counter() - t0
        meets = ev.meets and ev.check.all_passed  # the guardrail
        sink.event(
            {
                "kind": "evaluated",
                "iteration": it,
                "goals": [r.to_dict() for r in ev.check.results],
                "message": "; ".join(ev.findings),
            }
        )
        record = IterationRecord(
            iteration=it,
            objectives=list(objectives),
            fmo=opt.fmo,
            check=ev.check,
            findings=list(ev.findings),
            decision=MEETS if meets else NEEDS_IMPROVEMENT,
            dose=opt.dose,
            fluence=opt.fluence,
            physician_feedback=feedback,
            llm_decision=ev.llm_decision,
            disagreement=ev.disagreement,
            llm_calls=[{**c, "iteration": it} for c in ev.llm_calls],
            seconds=seconds,
            stats=list(ev.stats),
            dvh=dict(ev.dvh),
        )
        if not meets and it < settings.max_iterations:
            sink.check_stop()
            memory = memory_window(settings.agent, [*records, record], settings.memory_length)
            t0 = time.perf_counter()
            prop = _retrying(
                settings,
                sink,
                "planner",
                partial(planner.propose, list(objectives), memory, record.physician_feedback),
            )
            seconds["propose"] = time.perf_counter() - t0
            record.proposal = list(prop.objectives)
            record.rationale = prop.rationale
            record.reference_ids = list(prop.reference_ids)
            record.llm_calls += [{**c, "iteration": it} for c in prop.llm_calls]
        sink.check_stop()
        sink.add(
            record,
            {
                "kind": "proposal",
                "iteration": it,
                "proposal": [o.to_dict() for o in record.proposal],
                "message": record.rationale,
            },
        )
        records.append(record)
        log.info("iteration %d: %s", it, "meets protocol" if meets else "needs improvement")
        if finished(records):
            break
        objectives, warm = record.proposal, opt.fluence
    return _result(records)


def _result(records: list[IterationRecord]) -> LoopResult:
    return LoopResult(records, best_iteration(records), first_met(records))


def _retrying(settings: LoopSettings, sink: IterationSink, step: str, call: Callable[[], T]) -> T:
    """Call a port; while it says UnavailableError, wait (doubling) and call again, until the
    retry budget is spent. Stop requests are honoured between attempts."""
    start = time.monotonic()
    delay = settings.retry_first_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except UnavailableError as exc:
            waited = time.monotonic() - start
            if waited + delay > settings.retry_budget_s:
                raise StepFailedError(
                    f"UNAVAILABLE: the {step} did not come back within the "
                    f"{settings.retry_budget_s:g} s retry budget ({attempt} attempt(s)): {exc}"
                ) from exc
            log.warning(
                "%s unavailable (attempt %d), retrying in %.1f s: %s", step, attempt, delay, exc
            )
            sink.check_stop()
            time.sleep(delay)
            sink.check_stop()
            delay = min(delay * 2, settings.retry_max_s)
