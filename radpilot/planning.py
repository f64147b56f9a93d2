"""One in-process plan: optimise a case against a protocol's objectives and evaluate it.

The gRPC services call the same pieces; this module is what the demo and the CLI use without them.
"""

from __future__ import annotations

import logging
import time

from radpilot.case import Case
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import check_protocol
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
