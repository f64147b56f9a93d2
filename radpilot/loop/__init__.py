"""The one outer loop (paper Algorithm 1) over ports, its typed iteration record, and its
in-process wiring. The orchestrator service wires the same loop to gRPC clients."""

from radpilot.loop.core import (
    Evaluated,
    EvaluatorPort,
    IterationSink,
    LoopResult,
    LoopSettings,
    Optimized,
    OptimizerPort,
    PlannerPort,
    Proposal,
    best_iteration,
    run_loop,
)
from radpilot.loop.record import ArtefactRef, FmoStats, IterationRecord

__all__ = [
    "ArtefactRef",
    "Evaluated",
    "EvaluatorPort",
    "FmoStats",
    "IterationRecord",
    "IterationSink",
    "LoopResult",
    "LoopSettings",
    "Optimized",
    "OptimizerPort",
    "PlannerPort",
    "Proposal",
    "best_iteration",
    "run_loop",
]
