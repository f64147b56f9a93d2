"""The deterministic protocol check: each clinical goal's achieved value, pass/fail and margin.

This is RadPilot's guardrail: no plan is reported as meeting the protocol unless every hard goal
passes here, whatever an LLM evaluator says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from radpilot.case import OUTSIDE_TARGETS
from radpilot.evaluation.metrics import PlanDose
from radpilot.protocol import ClinicalGoal, Protocol

# Dose normalisation makes D95 equal the prescription to float32 precision; a goal sitting
# exactly on its limit must not fail on the last bit.
RELATIVE_TOLERANCE = 1e-5
# The loop's own goal on the hottest point anywhere (the improvement phase may not raise it):
# not a protocol structure, never a sparing goal, never an objective term.
GLOBAL = "Global"


@dataclass(frozen=True)
class GoalResult:
    goal: ClinicalGoal
    achieved: float
    passed: bool
    margin: float  # > 0 met with room, < 0 missed by that much (Gy or %)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.goal.to_dict(),
            "achieved": self.achieved,
            "passed": self.passed,
            "margin": self.margin,
            "unit": self.goal.unit,
        }

    @classmethod
    def from_dict(cls, g: dict[str, Any]) -> GoalResult:
        """The inverse of ``to_dict`` (as stored in the job store and reference plans)."""
        goal = ClinicalGoal(
            g["structure"],
            g["metric"],
            g["comparator"],
            g["limit"],
            g.get("priority") or 1,
            g.get("hard", True),
        )
        return cls(goal, g["achieved"], g["passed"], g["margin"])

    def finding(self) -> str:
        g = self.goal
        verb = "meets" if self.passed else "misses"
        room = "with" if self.passed else "by"
        return (
            f"{g.structure} {g.metric} = {self.achieved:.2f} {g.unit} {verb} the goal "
            f"{g.comparator} {g.limit:g} {g.unit} {room} {abs(self.margin):.2f} {g.unit}"
            f" ({'hard' if g.hard else 'soft'}, priority {g.priority})"
        )


# a goal missed by less than this fraction of its limit is missed by a hair: the loop restarts a
# plan whose step broke goals only so (loop.core._broken_by_a_hair), and the rules planner steps
# on from one (rules_planner._along_trade_off)
HAIR = 0.02


def relative_miss(r: GoalResult) -> float:
    """A missed goal's shortfall relative to its limit (0 when met)."""
    return 0.0 if r.passed else abs(r.margin) / max(abs(r.goal.limit), 1.0)


def stalled(
    goal: ClinicalGoal, checks: list[ProtocolCheck], gain: float
) -> tuple[GoalResult, GoalResult] | None:
    """``goal``'s (first, last) results when every one of ``checks`` (in order) missed it and the
    miss shrank by less than ``gain`` of itself from the first to the last; else None."""
    results = [c.result(goal) for c in checks]
    if not results or any(r is None or r.passed for r in results):
        return None
    first, last = results[0], results[-1]
    assert first is not None and last is not None
    if last.margin - first.margin >= gain * abs(first.margin):
        return None
    return first, last


@dataclass(frozen=True)
class ProtocolCheck:
    results: list[GoalResult]

    @property
    def all_hard_passed(self) -> bool:
        return all(r.passed for r in self.results if r.goal.hard)

    @property
    def all_passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed(self) -> list[GoalResult]:
        return [r for r in self.results if not r.passed]

    def result(self, goal: ClinicalGoal) -> GoalResult | None:
        """The result of ``goal`` (None when this check did not judge it)."""
        return next((r for r in self.results if r.goal == goal), None)

    def score(self) -> tuple[int, ...]:
        """Failure counts (bigger is better): hard failures, then failures per priority level."""
        key: list[int] = [-sum(1 for r in self.failed if r.goal.hard)]
        for p in sorted({r.goal.priority for r in self.results}):
            key.append(-sum(1 for r in self.failed if r.goal.priority == p))
        return tuple(key)

    def shortfall(self) -> float:
        """How far the goals are missed: relative misses, hard goals x10, divided by priority."""
        total = 0.0
        for r in self.failed:
            total += relative_miss(r) * (10.0 if r.goal.hard else 1.0) / r.goal.priority
        return total

    def rank(self) -> tuple[float, ...]:
        """Sort key for "which plan is best" (bigger is better), as a physicist ranks plans: hard
        goals first, priority by priority (1 first), each level by the summed size of its
        misses relative to their limits, then by how many; then soft goals the same way. A plan that
        misses a higher-priority goal by more never wins, however many lower ones it meets."""
        levels = sorted({r.goal.priority for r in self.results})
        key: list[float] = []
        for hard in (True, False):
            for p in levels:
                misses = [
                    relative_miss(r)
                    for r in self.failed
                    if r.goal.hard is hard and r.goal.priority == p
                ]
                # the size first (to 0.01 %, so float noise does not decide), then the count:
                # a plan that meets a goal beats one that misses it by a hair
                key += [-round(sum(misses), 4), -len(misses)]
        # between plans that miss the same (typically: none), the one that spares more wins
        key.append(round(self.sparing(), 4))
        return tuple(key)

    def protocol_only(self) -> ProtocolCheck:
        """The check on the protocol's own goals, without the loop's hot-spot bound
        (``Global max``, ``loop.core._bound_hot_spot``)."""
        return ProtocolCheck([r for r in self.results if r.goal.structure != GLOBAL])

    def sparing_results(self) -> list[GoalResult]:
        """The organ-at-risk goals: upper limits on structures that have no lower limit (a
        target's D95 >= is a lower limit, so its hot-spot goals are not sparing goals; nor are
        the hot-spot limits outside the targets)."""
        lower = {r.goal.structure for r in self.results if r.goal.comparator == ">="}
        lower |= {GLOBAL, OUTSIDE_TARGETS}  # hot-spot limits, not organs to spare
        return [
            r for r in self.results if r.goal.comparator == "<=" and r.goal.structure not in lower
        ]

    def sparing(self) -> float:
        """Room under the organ-at-risk limits: each goal's margin relative to its limit (within
        -1..1), divided by its priority, summed. Bigger spares more."""
        return sum(
            max(-1.0, min(1.0, r.margin / max(abs(r.goal.limit), 1.0))) / r.goal.priority
            for r in self.sparing_results()
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "all_hard_passed": self.all_hard_passed,
            "all_passed": self.all_passed,
            "goals": [r.to_dict() for r in self.results],
        }


def sparing_gains(before: ProtocolCheck, after: ProtocolCheck) -> dict[str, float]:
    """Per organ-at-risk goal (by label): how much lower its metric is in ``after`` than in
    ``before``, in the goal's unit (Gy, or % for a Vx goal); negative where it rose."""
    was = {r.goal.label: r.achieved for r in before.sparing_results()}
    return {
        r.goal.label: was[r.goal.label] - r.achieved
        for r in after.sparing_results()
        if r.goal.label in was
    }


def check_protocol(plan: PlanDose, protocol: Protocol) -> ProtocolCheck:
    protocol.check_case(plan.case)
    results = []
    for g in protocol.goals:
        achieved = plan.metric(g.structure, g.metric)
        margin = g.margin(achieved)
        passed = margin >= -RELATIVE_TOLERANCE * max(abs(g.limit), 1.0)
        results.append(GoalResult(g, achieved, passed, margin))
    return ProtocolCheck(results)
