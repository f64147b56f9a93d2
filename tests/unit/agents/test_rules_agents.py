"""The rule-based planner's steps, its backtracking, and the in-process loop."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from radpilot.agents.rules_planner import propose_rules
from radpilot.agents.types import MemoryEntry
from radpilot.case import Case
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import GLOBAL, GoalResult, ProtocolCheck, check_protocol
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.loop.inprocess import plan_loop
from radpilot.protocol import ClinicalGoal, load_protocol_text
from tests.paths import REPO_ROOT, with_safety, without_ring

PROTOCOLS = REPO_ROOT / "protocols"


def _dose(case: Case, ptv_hot: float, core: float) -> np.ndarray:
    dose = np.full(case.row_voxels.size, 5.0, dtype=np.float32)
    ptv = case.rows_of("PTV")
    dose[ptv] = 50.0
    dose[ptv[: len(ptv) // 5]] = ptv_hot  # 20 % of the PTV at ptv_hot -> D10 = ptv_hot
    dose[case.rows_of("Core")] = core
    return dose


def _check(case: Case, ptv_hot: float, core: float):
    protocol = load_protocol_text(without_ring("tg119_cshape_harder.yaml"))
    return protocol, check_protocol(PlanDose(case, _dose(case, ptv_hot, core)), protocol)


def test_missed_oar_goal_raises_its_weight_and_lowers_its_dose(analytic_case: Case) -> None:
    protocol, check = _check(analytic_case, 52.0, 14.0)  # core D10 14 > 10
    new, why, _ = propose_rules(
        protocol, protocol.objectives, check, [MemoryEntry(1, protocol.objectives, check)]
    )
    old = {t.key(): t for t in protocol.objectives}
    got = {t.key(): t for t in new}
    assert got["Core:squared_overdose"].weight > old["Core:squared_overdose"].weight
    assert got["Core:squared_overdose"].dose_gy < old["Core:squared_overdose"].dose_gy
    assert got["PTV:squared_overdose"] == old["PTV:squared_overdose"]  # PTV goals are met
    assert "Core D10 <= 10 Gy missed by 4.00 Gy" in why


def test_an_organ_near_miss_alone_moves_its_weight_in_proportion_to_the_miss(
    analytic_case: Case,
) -> None:
    # core D10 <= 10 Gy missed in the last three plans, now by 0.05 Gy (0.5 % of the limit)
    # and nothing else missed: the weight alone, x1.25; by 0.01 Gy, x1.1 (the floor)
    core = "Core:squared_overdose"
    protocol, earlier = _check(analytic_case, 52.0, 10.4)
    start = next(t for t in protocol.objectives if t.key() == core)

    def step(memory, check):
        new, why, _ = propose_rules(protocol, protocol.objectives, check, memory)
        return next(t for t in new if t.key() == core), why

    closing = [
        MemoryEntry(1, protocol.objectives, earlier),
        MemoryEntry(2, protocol.objectives, earlier),
    ]
    for achieved, factor in ((10.05, 1.25), (10.01, 1.1)):
        _, check = _check(analytic_case, 52.0, achieved)
        assert [r.goal.label for r in check.failed] == ["Core D10 <= 10 Gy"]
        got, why = step([*closing, MemoryEntry(3, protocol.objectives, check)], check)
        assert got.dose_gy == start.dose_gy
        assert got.weight == pytest.approx(start.weight * factor, rel=0.02)
        assert "a near miss: the weight alone" in why
        # the same miss after one push: the usual step (objective dose lower, weight x1.5 or more)
        got, why = step([closing[0], MemoryEntry(2, protocol.objectives, check)], check)
        assert got.dose_gy < start.dose_gy and got.weight >= 1.5 * start.weight
        assert "near miss" not in why
    # beside another miss (PTV D10 55.5 > 55), whose push presses on the core: the usual step
    _, check = _check(analytic_case, 55.5, 10.05)
    assert len(check.failed) == 2
    got, why = step([*closing, MemoryEntry(3, protocol.objectives, check)], check)
    assert got.dose_gy < start.dose_gy and got.weight >= 1.5 * start.weight
    assert "near miss" not in why


def test_before_a_plan_meets_the_loops_hot_spot_ceiling_does_not_steer_the_rules_planner(
    analytic_case: Case,
) -> None:
    """The loop's ``Global max`` (priority 1) decides which plan it reports, not the step: the
    same plans with and without a missed ceiling get the same proposal (it has no region for a
    term, and stepping back from every plan over it cost the agent met plans)."""
    protocol, first = _check(analytic_case, 52.0, 14.0)
    _, hotter = _check(analytic_case, 54.0, 12.0)  # closer on the core, hotter
    ceiling = ClinicalGoal(GLOBAL, "max", "<=", 53.0, 1, True)

    def judged(check, hottest):
        result = GoalResult(ceiling, hottest, hottest <= 53.0, 53.0 - hottest)
        return ProtocolCheck([*check.results, result])

    grown = [replace(t, weight=t.weight * 2) for t in protocol.objectives]
    plain = [MemoryEntry(1, protocol.objectives, first), MemoryEntry(2, grown, hotter)]
    capped = [
        MemoryEntry(1, protocol.objectives, judged(first, 52.0)),
        MemoryEntry(2, grown, judged(hotter, 54.0)),
    ]
    assert not capped[1].check.result(ceiling).passed
    want = propose_rules(protocol, grown, hotter, plain)
    got = propose_rules(protocol, grown, capped[1].check, capped)
    assert got == want
    assert "Global" not in got[1]


def test_alternatives_guard_goals_at_risk_then_scale_the_step(analytic_case: Case) -> None:
    protocol, check = _check(analytic_case, 52.0, 14.0)  # core D10 14 > 10; PTV D95 = 50 exactly
    memory = [MemoryEntry(1, protocol.objectives, check)]
    one, _, none = propose_rules(protocol, protocol.objectives, check, memory)
    new, why, alternatives = propose_rules(protocol, protocol.objectives, check, memory, count=4)
    assert none == [] and new == one  # the first candidate is the step a single plan gets
    assert len(alternatives) == 3
    assert "alternatives: also PTV D95 >= 50 Gy; the step x2; the step x0.5" in why

    def term(ts, key):
        return next(t for t in ts if t.key() == key)

    core, ptv = "Core:squared_overdose", "PTV:squared_deviation"
    guarded, bold, cautious = alternatives
    # the guarded step also pushes the met-with-no-room PTV D95 (its coverage term)
    assert term(guarded, ptv).weight > term(new, ptv).weight == term(one, ptv).weight
    assert term(guarded, core) == term(new, core)
    start = term(protocol.objectives, core).weight
    assert term(bold, core).weight >= term(new, core).weight > term(cautious, core).weight > start
    assert term(bold, core).dose_gy < term(new, core).dose_gy < term(cautious, core).dose_gy
    tried = [*memory, MemoryEntry(2, bold, check)]  # an alternative already tried is not offered
    _, _, again = propose_rules(protocol, protocol.objectives, check, tried, count=4)
    assert bold not in again and len(again) == 3


def test_target_hot_spot_raises_target_overdose_weight(analytic_case: Case) -> None:
    protocol, check = _check(analytic_case, 58.0, 5.0)  # PTV D10 58 > 55
    new, _, _ = propose_rules(
        protocol, protocol.objectives, check, [MemoryEntry(1, protocol.objectives, check)]
    )
    got = {t.key(): t for t in new}
    assert got["PTV:squared_overdose"].weight > 500.0
    assert got["PTV:squared_overdose"].dose_gy >= 50.5  # never asks the target to be under-dosed


def test_a_hot_spot_outside_the_targets_gets_a_term_on_the_implicit_region(
    analytic_case: Case,
) -> None:
    text = with_safety(without_ring("tg119_cshape_harder.yaml"), "on")
    protocol = load_protocol_text(text)
    dose = np.full(analytic_case.row_voxels.size, 5.0, dtype=np.float32)
    dose[analytic_case.rows_of("PTV")] = 50.0
    outside = np.setdiff1d(analytic_case.rows_of("BODY"), analytic_case.rows_of("PTV"))
    dose[outside[:3]] = 60.0  # 120 % of Rx outside the target: OutsideTargets max <= 53.5 fails
    check = check_protocol(PlanDose(analytic_case, dose), protocol)
    assert [r.goal.label for r in check.failed] == ["OutsideTargets max <= 53.5 Gy"]
    memory = [MemoryEntry(1, protocol.objectives, check)]
    new, why, _ = propose_rules(protocol, protocol.objectives, check, memory)
    term = next(t for t in new if t.structure == "OutsideTargets")
    # a few hot voxels in a large region: its sharp smooth maximum at once (an overdose term on
    # the region's mean hardly moves them)
    assert term.kind == "smooth_max" and term.parameter == pytest.approx(0.25)
    assert "OutsideTargets:squared_overdose" not in {t.key() for t in new}
    # aimed between the limit and just above the prescription: the voxels beside the target
    # get the prescription, a term below it would pull the coverage down
    assert 50.5 <= term.dose_gy < 53.5
    assert "OutsideTargets max <= 53.5 Gy missed by 6.50 Gy (a hot spot outside" in why
    again, _, _ = propose_rules(protocol, new, check, [*memory, MemoryEntry(2, new, check)])
    pushed = next(t for t in again if t.key() == term.key())
    assert pushed.weight > term.weight and 50.5 <= pushed.dose_gy <= term.dose_gy
    # the terms act before normalisation: after a plan multiplied by 1.05 it aims 5 % lower
    inflated, _, _ = propose_rules(
        protocol,
        protocol.objectives,
        check,
        [MemoryEntry(1, protocol.objectives, check, scale=1.05)],
    )
    lower = next(t for t in inflated if t.key() == term.key())
    assert lower.dose_gy == pytest.approx(term.dose_gy / 1.05, abs=1e-3)
    assert "NormalTissue:smooth_max" not in {t.key() for t in new}  # (no statistics: not far)
    # the hottest point outside the targets is NormalTissue's (10 mm or more from them, maybe
    # beyond the OutsideTargets term's 30 mm): NormalTissue gets a smooth maximum too
    far = ({"name": "NormalTissue", "max_gy": 60.0},)
    memory = [MemoryEntry(1, protocol.objectives, check, stats=far)]
    both, why2, _ = propose_rules(protocol, protocol.objectives, check, memory)
    nt = next(t for t in both if t.key() == "NormalTissue:smooth_max")
    assert (nt.dose_gy, nt.weight, nt.parameter) == (term.dose_gy, term.weight, term.parameter)
    assert "the hottest point outside the targets is NormalTissue's (60.0 Gy" in why2
    memory.append(MemoryEntry(2, both, check, stats=far))
    again, _, _ = propose_rules(protocol, both, check, memory)
    assert next(t for t in again if t.key() == nt.key()).weight > nt.weight  # pushed with it
    near = ({"name": "NormalTissue", "max_gy": 40.0},)  # the hottest point is nearer
    close, _, _ = propose_rules(
        protocol,
        protocol.objectives,
        check,
        [MemoryEntry(1, protocol.objectives, check, stats=near)],
    )
    assert "NormalTissue:smooth_max" not in {t.key() for t in close}


def test_backtracks_to_the_best_iteration_with_a_smaller_step(analytic_case: Case) -> None:
    protocol, good = _check(analytic_case, 52.0, 10.5)
    _, bad = _check(analytic_case, 58.0, 14.0)
    assert bad.shortfall() > good.shortfall() and bad.rank() < good.rank()
    best_objs = protocol.objectives
    worse_objs = [  # the same terms, other values (a step that changed the terms is tried once)
        t.with_values(t.dose_gy, t.weight * 0.1) if t.structure == "NormalTissue" else t
        for t in protocol.objectives
    ]
    memory = [MemoryEntry(1, best_objs, good), MemoryEntry(2, worse_objs, bad)]
    new, why, _ = propose_rules(protocol, worse_objs, bad, memory)
    assert "stepping again from iteration 1" in why
    assert any(t.structure == "NormalTissue" for t in new)  # back on iteration 1's objectives
    full, _, _ = propose_rules(protocol, best_objs, good, [MemoryEntry(1, best_objs, good)])
    core = lambda ts: next(t for t in ts if t.key() == "Core:squared_overdose").weight  # noqa: E731
    assert core(protocol.objectives) < core(new) < core(full)  # a smaller step than a fresh one


def test_once_every_goal_is_met_it_spares_the_organs_and_keeps_the_targets(
    analytic_case: Case,
) -> None:
    protocol, met = _check(analytic_case, 52.0, 8.0)  # every goal met, core D10 8 Gy
    assert met.all_passed
    old = {t.key(): t for t in protocol.objectives}
    # away from the target (its hottest voxel well below the prescription) an organ's overdose
    # term is lowered: a full margin below what the core gets now (8 Gy), weight x2
    cool = ({"name": "Core", "max_gy": 20.0},)
    away, _, _ = propose_rules(
        protocol, protocol.objectives, met, [MemoryEntry(1, protocol.objectives, met, stats=cool)]
    )
    lowered = {t.key(): t for t in away}["Core:squared_overdose"]
    assert lowered.dose_gy == pytest.approx(8.0 * (1 - 0.15)) and lowered.weight == 200.0
    assert "Core:max_dvh" not in {t.key() for t in away}
    # an organ that reaches the prescription (it overlaps the target) is spared by a term of
    # its dose-volume limit's shape (max-DVH on the core's D10), aimed at half the core's D10,
    # as heavy as the heavier of the core's overdose term and the target's
    # coverage term; the overdose term itself is left as it was
    hot = ({"name": "Core", "max_gy": 49.0},)
    first = MemoryEntry(1, protocol.objectives, met, stats=hot)
    new, why, alternatives = propose_rules(protocol, protocol.objectives, met, [first], count=3)
    got = {t.key(): t for t in new}
    core = got["Core:max_dvh"]
    assert core.parameter == 10 and core.dose_gy == pytest.approx(8.0 * 0.5)
    assert core.weight == pytest.approx(100.0)  # the core's overdose term and PTV's coverage
    heavy = [t.with_values(t.dose_gy, 300.0) if t.kind == "squared_deviation" else t
             for t in protocol.objectives]  # fmt: skip
    pressed, _, _ = propose_rules(protocol, heavy, met, [MemoryEntry(1, heavy, met, stats=hot)])
    assert {t.key(): t for t in pressed}["Core:max_dvh"].weight == pytest.approx(300.0)
    assert got["Core:squared_overdose"] == old["Core:squared_overdose"]
    # the target's hot-spot term keeps the balance: the step's factor (x2), active at the hot
    # spot now
    ptv_hot = got["PTV:squared_overdose"]
    assert ptv_hot.weight == pytest.approx(2.0 * 500.0) and ptv_hot.dose_gy == pytest.approx(52.0)
    assert got["PTV:squared_deviation"] == old["PTV:squared_deviation"]
    assert "every goal is met at iteration 1; sparing the organs at risk" in why
    assert "Core D10 <= 10 Gy at 8.00 Gy" in why
    assert len(alternatives) == 2 and new not in alternatives
    # the step broke a goal (iteration 2): from iteration 1 again, with a smaller step
    _, broke = _check(analytic_case, 58.0, 6.0)
    memory = [first, MemoryEntry(2, new, broke)]
    again, why2, _ = propose_rules(protocol, new, broke, memory)
    # a step that broke a goal halves the next: half the margin below 8 Gy, factor x1.5
    smaller = {t.key(): t for t in again}
    assert core.dose_gy < smaller["Core:max_dvh"].dose_gy < 8.0
    # the target's overdose term: x1.5 with the step, and x2 more because that step broke the
    # target's maximum (58 Gy, implicit limit 57.5): a hot spot in the target is held by its own
    # overdose term, not by a smooth maximum that would press on every voxel of the target
    assert smaller["PTV:squared_overdose"].weight == pytest.approx(2 * 1.5 * 500.0)
    assert "PTV:smooth_max" not in smaller
    assert "broke PTV max <= 57.5 Gy (58.00 Gy): PTV:squared_overdose weight x2" in why2
    assert "attempt 2, a smaller step (x0.5)" in why2
    # what the step broke is held by a term of the goal's own shape while sparing goes on
    held = {t.key(): t for t in again}["PTV:max_dvh"]
    assert held.parameter == 10 and 50.0 < held.dose_gy < 55.0 and held.weight > 500.0
    assert "the last step broke PTV D10 <= 55 Gy (58.00 Gy)" in why2
    assert "holds it while sparing" in why2
    # the target's own hot-spot term stays where it is when the breaking plan was inflated by
    # the normalisation (aimed lower, it would fight the coverage)
    memory[-1] = MemoryEntry(2, new, broke, scale=1.1)
    scaled, _, _ = propose_rules(protocol, new, broke, memory)
    assert {t.key(): t for t in scaled}["PTV:max_dvh"].dose_gy == pytest.approx(held.dose_gy)
    # a broken coverage Dx is held by a min-DVH term a little above its limit, as heavy as the
    # target's coverage term (its deviation term here) times the step
    dose = np.full(analytic_case.row_voxels.size, 5.0, dtype=np.float32)
    ptv = analytic_case.rows_of("PTV")
    dose[ptv] = 50.0
    dose[ptv[: len(ptv) // 10]] = 45.0  # a tenth of the PTV cold: D95 45 Gy
    dose[analytic_case.rows_of("Core")] = 6.0
    cold = check_protocol(PlanDose(analytic_case, dose), protocol)
    assert [r.goal.label for r in cold.failed] == ["PTV D95 >= 50 Gy"]
    covered, why3, _ = propose_rules(protocol, new, cold, [first, MemoryEntry(2, new, cold)])
    hold = {t.key(): t for t in covered}["PTV:min_dvh"]
    assert hold.parameter == 95 and 50.0 < hold.dose_gy <= 51.0
    assert hold.weight > old["PTV:squared_deviation"].weight
    assert "the last step broke PTV D95 >= 50 Gy (45.00 Gy)" in why3


def test_loop_goes_on_after_the_goals_are_met_unless_the_protocol_says_stop(
    analytic_case: Case,
) -> None:
    protocol = load_protocol_text(without_ring("tg119_cshape_easier.yaml"))
    report = plan_loop(analytic_case, protocol, max_iterations=4)
    assert 1 <= len(report.iterations) <= 4
    assert report.best_iteration in [it.iteration for it in report.iterations]
    summary = report.summary()
    met = summary["improvement"]["met_at_iteration"]
    assert met, "the easier C-shape protocol is met on the analytic phantom"
    best = next(it for it in report.iterations if it.iteration == report.best_iteration)
    assert best.meets and report.best_iteration >= met
    first = next(it for it in report.iterations if it.iteration == met)
    assert best.check.sparing() >= first.check.sparing()
    if len(report.iterations) < 4:  # it stopped before the budget: the record says why
        assert summary["loop_ended"].startswith("improvement ended")
    assert summary["after_goals_met"] == "improve"
    stop = replace(protocol, after_goals_met="stop")
    stopped = plan_loop(analytic_case, stop, max_iterations=4)
    assert stopped.iterations[-1].iteration == met == stopped.best_iteration
    assert "after_goals_met: stop" in stopped.summary()["loop_ended"]
    with pytest.raises(ValueError, match="max_iterations"):
        plan_loop(analytic_case, stop, max_iterations=0)


def test_a_stalled_goal_gets_a_term_shaped_like_it_which_is_pushed_from_then_on(
    analytic_case: Case,
) -> None:
    protocol, c1 = _check(analytic_case, 52.0, 14.0)  # core D10 14 > 10 ...
    _, c2 = _check(analytic_case, 52.0, 13.8)
    _, c3 = _check(analytic_case, 52.0, 13.6)  # ... closing in by 0.4 of a 4 Gy miss: stalled
    memory = [MemoryEntry(i + 1, protocol.objectives, c) for i, c in enumerate((c1, c2, c3))]
    new, why, _ = propose_rules(protocol, protocol.objectives, c3, memory)
    got = {t.key(): t for t in new}
    old = {t.key(): t for t in protocol.objectives}
    dvh = got["Core:max_dvh"]  # "at most 10 % of the core above 8.5 Gy"
    assert dvh.parameter == 10.0 and dvh.dose_gy == pytest.approx(8.5)
    assert got["Core:squared_overdose"] == old["Core:squared_overdose"]  # not pushed again
    assert "Core D10 <= 10 Gy missed in the last 3 plans without closing in" in why
    assert "switching strategy, new term Core max_dvh 8.5 Gy (volume_pct 10)" in why
    # the next step pushes the new term, not the overdose term
    _, c4 = _check(analytic_case, 52.0, 12.0)
    nxt, why2, _ = propose_rules(protocol, new, c4, [*memory, MemoryEntry(4, new, c4)])
    after = {t.key(): t for t in nxt}
    assert after["Core:max_dvh"].weight > dvh.weight and after["Core:max_dvh"].parameter == 10.0
    assert after["Core:squared_overdose"] == old["Core:squared_overdose"]
    assert "Core:max_dvh weight x" in why2
    # a goal that is closing in keeps the overdose term
    _, fast = _check(analytic_case, 52.0, 11.0)
    moving = [*memory[:2], MemoryEntry(3, protocol.objectives, fast)]
    plain, _, _ = propose_rules(protocol, protocol.objectives, fast, moving)
    assert "Core:max_dvh" not in {t.key() for t in plain}


def test_a_stalled_hot_spot_in_the_target_gets_its_shape_aimed_inside_the_limit(
    analytic_case: Case,
) -> None:
    # PTV D10 <= 55 Gy missed three times without closing in, the plan not inflated: the new
    # max-DVH term on the PTV aims between the limit and 101 % of the prescription (52.75 Gy),
    # never at half the target's D10 as an organ overlapping the target would be
    hot = ({"name": "PTV", "max_gy": 60.0}, {"name": "Core", "max_gy": 30.0})
    protocol, c1 = _check(analytic_case, 58.0, 8.0)
    _, c2 = _check(analytic_case, 57.9, 8.0)
    _, c3 = _check(analytic_case, 57.8, 8.0)
    memory = [
        MemoryEntry(i + 1, protocol.objectives, c, stats=hot, scale=1.0)
        for i, c in enumerate((c1, c2, c3))
    ]
    new, why, _ = propose_rules(protocol, protocol.objectives, c3, memory)
    dvh = {t.key(): t for t in new}["PTV:max_dvh"]
    assert dvh.parameter == 10.0 and dvh.dose_gy == pytest.approx(52.75)
    assert "switching strategy, new term PTV max_dvh 52.75 Gy (volume_pct 10)" in why
    # pushed again, it keeps its dose
    _, c4 = _check(analytic_case, 57.0, 8.0)
    nxt, _, _ = propose_rules(
        protocol, new, c4, [*memory, MemoryEntry(4, new, c4, stats=hot, scale=1.0)]
    )
    pushed = {t.key(): t for t in nxt}["PTV:max_dvh"]
    assert pushed.weight > dvh.weight and pushed.dose_gy == pytest.approx(52.75)


def test_a_stalled_target_maximum_gets_a_sharp_smooth_maximum_even_on_an_inflated_plan(
    analytic_case: Case,
) -> None:
    # PTV max <= 57.5 Gy (the implicit hot-spot goal) missed three times without closing in,
    # every plan scaled up by the normalisation (whose pushes go to the coverage's min-DVH
    # term): a smooth maximum with 0.25 Gy softness, aimed 15 % of the way from the limit
    # down to 101 % of Rx (56.45 Gy). A softness of 1 Gy over the target's many voxels near
    # the prescription would press its whole top down.
    protocol = load_protocol_text(without_ring("tg119_cshape_harder.yaml"))
    ptv = analytic_case.rows_of("PTV")
    cover = ObjectiveTerm("PTV", "min_dvh", 50.0, 800.0, 95.0)
    terms = [*protocol.objectives, cover]

    def check(peak: float):
        dose = _dose(analytic_case, 54.0, 8.0)  # PTV D10 54 <= 55, core met
        dose[ptv[:3]] = peak
        return check_protocol(PlanDose(analytic_case, dose), protocol)

    checks = [check(peak) for peak in (59.0, 58.9, 58.8)]
    assert [r.goal.label for r in checks[-1].failed] == ["PTV max <= 57.5 Gy"]
    memory = [MemoryEntry(i + 1, terms, c, scale=1.04) for i, c in enumerate(checks)]
    new, why, _ = propose_rules(protocol, terms, checks[-1], memory)
    got = {t.key(): t for t in new}
    sharp = got["PTV:smooth_max"]
    assert sharp.dose_gy == pytest.approx(56.45) and sharp.parameter == 0.25
    assert sharp.weight > 500.0  # the PTV overdose term's, times the step
    assert got["PTV:min_dvh"] == cover  # not pushed again
    assert "PTV max <= 57.5 Gy missed in the last 3 plans without closing in" in why
    assert "new term PTV smooth_max 56.45 Gy (softness_gy 0.25)" in why
    # from then on that term is pushed, still not the coverage's
    c4 = check(58.0)
    nxt, why2, _ = propose_rules(protocol, new, c4, [*memory, MemoryEntry(4, new, c4, scale=1.04)])
    after = {t.key(): t for t in nxt}
    assert after["PTV:smooth_max"].weight > sharp.weight
    assert after["PTV:smooth_max"].dose_gy == pytest.approx(56.45)
    assert after["PTV:min_dvh"] == cover
    assert "PTV:smooth_max weight x" in why2
    # a first miss on an inflated plan still goes to the coverage
    first, _, _ = propose_rules(protocol, terms, checks[0], memory[:1])
    assert "PTV:smooth_max" not in {t.key() for t in first}


def _with_helpers(protocol):
    from radpilot.cases.helpers import Helper

    return replace(
        protocol,
        helpers=(
            Helper("PTV_ring", "ring", "PTV", inner_mm=3.0, outer_mm=15.0),
            Helper("Core_opt", "minus", "Core", subtract="PTV", margin_mm=0.0),
        ),
    )


def _overlapping_core(case: Case):
    """The harder C-shape with helpers, its core D10 missed (14 Gy) while the core reaches 49
    Gy (it abuts the target): protocol, check, stats, a memory of that one plan."""
    plain, check = _check(case, 52.0, 14.0)
    protocol = _with_helpers(plain)
    hot = ({"name": "Core", "max_gy": 49.0}, {"name": "NormalTissue", "max_gy": 20.0})
    return protocol, check, hot, [MemoryEntry(1, protocol.objectives, check, stats=hot)]


def test_an_organ_reaching_the_prescription_moves_its_term_to_its_minus_helper(
    analytic_case: Case,
) -> None:
    protocol, check, hot, memory = _overlapping_core(analytic_case)
    plain = load_protocol_text(without_ring("tg119_cshape_harder.yaml"))
    new, why, _ = propose_rules(protocol, protocol.objectives, check, memory)
    got = {t.key(): t for t in new}
    old = {t.key(): t for t in protocol.objectives}
    assert "Core:squared_overdose" not in got  # retired ...
    moved = got["Core_opt:squared_overdose"]  # ... and pushed on the helper instead
    assert moved.weight > old["Core:squared_overdose"].weight
    assert moved.dose_gy < old["Core:squared_overdose"].dose_gy
    assert "Core reaches 49.0 Gy (it overlaps the target): added Core_opt squared_overdose" in why
    assert "retired Core squared_overdose 8 Gy w=100" in why
    assert "PTV_ring" not in got  # no spillage
    # the next step pushes the helper's term (the organ's is not brought back)
    nxt, _, _ = propose_rules(protocol, new, check, [*memory, MemoryEntry(2, new, check)])
    after = {t.key(): t for t in nxt}
    assert "Core:squared_overdose" not in after
    assert after["Core_opt:squared_overdose"].weight > moved.weight
    # an organ away from the target, or a protocol without the helper: pushed where it is
    cool = ({"name": "Core", "max_gy": 20.0},)
    for p, stats in ((protocol, cool), (plain, hot)):
        same, _, _ = propose_rules(
            p, p.objectives, check, [MemoryEntry(1, p.objectives, check, stats=stats)]
        )
        assert {t.structure for t in same} == {t.structure for t in p.objectives}


def test_sparing_an_organ_that_reaches_the_prescription_uses_its_minus_helper(
    analytic_case: Case,
) -> None:
    from radpilot.protocol import ClinicalGoal

    plain, _ = _check(analytic_case, 52.0, 8.0)
    # a limit that is not a dose-volume one (those get a max-DVH term, which leaves the
    # overlap alone by itself): the core's mean
    kept = [g for g in plain.goals if g.structure != "Core"]
    goals = (*kept, ClinicalGoal("Core", "mean", "<=", 20.0, 2))
    protocol = replace(_with_helpers(plain), goals=goals)
    dose = np.full(analytic_case.row_voxels.size, 5.0, dtype=np.float32)
    dose[analytic_case.rows_of("PTV")] = 50.0
    dose[analytic_case.rows_of("Core")] = 8.0
    met = check_protocol(PlanDose(analytic_case, dose), protocol)
    assert met.all_passed
    hot = ({"name": "Core", "max_gy": 49.0},)
    new, why, _ = propose_rules(
        protocol, protocol.objectives, met, [MemoryEntry(1, protocol.objectives, met, stats=hot)]
    )
    got = {t.key(): t for t in new}
    assert "Core:squared_overdose" not in got
    assert got["Core_opt:squared_overdose"].dose_gy < 8.0
    assert "Core mean <= 20 Gy spared while Core reaches 49.0 Gy (it overlaps the target)" in why
    # away from the target it is lowered where it is
    cool = ({"name": "Core", "max_gy": 20.0},)
    same, _, _ = propose_rules(
        protocol, protocol.objectives, met, [MemoryEntry(1, protocol.objectives, met, stats=cool)]
    )
    assert {t.key() for t in same} == {t.key() for t in protocol.objectives}


def test_a_sparing_step_that_broke_a_goal_halves_the_steps_after_it(analytic_case: Case) -> None:
    protocol, met = _check(analytic_case, 52.0, 8.0)
    _, broke = _check(analytic_case, 58.0, 6.0)
    _, better = _check(analytic_case, 52.0, 7.0)  # met again, the core lower
    objs = protocol.objectives
    fresh, _, _ = propose_rules(protocol, objs, met, [MemoryEntry(1, objs, met)])
    memory = [MemoryEntry(1, objs, met), MemoryEntry(2, fresh, broke), MemoryEntry(3, objs, better)]
    after, why, _ = propose_rules(protocol, objs, better, memory)
    assert "every goal is met at iteration 3" in why and "attempt" not in why
    assert "sparing the organs at risk (a smaller step (x0.5))" in why
    weight = lambda ts: {t.key(): t for t in ts}["PTV:squared_overdose"].weight  # noqa: E731
    assert weight(fresh) == pytest.approx(2.0 * 500.0)  # a full push from a first met plan
    assert weight(after) == pytest.approx(1.5 * 500.0)  # half of it after a step that broke


def test_after_a_sparing_step_broke_a_goal_only_the_organs_nearest_their_limits_are_lowered(
    analytic_case: Case,
) -> None:
    # two organs to spare: the core at 8 of 10 Gy (80 % of its limit) and the body's mean far
    # below its limit; and a coverage goal that is not the prescription, 4 % above its limit
    goals = (
        '  - {structure: PTV, metric: D99, comparator: ">=", limit: 48.0, priority: 1}\n'
        '  - {structure: BODY, metric: mean, comparator: "<=", limit: 40.0, priority: 2}\n'
    )
    text = without_ring("tg119_cshape_harder.yaml").replace("goals:\n", "goals:\n" + goals, 1)
    protocol = load_protocol_text(text)

    def check(ptv_hot: float, core: float):
        dose = _dose(analytic_case, ptv_hot, core)
        return check_protocol(PlanDose(analytic_case, dose), protocol)

    met, broke = check(52.0, 8.0), check(58.0, 6.0)
    assert met.all_passed and not broke.all_passed
    hot = ({"name": "Core", "max_gy": 49.0},)  # the core reaches the prescription
    first = MemoryEntry(1, protocol.objectives, met, stats=hot)
    # the first sparing step from a plan that meets lowers every organ, and holds no coverage
    new, _, _ = propose_rules(protocol, protocol.objectives, met, [first])
    keys = {t.key() for t in new}
    assert {"Core:max_dvh", "BODY:squared_overdose"} <= keys and "PTV:min_dvh" not in keys
    # it broke a goal: the next step lowers only the organ nearest its limit (the core), and
    # holds the coverage goal near its limit with a min-DVH term twice as heavy as the core's
    again, why, _ = propose_rules(protocol, new, broke, [first, MemoryEntry(2, new, broke)])
    got = {t.key(): t for t in again}
    assert "BODY:squared_overdose" not in got  # left as it was in iteration 1 (no term)
    assert "BODY left as it is (BODY mean <= 40 Gy at" in why
    assert got["Core:max_dvh"].dose_gy < 8.0
    cover = got["PTV:min_dvh"]
    assert cover.parameter == 99 and cover.dose_gy == pytest.approx(48.0 * (1 + 0.02 * 0.5))
    assert cover.weight == pytest.approx(2.0 * got["Core:max_dvh"].weight)
    assert "PTV D99 >= 48 Gy at 50.00 Gy, near its limit" in why
    # the prescription's own coverage (D95, normalised to meet exactly) is never held
    assert not any(t.kind == "min_dvh" and t.parameter == 95 for t in again)
    # a min-DVH term the target has on another volume (one per structure and kind) stays
    d95 = ObjectiveTerm("PTV", "min_dvh", 50.0, 10.0, 95.0)  # lighter than a hold
    own = MemoryEntry(1, [*protocol.objectives, d95], met, stats=hot)
    kept, _, _ = propose_rules(protocol, new, broke, [own, MemoryEntry(2, new, broke)])
    assert {t.key(): t for t in kept}["PTV:min_dvh"] == d95
    # an organ away from the target: the coverage is left to the step's guard terms
    cool = ({"name": "Core", "max_gy": 20.0},)
    away = MemoryEntry(1, protocol.objectives, met, stats=cool)
    step, _, _ = propose_rules(protocol, new, broke, [away, MemoryEntry(2, new, broke)])
    assert "PTV:min_dvh" not in {t.key() for t in step}


def test_spillage_adds_a_term_on_the_ring_around_the_target_once(analytic_case: Case) -> None:
    plain, check = _check(analytic_case, 52.0, 14.0)
    protocol = _with_helpers(plain)
    spill = ({"name": "Core", "max_gy": 20.0}, {"name": "NormalTissue", "max_gy": 44.0})
    memory = [MemoryEntry(1, protocol.objectives, check, stats=spill)]
    new, why, _ = propose_rules(protocol, protocol.objectives, check, memory)
    ring = {t.key(): t for t in new}["PTV_ring:squared_overdose"]
    assert ring.dose_gy == pytest.approx(37.5)  # 75 % of the prescription
    assert "NormalTissue (10 mm or more from the targets) reaches 44.0 Gy, 88 %" in why
    assert "ring 3-15 mm around PTV" in why
    nxt, why2, _ = propose_rules(
        protocol, new, check, [*memory, MemoryEntry(2, new, check, stats=spill)]
    )
    assert sum(t.structure == "PTV_ring" for t in nxt) == 1 and "dose spills" not in why2
    low = ({"name": "NormalTissue", "max_gy": 30.0},)
    calm, _, _ = propose_rules(
        protocol,
        protocol.objectives,
        check,
        [MemoryEntry(1, protocol.objectives, check, stats=low)],
    )
    assert all(t.structure != "PTV_ring" for t in calm)


def test_a_limit_near_the_prescription_on_an_overlapping_organ_gives_coverage_to_a_helper(
    analytic_case: Case,
) -> None:
    from radpilot.cases.helpers import Helper

    # a protocol whose core limit sits near the prescription (45 of 50 Gy), missed at 48 Gy
    text = without_ring("tg119_cshape_harder.yaml")
    base = load_protocol_text(text.replace("limit: 10.0", "limit: 45.0"))
    protocol = replace(base, helpers=(Helper("PTV_core", "minus", "PTV", subtract="Core"),))
    dose = np.full(analytic_case.row_voxels.size, 5.0, dtype=np.float32)
    dose[analytic_case.rows_of("PTV")] = 50.0
    dose[analytic_case.rows_of("Core")] = 48.0
    check = check_protocol(PlanDose(analytic_case, dose), protocol)
    assert [r.goal.label for r in check.failed] == ["Core D10 <= 45 Gy"]
    overlapping = ({"name": "Core", "max_gy": 49.0},)
    memory = [MemoryEntry(1, protocol.objectives, check, stats=overlapping)]
    new, why, _ = propose_rules(protocol, protocol.objectives, check, memory)
    got = {t.key(): t for t in new}
    old = {t.key(): t for t in protocol.objectives}
    assert got["PTV_core:squared_deviation"].weight == old["PTV:squared_deviation"].weight
    assert got["PTV:squared_deviation"].weight == pytest.approx(
        0.2 * old["PTV:squared_deviation"].weight
    )
    assert "added PTV_core squared_deviation 50 Gy w=100, PTV:squared_deviation weight x0.2" in why
    # a min-DVH term on the target's coverage moves with it, whole: even a fifth of it would
    # hold the overlap at the prescription
    held = [*protocol.objectives, ObjectiveTerm("PTV", "min_dvh", 50.0, 800.0, 95.0)]
    memory = [MemoryEntry(1, held, check, stats=overlapping)]
    moved, why, _ = propose_rules(protocol, held, check, memory)
    keys = {t.key(): t for t in moved}
    assert "PTV:min_dvh" not in keys
    assert (keys["PTV_core:min_dvh"].weight, keys["PTV_core:min_dvh"].parameter) == (800.0, 95.0)
    assert "PTV:min_dvh moved to PTV_core" in why
    # and a hot spot of an inflated plan then adds its min-DVH term on the helper
    hot = check_protocol(PlanDose(analytic_case, _dose(analytic_case, 58.0, 8.0)), protocol)
    assert "PTV D10 <= 55 Gy" in [r.goal.label for r in hot.failed]
    inflated = [MemoryEntry(2, new, hot, scale=1.08)]
    again, why, _ = propose_rules(protocol, new, hot, inflated)
    assert "PTV_core:min_dvh" in {t.key() for t in again}
    assert "PTV:min_dvh" not in {t.key() for t in again}
    # the organ far from the prescription, or without the helper: the coverage stays put
    for p, stats in ((protocol, ({"name": "Core", "max_gy": 30.0},)), (base, overlapping)):
        same, _, _ = propose_rules(
            p, p.objectives, check, [MemoryEntry(1, p.objectives, check, stats=stats)]
        )
        assert "PTV_core:squared_deviation" not in {t.key() for t in same}


def test_a_hot_spot_of_an_inflated_plan_pushes_coverage_not_the_overdose_term(
    analytic_case: Case,
) -> None:
    protocol, check = _check(analytic_case, 58.0, 8.0)  # PTV D10 58 > 55, core met
    old = {t.key(): t for t in protocol.objectives}
    inflated = [MemoryEntry(1, protocol.objectives, check, scale=1.08)]
    new, why, _ = propose_rules(protocol, protocol.objectives, check, inflated)
    got = {t.key(): t for t in new}
    # first a min-DVH term on the coverage itself: the coldest 5 % (next to the core) may stay
    # cold without the whole plan being scaled up for them
    dvh = got["PTV:min_dvh"]
    assert (dvh.dose_gy, dvh.parameter) == (50.0, 95.0)
    assert dvh.weight == pytest.approx(8 * old["PTV:squared_deviation"].weight)
    assert got["PTV:squared_overdose"] == old["PTV:squared_overdose"]
    assert got["PTV:squared_deviation"] == old["PTV:squared_deviation"]
    assert "while the normalisation multiplies the plan by 1.080" in why
    assert "new term PTV min_dvh 50 Gy (volume_pct 95)" in why
    # still inflated with that term: the min-DVH term alone is pushed (the deviation term
    # would pull the voxels next to the core up to the prescription as well)
    again = [*inflated, MemoryEntry(2, new, check, scale=1.08)]
    newer, why, _ = propose_rules(protocol, new, check, again)
    pushed = {t.key(): t for t in newer}
    assert pushed["PTV:squared_deviation"] == old["PTV:squared_deviation"]
    assert pushed["PTV:min_dvh"].weight > dvh.weight
    assert "(the optimised coverage falls short): PTV:min_dvh weight x" in why
    flat = [MemoryEntry(1, protocol.objectives, check, scale=1.0)]
    new, _, _ = propose_rules(protocol, protocol.objectives, check, flat)
    got = {t.key(): t for t in new}
    assert got["PTV:squared_overdose"].weight > old["PTV:squared_overdose"].weight
    assert got["PTV:squared_deviation"] == old["PTV:squared_deviation"]


def test_a_coverage_push_still_short_is_sized_from_the_last_one(analytic_case: Case) -> None:
    """An inflated plan's PTV D10 <= 55 Gy: doubling the coverage min-DVH term took D10 from 57
    to 56 Gy. Taken as linear in the log of the weight, the 1 Gy left needs x2, more than the
    usual step (1 + 0.5 + 4 x 1/55 = 1.57); where the push closed the miss faster, the usual
    step stands."""
    protocol, first = _check(analytic_case, 57.0, 8.0)  # PTV D10 57 > 55, core met
    dvh = ObjectiveTerm("PTV", "min_dvh", 50.0, 800.0, 95.0)
    before = [*protocol.objectives, dvh]
    doubled = [*protocol.objectives, dvh.with_values(50.0, 1600.0)]

    def factor_after(d10_now: float) -> tuple[float, str]:
        _, now = _check(analytic_case, d10_now, 8.0)
        memory = [
            MemoryEntry(1, before, first, scale=1.06),
            MemoryEntry(2, doubled, now, scale=1.05),
        ]
        new, why, _ = propose_rules(protocol, doubled, now, memory)
        return _weights(new)["PTV:min_dvh"] / 1600.0, why

    factor, why = factor_after(56.0)
    assert factor == pytest.approx(2.0)
    assert "PTV:min_dvh weight x2.00 (sized from the last push: x2.00 closed 1.00" in why
    factor, why = factor_after(55.5)  # 2 ** (0.5 / 1.5) = 1.26: the usual step (1.54)
    assert factor == pytest.approx(1.0 + 0.5 + 4.0 * 0.5 / 55.0) and "sized from" not in why


def test_an_organ_missed_while_the_plan_is_inflated_gets_the_coverage_min_dvh_term(
    analytic_case: Case,
) -> None:
    protocol, check = _check(analytic_case, 52.0, 14.0)  # core D10 14 > 10, PTV goals met
    inflated = [MemoryEntry(1, protocol.objectives, check, scale=1.05)]
    new, why, _ = propose_rules(protocol, protocol.objectives, check, inflated)
    got = {t.key(): t for t in new}
    # every organ's dose is multiplied with the target's: the coverage's coldest voxels get
    # their own term now, not only once a target hot spot breaks
    dvh = got["PTV:min_dvh"]
    assert (dvh.dose_gy, dvh.parameter) == (50.0, 95.0)
    assert "Core D10 <= 10 Gy missed by 4.00 Gy while the normalisation multiplies" in why
    assert got["Core:squared_overdose"].weight > 100.0  # the organ's own push as well
    # not when the plan was hardly scaled, nor a second one once it is there
    flat, _, _ = propose_rules(
        protocol, protocol.objectives, check, [MemoryEntry(1, protocol.objectives, check)]
    )
    assert "PTV:min_dvh" not in {t.key() for t in flat}
    again, _, _ = propose_rules(
        protocol, new, check, [*inflated, MemoryEntry(2, new, check, scale=1.05)]
    )
    assert [t.key() for t in again].count("PTV:min_dvh") == 1
    assert {t.key(): t for t in again}["PTV:min_dvh"] == dvh  # (pushed for hot spots only)
    # nor for a near miss, left to the organ's own push
    _, close = _check(analytic_case, 52.0, 10.5)  # core D10 10.5 > 10
    near_memory = [MemoryEntry(1, protocol.objectives, close, scale=1.05)]
    near, _, _ = propose_rules(protocol, protocol.objectives, close, near_memory)
    assert "PTV:min_dvh" not in {t.key() for t in near}
    # nor where a goal holds the target's coldest voxels (a D99 beside the D95 coverage): the
    # term would let them run cold
    d95 = next(g for g in protocol.goals if g.metric == "D95")
    held = replace(protocol, goals=[*protocol.goals, replace(d95, metric="D99", limit=45.0)])
    kept, _, _ = propose_rules(held, held.objectives, check, inflated)
    assert "PTV:min_dvh" not in {t.key() for t in kept}


def test_a_step_that_changed_the_terms_gets_one_more_step_before_a_backtrack(
    analytic_case: Case,
) -> None:
    protocol, good = _check(analytic_case, 52.0, 10.5)
    _, bad = _check(analytic_case, 58.0, 10.2)  # same priority traded: PTV D10 for core D10
    assert bad.rank() < good.rank()
    added = [*protocol.objectives, ObjectiveTerm("Core", "max_dvh", 9.0, 100.0, 10.0)]
    memory = [MemoryEntry(1, protocol.objectives, good), MemoryEntry(2, added, bad)]
    new, why, _ = propose_rules(protocol, added, bad, memory)
    assert "iteration 2 changed the terms themselves; one step on them" in why
    assert "Core:max_dvh" in {t.key() for t in new}
    # a second plan on the new terms that is still worse: back to the best one
    again = [*memory, MemoryEntry(3, new, bad)]
    _, why3, _ = propose_rules(protocol, new, bad, again)
    assert "stepping again from iteration 1" in why3


def test_the_rules_loop_brings_a_hot_spot_outside_the_targets_under_its_safety_goal(
    analytic_case: Case,
) -> None:
    text = with_safety(without_ring("tg119_cshape_easier.yaml"), "on")
    protocol = load_protocol_text(text)
    report = plan_loop(analytic_case, protocol, max_iterations=4)
    label = "OutsideTargets max <= 53.5 Gy"

    def outside(check):
        return next(r for r in check.results if r.goal.label == label)

    first = report.iterations[0]
    assert not outside(first.check).passed  # the class solution's hot spot beside the C
    assert "new term OutsideTargets smooth_max" in first.rationale
    met = next(it for it in report.iterations if it.meets)  # pushed under the limit
    assert met.iteration > 1 and outside(met.check).passed
    hot = report.summary()["hot_spots"]["outside_targets"]
    assert hot["dose_gy"] == pytest.approx(outside(report.check).achieved, abs=1e-3)


def test_only_a_goal_that_flipped_takes_smaller_steps(analytic_case: Case) -> None:
    """A goal that went from missed to met and back (fixing another broke it) has its step
    halved per flip; a goal missed all along keeps its full step."""

    def memory(plans):
        out = []
        for i, (hot, core) in enumerate(plans):
            protocol, check = _check(analytic_case, hot, core)
            out.append(MemoryEntry(i + 1, protocol.objectives, check))
        return protocol, out

    # PTV D10 missed, met, missed (two flips); core D10 missed in every plan, closing in
    protocol, flipped = memory([(58.0, 14.0), (52.0, 13.5), (56.0, 10.5)])
    _, steady = memory([(58.0, 14.0), (58.0, 13.5), (56.0, 10.5)])  # PTV D10 missed throughout
    last = flipped[-1].check
    a, _, _ = propose_rules(protocol, protocol.objectives, last, flipped)
    b, _, _ = propose_rules(protocol, protocol.objectives, last, steady)
    ga, gb = {t.key(): t for t in a}, {t.key(): t for t in b}
    start = {t.key(): t for t in protocol.objectives}
    core, hot = "Core:squared_overdose", "PTV:squared_overdose"
    assert ga[core] == gb[core] and ga[core].weight > start[core].weight  # the same full step
    assert start[hot].weight < ga[hot].weight < gb[hot].weight  # the flipping goal: smaller


def test_a_dose_volume_limit_on_an_organ_overlapping_the_target_gets_its_shape_on_the_organ(
    analytic_case: Case,
) -> None:
    protocol, check, hot, memory = _overlapping_core(analytic_case)
    first, _, _ = propose_rules(protocol, protocol.objectives, check, memory)
    assert "Core:max_dvh" not in {t.key() for t in first}  # first plan: moved to the helper
    assert "Core_opt:squared_overdose" in {t.key() for t in first}
    memory.append(MemoryEntry(2, first, check, stats=hot))
    second, why2, _ = propose_rules(protocol, first, check, memory)
    got = {t.key(): t for t in second}
    # on the organ itself ("at most 10 % of Core above d": on Core_opt the 10 % would be
    # another volume), aimed at half the organ's D10
    dvh = got["Core:max_dvh"]
    assert dvh.parameter == 10.0 and dvh.dose_gy == pytest.approx(7.0)
    assert "Core_opt:max_dvh" not in got
    assert (
        got["Core_opt:squared_overdose"] == {t.key(): t for t in first}["Core_opt:squared_overdose"]
    )  # pushed no more: the new term is
    assert "Core D10 <= 10 Gy missed by 4.00 Gy where Core overlaps the target" in why2
    # the next push raises its weight and takes its dose down with the organ's D10
    _, closer = _check(analytic_case, 52.0, 12.0)
    memory.append(MemoryEntry(3, second, closer, stats=hot))
    third, _, _ = propose_rules(protocol, second, closer, memory)
    pushed = {t.key(): t for t in third}["Core:max_dvh"]
    assert pushed.weight > dvh.weight and pushed.dose_gy == pytest.approx(6.0)
    # without a minus helper to move to, the shape comes with the first plan: the organ's
    # overdose term would pull on its part inside the target
    plain = load_protocol_text(without_ring("tg119_cshape_harder.yaml"))
    at_once, why, _ = propose_rules(
        plain, plain.objectives, check, [MemoryEntry(1, plain.objectives, check, stats=hot)]
    )
    got = {t.key(): t for t in at_once}
    assert got["Core:max_dvh"].dose_gy == pytest.approx(7.0)
    assert (
        got["Core:squared_overdose"]
        == {t.key(): t for t in plain.objectives}["Core:squared_overdose"]
    )
    assert "where Core overlaps the target" in why


def test_a_limit_near_the_prescription_gets_the_shape_only_where_coverage_can_leave_the_overlap(
    analytic_case: Case,
) -> None:
    from radpilot.cases.helpers import Helper
    from radpilot.protocol import ClinicalGoal

    base, check = _check(analytic_case, 52.0, 48.0)  # core D10 48 Gy ...
    goals = [g for g in base.goals if g.structure != "Core"]
    near = replace(base, goals=[*goals, ClinicalGoal("Core", "D10", "<=", 46.0, 2)])  # ... > 46
    check = check_protocol(PlanDose(analytic_case, _dose(analytic_case, 52.0, 48.0)), near)
    hot = ({"name": "Core", "max_gy": 49.0},)
    memory = [MemoryEntry(1, near.objectives, check, stats=hot)]
    plain, _, _ = propose_rules(near, near.objectives, check, memory)
    assert "Core:max_dvh" not in {t.key() for t in plain}  # it would fight the coverage
    helper = Helper("PTV_core", "minus", "PTV", subtract="Core", margin_mm=0.0)
    uncovered = replace(near, helpers=(helper,))
    shaped, _, _ = propose_rules(uncovered, uncovered.objectives, check, memory)
    assert {t.key(): t for t in shaped}["Core:max_dvh"].dose_gy == pytest.approx(24.0)


def _weights(terms: list[ObjectiveTerm]) -> dict[str, float]:
    return {t.key(): t.weight for t in terms}


def test_a_goal_still_missed_after_a_push_gets_a_step_sized_from_that_push(
    analytic_case: Case,
) -> None:
    """Core D10 <= 10: doubling its term's weight took D10 from 14 to 13 Gy. Taken as linear in
    the log of the weight, the 3 Gy left need 2 ** 3 = x8, capped at x4; where the push closed
    the miss faster than that model needs, the usual step stands."""
    core = "Core:squared_overdose"
    protocol, first = _check(analytic_case, 52.0, 14.0)
    doubled = [
        t.with_values(t.dose_gy, 2 * t.weight) if t.key() == core else t
        for t in protocol.objectives
    ]
    w = _weights(doubled)[core]

    def step_after(core_now: float) -> float:
        _, now = _check(analytic_case, 52.0, core_now)
        memory = [MemoryEntry(1, protocol.objectives, first), MemoryEntry(2, doubled, now)]
        new, why, _ = propose_rules(protocol, doubled, now, memory)
        factor = _weights(new)[core] / w
        sized = "(sized from the last push: x2.00 closed" in why
        assert sized == (factor > 1.0 + 0.5 + 4.0 * (core_now - 10.0) / 10.0 + 1e-9), why
        return factor

    assert step_after(13.0) == pytest.approx(4.0)  # 2 ** (3 / 1) = 8, at the cap
    # 14 -> 13.7: 2 ** (3.7 / 0.3) is capped too; 14 -> 13.2: 2 ** (3.2 / 0.8) = 16, capped
    assert step_after(13.7) == step_after(13.2) == pytest.approx(4.0)
    # 14 -> 12.5: 2 ** (2.5 / 1.5) = 3.17, above the usual step (1 + 0.5 + 4 x 0.25 = 2.5)
    assert step_after(12.5) == pytest.approx(2 ** (2.5 / 1.5))
    # 14 -> 12: 2 ** (2 / 2) = 2 is below the usual step (1 + 0.5 + 4 x 0.2 = 2.3)
    assert step_after(12.0) == pytest.approx(2.3)
    # 14 -> 11: 2 ** (1 / 3) = 1.26, below the usual step (1 + 0.5 + 4 x 0.1 = 1.9)
    assert step_after(11.0) == pytest.approx(1.9)

    # the plan before the last ranked below an earlier one (it broke PTV D10): the last plan
    # was stepped from that earlier one, so the pair says nothing about the push: usual step
    _, broke = _check(analytic_case, 58.0, 14.0)
    halved = [
        t.with_values(t.dose_gy, 0.5 * t.weight) if t.key() == core else t
        for t in protocol.objectives
    ]
    _, now = _check(analytic_case, 52.0, 13.0)
    memory = [
        MemoryEntry(1, protocol.objectives, first),
        MemoryEntry(2, halved, broke),
        MemoryEntry(3, doubled, now),
    ]
    new, why, _ = propose_rules(protocol, doubled, now, memory)
    assert _weights(new)[core] / w == pytest.approx(2.7) and "sized from" not in why


def test_a_goal_a_worse_step_broke_is_pushed_back_as_hard_as_the_goals_that_step_pushed(
    analytic_case: Case,
) -> None:
    """Backtracking from iteration 1 after iteration 2 broke PTV D10 while pushing core D10: the
    step from iteration 1 pushes both, PTV D10 by the same factor as core (its own step, halved
    by its flip, would let the plan slide back across the same trade-off)."""
    protocol, good = _check(analytic_case, 52.0, 14.0)
    _, worse = _check(analytic_case, 56.0, 14.0)  # PTV D10 broken, its maximum still met
    pushed = [t.with_values(t.dose_gy, t.weight * 1.5) for t in protocol.objectives]
    memory = [MemoryEntry(1, protocol.objectives, good), MemoryEntry(2, pushed, worse)]
    new, why, _ = propose_rules(protocol, pushed, worse, memory)
    assert "stepping again from iteration 1" in why and "also pushing PTV D10 <= 55 Gy" in why
    before, after = _weights(protocol.objectives), _weights(new)
    core = after["Core:squared_overdose"] / before["Core:squared_overdose"]
    hot = after["PTV:squared_overdose"] / before["PTV:squared_overdose"]
    assert core > 1.5 and hot == pytest.approx(core)


def test_a_worse_plan_that_broke_goals_only_by_a_hair_and_misses_less_in_all_is_stepped_from(
    analytic_case: Case,
) -> None:
    """Core D10 at priority 3: iteration 2 met it and missed PTV D10 (priority 2) by 0.5 Gy, so
    it ranks below iteration 1 (core D10 14 Gy). It is still the plan to step from: going back
    would give up the core's 4 Gy for half a gray. A break of 2 Gy is no hair: back it goes."""
    protocol, _ = _check(analytic_case, 52.0, 14.0)
    protocol = replace(
        protocol,
        goals=[replace(g, priority=3) if g.structure == "Core" else g for g in protocol.goals],
    )

    def check(ptv_hot: float, core: float) -> ProtocolCheck:
        dose = _dose(analytic_case, ptv_hot, core)
        return check_protocol(PlanDose(analytic_case, dose), protocol)

    good = check(52.0, 14.0)
    pushed = [
        t.with_values(t.dose_gy, t.weight * 3.0) if t.structure == "Core" else t
        for t in protocol.objectives
    ]
    for ptv_hot, along in ((55.5, True), (57.0, False)):
        last = check(ptv_hot, 10.0)
        assert last.rank() < good.rank() and [r.goal.label for r in last.failed] == [
            "PTV D10 <= 55 Gy"
        ]
        memory = [MemoryEntry(1, protocol.objectives, good), MemoryEntry(2, pushed, last)]
        new, why, _ = propose_rules(protocol, pushed, last, memory)
        core = next(t for t in new if t.key() == "Core:squared_overdose").weight
        if along:
            assert "ranks below iteration 1 only for near misses (PTV D10 <= 55 Gy)" in why
            assert "pushing them back at least x3.00" in why
            assert "stepping again" not in why
            assert core == pytest.approx(3.0 * 100.0)  # iteration 2's terms, the core kept
        else:
            assert "stepping again from iteration 1" in why
            assert core < 3.0 * 100.0


def test_while_a_priority_1_goal_is_missed_the_lower_priority_misses_wait(
    analytic_case: Case,
) -> None:
    """PTV D95 (priority 1) and core D10 (priority 2) both missed: the step pushes the coverage
    alone. Once the coverage is met and a step broke it again, the backtrack pushes the core
    and holds the coverage beside it (a held goal does not make the others wait)."""
    protocol, _ = _check(analytic_case, 52.0, 14.0)

    def check(ptv: float, core: float) -> ProtocolCheck:
        dose = _dose(analytic_case, 52.0, core)
        rows = analytic_case.rows_of("PTV")
        dose[rows[len(rows) // 5 :]] = ptv  # the PTV's cold 80 %: D95 = ptv
        return check_protocol(PlanDose(analytic_case, dose), protocol)

    weights = lambda ts: {t.key(): t.weight for t in ts}  # noqa: E731
    old = weights(protocol.objectives)
    cold = check(47.0, 14.0)
    assert {r.goal.label for r in cold.failed} == {"PTV D95 >= 50 Gy", "Core D10 <= 10 Gy"}
    new, why, _ = propose_rules(
        protocol, protocol.objectives, cold, [MemoryEntry(1, protocol.objectives, cold)]
    )
    assert "priority 1 first: Core D10 <= 10 Gy not pushed while PTV D95 >= 50 Gy missed" in why
    assert weights(new)["Core:squared_overdose"] == old["Core:squared_overdose"]
    assert weights(new)["PTV:squared_deviation"] > old["PTV:squared_deviation"]

    good = check(50.0, 14.0)  # coverage met, core missed
    pushed = [t.with_values(t.dose_gy, t.weight * 2.0) for t in protocol.objectives]
    memory = [MemoryEntry(1, protocol.objectives, good), MemoryEntry(2, pushed, cold)]
    new, why, _ = propose_rules(protocol, pushed, cold, memory)
    assert "stepping again from iteration 1" in why and "priority 1 first" not in why
    assert weights(new)["Core:squared_overdose"] > old["Core:squared_overdose"]
