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
- an organ's limit missed in the last two plans, where the last push raised its term's weight
  and closed part of the miss, gets a step sized from that response (the metric taken as
  linear in the log of the weight, at most ``MAX_EXTRAPOLATED``), when that is larger than the
  usual one; the rationale says so. So does a target hot spot's push on the coverage's min-DVH
  term in an inflated plan (below).
- an organ's limit missed by less than ``NEAR_MISS`` of itself, the plan's only miss, in the
  third plan running that misses it, moves its term's weight alone, in proportion to the miss
  (the end of a trade-off, where the usual step breaks the goals it traded against).
- if the last step made the plan worse than the best in memory, it backtracks: it steps again
  from the best iteration's objectives, for that iteration's misses, with a smaller step, and
  pushes the goals the worse step broke as hard as the goals it pushed (so the plan moves along
  the trade-off instead of back across it); every flip of a goal between met and missed
  (fixing one breaks another) halves that goal's step (a goal missed all along keeps its full
  step).
- a worse plan whose step broke goals only by a hair (each by less than ``HAIR`` of its
  limit) while its misses sum to less than half the best plan's is stepped on from instead
  (``_along_trade_off``): the broken goals are pushed back at least as hard as the step that
  broke them.
- while a hard priority-1 goal is missed, the step pushes the priority-1 goals alone; the
  lower-priority misses wait for a plan that meets them (``_first_priority``).
- a goal that stays missed without getting closer (``STALL_PLANS`` plans in a row, the miss
  shrinking by less than ``STALL_GAIN`` of itself) switches strategy: the structure gets a term
  shaped like the goal — a max-DVH term for a Dx or Vx limit ("at most x % above the limit"), a
  mean-dose term for a mean, a smooth maximum for a maximum — and from then on that term is
  pushed instead of the voxel overdose term. The new term and its reason are in the rationale.
  A Dx limit on an organ that reaches the prescription gets its max-DVH term when a plan from the
  second on misses it (from the first, when the protocol has no minus helper for the organ), on
  the organ itself, aimed at half its Dx (and lowered with it).
- helper structures the protocol defines (``helpers:``) are used when the plan calls for them:
  an organ whose upper-limit goal fails while it reaches the prescription (it overlaps or abuts
  the target) has its overdose term moved to its "organ minus target" helper (the old term is
  retired: in the overlap it pulls against the target's coverage), and later pushes go to the
  helper; a limit near the prescription on such an organ gives the target's coverage term to
  the "target minus organ" helper, the target's own keeping a fifth of its weight (the overlap
  may run a little cold); when the dose spills
  (``NormalTissue``, 10 mm and more from every target, above
  ``SPILL`` of the prescription) a ring around the target gets an overdose term. Every added,
  moved or retired term is named in the rationale with its reason.
- a plan the normalisation scaled up (its optimised coverage fell short) gets a min-DVH term on
  the coverage when a target hot spot or an organ's limit is missed (``_push_coverage``,
  ``_cover_for_organs``): the coldest voxels, next to the organs, may stay cold instead of the
  whole plan being multiplied for them.
- once the best plan in memory meets every goal (the protocol's ``after_goals_met: improve``),
  it spares: each organ at risk gets a term for its first goal (max-DVH for a Dx limit on an
  organ that reaches the prescription, else its overdose term, on the organ's minus helper when
  it reaches the prescription) with an objective dose below what the plan achieves and a
  higher weight. Every sparing step that broke a goal halves the later ones; the step right
  after one also holds what broke (a target's own maximum by its overdose term, heavier). Once
  one broke, sparing narrows to the organs nearest their limits (``_focus``) and holds the
  target coverage goals near their limits when those organs overlap the target
  (``_hold_coverage``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

from radpilot.agents.types import MemoryEntry
from radpilot.case import NORMAL_TISSUE, OUTSIDE_TARGETS
from radpilot.cases.helpers import Helper
from radpilot.dosimetry import parse_metric
from radpilot.evaluation.protocol_check import GLOBAL, HAIR, GoalResult, ProtocolCheck, stalled
from radpilot.fmo.objectives import MAX_WEIGHT, ObjectiveTerm
from radpilot.protocol import ClinicalGoal, Protocol

MAX_FACTOR = 3.0
OAR_MARGIN = 0.15  # objective dose = limit x (1 - margin) for a missed upper limit
# a max-DVH sparing term aims at half the organ's Dx: it presses only on the voxels between its
# dose and the Dx, and that band decides how far it moves the organ (on the TG-119 head & neck's
# first plan that met, max-DVH terms on the parotids' D50 at 8 Gy took the right one from 18.7
# to 12.5 Gy with PTV D99 met; at 10 Gy and twice the weight, to 14.3)
DVH_MARGIN = 0.5
COVERAGE_HOLD = 0.02  # a broken coverage Dx is held by a min-DVH term this fraction above it
AT_RISK = 0.05  # a met goal within this fraction of its limit: pushed by the first alternative
SPARE_GAIN = 1.0  # the first sparing step from a plan that meets: a full push (halved by breaks)
# once a sparing step broke a goal, the next ones lower the organs whose use of a limit (a goal's
# value / its limit, the organ's largest) is within this of the largest. (TG-119 head & neck,
# from the plan that met with cord max 29.2 / 40, parotids' D50 10.2 and 14.6 / 20 Gy: lowering
# all three broke PTV D99 or a hot spot at every step size; the cord and the right parotid
# alone, with the coverage held (COVERAGE_HOLD_WEIGHT), met every goal at 27.4 / 10.3 / 10.9 Gy,
# one FMO each, 2026-12-07)
FOCUS_BAND = 0.1
# sparing an organ that overlaps the target holds a coverage goal near its limit with a min-DVH
# term this many times as heavy as the heaviest sparing term (same probe: at 1x PTV D99 ended
# at its limit, 46.50 Gy; at 2x 46.64-46.81 Gy)
COVERAGE_HOLD_WEIGHT = 2.0
HOT_SPOT_HOLD = 2.0  # a target hot spot a sparing step broke: the target's overdose term x this
ALTERNATIVE_SCALES = (
    2.0,
    0.5,
    4.0,
    0.25,
    8.0,
    0.125,
    16.0,
)  # candidates beside the step


REACHES_RX = 0.95  # an organ whose maximum is this fraction of Rx overlaps or abuts the target
NEAR_RX = 0.9  # an organ's upper limit at this fraction of Rx or more is decided in the overlap
KEEP_COVERAGE = 0.2  # the target's own coverage term keeps this share once a helper takes over
# an inflated plan's coverage gets a min-DVH term this many times its heaviest coverage term
# (TG-119 prostate, bladder D30 <= 15 Gy: missed in 8 plans without it (19.5 Gy), met in the
# 6th plan with it (14.85 Gy), and in the 6th or 7th with x4, x12 or x16; bladder D30 <= 12 Gy on
# the tight protocol stays missed with every one of them, 17.7 Gy with x8)
COVERAGE_DVH_WEIGHT = 8.0
INFLATED = 1.02  # a plan normalised by more than this has its target hot spots from the scaling
SPILL = 0.8  # NormalTissue's maximum above this fraction of Rx: the dose spills
RING_DOSE = 0.75  # a ring's overdose term starts at this fraction of Rx
STALL_PLANS = 3  # a goal missed in this many plans in a row ...
STALL_GAIN = 0.25  # ... whose miss shrank by less than this fraction of itself has stalled
# an organ's miss of at least this fraction of its limit, in a plan the normalisation scaled up,
# brings the coverage's min-DVH term at once (``_cover_for_organs``); a near miss is left to the
# organ's own push (the shipped TG-119 prostate's first plan misses rectum D10 by 0.35 Gy: with
# the term from then on its sparing phase ended at rectum D30 45.2 Gy instead of 24.2)
SCALED_ORGAN_MISS = 0.1
OVERLAP_SHAPE_FROM = 2  # a Dx limit on an organ overlapping the target: its shape from this plan
HOT_SPOT_SOFTNESS_GY = 0.25  # the smooth maximum on a hot spot (outside the targets or in one)
# a target's maximum: its smooth maximum aims this fraction of the way from the limit down to
# 101 % of Rx. (The smooth maximum lies above the true maximum by up to T ln N over the N voxels
# near it: 0.8 Gy at T = 0.25 on the TG-119 C-shape PTV. Aimed at the midpoint, as the hot spots
# outside the targets are, it would press on the top tenth of the target: at the 3 mm grid on
# the harder protocol, a term at 55.5 Gy cost the core D10 goal, one at 56.5 Gy met every goal.)
TARGET_MAX_AIM = 0.15
# an organ's limit still missed after a push that moved it: the next push is sized from that
# response (log-linear in the weight), at most this factor. (TG-119 prostate, tight protocol:
# bladder D30 <= 15 Gy went 21.4 -> 19.7 -> 16.9 -> 16.4 -> 15.6 Gy on steps of x3, x2.75,
# x2.0, x1.88, the step shrinking with the miss while the response per step shrank too. On
# the seven variants of `make bench-tightened` the rules agent met 4 with a cap of 4, 3 with 8:
# the response flattens as the other goals push back.)
MAX_EXTRAPOLATED = 4.0
# an organ's limit missed by less than this fraction of itself, the plan's only miss, after
# it was missed in each of the last STALL_PLANS plans (``_near_miss``): only the term's weight
# moves, by a step in proportion to the miss (``_near_miss_step``). Lowering the objective dose
# by OAR_MARGIN moves every voxel of the organ above it, and at the end of a trade-off that
# costs the other goals more than the miss. (Harder C-shape at the 3 mm grid, plan 7, core D10
# 10.01 / 10 Gy: the usual step, objective dose 5.6 -> 4.8 Gy and weight x1.5, broke PTV D10
# and PTV max, 55.93 and 58.11 Gy; weight x1.1 alone met every goal, core D10 9.96 Gy.) The
# usual step stands beside other misses, whose terms the same step pushes against the organ
# (same run, plan 6, core D10 10.05 Gy beside PTV D10 and max: with the weight alone, core 10.13
# at plan 7, not met in 8), and for a goal that came near after one or two pushes, where it
# overshoots into room the sparing phase then uses (harder C-shape at 5 mm, plan 2, core D10
# 10.03 Gy: with the weight alone met at plan 3 at 9.97 Gy, no sparing step kept PTV D10, and
# the leaf-sequenced plan missed three goals; with the usual step met at plan 4, 9.71 Gy, spared
# to 9.19, every goal kept as delivered).
NEAR_MISS = 0.01
# a plan ranked below the best whose step broke goals only by a hair (``HAIR`` of their limits),
# and whose misses sum to less than this fraction of the best's, is stepped on from instead of
# backtracking from (``_along_trade_off``)
ALONG_GAIN = 0.5


def _overlaps_target(protocol: Protocol, memory: list[MemoryEntry] | None, structure: str) -> bool:
    """Whether ``structure``, an organ (never a target: a target reaches the prescription as a
    matter of course), reached ``REACHES_RX`` of the prescription in the latest plan (it
    overlaps or abuts the target)."""
    if structure in _targets(protocol):
        return False
    peak = _last_stat(memory, structure, "max_gy")
    return peak is not None and peak >= REACHES_RX * protocol.prescription_gy


def _missed_lately(goal: ClinicalGoal, memory: list[MemoryEntry]) -> bool:
    """Whether each of the last STALL_PLANS plans missed ``goal``."""
    results = [m.check.result(goal) for m in memory[-STALL_PLANS:]]
    return len(results) == STALL_PLANS and all(r is not None and not r.passed for r in results)


def _stalled(goal: ClinicalGoal, memory: list[MemoryEntry]) -> tuple[float, float] | None:
    """(first, last) achieved values when ``goal`` has stalled over the last plans, else None."""
    if len(memory) < STALL_PLANS:
        return None
    ends = stalled(goal, [m.check for m in memory[-STALL_PLANS:]], STALL_GAIN)
    return (ends[0].achieved, ends[1].achieved) if ends else None


def goal_term(
    protocol: Protocol, goal: ClinicalGoal, gain: float, weight: float
) -> ObjectiveTerm | None:
    """A term shaped like an upper-limit goal, aimed a margin inside its limit (None: no kind
    fits the metric)."""
    kind, x = parse_metric(goal.metric)
    target_max = _target_max(protocol, goal)
    shrink = 1 - OAR_MARGIN * gain
    if _hot_spot_limit(protocol, goal):  # never aimed below 101 % of Rx
        floor = protocol.prescription_gy * 1.01
        aim = TARGET_MAX_AIM if target_max else 0.5
        dose = max(floor, goal.limit - (goal.limit - floor) * aim)
    else:
        dose = goal.limit * shrink
    s = goal.structure
    if kind == "D" and x is not None and 0 < x < 100:
        return ObjectiveTerm(s, "max_dvh", round(dose, 3), weight, x)
    if kind == "V" and x is not None and 0 < goal.limit * shrink < 100:
        # "Vx <= L %": at most L % (a margin inside) of the volume above x Gy
        return ObjectiveTerm(s, "max_dvh", x, weight, round(goal.limit * shrink, 3))
    if kind == "mean":
        return ObjectiveTerm(s, "mean_dose", round(dose, 3), weight)
    if s == OUTSIDE_TARGETS or target_max:
        # a few hot voxels among many near the prescription: a sharp smooth maximum (0.25 Gy),
        # or the many would dominate it (pull the target's edge, or its whole top, down)
        return ObjectiveTerm(s, "smooth_max", round(dose, 3), weight, HOT_SPOT_SOFTNESS_GY)
    if _is_max(kind, x):
        return ObjectiveTerm(s, "smooth_max", round(dose, 3), weight)
    return None


def _coverage_term(goal: ClinicalGoal, gain: float) -> ObjectiveTerm | None:
    """A min-DVH term for a lower limit on a Dx ("at least x % at or above d Gy"), aimed a
    little above the limit; None for other metrics."""
    kind, x = parse_metric(goal.metric)
    if kind != "D" or x is None or not 0 < x < 100:
        return None
    return ObjectiveTerm(
        goal.structure, "min_dvh", round(goal.limit * (1 + COVERAGE_HOLD * gain), 3), 1.0, x
    )


def _hot_spot_limit(protocol: Protocol, goal: ClinicalGoal) -> bool:
    """An upper limit on a hot spot (in the prescription target, or anywhere outside the
    targets, where the voxels next to a target get the prescription): its terms aim between
    the limit and 101 % of the prescription, never lower."""
    return goal.structure in (protocol.target, OUTSIDE_TARGETS)


def _target_max(protocol: Protocol, goal: ClinicalGoal) -> bool:
    """Whether ``goal`` limits the prescription target's maximum dose."""
    return goal.structure == protocol.target and _is_max(*parse_metric(goal.metric))


def _is_max(kind: str, x: float | None) -> bool:
    """Whether a parsed metric is a maximum dose ("max", or D0)."""
    return kind == "max" or (kind == "D" and x == 0)


def _shaped_for(goal: ClinicalGoal, term: ObjectiveTerm | None) -> bool:
    """Whether ``term`` is the goal-shaped term of ``goal`` (the one pushed once it stalled)."""
    if term is None:
        return False
    kind, x = parse_metric(goal.metric)
    if term.kind == "max_dvh":
        return (kind == "D" and term.parameter == x) or (kind == "V" and term.dose_gy == x)
    return (term.kind, kind) in (("mean_dose", "mean"), ("smooth_max", "max"))


def _last_stat(memory: list[MemoryEntry] | None, structure: str, field: str) -> float | None:
    """A structure's statistic (``max_gy``, ...) in the latest plan of the memory, if known."""
    for entry in (memory or [])[-1:]:
        for st in entry.stats:
            if st.get("name") == structure and field in st:
                return float(st[field])
    return None


def _helpers(
    protocol: Protocol, kind: str, of: str, subtract: set[str] | None = None
) -> list[Helper]:
    """The protocol's helpers of a kind built from ``of`` (minus one of ``subtract``, if given)."""
    return [
        h
        for h in protocol.helpers
        if h.kind == kind and h.of == of and (subtract is None or h.subtract in subtract)
    ]


def _targets(protocol: Protocol) -> set[str]:
    """The prescription target and every structure with a lower-limit goal."""
    return {protocol.target} | {g.structure for g in protocol.goals if g.comparator == ">="}


def _coverage_sites(protocol: Protocol) -> set[str]:
    """Where the prescription target's coverage terms may sit: the target and its "target minus
    organ" helpers."""
    return {protocol.target} | {h.name for h in _helpers(protocol, "minus", protocol.target)}


def _minus_helper(protocol: Protocol, structure: str) -> str | None:
    """The protocol's "structure minus a target" helper, if it defines one."""
    found = _helpers(protocol, "minus", structure, _targets(protocol))
    return found[0].name if found else None


def _target_minus_helper(protocol: Protocol, structure: str) -> str | None:
    """The protocol's "target minus structure" helper, if it defines one."""
    found = _helpers(protocol, "minus", protocol.target, {structure})
    return found[0].name if found else None


def _site(protocol: Protocol, structure: str, terms: dict[str, ObjectiveTerm]) -> str:
    """Where the terms serving a structure's upper limits sit: its minus helper once a term is
    on it, else the structure itself."""
    helper = _minus_helper(protocol, structure)
    if helper is not None and any(t.structure == helper for t in terms.values()):
        return helper
    return structure


def _move_to_helper(
    protocol: Protocol,
    terms: dict[str, ObjectiveTerm],
    r: GoalResult,
    memory: list[MemoryEntry] | None,
    notes: list[str],
    sparing: bool = False,
) -> None:
    """An organ that misses an upper limit (or, ``sparing``, is being lowered below it) while
    reaching the prescription: move its overdose term to its minus helper (when the protocol
    defines one), retiring the organ's own."""
    g = r.goal
    helper = _minus_helper(protocol, g.structure)
    peak = _last_stat(memory, g.structure, "max_gy")
    if (
        helper is None
        or _site(protocol, g.structure, terms) == helper
        or peak is None
        or peak < REACHES_RX * protocol.prescription_gy
    ):
        return
    old = terms.pop(f"{g.structure}:squared_overdose", None)
    dose = old.dose_gy if old else g.limit if g.unit == "Gy" else protocol.prescription_gy
    weight = old.weight if old else _median_weight(list(terms.values()))
    new = ObjectiveTerm(helper, "squared_overdose", dose, weight)
    terms[new.key()] = new
    notes.append(
        f"{g.label} {'spared' if sparing else 'missed'} while {g.structure} reaches {peak:.1f} "
        f"Gy (it overlaps the target): "
        f"added {new.label()}"
        + (
            f", retired {old.label()} (in the overlap it pulls against the target's coverage)"
            if old
            else ""
        )
    )


def _uncover_overlap(
    protocol: Protocol,
    terms: dict[str, ObjectiveTerm],
    r: GoalResult,
    memory: list[MemoryEntry] | None,
    notes: list[str],
) -> None:
    """An organ's upper limit near the prescription, missed while the organ reaches it, is
    decided where the organ overlaps the target: move the target's coverage term to the
    protocol's "target minus organ" helper (when it defines one), so the overlap may run a
    little cold; the normalisation still holds the whole target's coverage."""
    g, rx = r.goal, protocol.prescription_gy
    helper = _target_minus_helper(protocol, g.structure)
    if helper is None or g.unit != "Gy" or g.limit < NEAR_RX * rx:
        return
    if not _overlaps_target(protocol, memory, g.structure):
        return
    if any(t.structure == helper for t in terms.values()):
        return
    for kind in ("squared_deviation", "squared_underdose"):
        old = terms.get(f"{protocol.target}:{kind}")
        if old is None:
            continue
        new = ObjectiveTerm(helper, kind, old.dose_gy, old.weight, old.parameter)
        terms[new.key()] = new
        kept = old.with_values(old.dose_gy, old.weight * KEEP_COVERAGE)
        terms[old.key()] = kept
        notes.append(
            f"{g.label} missed where {g.structure} overlaps {protocol.target} (a limit near the "
            f"prescription): added {new.label()}, {old.key()} weight x{KEEP_COVERAGE:g} (the "
            f"overlap may run a little cold; the normalisation keeps {protocol.target}'s "
            "coverage)"
        )
        dvh = terms.pop(f"{protocol.target}:min_dvh", None)
        if dvh is not None:
            # whole: even a fifth of it would hold the overlap at the prescription
            moved = dataclasses.replace(dvh, structure=helper)
            terms[moved.key()] = moved
            notes.append(f"{dvh.key()} moved to {helper}: {moved.label()}")
        return


def _push_coverage(
    protocol: Protocol,
    terms: dict[str, ObjectiveTerm],
    r: GoalResult,
    factor: float,
    memory: list[MemoryEntry] | None,
    notes: list[str],
    fresh: set[str],
    gain: float = 1.0,
) -> bool:
    """A target hot spot while the normalisation inflates the plan (the optimised coverage
    falls short, so every dose was multiplied by more than ``INFLATED``): an overdose term
    cannot help (it acts before the multiplication); the coverage terms can, by making the
    target's dose more uniform. First a min-DVH term on the coverage itself (at least the
    protocol's coverage volume at the prescription, ``COVERAGE_DVH_WEIGHT`` times the heaviest
    coverage term): the coldest voxels, next to an organ being spared, may then stay cold
    without the whole plan being scaled up for them. Then that term alone is pushed: the
    deviation term pulls the whole target towards the prescription, the voxels next to the
    organ too (TG-119 C-shape, core mean <= 6 Gy and PTV D10 <= 54 Gy at the 5 mm grid, one
    solve each from the same terms: min-DVH x3 gave PTV D10 53.97 Gy, core mean 5.86; min-DVH
    and deviation x3, 53.64 and 6.19). False when the plan is not inflated; ``fresh`` gets the
    key of a term added."""
    scale = memory[-1].scale if memory else 1.0
    sites = _coverage_sites(protocol)
    cover = [
        t
        for t in terms.values()
        if t.structure in sites and t.kind in ("squared_deviation", "squared_underdose")
    ]
    if scale <= INFLATED or not cover:
        return False
    # on the "target minus organ" helper that holds the coverage, when one does (the overlap
    # may run cold: ``_uncover_overlap``)
    site = min(
        (t.structure for t in cover if t.structure != protocol.target), default=protocol.target
    )
    key = f"{site}:min_dvh"
    if key not in terms:
        new = ObjectiveTerm(
            site,
            "min_dvh",
            protocol.prescription_gy,
            min(MAX_WEIGHT, COVERAGE_DVH_WEIGHT * max(t.weight for t in cover)),
            protocol.coverage_pct,
        )
        terms[key] = new
        fresh.add(key)
        notes.append(
            f"{r.goal.label} missed by {abs(r.margin):.2f} {r.goal.unit} while the normalisation "
            f"multiplies the plan by {scale:.3f} (the optimised coverage falls short): new term "
            f"{new.label()}"
        )
        return True
    if fresh & {key, f"{protocol.target}:min_dvh"}:  # added this step (maybe moved since)
        return True
    # on a "target minus organ" helper the min-DVH term cannot reach the overlap, where the
    # normalisation's cold voxels are: the target's own coverage term is pushed with it
    pushed = [terms[key]] if site == protocol.target else [*cover, terms[key]]
    factor, sized = _extrapolated(factor, r, key, gain, memory)
    for t in pushed:
        terms[t.key()] = t.with_values(t.dose_gy, min(MAX_WEIGHT, t.weight * factor))
    notes.append(
        f"{r.goal.label} missed by {abs(r.margin):.2f} {r.goal.unit} while the normalisation "
        f"multiplies the plan by {scale:.3f} (the optimised coverage falls short): "
        f"{', '.join(t.key() for t in pushed)} weight x{factor:.2f}{sized}"
    )
    return True


def _add_ring(
    protocol: Protocol,
    terms: dict[str, ObjectiveTerm],
    memory: list[MemoryEntry] | None,
    notes: list[str],
) -> None:
    """A term on the protocol's ring around the target when the dose spills far from it."""
    ring = next(iter(_helpers(protocol, "ring", protocol.target)), None)
    spill = _last_stat(memory, NORMAL_TISSUE, "max_gy")
    if (
        ring is None
        or any(t.structure == ring.name for t in terms.values())
        or spill is None
        or spill < SPILL * protocol.prescription_gy
    ):
        return
    nt = terms.get(f"{NORMAL_TISSUE}:squared_overdose")
    weight = max(nt.weight if nt else 0.0, _median_weight(list(terms.values())))
    new = ObjectiveTerm(
        ring.name, "squared_overdose", round(RING_DOSE * protocol.prescription_gy, 3), weight
    )
    terms[new.key()] = new
    notes.append(
        f"dose spills: {NORMAL_TISSUE} (10 mm or more from the targets) reaches {spill:.1f} Gy, "
        f"{100 * spill / protocol.prescription_gy:.0f} % of the prescription: added "
        f"{new.label()} on the {ring.describe()}"
    )


def _relative_miss(r: GoalResult) -> float:
    """How far a goal is from its limit, as a fraction of the limit (of 1 below 1)."""
    return abs(r.margin) / max(abs(r.goal.limit), 1.0)


def _step(r: GoalResult, gain: float) -> float:
    return min(MAX_FACTOR, 1.0 + gain * (0.5 + 4.0 * _relative_miss(r)))


def _near_miss(r: GoalResult, check: ProtocolCheck, memory: list[MemoryEntry] | None) -> bool:
    """A miss below NEAR_MISS of the limit, the plan's only one, of a goal missed in each of the
    last STALL_PLANS plans: the loop has been closing in on it along a trade-off."""
    if len(check.failed) != 1 or _relative_miss(r) >= NEAR_MISS:
        return False
    return _missed_lately(r.goal, memory or [])


def _near_miss_step(r: GoalResult, gain: float) -> float:
    """The weight factor for a near miss: the usual step's at a miss of NEAR_MISS, down in
    proportion to the miss, to a fifth of it (x1.1 at full gain)."""
    return 1.0 + gain * 0.5 * max(_relative_miss(r) / NEAR_MISS, 0.2)


def _extrapolated(
    factor: float, r: GoalResult, key: str, gain: float, memory: list[MemoryEntry] | None
) -> tuple[float, str]:
    """The weight factor for term ``key`` of a missed organ limit, sized from the last push.

    When the last two plans both missed the goal and the second raised the term's weight by
    ``w1 / w0``, closing the miss by ``delta``, the goal's metric is taken as linear in the log
    of the weight: the miss left needs ``(w1 / w0) ** (miss / delta)``. Never less than the
    usual ``factor``, at most ``MAX_EXTRAPOLATED``; only on a full step (``gain`` 1: not after
    a backtrack or a flip of the goal, where the smaller step is the point), and only when the
    plan before the last was the best so far (so the last plan was stepped from it, not from an
    earlier one by a backtrack). Also says why, for the rationale ("" when the usual factor
    stands)."""
    if gain < 1.0 or not memory or len(memory) < 2:
        return factor, ""
    prev, last = memory[-2], memory[-1]
    if prev.check.rank() < max(m.check.rank() for m in memory[:-1]):
        return factor, ""
    before, now = prev.check.result(r.goal), last.check.result(r.goal)
    w0 = next((t.weight for t in prev.objectives if t.key() == key), None)
    w1 = next((t.weight for t in last.objectives if t.key() == key), None)
    if before is None or now is None or before.passed or now.passed or not w0 or not w1:
        return factor, ""
    delta = now.margin - before.margin  # > 0: the miss shrank
    if w1 <= 1.05 * w0 or delta <= 0.02 * abs(before.margin):
        return factor, ""
    needed = math.exp(math.log(w1 / w0) * abs(now.margin) / delta)
    if needed <= factor:
        return factor, ""
    why = (
        f" (sized from the last push: x{w1 / w0:.2f} closed {delta:.2f} of the "
        f"{abs(before.margin):.2f} {r.goal.unit} miss)"
    )
    return max(factor, min(MAX_EXTRAPOLATED, needed)), why


def propose_rules(
    protocol: Protocol,
    objectives: list[ObjectiveTerm],
    check: ProtocolCheck,
    memory: list[MemoryEntry],
    count: int = 1,
) -> tuple[list[ObjectiveTerm], str, list[list[ObjectiveTerm]]]:
    """The next terms, why, and up to ``count - 1`` alternative steps (bolder, more cautious)."""
    notes: list[str] = []
    if not any(m.check.all_passed for m in memory):
        # before a plan meets, the loop's hot-spot ceiling (Global max) decides which plan it
        # reports, not how this planner steps: it has no region to put a term on, the protocol's
        # hot-spot goals steer the hot spots, and stepping back from every plan over it cost the
        # agent plans that met (docs/benchmarks.md, bench-tightened)
        check = check.protocol_only()
        memory = [dataclasses.replace(m, check=m.check.protocol_only()) for m in memory]
    # (each goal's own step also halves every time it flipped: _push, _flips)
    gain = 1.0
    hold: frozenset[str] = frozenset()  # goals the last (worse) step broke
    floor = 1.0  # ... pushed back at least by this factor
    best = max(memory, key=lambda m: m.check.rank(), default=None)
    if best is not None and best is not memory[-1]:
        last = memory[-1]
        if _new_terms_on_trial(memory, best):
            notes.append(
                f"iteration {last.iteration} changed the terms themselves; one step on them "
                f"before they are judged against iteration {best.iteration}"
            )
        elif last.check.rank() < best.check.rank() and _along_trade_off(last, best):
            # what the step broke is pushed back as hard as that step pushed: its own step, for
            # a miss this small, would hardly move it against the terms that step made heavier
            hold = frozenset(r.goal.label for r in _broken_by(last, best))
            floor = _last_push(memory)
            notes.append(
                f"iteration {last.iteration} ranks below iteration {best.iteration} only for "
                f"near misses ({', '.join(sorted(hold))}) and misses less in all: stepping on "
                f"from it, pushing them back at least x{floor:.2f} (the step that broke them)"
            )
        elif last.check.rank() < best.check.rank():
            objectives, check = list(best.objectives), best.check
            gain *= 0.5
            # a goal the worse step broke is traded off against the ones being pushed: push it
            # too, so that the next step moves along the trade-off rather than across it
            broken = _broken_by(last, best)
            hold = frozenset(r.goal.label for r in broken)
            check = ProtocolCheck(best.check.results + broken)
            notes.append(
                f"iteration {last.iteration} was worse than iteration {best.iteration}; "
                f"stepping again from iteration {best.iteration} with a smaller step"
                + (
                    f", also pushing {', '.join(r.goal.label for r in broken)} as hard as the "
                    "goals that step pushed"
                    if broken
                    else ""
                )
            )
    if best is not None and best.check.all_passed:
        return _spare(protocol, best, memory, count)
    if not check.failed:
        return list(objectives), "every goal is met; objectives unchanged", []
    check = _first_priority(check, hold, notes)
    # never propose parameters already tried (they would give the same plan): halve the step
    tried = [m.objectives for m in memory]
    for _ in range(8):
        terms, steps = _push(protocol, objectives, check, gain, memory, hold, floor)
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
        if r.passed and _at_risk(r)
    ]
    options: list[tuple[str, ProtocolCheck, float]] = []
    if at_risk:
        guarded = ProtocolCheck(check.failed + at_risk)
        options.append(("also " + ", ".join(r.goal.label for r in at_risk), guarded, gain))
    options += [(f"the step x{scale:g}", check, gain * scale) for scale in ALTERNATIVE_SCALES]
    for label, pushed, g in options:
        if len(alternatives) >= count - 1:
            break
        alt, _ = _push(protocol, objectives, pushed, g, memory, hold, floor)
        if alt not in tried and alt != terms and alt not in alternatives:
            alternatives.append(alt)
            labels.append(label)
    if labels:
        notes.append(f"alternatives: {'; '.join(labels)}")
    return terms, "; ".join(notes + steps), alternatives


def _push(
    protocol: Protocol,
    objectives: list[ObjectiveTerm],
    check: ProtocolCheck,
    gain: float,
    memory: list[MemoryEntry] | None = None,
    hold: frozenset[str] = frozenset(),
    floor: float = 1.0,
) -> tuple[list[ObjectiveTerm], list[str]]:
    """One step on the terms of every missed goal, scaled by ``gain``. A goal in ``hold`` (one
    the last step broke, pushed again beside the goals that step pushed) gets at least the
    largest factor of those, and at least ``floor``: a smaller one moves the plan back across
    the same trade-off."""
    notes: list[str] = []
    terms = {t.key(): t for t in objectives}

    def own_gain(g: ClinicalGoal) -> float:
        return gain * 0.5 ** _flips(g, memory or [])  # halved by the goal's own flips

    pushing = [_step(r, own_gain(r.goal)) for r in check.failed if r.goal.label not in hold]
    fresh: set[str] = set()  # terms this step added (another goal does not push them again)
    for r in sorted(check.failed, key=lambda r: r.goal.priority):
        g = r.goal
        own = own_gain(g)
        factor = _step(r, own)
        if g.label in hold:
            factor = max(factor, floor, *pushing)
        is_target = g.structure == protocol.target
        if g.comparator == "<=" and not is_target:
            _uncover_overlap(protocol, terms, r, memory, notes)
            _move_to_helper(protocol, terms, r, memory, notes)
        # a target's maximum that has stalled (or has its smooth maximum already): that term,
        # whether or not the normalisation inflates the plan (the coverage's min-DVH term makes
        # the target more uniform, but no more than that)
        sharp = _target_max(protocol, g) and (
            _shaped_for(g, terms.get(f"{g.structure}:smooth_max"))
            or _stalled(g, memory or []) is not None
        )
        if (
            g.comparator == "<="
            and is_target
            and not sharp
            and _push_coverage(protocol, terms, r, factor, memory, notes, fresh, gain)
        ):
            continue
        if g.comparator == "<=" and _shaped_push(protocol, terms, r, own, factor, memory, notes):
            if g.structure == OUTSIDE_TARGETS:
                _far_hot_spot(terms, r, factor, memory, notes)
            continue
        site = _site(protocol, g.structure, terms)
        if g.comparator == "<=":
            key = f"{site}:squared_overdose"
            old = terms.get(key)
            unit = g.limit if g.unit == "Gy" else protocol.prescription_gy
            hot_spot = _hot_spot_limit(protocol, g)
            floor = protocol.prescription_gy * 1.01 if hot_spot else 0.0
            shrink = 1 - OAR_MARGIN * own
            new_dose = min((old.dose_gy if old else unit) * shrink, unit * shrink)
            if hot_spot:
                new_dose = max(
                    floor, min(old.dose_gy if old else unit, unit - (unit - floor) * 0.5)
                )
            sized = ""
            if old:
                if not hot_spot and _near_miss(r, check, memory):
                    new_dose, factor = old.dose_gy, _near_miss_step(r, own)
                    sized = " (a near miss: the weight alone, in proportion to the miss)"
                elif not hot_spot:
                    factor, sized = _extrapolated(factor, r, key, own, memory)
                weight = min(MAX_WEIGHT, old.weight * factor)
            elif g.structure == OUTSIDE_TARGETS:
                # a few hot voxels in a large region: as heavy as the target's own hot-spot
                # term, or it would hardly move them
                weight = max(
                    (
                        t.weight
                        for t in terms.values()
                        if t.structure == protocol.target and t.kind == "squared_overdose"
                    ),
                    default=_median_weight(objectives),
                )
            else:
                weight = _median_weight(objectives)
            terms[key] = ObjectiveTerm(site, "squared_overdose", round(new_dose, 3), weight)
            notes.append(
                f"{g.label} missed by {abs(r.margin):.2f} {g.unit}: {key} weight x{factor:.2f}"
                f"{sized}, objective dose {new_dose:.1f} Gy"
            )
        else:
            key = _coverage_key(terms, g.structure)
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
    _cover_for_organs(protocol, terms, check, memory, notes, fresh)
    _add_ring(protocol, terms, memory, notes)
    return list(terms.values()), notes


def _cover_for_organs(
    protocol: Protocol,
    terms: dict[str, ObjectiveTerm],
    check: ProtocolCheck,
    memory: list[MemoryEntry] | None,
    notes: list[str],
    fresh: set[str],
) -> None:
    """An organ's upper limit missed while the normalisation inflates the plan: every organ's
    dose is multiplied with the target's, so the coverage gets its min-DVH term now
    (``_push_coverage``) rather than once a target hot spot breaks. (TG-119 prostate, rectum
    D30 <= 45 Gy and bladder D30 <= 15 Gy, first plan normalised by 1.029: bladder D30 16.16
    Gy after 8 plans, the term added at the sixth after PTV D5 broke; with it from the second
    plan, met at the seventh, 14.52 Gy.)"""
    sites = _coverage_sites(protocol)
    if any(t.kind == "min_dvh" and t.structure in sites for t in terms.values()):
        return  # there already (pushed only for the target's own hot spots)
    # the term lets the target's coldest (100 - coverage) % run cold: not where a goal holds
    # them (TG-119 head & neck, PTV D99 >= 46.5 Gy beside its D90 coverage: the term added for
    # a parotid took PTV D99 from 45.0 to 44.5 Gy, and a variant met before was missed)
    for g in protocol.goals:
        kind, x = parse_metric(g.metric)
        deeper = kind == "min" or (kind == "D" and x is not None and x > protocol.coverage_pct)
        if g.structure == protocol.target and g.comparator == ">=" and deeper:
            return
    targets = _targets(protocol)
    organ = next(
        (
            r
            for r in check.failed
            if r.goal.comparator == "<="
            and r.goal.structure not in targets
            and not _hot_spot_limit(protocol, r.goal)
            and r.goal.structure != GLOBAL
            and _relative_miss(r) >= SCALED_ORGAN_MISS
        ),
        None,
    )
    if organ is not None:
        _push_coverage(protocol, terms, organ, 1.0, memory, notes, fresh)


def _coverage_key(terms: dict[str, ObjectiveTerm], structure: str) -> str:
    """The key of the term that holds ``structure``'s coverage: its underdose term, else its
    deviation term (a new underdose term's when it has neither)."""
    keys = (f"{structure}:squared_underdose", f"{structure}:squared_deviation")
    return next((k for k in keys if k in terms), keys[0])


def _shaped_push(
    protocol: Protocol,
    terms: dict[str, ObjectiveTerm],
    r: GoalResult,
    gain: float,
    factor: float,
    memory: list[MemoryEntry] | None,
    notes: list[str],
) -> bool:
    """Push the goal-shaped term of a missed upper limit, adding it when the goal has stalled;
    False when the goal has neither (the overdose term is pushed as before)."""
    g = r.goal
    probe = goal_term(protocol, g, gain, 1.0)
    if probe is None:
        return False
    site = _site(protocol, g.structure, terms)  # the organ's minus helper, once it is used
    probe = dataclasses.replace(probe, structure=_shaped_site(protocol, g, probe, terms))
    old = terms.get(probe.key())
    if _shaped_for(g, old):
        assert old is not None
        sized = ""
        if not _hot_spot_limit(protocol, g):
            factor, sized = _extrapolated(factor, r, old.key(), gain, memory)
        weight = min(MAX_WEIGHT, old.weight * factor)
        dose = min(old.dose_gy, probe.dose_gy)
        if old.kind == "max_dvh" and _overlaps_target(protocol, memory, g.structure):
            dose = round(min(dose, r.achieved * (1 - DVH_MARGIN)), 3)  # the band follows it down
        terms[old.key()] = old.with_values(dose, weight)
        notes.append(
            f"{g.label} missed by {abs(r.margin):.2f} {g.unit}: {old.key()} weight "
            f"x{factor:.2f}{sized}"
        )
        return True
    stall = _stalled(g, memory or [])
    # a hot spot outside the targets is a few voxels in a large region: an overdose term on the
    # region hardly moves it, so its smooth maximum comes at once, aimed lower by the factor the
    # last plan was normalised by (the terms act on the dose before that multiplication)
    at_once = g.structure == OUTSIDE_TARGETS
    # a dose-volume limit on an organ that overlaps the target, missed from the second plan on
    # (the first plan's miss moves the organ's terms to its minus helper): its Dx is decided
    # next to the target, where an overdose term on the minus helper moves it slowly (TG-119
    # prostate, bladder D30 <= 15 Gy: 21.2 -> 20.6 -> 19.7 Gy while the PTV's hot spot broke),
    # and a max-DVH term presses on exactly the voxels that set it
    dx_on_overlap = (
        probe.kind == "max_dvh"
        and parse_metric(g.metric)[0] == "D"
        and _overlaps_target(protocol, memory, g.structure)
    )
    # (without a minus helper to move the organ's terms to, from the first plan on: its overdose
    # term would pull on the part inside the target, and the normalisation then raises every
    # hot spot)
    first = OVERLAP_SHAPE_FROM if _minus_helper(protocol, g.structure) else 1
    # a limit near the prescription is decided inside the overlap, where the target's coverage
    # holds the dose unless the protocol's "target minus organ" helper can take the coverage
    # (``_uncover_overlap``): without it, the term would fight the coverage from the start (the
    # shipped TG-119 prostate, rectum D10 <= 75 Gy: its best plan's bladder D30 45.6 Gy where
    # it gets 21.5 Gy without the term)
    near = g.limit >= NEAR_RX * protocol.prescription_gy
    uncovered = _target_minus_helper(protocol, g.structure) is not None
    overlap = dx_on_overlap and len(memory or []) >= first and (uncovered or not near)
    if (stall is None and not at_once and not overlap) or old is not None:
        return False  # not stalled, or the structure's one term of that kind serves another goal
    weight = min(MAX_WEIGHT, _site_weight(terms, site) * factor)
    dose = probe.dose_gy
    if dx_on_overlap:
        # aimed at half the organ's Dx (as sparing does), not just inside the limit: the term
        # presses only on the voxels between its dose and the Dx, and a band as narrow as the
        # miss hardly moves the organ (TG-119 prostate, bladder D30 <= 20 Gy: a term at 19.25
        # Gy left D30 at 22.43 Gy through three rounds)
        dose = round(min(dose, r.achieved * (1 - DVH_MARGIN)), 3)
    new = probe.with_values(dose, weight)
    if at_once:
        new = _below_normalisation(new, memory)
    terms[new.key()] = new
    if stall is not None:
        why = (
            f"missed in the last {STALL_PLANS} plans without closing in ({stall[0]:.2f} -> "
            f"{stall[1]:.2f} {g.unit}): switching strategy"
        )
    elif at_once:
        why = f"missed by {abs(r.margin):.2f} {g.unit} (a hot spot outside the targets)"
    else:
        why = (
            f"missed by {abs(r.margin):.2f} {g.unit} where {g.structure} overlaps the target "
            "(its Dx is set next to the target)"
        )
    sep = ", " if stall is not None else ": "  # "switching strategy, new term ..."
    notes.append(f"{g.label} {why}{sep}new term {new.label()}")
    return True


def _far_hot_spot(
    terms: dict[str, ObjectiveTerm],
    r: GoalResult,
    factor: float,
    memory: list[MemoryEntry] | None,
    notes: list[str],
) -> None:
    """A missed ``OutsideTargets max`` whose hottest point is NormalTissue's (10 mm or more
    from every target) may lie beyond the region its smooth maximum acts on (30 mm around the
    prescription target: ``OUTSIDE_TARGETS_REACH_MM``): NormalTissue gets a smooth maximum as
    well, aimed and weighted like it, and pushed with it. (TG-119 prostate, tight protocol with
    ``safety: on``: the hottest point, at the body's lateral edge, stayed at 97-107 Gy through 8
    plans for a limit of 80.9 Gy; with this term, 81.8-82.7 Gy from the next plan on.)"""
    far = _last_stat(memory, NORMAL_TISSUE, "max_gy")
    near = terms.get(f"{OUTSIDE_TARGETS}:smooth_max")
    if far is None or near is None or far < r.achieved - 0.01:
        return
    key = f"{NORMAL_TISSUE}:smooth_max"
    old = terms.get(key)
    if old is None:
        new = ObjectiveTerm(
            NORMAL_TISSUE, "smooth_max", near.dose_gy, near.weight, HOT_SPOT_SOFTNESS_GY
        )
        why = (
            f"{r.goal.label}: the hottest point outside the targets is {NORMAL_TISSUE}'s "
            f"({far:.1f} Gy, 10 mm or more from the targets, maybe beyond the "
            f"{OUTSIDE_TARGETS} term's reach): new term {new.label()}"
        )
    else:
        new = old.with_values(min(old.dose_gy, near.dose_gy), min(MAX_WEIGHT, old.weight * factor))
        why = f"{r.goal.label}: {key} weight x{factor:.2f}"
    terms[key] = new
    notes.append(why)


def _spare(
    protocol: Protocol, best: MemoryEntry, memory: list[MemoryEntry], count: int
) -> tuple[list[ObjectiveTerm], str, list[list[ObjectiveTerm]]]:
    """A sparing step from ``best`` (a plan that meets every goal), and alternatives."""
    attempts = sum(1 for m in memory if m.iteration > best.iteration)
    goals = best.check.sparing_results()
    if not goals:
        return list(best.objectives), "every goal is met and no organ-at-risk goal is set", []
    # the upper limits on the targets (hot spots) are what sparing tends to break: their
    # overdose terms get the same weight factor, so the balance with the targets holds
    sparing = {id(r) for r in best.check.sparing_results()}
    guard = [r for r in best.check.results if r.goal.comparator == "<=" and id(r) not in sparing]
    # goals the last sparing step broke are pushed back while the next one lowers the organs:
    # the step then moves along the trade-off instead of into the same miss
    last = memory[-1] if memory else best
    # (the loop's own Global max has no region to put a term on: the guard holds the targets'
    # hot spots, OutsideTargets the rest)
    broken = (
        [r for r in _broken_by(last, best) if r.goal.structure != GLOBAL]
        if last is not best
        else []
    )

    # every sparing step in view that broke a goal halves the step, from a new best plan too:
    # a step that broke once breaks again from the next plan that meets; it also narrows the
    # step to the organs nearest their limits (``_focus``)
    met_at = next((i for i, m in enumerate(memory) if m.check.all_passed), len(memory))
    breaks = sum(1 for m in memory[met_at:] if m.check.failed)

    def step(g: float) -> tuple[list[ObjectiveTerm], list[str]]:
        terms, notes = _lower(protocol, best.objectives, goals, g, guard, best, narrow=breaks > 0)
        if broken:
            terms, pushed = _hold(protocol, terms, broken, g, memory)
            notes += pushed
        return terms, notes

    tried = [m.objectives for m in memory]
    gain = SPARE_GAIN * 0.5**breaks
    for _ in range(8):
        terms, steps = step(gain)
        if terms not in tried:
            break
        gain *= 0.5
    alternatives: list[list[ObjectiveTerm]] = []
    for scale in ALTERNATIVE_SCALES:
        if len(alternatives) >= count - 1:
            break
        alt, _ = step(gain * scale)
        if alt not in tried and alt != terms and alt not in alternatives:
            alternatives.append(alt)
    head = f"every goal is met at iteration {best.iteration}; sparing the organs at risk"
    about = [f"attempt {attempts + 1}"] if attempts else []
    if gain < SPARE_GAIN:  # halved by the steps that broke a goal, or by parameters tried
        about.append(f"a smaller step (x{gain / SPARE_GAIN:g})")
    if about:
        head += f" ({', '.join(about)})"
    return terms, "; ".join([head, *steps]), alternatives


def _shaped_site(
    protocol: Protocol, goal: ClinicalGoal, term: ObjectiveTerm, terms: dict[str, ObjectiveTerm]
) -> str:
    """Where a goal-shaped term goes: a max-DVH term on the organ itself (its volume is the
    goal's: on the organ's minus helper "at most x %" would count another volume, and the part
    in the target, above any sparing dose, is among the x % it leaves alone), other shapes where
    the organ's upper-limit terms sit (its minus helper once one is used)."""
    if term.kind == "max_dvh":
        return goal.structure
    return _site(protocol, goal.structure, terms)


def _site_weight(
    terms: dict[str, ObjectiveTerm], site: str, pool: list[ObjectiveTerm] | None = None
) -> float:
    """The weight a new goal-shaped term on ``site`` starts from: the site's overdose term's,
    else the median weight of ``pool`` (default: ``terms``)."""
    base = terms.get(f"{site}:squared_overdose")
    if base is not None:
        return base.weight
    return _median_weight(pool if pool is not None else list(terms.values()))


def _below_normalisation(term: ObjectiveTerm, memory: list[MemoryEntry] | None) -> ObjectiveTerm:
    """``term`` aimed lower by the factor the last plan was normalised by: the terms act on the
    dose before that multiplication, so that is where it lands as meant."""
    scale = max(1.0, memory[-1].scale) if memory else 1.0
    return term.with_values(round(term.dose_gy / scale, 3), term.weight)


def _hold(
    protocol: Protocol,
    objectives: list[ObjectiveTerm],
    broken: list[GoalResult],
    gain: float,
    memory: list[MemoryEntry],
) -> tuple[list[ObjectiveTerm], list[str]]:
    """Terms that hold the goals a sparing step broke: the goal's own shape (a sharp smooth
    maximum on a hot spot, a max-DVH term on an upper limit on a Dx, a min-DVH term on a lower
    one: a target's coverage) at once, since sparing presses on those goals every round; a goal
    without a shape, or one that has it, is pushed."""
    terms = {t.key(): t for t in objectives}
    notes: list[str] = []
    rest: list[GoalResult] = []
    for r in broken:
        over = terms.get(f"{r.goal.structure}:squared_overdose")
        if r.goal.structure in _targets(protocol) and r.goal.metric == "max" and over is not None:
            # a target's own hot spot: its overdose term, heavier. (A smooth maximum on the
            # target, softness 1 Gy over its many voxels near the prescription, presses on all
            # of them: on the TG-119 head & neck it took the PTV maximum to 53-54 Gy, at 54-56.5
            # Gy, and pushed the hot spot outside the PTV over its limit; the overdose term at
            # twice its weight met both, 2026-12-07)
            new = over.with_values(over.dose_gy, min(MAX_WEIGHT, over.weight * HOT_SPOT_HOLD))
            terms[new.key()] = new
            notes.append(
                f"the last step broke {r.goal.label} ({r.achieved:.2f} {r.goal.unit}): "
                f"{new.key()} weight x{HOT_SPOT_HOLD:g} holds it while sparing"
            )
            continue
        probe = (
            goal_term(protocol, r.goal, gain, 1.0)
            if r.goal.comparator == "<="
            else _coverage_term(r.goal, gain)
        )
        if probe is None:
            rest.append(r)
            continue
        site = _site(protocol, r.goal.structure, terms)
        probe = dataclasses.replace(probe, structure=_shaped_site(protocol, r.goal, probe, terms))
        if r.goal.structure == OUTSIDE_TARGETS:
            # (a target's own hot-spot term is left where it is: lower, it would fight the
            # coverage)
            probe = _below_normalisation(probe, memory)
        if probe.key() in terms:
            rest.append(r)
            continue
        if probe.kind == "min_dvh":  # as heavy as the coverage term it helps
            base = terms.get(_coverage_key(terms, site))
            start = base.weight if base else _median_weight(objectives)
        else:
            start = _site_weight(terms, site, objectives)
        weight = min(MAX_WEIGHT, start * _step(r, gain))
        new = probe.with_values(probe.dose_gy, weight)
        terms[new.key()] = new
        notes.append(
            f"the last step broke {r.goal.label} ({r.achieved:.2f} {r.goal.unit}): new term "
            f"{new.label()} holds it while sparing"
        )
    if rest:
        out, pushed = _push(protocol, list(terms.values()), ProtocolCheck(rest), gain, memory)
        return out, notes + [f"the last step broke it: {n}" for n in pushed]
    return list(terms.values()), notes


def _lower(
    protocol: Protocol,
    objectives: list[ObjectiveTerm],
    goals: list[GoalResult],
    gain: float,
    guard: list[GoalResult],
    best: MemoryEntry,
    narrow: bool = False,
) -> tuple[list[ObjectiveTerm], list[str]]:
    """Objective doses below what the plan achieves on each goal's structure, weights up; the
    overdose terms of the ``guard`` goals' structures get the same weight factor. ``narrow``
    (a sparing step broke a goal before): only the organs nearest their limits are lowered, and
    a coverage goal near its limit is held when one of them overlaps the target."""
    terms = {t.key(): t for t in objectives}
    factor = 1.0 + gain
    hot: dict[str, float] = {}  # overdose term -> the lowest hot spot its guard goals are at
    for r in guard:
        key = f"{r.goal.structure}:squared_overdose"
        if key in terms and r.goal.unit == "Gy":
            hot[key] = min(hot.get(key, r.achieved), r.achieved)
    for key, achieved in hot.items():
        # active at the hot spot the plan has now (never below 101 % of the prescription); once
        # per term, however many of its structure's limits guard it
        t = terms[key]
        dose = min(t.dose_gy, max(achieved, protocol.prescription_gy * 1.01))
        terms[key] = t.with_values(round(dose, 3), min(MAX_WEIGHT, t.weight * factor))
    level: dict[str, float] = {}  # structure -> the lowest dose one of its goals sits at
    for r in goals:
        kind, value = parse_metric(r.goal.metric)
        dose = value if kind == "V" and value is not None else r.achieved
        level[r.goal.structure] = min(level.get(r.goal.structure, dose), dose)
    notes: list[str] = []
    ordered = sorted(goals, key=lambda r: r.goal.priority)
    focus = _focus(ordered) if narrow else {r.goal.structure: _use(r) for r in ordered}
    pushed: list[ObjectiveTerm] = []
    for r in ordered:
        structure = r.goal.structure
        if structure not in level:
            continue
        if structure not in focus:
            level.pop(structure)
            notes.append(
                f"{structure} left as it is ({r.goal.label} at {r.achieved:.2f} "
                f"{r.goal.unit}): the organs nearest their limits "
                f"({max(focus.values()):.0%} of one) are spared first"
            )
            continue
        kind, x = parse_metric(r.goal.metric)
        shaped = terms.get(f"{structure}:max_dvh")
        if (
            kind == "D"
            and x is not None
            and 0 < x < 100
            and _overlaps_target(protocol, [best], structure)
            and (shaped is None or shaped.parameter == x)  # (one of another Dx is left alone)
        ):
            # a dose-volume limit on an organ that overlaps the target is spared by its own
            # shape: a max-DVH term presses only on the voxels between its dose and the organ's
            # Dx, the ones cheapest to lower, where an overdose term also pulls on the part in
            # the target, which cannot follow and costs the coverage. (Away from the target the
            # overdose term is lowered: an organ's Dx is then set by its voxels nearest the
            # target, which a max-DVH term leaves alone.)
            site, kind, parameter, at = structure, "max_dvh", x, r.achieved
        else:
            # an organ that overlaps the target is spared where it does not (its minus helper)
            _move_to_helper(protocol, terms, r, [best], notes, sparing=True)
            site, kind, parameter = _site(protocol, structure, terms), "squared_overdose", None
            at = level[structure]
        level.pop(structure)  # one sparing term per organ: its first goal in priority order
        key = f"{site}:{kind}"
        old = terms.get(key)
        margin = DVH_MARGIN if kind == "max_dvh" else OAR_MARGIN
        dose = at * (1 - margin * gain)
        if old is not None:
            # below the term's dose by at least the margin, by at most twice it: a term far
            # above what the organ gets moves there over several rounds, not in one jump
            dose = min(dose, old.dose_gy * (1 - margin * gain))
            dose = max(dose, old.dose_gy * (1 - 2 * margin * gain))
        if old is not None:
            weight = min(MAX_WEIGHT, old.weight * factor)
        elif kind == "max_dvh":
            # the organ overlaps the target: its term competes with the target's coverage term
            # from the start (as light as the organ's own terms, it moved the median dose of a
            # parotid a third inside the PTV by 0.2-0.5 Gy a round)
            cover = terms.get(_coverage_key(terms, protocol.target))
            weight = max(_site_weight(terms, site, objectives), cover.weight if cover else 0.0)
        else:
            weight = _median_weight(objectives)
        terms[key] = ObjectiveTerm(site, kind, round(max(dose, 0.0), 3), weight, parameter)
        pushed.append(terms[key])
        notes.append(
            f"{r.goal.label} at {r.achieved:.2f} {r.goal.unit}: {key} objective dose "
            f"{dose:.1f} Gy, weight {f'x{factor:.2f}' if old else 'new'}"
        )
    if narrow and any(_overlaps_target(protocol, [best], s) for s in focus):
        heaviest = max((t.weight for t in pushed), default=_median_weight(objectives))
        notes += _hold_coverage(protocol, terms, best, gain, heaviest)
    return list(terms.values()), notes


def _at_risk(r: GoalResult) -> bool:
    """A goal within ``AT_RISK`` of its limit (relative to the limit), or past it."""
    return r.margin / max(abs(r.goal.limit), 1.0) < AT_RISK


def _use(r: GoalResult) -> float:
    """How much of an upper limit a goal's value uses (1 = at the limit)."""
    return r.achieved / max(abs(r.goal.limit), 1e-6)


def _focus(goals: list[GoalResult]) -> dict[str, float]:
    """The organs a sparing step lowers: those whose goals come within ``FOCUS_BAND`` of the
    largest use of a limit (an organ's use: its goal nearest its limit), with that use. The
    others keep their terms: lowering every organ at once spends the room the targets' goals
    leave on organs already far below their limits."""
    use: dict[str, float] = {}
    for r in goals:
        use[r.goal.structure] = max(use.get(r.goal.structure, 0.0), _use(r))
    top = max(use.values(), default=0.0)
    return {s: u for s, u in use.items() if u >= top - FOCUS_BAND}


def _hold_coverage(
    protocol: Protocol,
    terms: dict[str, ObjectiveTerm],
    best: MemoryEntry,
    gain: float,
    pushed_weight: float,
) -> list[str]:
    """Sparing an organ that overlaps the target takes dose from the target's edge: each
    coverage goal (a lower limit on a Dx of a target) within ``AT_RISK`` of its limit gets its
    min-DVH term in the same step, ``COVERAGE_HOLD_WEIGHT`` times as heavy as the heaviest
    sparing term (a term it has already is made at least that heavy; a target whose min-DVH
    term is on another volume keeps it)."""
    notes: list[str] = []
    targets = _targets(protocol)
    for r in best.check.results:
        if r.goal.comparator != ">=" or r.goal.structure not in targets:
            continue
        if r.goal.structure == protocol.target and parse_metric(r.goal.metric) == (
            "D",
            protocol.coverage_pct,
        ):
            continue  # the prescription itself: every plan is normalised to meet it exactly
        if not _at_risk(r):
            continue
        probe = _coverage_term(r.goal, gain)
        if probe is None:
            continue
        weight = min(MAX_WEIGHT, COVERAGE_HOLD_WEIGHT * pushed_weight)
        old = terms.get(probe.key())
        if old is not None and (old.parameter != probe.parameter or old.weight >= weight):
            continue  # (one term per structure and kind: one on another volume stays)
        dose = max(probe.dose_gy, old.dose_gy) if old is not None else probe.dose_gy
        terms[probe.key()] = probe.with_values(dose, weight)
        notes.append(
            f"{r.goal.label} at {r.achieved:.2f} {r.goal.unit}, near its limit while an organ "
            f"in or beside the target is spared: {terms[probe.key()].label()} holds it"
        )
    return notes


def _new_terms_on_trial(memory: list[MemoryEntry], best: MemoryEntry) -> bool:
    """The last plan is the first with a changed set of terms (added, moved or retired) and
    broke no goal of higher priority than the best plan misses: a new strategy gets one step of
    tuning before the loop backtracks from it."""
    if len(memory) < 2 or best.check.all_passed:
        return False
    last, before = memory[-1], memory[-2]
    if {t.key() for t in last.objectives} == {t.key() for t in before.objectives}:
        return False
    worst = min((r.goal.priority for r in best.check.failed), default=0)
    return all(r.goal.priority >= worst for r in last.check.failed)


def _along_trade_off(last: MemoryEntry, best: MemoryEntry) -> bool:
    """Whether ``last``, ranked below ``best``, is still the better plan to step from: every
    goal its step broke is missed by less than ``HAIR`` of its limit, and its misses sum
    (relative to their limits, every priority together) to less than ``ALONG_GAIN`` of the best
    plan's. The step then moved along the trade-off, gaining far more than it gave; going back
    to ``best`` with a halved step gives most of that back (TG-119 prostate, bladder D30 <=
    15 Gy: a plan met it with the outside maximum 0.52 Gy over, the loop went back to the plan
    missing bladder D30 by 1.9 Gy and ended 0.67 Gy short)."""
    broken = _broken_by(last, best)
    if not broken or any(_relative_miss(r) >= HAIR for r in broken):
        return False
    return _summed_miss(last.check) < ALONG_GAIN * _summed_miss(best.check)


def _first_priority(check: ProtocolCheck, hold: frozenset[str], notes: list[str]) -> ProtocolCheck:
    """While a hard priority-1 goal is missed, the step pushes those alone: the lower-priority
    misses wait (a push on them draws dose from the coverage or toward the hot spots the
    priority-1 goals hold), and are pushed from the plan that meets them. A goal in ``hold``
    (met by the plan stepped from, broken by the step after it) does not make them wait: it is
    pushed beside them, so that the step moves along the trade-off."""
    urgent = {
        id(r)
        for r in check.failed
        if r.goal.hard and r.goal.priority == 1 and r.goal.label not in hold
    }
    waiting = [r for r in check.failed if id(r) not in urgent]
    if not urgent or not waiting:
        return check
    notes.append(
        f"priority 1 first: {', '.join(r.goal.label for r in waiting)} not pushed while "
        f"{', '.join(r.goal.label for r in check.failed if id(r) in urgent)} missed"
    )
    return ProtocolCheck([r for r in check.results if r.passed or id(r) in urgent])


def _last_push(memory: list[MemoryEntry]) -> float:
    """The largest weight factor of the step to the last plan (on the terms it shares with the
    plan before), at most ``MAX_EXTRAPOLATED``."""
    if len(memory) < 2:
        return 1.0
    before = {t.key(): t.weight for t in memory[-2].objectives}
    factors = [t.weight / before[t.key()] for t in memory[-1].objectives if before.get(t.key())]
    return min(MAX_EXTRAPOLATED, max([1.0, *factors]))


def _summed_miss(check: ProtocolCheck) -> float:
    return sum(_relative_miss(r) for r in check.failed)


def _flips(goal: ClinicalGoal, memory: list[MemoryEntry]) -> int:
    """How often ``goal`` went from missed to met or back between two plans that both missed
    something (fixing one goal broke another): each flip halves the goal's step, so that the
    loop closes in on the trade-off instead of jumping across it, while a goal that stays missed
    keeps its full step."""

    def passed(m: MemoryEntry) -> bool | None:
        r = m.check.result(goal)
        return None if r is None else r.passed

    return sum(
        1
        for a, b in itertools.pairwise(memory)
        if a.check.failed and b.check.failed and passed(a) != passed(b)
    )


def _missed(check: ProtocolCheck) -> frozenset[str]:
    return frozenset(r.goal.label for r in check.failed)


def _broken_by(last: MemoryEntry, best: MemoryEntry) -> list[GoalResult]:
    """The goals ``last`` misses that ``best`` did not: what the step to ``last`` broke."""
    return [r for r in last.check.failed if r.goal.label not in _missed(best.check)]


def _median_weight(objectives: list[ObjectiveTerm]) -> float:
    w = sorted(t.weight for t in objectives if t.weight > 0)
    return w[len(w) // 2] if w else 1.0
