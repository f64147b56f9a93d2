"""What the agents exchange with the outer loop: memory entries, proposals, evaluations."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from radpilot.evaluation.protocol_check import ProtocolCheck
from radpilot.evaluation.rules import Evaluation
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.llm.client import LLMCall


@dataclass(frozen=True)
class MemoryEntry:
    """One remembered iteration, as a planner sees it (paper Algorithm 1's memory)."""

    iteration: int
    objectives: list[ObjectiveTerm]
    check: ProtocolCheck
    physician_feedback: str = ""  # the physician's free text in force at this iteration
    findings: tuple[str, ...] = ()  # the evaluator's findings on this iteration's plan
    stats: tuple[dict[str, Any], ...] = ()  # StructureStats.to_dict() of this iteration's plan
    dvh: dict[str, Any] = field(default_factory=dict)  # DVHTable.compact().to_dict()
    # the FMO's normalisation factor for this plan (the objective doses act on the dose before
    # it was multiplied by this)
    scale: float = 1.0


@dataclass
class PlannerOutcome:
    """A planner's next objective terms, why, and the LLM calls it made (if any)."""

    objectives: list[ObjectiveTerm]
    rationale: str
    calls: list[LLMCall] = field(default_factory=list)
    fallback: bool = False
    # further parameter sets for the same round when more than one was asked for
    alternatives: list[list[ObjectiveTerm]] = field(default_factory=list)


@dataclass
class EvaluationOutcome:
    """An evaluator's verdict on one plan (after the guardrail) and its LLM calls."""

    evaluation: Evaluation
    llm_decision: str = ""  # the model's own decision, before the guardrail
    disagreement: bool = False
    calls: list[LLMCall] = field(default_factory=list)
