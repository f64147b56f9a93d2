"""The outer loop wired to the library, in this process: no services, no store writes.

``plan_loop`` is what ``radpilot plan --in-process``, the tests and the benchmarks run; the
orchestrator runs the same ``run_loop`` over gRPC. Doses and fluences stay in memory, addressed
by ``ArtefactRef``s like the case-store artefacts of the services.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from radpilot.agents.llm_evaluator import LLMEvaluator
from radpilot.agents.llm_planner import LLMPlanner
from radpilot.agents.references import ReferencePlan, anatomy_features, nearest
from radpilot.agents.step import (
    JOB_AGENTS,
    check_agent,
    evaluate_plan,
    evaluator_agent,
    propose_next,
)
from radpilot.agents.types import MemoryEntry
from radpilot.case import Case
from radpilot.cases.helpers import build_helper
from radpilot.delivery.sequencing import SequencingSettings, deliver
from radpilot.errors import DeliveryError
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.rules import Decision
from radpilot.fmo import FluenceOptimizer
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.llm.client import LLMClient
from radpilot.loop.core import (
    Evaluated,
    LoopSettings,
    Optimized,
    OptimizerPort,
    Proposal,
    SequencingOptimizer,
    run_loop,
)
from radpilot.loop.record import ArtefactRef, FmoStats, IterationRecord
from radpilot.protocol import Protocol
from radpilot.report import PlanReport

log = logging.getLogger(__name__)


class MemoryArtefacts:
    """Arrays addressed like case-store artefacts, kept in this process."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def put(self, kind: str, array: np.ndarray) -> ArtefactRef:
        ref = ArtefactRef(f"memory:{kind}-{len(self._arrays) + 1}")
        self._arrays[ref.path] = array
        return ref

    def get(self, ref: ArtefactRef) -> np.ndarray:
        return self._arrays[ref.path]


def protocol_optimizer(case: Case, protocol: Protocol, backend: str = "numpy") -> FluenceOptimizer:
    """An optimizer for the case that knows the protocol's helper structures (terms name them)."""
    optimizer = FluenceOptimizer(case, backend=backend)
    optimizer.use_helpers([build_helper(case, h) for h in protocol.all_helpers])
    return optimizer


class LibraryOptimizer:
    def __init__(self, case: Case, protocol: Protocol, backend: str, arrays: MemoryArtefacts):
        self.optimizer = protocol_optimizer(case, protocol, backend)
        self.settings = protocol.fmo_settings()
        self.arrays = arrays

    def optimize(self, objectives: list[ObjectiveTerm], warm: ArtefactRef | None) -> Optimized:
        x0 = self.arrays.get(warm) if warm is not None else None
        result = self.optimizer.solve(objectives, x0=x0, settings=self.settings)
        return Optimized(
            self.arrays.put("dose", result.dose_rows),
            self.arrays.put("fluence", result.fluence),
            FmoStats.from_json(result.stats()),
        )


class LibraryEvaluator:
    def __init__(
        self,
        case: Case,
        protocol: Protocol,
        agent: str,
        arrays: MemoryArtefacts,
        llm: LLMEvaluator | None = None,
        references: list[ReferencePlan] | None = None,
    ) -> None:
        self.case, self.protocol, self.agent, self.arrays, self.llm = (
            case,
            protocol,
            agent,
            arrays,
            llm,
        )
        self.references = references or []

    def evaluate(self, dose: ArtefactRef, physician_feedback: str = "") -> Evaluated:
        plan = PlanDose(self.case, self.arrays.get(dose))
        out = evaluate_plan(
            self.agent,
            plan,
            self.protocol,
            self.llm,
            references=[r.for_prompt() for r in self.references],
            physician=physician_feedback,
        )
        return Evaluated(
            check=out.evaluation.check,
            findings=list(out.evaluation.findings),
            meets=out.evaluation.decision is Decision.MEETS_PROTOCOL,
            llm_decision=out.llm_decision,
            disagreement=out.disagreement,
            llm_calls=[c.to_dict() for c in out.calls],
            stats=[s.to_dict() for s in plan.stats()],
            dvh=plan.dvh_table().compact(self.protocol.prescription_gy).to_dict(),
        )


def memory_entries(records: list[IterationRecord]) -> list[MemoryEntry]:
    return [
        MemoryEntry(
            r.iteration,
            list(r.objectives),
            r.check,
            r.physician_feedback,
            tuple(r.findings),
            tuple(r.stats),
            dict(r.dvh),
            r.fmo.scale_factor,
        )
        for r in records
    ]


class LibraryPlanner:
    def __init__(
        self,
        protocol: Protocol,
        agent: str,
        llm: LLMPlanner | None = None,
        references: list[ReferencePlan] | None = None,
    ) -> None:
        self.protocol, self.agent, self.llm = protocol, agent, llm
        self.references = references or []

    def propose(
        self,
        current: list[ObjectiveTerm],
        memory: list[IterationRecord],
        physician_feedback: str,
        count: int = 1,
    ) -> Proposal:
        out = propose_next(
            self.agent,
            self.protocol,
            current,
            memory_entries(memory),
            references=[r.for_prompt() for r in self.references],
            physician=physician_feedback,
            llm=self.llm,
            count=count,
        )
        return Proposal(
            out.objectives,
            out.rationale,
            [c.to_dict() for c in out.calls],
            [r.reference_id for r in self.references],
            out.alternatives,
        )


class MemorySink:
    """Keeps the records in a list; events go to a callback (the CLI's progress lines)."""

    def __init__(
        self,
        physician_feedback: str = "",
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.records: list[IterationRecord] = []
        self.feedback = physician_feedback
        self.on_event = on_event

    def stored(self) -> list[IterationRecord]:
        return list(self.records)

    def physician_feedback(self, iteration: int) -> str:
        return self.feedback

    def event(self, event: dict[str, Any]) -> None:
        if self.on_event is not None:
            self.on_event(event)

    def add(self, record: IterationRecord, event: dict[str, Any]) -> None:
        self.records.append(record)
        self.event(event)

    def check_stop(self) -> None:
        return None


def plan_loop(
    case: Case,
    protocol: Protocol,
    max_iterations: int = 6,
    memory_length: int = 4,
    backend: str = "numpy",
    agent: str = "rules",
    llm: LLMClient | None = None,
    references: list[ReferencePlan] | None = None,
    num_references: int = 3,
    physician: str = "",
    on_event: Callable[[dict[str, Any]], None] | None = None,
    candidates: int = 1,
) -> PlanReport:
    """Plan a case in process (paper Algorithm 1) and report the best plan.

    ``agent`` names the planner (rules, llm, bo, fixed); ``llm`` also switches the evaluator to
    the LLM experts (guarded by the exact check). Each FMO warm-starts from the previous plan.
    ``candidates`` K > 1: K parameter sets per round from round 2 on, optimised one after the
    other here (the services optimise them side by side across optimizer replicas).
    """
    settings = LoopSettings(
        max_iterations,
        memory_length,
        agent,
        candidates=candidates,
        parallel=1,
        **protocol.improvement_settings(),
    )
    check_agent(agent, JOB_AGENTS, llm_configured=llm is not None)
    protocol.check_case(case)
    t0 = time.perf_counter()
    arrays = MemoryArtefacts()
    use_llm = llm is not None and agent == "llm"
    refs = (
        [
            r
            for r, _ in nearest(
                references or [], protocol.name, case_anatomy_features(case), num_references
            )
        ]
        if use_llm
        else []
    )
    optimizer = LibraryOptimizer(case, protocol, backend, arrays)

    def sequence(
        fluence: np.ndarray, settings: SequencingSettings, terms: list[ObjectiveTerm]
    ) -> tuple[dict[str, Any], np.ndarray]:
        """One sequencing of a plan's fluence (with ``terms``: weights refitted on them too)."""
        d = deliver(
            case,
            fluence,
            settings,
            fractions=protocol.num_fractions,
            target=protocol.target,
            prescription_gy=protocol.prescription_gy,
            coverage_pct=protocol.coverage_pct,
            objective=(
                (lambda x: optimizer.optimizer.value_and_gradient(x, terms)) if terms else None
            ),
        )
        return d.to_json(protocol.prescription_gy), d.dose_rows

    port: OptimizerPort = optimizer
    if protocol.delivery is not None and protocol.delivery.every_iteration:
        delivery = protocol.delivery

        def sequence_iteration(fluence: ArtefactRef) -> tuple[dict[str, Any], ArtefactRef]:
            plan, dose = sequence(arrays.get(fluence), delivery, [])
            return plan, arrays.put("deliverable", dose)

        port = SequencingOptimizer(optimizer, sequence_iteration, (DeliveryError,))
    result = run_loop(
        list(protocol.objectives),
        port,
        LibraryEvaluator(
            case,
            protocol,
            evaluator_agent(agent),
            arrays,
            LLMEvaluator(llm) if use_llm and llm else None,
            refs,
        ),
        LibraryPlanner(protocol, agent, LLMPlanner(llm) if use_llm and llm else None, refs),
        MemorySink(physician, on_event),
        settings,
    )
    report = PlanReport.from_records(
        case, protocol, agent, result.records, result.best_iteration, arrays.get
    )
    best = result.best
    t_seq = time.perf_counter()
    if protocol.delivery is not None and best.fluence is not None:
        fluence = arrays.get(best.fluence)

        try:
            report.sequence_keeping_goals(
                lambda settings, terms: sequence(fluence, settings, terms),
                lambda dose: dose,
                protocol.delivery,
                best.objectives,
            )
        except DeliveryError as exc:
            report.delivery_error = str(exc)
    report.seconds = {
        "fmo": sum(r.fmo.seconds for r in result.records),
        "sequencing": time.perf_counter() - t_seq,
        "loop": time.perf_counter() - t0,
    }
    return report


def plan_once(case: Case, protocol: Protocol, backend: str = "numpy") -> PlanReport:
    """One FMO with the protocol's initial objectives, normalised and checked (no agent)."""
    report = plan_loop(case, protocol, max_iterations=1, backend=backend, agent="fixed")
    report.agent = "initial-objectives"
    return report


def case_anatomy_features(case: Case) -> dict[str, float]:
    return anatomy_features(
        case.grid, [(s.name, s.kind.value, s.voxel_indices) for s in case.structures]
    )
