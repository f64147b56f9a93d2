"""The rule-based ("autoplan"-like) planner.

From the protocol check of the last plan and the memory of recent iterations it proposes new
objective weights and doses:

- every missed goal pushes on the objective terms of its structure: an upper limit on an OAR or
  a target hot spot raises the weight of that structure's overdose term (by a factor that grows
  with the miss) and lowers its objective dose to the limit minus a margin; a lower limit raises
  the structure's deviation/underdose weight. A missed goal with no term to push on gets one.
- asked for several candidates (a round optimised in parallel), it first adds the step that also
  pushes the met goals within 5 % of their limits (the ones the step is likely to break), then
  the same step taken bolder and more cautiously (x2, x1/2, x4, x1/4 ...), skipping parameters
  already tried.
- if the last step made the plan worse than the best in memory, it backtracks: it steps again
  from the best iteration's objectives, for that iteration's misses, with a smaller step; and
  every flip of the missed goals (fixing one breaks another) halves the step.
- once the best plan in memory meets every goal (the protocol's ``after_goals_met: improve``),
  it spares: every organ-at-risk goal's overdose term gets an objective dose below what the
  plan achieves and a higher weight. Each later attempt that did not improve on that plan
  halves the step and pushes only the highest-priority organ-at-risk goals.
"""

from __future__ import annotations

import itertools

from radpilot.agents.types import MemoryEntry
from radpilot.dosimetry import parse_metric
from radpilot.evaluation.protocol_check import GoalResult, ProtocolCheck
from radpilot.fmo.objectives import MAX_WEIGHT, ObjectiveTerm
from radpilot.protocol import Protocol

MAX_FACTOR = 3.0
OAR_MARGIN = 0.15  # objective dose = limit x (1 - margin) for a missed upper limit
AT_RISK = 0.05  # a met goal within this fraction of its limit: pushed by the first alternative
ALTERNATIVE_SCALES = (
    2.0,
    0.5,
    4.0,
    0.25,
    8.0,
    0.125,
    16.0,
)  # candidates beside the step


def _step(r: GoalResult, gain: float) -> float:
    rel = abs(r.margin) / max(abs(r.goal.limit), 1.0)
    return min(MAX_FACTOR, 1.0 + gain * (0.5 + 4.0 * rel))


def propose_rules(
    protocol: Protocol,
    objectives: list[ObjectiveTerm],
    check: ProtocolCheck,
    memory: list[MemoryEntry],
    count: int = 1,
) -> tuple[list[ObjectiveTerm], str, list[list[ObjectiveTerm]]]:
    """The next terms, why, and up to ``count - 1`` alternative steps (bolder, more cautious)."""
    notes: list[str] = []
    # Each time the set of missed goals flips (fixing one goal breaks another), the step halves:
    # the loop then closes in on the trade-off instead of jumping across it.
    flips = sum(
        1
        for a, b in itertools.pairwise(memory)
        if a.check.failed and b.check.failed and _missed(a.check) != _missed(b.check)
    )
    gain = 0.5**flips
    best = max(memory, key=lambda m: m.check.rank(), default=None)
    if best is not None and best is not memory[-1]:
        last = memory[-1]
        if last.check.rank() < best.check.rank():
            objectives, check = list(best.objectives), best.check
            gain *= 0.5
            # a goal the worse step broke is traded off against the ones being pushed: push it
            # too, so that the next step moves along the trade-off rather than across it
            broken = [r for r in last.check.failed if r.goal.label not in _missed(best.check)]
            check = ProtocolCheck(best.check.results + broken)
            notes.append(
                f"iteration {last.iteration} was worse than iteration {best.iteration}; "
                f"stepping again from iteration {best.iteration} with a smaller step"
                + (f", also pushing {', '.join(r.goal.label for r in broken)}" if broken else "")
            )
    if best is not None and best.check.all_passed:
        return _spare(protocol, best, memory, count)
    if not check.failed:
        return list(objectives), "every goal is met; objectives unchanged", []
    # never propose parameters already tried (they would give the same plan): halve the step
    tried = [m.objectives for m in memory]
    for _ in range(8):
        terms, steps = _push(protocol, objectives, check, gain)
        if terms not in tried:
            break
        gain *= 0.5
    alternatives: list[list[ObjectiveTerm]] = []
    labels: list[str] = []
    # a met goal close to its limit is the one the step is likely to break: the first
    # alternative pushes it too (the trade-off, anticipated); then the step bolder, more cautious
    at_risk = [
        GoalResult(r.goal, r.achieved, False, r.margin)
        for r in check.results
        if r.passed and r.margin / max(abs(r.goal.limit), 1.0) < AT_RISK
    ]
    options: list[tuple[str, ProtocolCheck, float]] = []
    if at_risk:
        guarded = ProtocolCheck(check.failed + at_risk)
        options.append(("also " + ", ".join(r.goal.label for r in at_risk), guarded, gain))
    options += [(f"the step x{scale:g}", check, gain * scale) for scale in ALTERNATIVE_SCALES]
    for label, pushed, g in options:
        if len(alternatives) >= count - 1:
            break
        alt, _ = _push(protocol, objectives, pushed, g)
        if alt not in tried and alt != terms and alt not in alternatives:
            alternatives.append(alt)
            labels.append(label)
    if labels:
        notes.append(f"alternatives: {'; '.join(labels)}")
    return terms, "; ".join(notes + steps), alternatives


def _push(
    protocol: Protocol, objectives: list[ObjectiveTerm], check: ProtocolCheck, gain: float
) -> tuple[list[ObjectiveTerm], list[str]]:
    """One step on the terms of every missed goal, scaled by ``gain``."""
    notes: list[str] = []
    terms = {t.key(): t for t in objectives}
    for r in sorted(check.failed, key=lambda r: r.goal.priority):
        g = r.goal
        factor = _step(r, gain)
        is_target = g.structure == protocol.target
        if g.comparator == "<=":
            key = f"{g.structure}:squared_overdose"
            old = terms.get(key)
            unit = g.limit if g.unit == "Gy" else protocol.prescription_gy
            floor = protocol.prescription_gy * 1.01 if is_target else 0.0
            shrink = 1 - OAR_MARGIN * gain
            new_dose = min((old.dose_gy if old else unit) * shrink, unit * shrink)
            if is_target:
                new_dose = max(
                    floor, min(old.dose_gy if old else unit, unit - (unit - floor) * 0.5)
                )
            weight = min(MAX_WEIGHT, old.weight * factor) if old else _median_weight(objectives)
            terms[key] = ObjectiveTerm(g.structure, "squared_overdose", round(new_dose, 3), weight)
            notes.append(
                f"{g.label} missed by {abs(r.margin):.2f} {g.unit}: {key} weight x{factor:.2f}, "
                f"objective dose {new_dose:.1f} Gy"
            )
        else:
            key = next(
                (
                    k
                    for k in (
                        f"{g.structure}:squared_underdose",
                        f"{g.structure}:squared_deviation",
                    )
                    if k in terms
                ),
                f"{g.structure}:squared_underdose",
            )
            old = terms.get(key)
            dose = old.dose_gy if old else (g.limit if g.unit == "Gy" else protocol.prescription_gy)
            weight = min(MAX_WEIGHT, old.weight * factor) if old else _median_weight(objectives)
            terms[key] = (
                old.with_values(dose, weight)
                if old
                else ObjectiveTerm(g.structure, key.split(":")[1], dose, weight)
            )
            notes.append(
                f"{g.label} missed by {abs(r.margin):.2f} {g.unit}: {key} weight x{factor:.2f}"
            )
    return list(terms.values()), notes


def _spare(
    protocol: Protocol, best: MemoryEntry, memory: list[MemoryEntry], count: int
) -> tuple[list[ObjectiveTerm], str, list[list[ObjectiveTerm]]]:
    """A sparing step from ``best`` (a plan that meets every goal), and alternatives."""
    attempts = sum(1 for m in memory if m.iteration > best.iteration)
    goals = best.check.sparing_results()
    if not goals:
        return list(best.objectives), "every goal is met and no organ-at-risk goal is set", []
    if attempts:  # the last step broke a goal or gained too little: the top priority only
        top = min(r.goal.priority for r in goals)
        goals = [r for r in goals if r.goal.priority == top]
    # the upper limits on the targets (hot spots) are what sparing tends to break: their
    # overdose terms get the same weight factor, so the balance with the targets holds
    sparing = {id(r) for r in best.check.sparing_results()}
    guard = [r for r in best.check.results if r.goal.comparator == "<=" and id(r) not in sparing]
    tried = [m.objectives for m in memory]
    gain = 0.5**attempts
    for _ in range(8):
        terms, steps = _lower(protocol, best.objectives, goals, gain, guard)
        if terms not in tried:
            break
        gain *= 0.5
    alternatives: list[list[ObjectiveTerm]] = []
    for scale in ALTERNATIVE_SCALES:
        if len(alternatives) >= count - 1:
            break
        alt, _ = _lower(protocol, best.objectives, goals, gain * scale, guard)
        if alt not in tried and alt != terms and alt not in alternatives:
            alternatives.append(alt)
    head = f"every goal is met at iteration {best.iteration}; sparing the organs at risk" + (
        f" (attempt {attempts + 1}, a smaller step, priority {goals[0].goal.priority} only)"
        if attempts
        else ""
    )
    return terms, "; ".join([head, *steps]), alternatives


def _lower(
    protocol: Protocol,
    objectives: list[ObjectiveTerm],
    goals: list[GoalResult],
    gain: float,
    guard: list[GoalResult],
) -> tuple[list[ObjectiveTerm], list[str]]:
    """Objective doses below what the plan achieves on each goal's structure, weights up; the
    overdose terms of the ``guard`` goals' structures get the same weight factor."""
    terms = {t.key(): t for t in objectives}
    factor = 1.0 + gain
    for r in guard:
        key = f"{r.goal.structure}:squared_overdose"
        if key in terms and r.goal.unit == "Gy":
            # active at the hot spot the plan has now (never below 101 % of the prescription)
            t = terms[key]
            dose = min(t.dose_gy, max(r.achieved, protocol.prescription_gy * 1.01))
            terms[key] = t.with_values(round(dose, 3), min(MAX_WEIGHT, t.weight * factor))
    level: dict[str, float] = {}  # structure -> the lowest dose one of its goals sits at
    for r in goals:
        kind, value = parse_metric(r.goal.metric)
        dose = value if kind == "V" and value is not None else r.achieved
        level[r.goal.structure] = min(level.get(r.goal.structure, dose), dose)
    notes = []
    for r in sorted(goals, key=lambda r: r.goal.priority):
        structure = r.goal.structure
        if structure not in level:
            continue
        key = f"{structure}:squared_overdose"
        old = terms.get(key)
        dose = level.pop(structure) * (1 - OAR_MARGIN * gain)
        if old is not None:
            # below the term's dose by at least the margin, by at most twice it: a term far
            # above what the organ gets moves there over several rounds, not in one jump
            dose = min(dose, old.dose_gy * (1 - OAR_MARGIN * gain))
            dose = max(dose, old.dose_gy * (1 - 2 * OAR_MARGIN * gain))
        weight = min(MAX_WEIGHT, old.weight * factor) if old else _median_weight(objectives)
        terms[key] = ObjectiveTerm(structure, "squared_overdose", round(max(dose, 0.0), 3), weight)
        notes.append(
            f"{r.goal.label} at {r.achieved:.2f} {r.goal.unit}: {key} objective dose "
            f"{dose:.1f} Gy, weight {f'x{factor:.2f}' if old else 'new'}"
        )
    return list(terms.values()), notes


def _missed(check: ProtocolCheck) -> frozenset[str]:
    return frozenset(r.goal.label for r in check.failed)


def _median_weight(objectives: list[ObjectiveTerm]) -> float:
    w = sorted(t.weight for t in objectives if t.weight > 0)
    return w[len(w) // 2] if w else 1.0
