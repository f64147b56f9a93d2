"""One in-process plan: optimise a case against a protocol's objectives and evaluate it.

The gRPC services call the same pieces; this module is what the demo and the CLI use without them.
"""

from __future__ import annotations

import logging
import time

from radpilot.agents.llm_evaluator import LLMEvaluator
from radpilot.agents.llm_planner import LLMPlanner
from radpilot.agents.references import ReferencePlan, anatomy_features, nearest
from radpilot.agents.rules_planner import MemoryEntry
from radpilot.agents.step import (
    JOB_AGENTS,
    check_agent,
    evaluate_plan,
    evaluator_agent,
    memory_window,
    propose_next,
)
from radpilot.case import Case
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import check_protocol
from radpilot.evaluation.rules import Decision
from radpilot.fmo import FluenceOptimizer
from radpilot.llm.client import LLMClient
from radpilot.protocol import Protocol
from radpilot.report import IterationRecord, PlanReport

log = logging.getLogger(__name__)


def plan_once(case: Case, protocol: Protocol, backend: str = "numpy") -> PlanReport:
    """Optimise with the protocol's initial objectives, normalise, and check the protocol."""
    protocol.check_case(case)
    t0 = time.perf_counter()
    optimizer = FluenceOptimizer(case, backend=backend)
    t_prep = time.perf_counter() - t0
    settings = protocol.fmo_settings()
    result = optimizer.solve(protocol.objectives, settings=settings)
    plan = PlanDose(case, result.dose_rows)
    t1 = time.perf_counter()
    check = check_protocol(plan, protocol)
    feedback = "; ".join(r.finding() for r in check.results)
    log.info(
        "FMO %d iterations in %.2f s on %s; %s",
        result.iterations,
        result.seconds,
        result.backend,
        feedback,
    )
    record = IterationRecord(1, list(protocol.objectives), result.stats(), check, feedback)
    return PlanReport(
        case_name=case.name,
        protocol=protocol,
        agent="initial-objectives",
        plan=plan,
        check=check,
        iterations=[record],
        best_iteration=1,
        seconds={
            "prepare_backend": t_prep,
            "fmo": result.seconds,
            "evaluate": time.perf_counter() - t1,
        },
    )


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
) -> PlanReport:
    """The outer loop in process (paper Algorithm 1): optimise -> evaluate -> remember -> propose.

    ``agent`` names the planner (rules, llm, bo, fixed); ``llm`` also switches the evaluator to
    the LLM experts (guarded by the exact check). Stops when the plan meets the protocol, when the
    planner proposes no change, or after ``max_iterations``; each FMO warm-starts from the
    previous plan. Reports the best plan by the protocol's priorities and every LLM call.
    """
    if max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    if memory_length < 1:
        raise ValueError("memory_length must be at least 1")
    check_agent(agent, JOB_AGENTS, llm_configured=llm is not None)
    protocol.check_case(case)
    t0 = time.perf_counter()
    optimizer = FluenceOptimizer(case, backend=backend)
    settings = protocol.fmo_settings()
    llm_eval = LLMEvaluator(llm) if llm is not None and agent == "llm" else None
    llm_plan = LLMPlanner(llm) if llm is not None and agent == "llm" else None
    refs = [
        r.for_prompt()
        for r, _ in nearest(
            references or [], protocol.name, case_anatomy_features(case), num_references
        )
    ]
    objectives = list(protocol.objectives)
    fluence = None
    records: list[IterationRecord] = []
    history: list[MemoryEntry] = []
    plans: list[PlanDose] = []
    fmo_seconds = 0.0
    for it in range(1, max_iterations + 1):
        result = optimizer.solve(objectives, x0=fluence, settings=settings)
        fmo_seconds += result.seconds
        fluence = result.fluence
        plan = PlanDose(case, result.dose_rows)
        ev = evaluate_plan(evaluator_agent(agent), plan, protocol, llm_eval)
        evaluation = ev.evaluation
        history.append(
            MemoryEntry(it, objectives, evaluation.check, physician, tuple(evaluation.findings))
        )
        done = evaluation.decision is Decision.MEETS_PROTOCOL
        rationale, calls = "", list(ev.calls)
        objectives_next = objectives
        if not done and it < max_iterations:
            outcome = propose_next(
                agent,
                protocol,
                objectives,
                memory_window(agent, history, memory_length),
                references=refs,
                physician=physician,
                llm=llm_plan,
            )
            objectives_next, rationale = outcome.objectives, outcome.rationale
            calls += outcome.calls
        for c in calls:
            c.iteration = it
        records.append(
            IterationRecord(
                it,
                list(objectives),
                result.stats(),
                evaluation.check,
                "; ".join(evaluation.findings) + (f" | planner: {rationale}" if rationale else ""),
                [c.to_dict() for c in calls],
            )
        )
        plans.append(plan)
        log.info("iteration %d: %s", it, "meets protocol" if done else "needs improvement")
        if done or it == max_iterations or objectives_next == objectives:
            break
        objectives = objectives_next
    best = max(range(len(records)), key=lambda i: records[i].check.rank())
    return PlanReport(
        case_name=case.name,
        protocol=protocol,
        agent=agent,
        plan=plans[best],
        check=records[best].check,
        iterations=records,
        best_iteration=records[best].iteration,
        seconds={"fmo": fmo_seconds, "loop": time.perf_counter() - t0},
    )


def case_anatomy_features(case: Case) -> dict[str, float]:
    return anatomy_features(
        case.grid, [(s.name, s.kind.value, s.voxel_indices) for s in case.structures]
    )
