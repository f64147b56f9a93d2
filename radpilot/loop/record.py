"""The typed record of one outer-loop iteration, and its one JSON form.

The job store keeps ``IterationRecord.to_json()``; ``from_json`` reads it back, including records
written before this type existed (``goals``/``feedback`` keys, the fluence inline as hex: see
``legacy_fluence_hex``). The services convert it to protos in one place
(``services/common/convert.py``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from radpilot.evaluation.protocol_check import GoalResult, ProtocolCheck
from radpilot.fmo.objectives import ObjectiveTerm

MEETS = "meets_protocol"
NEEDS_IMPROVEMENT = "needs_improvement"


@dataclass(frozen=True)
class ArtefactRef:
    """A dose or fluence array kept in the case store (or, in process, in memory)."""

    path: str
    sha256: str = ""

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "sha256": self.sha256}

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> ArtefactRef | None:
        return cls(str(d["path"]), str(d.get("sha256", ""))) if d else None


@dataclass
class FmoStats:
    """How one fluence-map optimisation went (the same fields in process and over gRPC)."""

    objective: float = 0.0
    objective_normalized: float = 0.0
    iterations: int = 0
    seconds: float = 0.0
    backend: str = ""
    converged: bool = False
    stop_reason: str = ""
    scale_factor: float = 1.0
    sparse_products: int = 0
    working_set_rows: int = 0  # rows of A the last round iterated on
    term_values: dict[str, float] = field(default_factory=dict)
    replica: str = ""  # which optimizer replica served it ("" in process)
    case_load_seconds: float = 0.0  # the replica loading the case first (services only)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any] | None) -> FmoStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (d or {}).items() if k in names})


@dataclass
class IterationRecord:
    """Everything one iteration produced: parameters, plan, verdict, proposal and audit trail."""

    iteration: int
    objectives: list[ObjectiveTerm]
    fmo: FmoStats
    check: ProtocolCheck
    findings: list[str] = field(default_factory=list)
    decision: str = NEEDS_IMPROVEMENT  # after the guardrail
    dose: ArtefactRef | None = None
    fluence: ArtefactRef | None = None
    proposal: list[ObjectiveTerm] = field(default_factory=list)  # [] = none (stopped here)
    rationale: str = ""
    physician_feedback: str = ""
    llm_decision: str = ""  # the LLM evaluator's own decision, before the guardrail
    disagreement: bool = False
    reference_ids: list[str] = field(default_factory=list)
    llm_calls: list[dict[str, Any]] = field(default_factory=list)  # LLMCall.to_dict()
    seconds: dict[str, float] = field(default_factory=dict)  # optimize, evaluate, propose
    stats: list[dict[str, Any]] = field(default_factory=list)  # StructureStats.to_dict()
    dvh: dict[str, Any] = field(default_factory=dict)  # compact DVH (DVHTable.to_dict())
    legacy_fluence_hex: str = ""  # only in records read from the pre-typed store format
    # Candidates in parallel: the outer round this FMO belongs to (0 = its iteration, as in a run
    # of one candidate per round), its index in the round, and on the round's last record the
    # other parameter sets proposed for the next round (``proposal`` is the first).
    round: int = 0
    candidate: int = 0
    alternatives: list[list[ObjectiveTerm]] = field(default_factory=list)
    # Sequenced every iteration (delivery.every_iteration): ``dose`` is then the deliverable
    # dose the check judged, ``optimal_dose`` the fluence optimum's, ``delivery`` its segments
    # and MU (or {"error": why} when this plan could not be sequenced).
    optimal_dose: ArtefactRef | None = None
    delivery: dict[str, Any] = field(default_factory=dict)
    # Why this FMO started from zero fluence instead of the previous round's plan (a goal had
    # stalled: see radpilot.loop.core.restart_reason); "" = warm start (or round 1).
    cold_start: str = ""

    def __post_init__(self) -> None:
        if self.round <= 0:
            self.round = self.iteration

    @property
    def candidates(self) -> list[list[ObjectiveTerm]]:
        """Every parameter set this record proposes for the next round ([] = none)."""
        return [list(self.proposal), *map(list, self.alternatives)] if self.proposal else []

    @property
    def dose_basis(self) -> str:
        """What the check judged: "deliverable" (sequenced every iteration) or "fluence-optimal"."""
        return "deliverable" if self.optimal_dose is not None else "fluence-optimal"

    @property
    def meets(self) -> bool:
        return self.decision == MEETS

    def summary_line(self) -> str:
        """Findings and the planner's rationale on one line (logs, the report's table)."""
        text = "; ".join(self.findings)
        return text + (f" | planner: {self.rationale}" if self.rationale else "")

    def to_json(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "objectives": [o.to_dict() for o in self.objectives],
            "fmo": self.fmo.to_json(),
            "goals": [r.to_dict() for r in self.check.results],
            "findings": list(self.findings),
            "decision": self.decision,
            "dose": self.dose.to_json() if self.dose else None,
            "fluence": self.fluence.to_json() if self.fluence else None,
            "proposal": [o.to_dict() for o in self.proposal],
            "rationale": self.rationale,
            "physician_feedback": self.physician_feedback,
            "llm_decision": self.llm_decision,
            "disagreement": self.disagreement,
            "reference_ids": list(self.reference_ids),
            "llm_calls": [{**c, "iteration": self.iteration} for c in self.llm_calls],
            "seconds": dict(self.seconds),
            "stats": list(self.stats),
            "dvh": dict(self.dvh),
            "round": self.round,
            "candidate": self.candidate,
            "alternatives": [[o.to_dict() for o in a] for a in self.alternatives],
            "optimal_dose": self.optimal_dose.to_json() if self.optimal_dose else None,
            "delivery": dict(self.delivery),
            "cold_start": self.cold_start,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> IterationRecord:
        return cls(
            iteration=int(d["iteration"]),
            objectives=[ObjectiveTerm.from_dict(o) for o in d["objectives"]],
            fmo=FmoStats.from_json(d.get("fmo")),
            check=ProtocolCheck([GoalResult.from_dict(g) for g in d.get("goals", [])]),
            findings=list(d.get("findings", [])),
            decision=d.get("decision", NEEDS_IMPROVEMENT),
            dose=ArtefactRef.from_json(d.get("dose")),
            fluence=ArtefactRef.from_json(d.get("fluence")),
            proposal=[ObjectiveTerm.from_dict(o) for o in d.get("proposal", [])],
            rationale=d.get("rationale", ""),
            physician_feedback=d.get("physician_feedback", d.get("feedback", "")),
            llm_decision=d.get("llm_decision", ""),
            disagreement=bool(d.get("disagreement", False)),
            reference_ids=list(d.get("reference_ids", [])),
            llm_calls=list(d.get("llm_calls", [])),
            seconds=dict(d.get("seconds", {})),
            stats=list(d.get("stats", [])),
            dvh=dict(d.get("dvh") or {}),
            legacy_fluence_hex=d.get("fluence_hex", ""),
            round=int(d.get("round", 0)),
            candidate=int(d.get("candidate", 0)),
            alternatives=[
                [ObjectiveTerm.from_dict(o) for o in a] for a in d.get("alternatives", [])
            ],
            optimal_dose=ArtefactRef.from_json(d.get("optimal_dose")),
            delivery=dict(d.get("delivery") or {}),
            cold_start=str(d.get("cold_start", "")),
        )
