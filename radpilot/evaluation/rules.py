"""Rule-based evaluator: exact protocol check, plain-language findings, hot/cold spots, spillage.

The decision is "meets protocol" only when every goal passes numerically; a plan with every hard
goal met but a soft goal missed still "needs improvement" (the loop may stop there on budget).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from radpilot.evaluation.metrics import HotSpot, PlanDose
from radpilot.evaluation.protocol_check import ProtocolCheck, check_protocol
from radpilot.protocol import Protocol


class Decision(enum.StrEnum):
    NEEDS_IMPROVEMENT = "needs_improvement"
    MEETS_PROTOCOL = "meets_protocol"


@dataclass
class Evaluation:
    decision: Decision
    check: ProtocolCheck
    findings: list[str]
    measures: dict[str, float] = field(default_factory=dict)


def describe_hot_spot(spot: HotSpot, prescription_gy: float) -> str:
    """ "63.2 Gy (126 % of the prescription) at x 56, y 1, z 36 mm, in ParotidL"."""
    gy, (x, y, z), where = spot
    return (
        f"{gy:.1f} Gy ({100.0 * gy / prescription_gy:.0f} % of the prescription) at x {x:.0f}, "
        f"y {y:.0f}, z {z:.0f} mm, " + (f"in {', '.join(where)}" if where else "in no named organ")
    )


def evaluate_rules(plan: PlanDose, protocol: Protocol) -> Evaluation:
    check = check_protocol(plan, protocol)
    case, rx = plan.case, protocol.prescription_gy
    target = plan.of(protocol.target)
    findings = [
        r.finding() for r in sorted(check.results, key=lambda r: (r.passed, r.goal.priority))
    ]
    measures: dict[str, float] = {
        "target_max_gy": float(target.max()),
        "target_min_gy": float(target.min()),
        "target_v95_pct": plan.metric(protocol.target, f"V{0.95 * rx:g}"),
        "target_v107_pct": plan.metric(protocol.target, f"V{1.07 * rx:g}"),
    }
    indices = plan.target_indices().get(protocol.target, {})
    measures.update({f"target_{k.lower()}": v for k, v in indices.items()})
    if measures["target_v107_pct"] > 0:
        findings.append(
            f"hot spot: {measures['target_v107_pct']:.1f} % of {protocol.target} receives more "
            f"than 107 % of the prescription (max {measures['target_max_gy']:.1f} Gy)"
        )
    if measures["target_v95_pct"] < protocol.coverage_pct:
        findings.append(
            f"cold spot: only {measures['target_v95_pct']:.1f} % of {protocol.target} receives "
            f"95 % of the prescription (min {measures['target_min_gy']:.1f} Gy)"
        )
    for key, what, spot in (
        ("max_global", "global maximum", plan.hottest_point()),
        (
            "max_outside_targets",
            "hottest point outside the targets",
            plan.hottest_outside_targets(),
        ),
    ):
        if spot is None:
            continue
        measures[f"{key}_gy"] = spot[0]
        measures[f"{key}_pct"] = 100.0 * spot[0] / rx
        findings.append(f"{what}: {describe_hot_spot(spot, rx)}")
    ext = case.external
    if ext is not None:
        for level in (0.95, 1.05):
            outside_cc = max(
                0.0,
                plan.volume_cc_at_least(ext.name, level * rx)
                - plan.volume_cc_at_least(protocol.target, level * rx),
            )
            measures[f"spill_{round(level * 100)}_cc"] = outside_cc
        findings.append(
            f"spillage: {measures['spill_95_cc']:.1f} cc outside {protocol.target} above 95 % of "
            f"the prescription, {measures['spill_105_cc']:.1f} cc above 105 %"
        )
    decision = Decision.MEETS_PROTOCOL if check.all_passed else Decision.NEEDS_IMPROVEMENT
    return Evaluation(decision, check, findings, measures)
