"""One in-process plan: optimise a case against a protocol's objectives and evaluate it.

The gRPC services call the same pieces; this module is what the demo and the CLI use without them.
"""

from __future__ import annotations

import logging
import time

from radpilot.agents.rules_planner import MemoryEntry, propose_rules
from radpilot.case import Case
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import check_protocol
from radpilot.evaluation.rules import Decision, evaluate_rules
from radpilot.fmo import FluenceOptimizer, FMOSettings
from radpilot.protocol import Protocol
from radpilot.report import IterationRecord, PlanReport

log = logging.getLogger(__name__)


def plan_once(case: Case, protocol: Protocol, backend: str = "numpy") -> PlanReport:
    """Optimise with the protocol's initial objectives, normalise, and check the protocol."""
    protocol.check_case(case)
    t0 = time.perf_counter()
    optimizer = FluenceOptimizer(case, backend=backend)
    t_prep = time.perf_counter() - t0
    settings = FMOSettings(normalize_to=protocol.target, coverage_pct=protocol.coverage_pct)
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
) -> PlanReport:
    """The outer loop in process (paper Algorithm 1) with the rule-based evaluator and planner.

    Optimise -> evaluate -> remember -> propose, until every goal is met or ``max_iterations``;
    each FMO warm-starts from the previous plan. Reports the best plan by the protocol's
    priorities, and which iteration it came from.
    """
    if max_iterations < 1:
        raise ValueError("max_iterations must be at least 1")
    if memory_length < 1:
        raise ValueError("memory_length must be at least 1")
    protocol.check_case(case)
    t0 = time.perf_counter()
    optimizer = FluenceOptimizer(case, backend=backend)
    settings = FMOSettings(normalize_to=protocol.target, coverage_pct=protocol.coverage_pct)
    objectives = list(protocol.objectives)
    fluence = None
    records: list[IterationRecord] = []
    memory: list[MemoryEntry] = []
    plans: list[PlanDose] = []
    fmo_seconds = 0.0
    for it in range(1, max_iterations + 1):
        result = optimizer.solve(objectives, x0=fluence, settings=settings)
        fmo_seconds += result.seconds
        fluence = result.fluence
        plan = PlanDose(case, result.dose_rows)
        evaluation = evaluate_rules(plan, protocol)
        memory = [*memory, MemoryEntry(it, objectives, evaluation.check)][-memory_length:]
        done = evaluation.decision is Decision.MEETS_PROTOCOL
        rationale = ""
        if not done and it < max_iterations:
            objectives_next, rationale = propose_rules(
                protocol, objectives, evaluation.check, memory
            )
        records.append(
            IterationRecord(
                it,
                list(objectives),
                result.stats(),
                evaluation.check,
                "; ".join(evaluation.findings) + (f" | planner: {rationale}" if rationale else ""),
            )
        )
        plans.append(plan)
        log.info("iteration %d: %s", it, "meets protocol" if done else "needs improvement")
        if done or it == max_iterations:
            break
        objectives = objectives_next
    best = max(range(len(records)), key=lambda i: records[i].check.rank())
    return PlanReport(
        case_name=case.name,
        protocol=protocol,
        agent="rules",
        plan=plans[best],
        check=records[best].check,
        iterations=records,
        best_iteration=records[best].iteration,
        seconds={"fmo": fmo_seconds, "loop": time.perf_counter() - t0},
    )
