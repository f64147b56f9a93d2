"""The outer loop over in-memory ports: stopping rules, guardrail, ranking, memory window,
resume from a sink, retries within a budget, and the record's JSON form."""

from __future__ import annotations

from typing import Any

import pytest

from radpilot.errors import StepFailedError, UnavailableError
from radpilot.evaluation.protocol_check import GoalResult, ProtocolCheck
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.loop import (
    ArtefactRef,
    Evaluated,
    FmoStats,
    IterationRecord,
    LoopSettings,
    Optimized,
    Proposal,
    best_iteration,
    run_loop,
)
from radpilot.loop.inprocess import MemorySink
from radpilot.loop.record import MEETS
from radpilot.protocol import ClinicalGoal

CORE = ClinicalGoal("Core", "D10", "<=", 10.0, 1, True)
SOFT = ClinicalGoal("PTV", "D10", "<=", 55.0, 2, False)
START = [ObjectiveTerm("Core", "squared_overdose", 10.0, 1.0)]


def _check(core_gy: float, soft_gy: float = 50.0) -> ProtocolCheck:
    return ProtocolCheck(
        [GoalResult(g, v, v <= g.limit, g.limit - v) for g, v in ((CORE, core_gy), (SOFT, soft_gy))]
    )


class FakeOptimizer:
    """Core D10 falls as the core weight rises: 16 Gy at weight 1, minus 2 Gy per doubling."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[ObjectiveTerm], ArtefactRef | None]] = []

    def optimize(self, objectives: list[ObjectiveTerm], warm: ArtefactRef | None) -> Optimized:
        self.calls.append((objectives, warm))
        n = len(self.calls)
        w = objectives[0].weight
        return Optimized(
            ArtefactRef(f"dose-{n}:{w}"), ArtefactRef(f"fluence-{n}"), FmoStats(iterations=n)
        )


class FakeEvaluator:
    def __init__(self, says_meets: bool | None = None, soft_gy: float = 50.0) -> None:
        self.says_meets, self.soft_gy = says_meets, soft_gy
        self.calls = 0

    def evaluate(self, dose: ArtefactRef, physician_feedback: str = "") -> Evaluated:
        import math

        self.calls += 1
        weight = float(dose.path.split(":")[1])
        check = _check(16.0 - 2.0 * math.log2(weight), self.soft_gy)
        meets = check.all_passed if self.says_meets is None else self.says_meets
        return Evaluated(check, [r.finding() for r in check.results], meets)


class DoublingPlanner:
    """Doubles the core weight; asked for more, it offers x4, x8, ... as alternatives. With
    ``step`` it scales by that instead (1.01: core D10 creeps down by 0.03 Gy a round)."""

    def __init__(self, same: bool = False, step: float = 2.0) -> None:
        self.same, self.step = same, step
        self.memories: list[list[int]] = []
        self.currents: list[float] = []

    def propose(
        self,
        current: list[ObjectiveTerm],
        memory: list[IterationRecord],
        physician_feedback: str,
        count: int = 1,
    ) -> Proposal:
        self.memories.append([m.iteration for m in memory])
        self.currents.append(current[0].weight)
        if self.same:
            return Proposal(list(current), "nothing to change")
        t = current[0]

        def scaled(f: float) -> list[ObjectiveTerm]:
            return [ObjectiveTerm(t.structure, t.kind, t.dose_gy, t.weight * f)]

        f = self.step
        return Proposal(
            scaled(f), "double", alternatives=[scaled(f**k) for k in range(2, count + 1)]
        )


def _run(
    evaluator: Any = None,
    planner: Any = None,
    sink: Any = None,
    optimizer: Any = None,
    **settings: Any,
) -> tuple[Any, FakeOptimizer, DoublingPlanner, MemorySink]:
    opt = optimizer or FakeOptimizer()
    plan = planner or DoublingPlanner()
    sink = sink or MemorySink()
    result = run_loop(
        START,
        opt,
        evaluator or FakeEvaluator(),
        plan,
        sink,
        LoopSettings(**{"max_iterations": 6, **settings}),
    )
    return result, opt, plan, sink


def test_stops_when_met_and_warm_starts_from_the_previous_fluence() -> None:
    # weights 1, 2, 4, 8: core 16, 14, 12, 10 -> met at iteration 4
    result, opt, _, sink = _run()
    assert [r.iteration for r in result.records] == [1, 2, 3, 4]
    assert result.met_at == 4 and result.best_iteration == 4
    assert result.records[-1].meets and result.records[-1].proposal == []
    assert opt.calls[0][1] is None
    assert [c[1].path for c in opt.calls[1:] if c[1]] == ["fluence-1", "fluence-2", "fluence-3"]
    assert [o.weight for o in result.records[2].objectives] == [4.0]
    assert len(sink.records) == 4


def test_guardrail_overrides_an_evaluator_that_says_meets_too_early() -> None:
    result, *_ = _run(evaluator=FakeEvaluator(says_meets=True))
    assert [r.decision for r in result.records[:3]] == ["needs_improvement"] * 3
    assert result.met_at == 4


def test_a_missed_soft_goal_is_not_met_and_the_budget_ends_the_loop() -> None:
    result, opt, *_ = _run(evaluator=FakeEvaluator(soft_gy=60.0), max_iterations=5)
    assert len(result.records) == 5 and len(opt.calls) == 5
    assert result.met_at == 0
    assert result.records[-1].proposal == []  # no proposal after the last FMO


def test_a_planner_with_nothing_new_ends_the_loop() -> None:
    result, opt, *_ = _run(planner=DoublingPlanner(same=True))
    assert len(result.records) == 1 and len(opt.calls) == 1


@pytest.mark.parametrize(("agent", "expected"), [("rules", [4, 5]), ("bo", [1, 2, 3, 4, 5])])
def test_memory_window(agent: str, expected: list[int]) -> None:
    _, _, planner, _ = _run(
        evaluator=FakeEvaluator(soft_gy=60.0), memory_length=2, agent=agent, max_iterations=6
    )
    assert planner.memories[-1] == expected


def test_ranking_prefers_fewer_hard_misses_then_smaller_shortfall_then_earlier() -> None:
    def rec(i: int, core: float, soft: float) -> IterationRecord:
        return IterationRecord(i, START, FmoStats(), _check(core, soft))

    assert best_iteration([rec(1, 11.0, 50.0), rec(2, 10.5, 50.0), rec(3, 9.0, 60.0)]) == 3
    assert best_iteration([rec(1, 12.0, 50.0), rec(2, 10.5, 50.0)]) == 2
    assert best_iteration([rec(1, 9.0, 50.0), rec(2, 9.0, 50.0)]) == 1
    assert best_iteration([]) == 0


class StopsAfter(MemorySink):
    """A sink whose process is 'shut down' once it holds n records."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def check_stop(self) -> None:
        if len(self.records) == self.n:
            raise KeyboardInterrupt


def test_resume_continues_after_the_last_stored_iteration() -> None:
    interrupted = StopsAfter(2)
    with pytest.raises(KeyboardInterrupt):
        _run(sink=interrupted)
    sink = MemorySink()
    sink.records = list(interrupted.records)
    result, opt, _, _ = _run(sink=sink)
    assert [r.iteration for r in result.records] == [1, 2, 3, 4]
    assert len(opt.calls) == 2  # only iterations 3 and 4 ran
    assert opt.calls[0][0][0].weight == 4.0  # the stored proposal of iteration 2
    assert opt.calls[0][1] == interrupted.records[-1].fluence


def test_resume_of_a_finished_run_calls_nothing() -> None:
    done, *_ = _run()
    sink = MemorySink()
    sink.records = list(done.records)
    result, opt, _, _ = _run(sink=sink)
    assert opt.calls == [] and result.best_iteration == 4


class FlakyEvaluator(FakeEvaluator):
    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def evaluate(self, dose: ArtefactRef, physician_feedback: str = "") -> Evaluated:
        if self.failures > 0:
            self.failures -= 1
            raise UnavailableError("evaluator: UNAVAILABLE: connection refused")
        return super().evaluate(dose)


def test_an_unavailable_service_is_retried_without_repeating_stored_work() -> None:
    ev = FlakyEvaluator(failures=3)
    result, opt, *_ = _run(evaluator=ev, retry_first_s=0.01, retry_budget_s=5)
    assert [r.iteration for r in result.records] == [1, 2, 3, 4]
    assert len(opt.calls) == 4  # the optimizer did not run again for the retried evaluation
    assert ev.calls == 4


def test_the_retry_budget_ends_in_a_clear_failure() -> None:
    with pytest.raises(StepFailedError, match=r"evaluator did not come back within the 0\.05 s"):
        _run(evaluator=FlakyEvaluator(failures=100), retry_first_s=0.01, retry_budget_s=0.05)


def test_a_stop_request_is_honoured_between_steps() -> None:
    sink = StopsAfter(2)
    with pytest.raises(KeyboardInterrupt):
        _run(sink=sink)
    assert len(sink.records) == 2


class CoveredEvaluator(FakeEvaluator):
    """Adds a met coverage goal, PTV D95 >= 50 Gy: the PTV's upper limits are hot spots."""

    def evaluate(self, dose: ArtefactRef, physician_feedback: str = "") -> Evaluated:
        ev = super().evaluate(dose, physician_feedback)
        cover = ClinicalGoal("PTV", "D95", ">=", 50.0, 1, True)
        check = ProtocolCheck([GoalResult(cover, 50.0, True, 0.0), *ev.check.results])
        return Evaluated(check, ev.findings, check.all_passed)


def test_a_stalled_goal_restarts_the_fmo_from_zero_fluence_once_per_three_rounds() -> None:
    events: list[dict[str, Any]] = []
    result, opt, *_ = _run(
        planner=DoublingPlanner(step=1.01),
        sink=MemorySink(on_event=events.append),
        max_iterations=8,
    )
    # rounds 1-3 miss core D10 by ~6 Gy each: round 4 starts cold; 5-7 have a restart among
    # their last three rounds; 5, 6, 7 miss again, the miss not halved: round 8 starts cold
    starts = [c[1].path if c[1] else None for c in opt.calls]
    assert starts == [
        None,
        "fluence-1",
        "fluence-2",
        None,
        "fluence-4",
        "fluence-5",
        "fluence-6",
        None,
    ]
    restarted = [r.iteration for r in result.records if r.cold_start]
    assert restarted == [4, 8]
    assert result.records[3].cold_start.startswith(
        "Core D10 <= 10 Gy missed in the last 3 rounds, the miss not halved (16.00 -> 15.94 Gy)"
    )
    started = [e for e in events if e["kind"] == "iteration_started"]
    assert ["starts from zero fluence" in e.get("message", "") for e in started] == [
        n in (4, 8) for n in range(1, 9)
    ]
    again = IterationRecord.from_json(result.records[3].to_json())
    assert again.cold_start == result.records[3].cold_start
    # a goal closing in (16 -> 14 -> 12 Gy: the miss 6 -> 2 Gy) never restarts, nor does a
    # target's hot spot that stalls (PTV D10 at 60 Gy where PTV D95 has a lower limit), nor
    # anything with restart_after=0
    _, closing, *_ = _run()
    assert len(closing.calls) == 4 and all(c[1] is not None for c in closing.calls[1:])
    _, hot, *_ = _run(evaluator=CoveredEvaluator(soft_gy=60.0), max_iterations=6)
    assert len(hot.calls) == 6 and all(c[1] is not None for c in hot.calls[1:])
    _, never, *_ = _run(planner=DoublingPlanner(step=1.01), max_iterations=8, restart_after=0)
    assert all(c[1] is not None for c in never.calls[1:])


def test_a_run_resumed_inside_the_restart_round_starts_it_cold_again() -> None:
    interrupted = StopsAfter(3)
    with pytest.raises(KeyboardInterrupt):
        _run(sink=interrupted, planner=DoublingPlanner(step=1.01), max_iterations=5)
    sink = MemorySink()
    sink.records = list(interrupted.records)
    result, opt, _, _ = _run(sink=sink, planner=DoublingPlanner(step=1.01), max_iterations=5)
    assert opt.calls[0][1] is None and opt.calls[1][1] is not None
    assert [r.iteration for r in result.records if r.cold_start] == [4]


def test_settings_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="max_iterations"):
        LoopSettings(max_iterations=0)
    with pytest.raises(ValueError, match="memory_length"):
        LoopSettings(memory_length=0)
    with pytest.raises(ValueError, match="restart_after"):
        LoopSettings(restart_after=-1)


def test_record_json_round_trip_and_the_previous_format() -> None:
    result, *_ = _run()
    for r in result.records:
        again = IterationRecord.from_json(r.to_json())
        assert again.to_json() == r.to_json()
    old = {
        "iteration": 1,
        "objectives": [o.to_dict() for o in START],
        "fmo": {"iterations": 12, "converged": True, "replica": "opt-1", "unknown": 1},
        "goals": [r.to_dict() for r in _check(11.0).results],
        "findings": ["x"],
        "decision": "needs_improvement",
        "dose": {"path": "artefacts/c/dose-1.npy", "sha256": "ab"},
        "fluence_hex": "0a0b",
        "feedback": "spare the core",
        "proposal": [],
        "rationale": "",
    }
    rec = IterationRecord.from_json(old)
    assert rec.physician_feedback == "spare the core"
    assert rec.legacy_fluence_hex == "0a0b" and rec.fluence is None
    assert rec.fmo.iterations == 12 and rec.fmo.replica == "opt-1"
    assert rec.check.failed[0].goal.structure == "Core"
    assert "fluence_hex" not in rec.to_json()


def test_ranking_follows_priority_and_the_size_of_each_miss() -> None:
    cover = ClinicalGoal("PTV", "D95", ">=", 50.0, 1, True)
    organ = ClinicalGoal("Core", "D10", "<=", 10.0, 2, True)

    def rec(i: int, d95: float, core: float) -> IterationRecord:
        results = [
            GoalResult(cover, d95, d95 >= 50.0, d95 - 50.0),
            GoalResult(organ, core, core <= 10.0, 10.0 - core),
        ]
        return IterationRecord(i, START, FmoStats(), ProtocolCheck(results))

    # missing priority 1 by 1 % loses to meeting it while missing priority 2 by 50 %
    assert best_iteration([rec(1, 49.5, 9.0), rec(2, 50.0, 15.0)]) == 2
    # a plan that meets a goal beats one that misses it by a hair (float noise included)
    assert best_iteration([rec(1, 50.0, 10.00001), rec(2, 50.0, 9.99)]) == 2
    # within a level, the smaller relative miss wins
    assert best_iteration([rec(1, 50.0, 12.0), rec(2, 50.0, 11.0)]) == 2

    # while improving, a plan that meets replaces the best one met before it only by lowering
    # an organ's metric by min_gain: a smaller gain is noise (and its delivered dose may differ)
    def met(i: int, core: float) -> IterationRecord:
        r = rec(i, 50.0, core)
        r.decision = MEETS
        return r

    plans = [rec(1, 50.0, 11.0), met(2, 9.0), met(3, 8.8), met(4, 8.45), rec(5, 49.0, 5.0)]
    assert best_iteration(plans) == 4
    assert best_iteration(plans[:3]) == 3 and best_iteration(plans[:3], min_gain=0.5) == 2
    assert best_iteration(plans, min_gain=0.5) == 4  # 0.55 Gy below iteration 2
    assert best_iteration(plans, min_gain=0.6) == 2
    assert best_iteration(plans[:1], min_gain=0.5) == 1  # none meets: the ranking alone


class ConcurrentOptimizer:
    """Names its artefacts by weight; from round 2 on two calls must be in flight at once."""

    def __init__(self) -> None:
        import threading

        self.barrier = threading.Barrier(2, timeout=10)
        self.calls: list[tuple[float, str | None]] = []

    def optimize(self, objectives: list[ObjectiveTerm], warm: ArtefactRef | None) -> Optimized:
        w = objectives[0].weight
        if warm is not None:
            self.barrier.wait()  # raises BrokenBarrierError if the candidates ran one by one
        self.calls.append((w, warm.path if warm else None))
        return Optimized(ArtefactRef(f"dose-{w:g}:{w}"), ArtefactRef(f"fluence-{w:g}"), FmoStats())


# (iteration, round, candidate) of a run with K = 2 that meets the protocol in round 3
TWO_PER_ROUND = [(1, 1, 0), (2, 2, 0), (3, 2, 1), (4, 3, 0), (5, 3, 1)]


def test_candidates_are_optimised_side_by_side_and_the_loop_follows_the_best() -> None:
    # round 1: w=1 (core 16); round 2: w=2 (14) and w=4 (12) -> best w=4;
    # round 3 from w=4: w=8 (10, met) and w=16 (8, met) -> stops, best = the one sparing more
    opt = ConcurrentOptimizer()
    result, _, planner, _ = _run(optimizer=opt, candidates=2)
    assert [(r.iteration, r.round, r.candidate) for r in result.records] == TWO_PER_ROUND
    assert [r.objectives[0].weight for r in result.records] == [1, 2, 4, 8, 16]
    assert sorted(opt.calls) == [
        (1, None),
        (2, "fluence-1"),
        (4, "fluence-1"),
        (8, "fluence-4"),
        (16, "fluence-4"),
    ]  # every candidate warm-starts from the previous round's best plan
    assert planner.currents == [1, 4]  # round 3 was proposed from w=4, the best of round 2
    assert planner.memories == [[1], [1, 3]]  # the path: the best of each round
    assert result.met_at == 4 and result.best_iteration == 5 and result.rounds == 3
    carrier = result.records[2]  # round 2's last record carries the next round's candidates
    assert [c[0].weight for c in carrier.candidates] == [8, 16]
    assert "best of round 2" in carrier.rationale
    assert result.records[1].proposal == []
    assert IterationRecord.from_json(carrier.to_json()).candidates == carrier.candidates


def test_a_run_stopped_inside_a_round_resumes_with_the_missing_candidates() -> None:
    interrupted = StopsAfter(2)  # round 1 and the first candidate of round 2 stored
    with pytest.raises(KeyboardInterrupt):
        _run(sink=interrupted, candidates=2, parallel=1)
    assert [(r.round, r.candidate) for r in interrupted.records] == [(1, 0), (2, 0)]
    sink = MemorySink()
    sink.records = list(interrupted.records)
    result, opt, *_ = _run(sink=sink, candidates=2, parallel=1)
    assert [(r.iteration, r.round, r.candidate) for r in result.records] == TWO_PER_ROUND
    assert [c[0][0].weight for c in opt.calls] == [4, 8, 16]  # only what was missing, then on
    assert opt.calls[0][1] == interrupted.records[0].fluence


def test_candidates_is_bounded() -> None:
    with pytest.raises(ValueError, match="candidates"):
        LoopSettings(candidates=0)


class BreaksAbove(FakeEvaluator):
    """The soft PTV goal breaks once the core weight passes ``limit`` (sparing too hard)."""

    def __init__(self, limit: float) -> None:
        super().__init__()
        self.limit = limit

    def evaluate(self, dose: ArtefactRef, physician_feedback: str = "") -> Evaluated:
        self.soft_gy = 60.0 if float(dose.path.split(":")[1]) > self.limit else 50.0
        return super().evaluate(dose, physician_feedback)


def test_after_the_goals_are_met_it_improves_while_rounds_gain() -> None:
    # met at iteration 4 (core 10 Gy); each doubling then lowers the core by 2 Gy >= 0.5
    result, *_ = _run(improve=True, max_iterations=6)
    assert [r.iteration for r in result.records] == [1, 2, 3, 4, 5, 6]
    assert result.met_at == 4 and result.best_iteration == 6  # the plan that spares most
    assert result.records[-1].proposal == []  # the budget ended it
    assert "improving on iteration 5, which meets every goal" in result.records[4].rationale
    # a round that gains less than min_gain ends the improvement, and the record says so
    result, *_ = _run(improve=True, min_gain=3.0, max_iterations=8)
    assert [r.iteration for r in result.records] == [1, 2, 3, 4, 5]
    # and its plan, 2 Gy lower on the core where 3 were asked for, does not replace iteration 4
    assert result.best_iteration == 4
    assert result.records[-1].rationale.startswith("improvement ended: round 5 met every goal")
    assert "(at most 2.00)" in result.records[-1].rationale


def test_improvement_continues_from_the_best_plan_and_ends_after_rounds_that_break_goals() -> None:
    result, opt, planner, sink = _run(evaluator=BreaksAbove(8.0), improve=True, max_iterations=8)
    # 5, 6 and 7 break the soft goal: each starts from iteration 4 (weight 8) and its fluence
    assert [r.iteration for r in result.records] == [1, 2, 3, 4, 5, 6, 7]
    assert result.best_iteration == 4 and result.met_at == 4
    assert planner.currents[-3:] == [8.0, 8.0, 8.0]
    assert [c[1].path for c in opt.calls[-3:] if c[1]] == ["fluence-4"] * 3
    assert 4 in planner.memories[-1]  # the plan to improve on stays in the planner's memory
    assert "3 round(s) in a row did not improve on iteration 4" in result.records[-1].rationale
    # resume: a stored run that is still improving goes on; a finished one does not
    done = MemorySink()
    done.records = list(sink.records)
    again, opt2, *_ = _run(evaluator=BreaksAbove(8.0), sink=done, improve=True, max_iterations=8)
    assert opt2.calls == [] and again.best_iteration == 4
    interrupted = StopsAfter(5)
    with pytest.raises(KeyboardInterrupt):
        _run(evaluator=BreaksAbove(8.0), sink=interrupted, improve=True, max_iterations=8)
    resumed = MemorySink()
    resumed.records = list(interrupted.records)
    later, opt3, *_ = _run(evaluator=BreaksAbove(8.0), sink=resumed, improve=True, max_iterations=8)
    assert [r.iteration for r in later.records] == [1, 2, 3, 4, 5, 6, 7] and len(opt3.calls) == 2


def test_ranking_prefers_the_plan_that_spares_more_among_plans_that_meet() -> None:
    def rec(i: int, core: float) -> IterationRecord:
        return IterationRecord(i, START, FmoStats(), _check(core, 50.0))

    assert best_iteration([rec(1, 9.0), rec(2, 7.5), rec(3, 8.0)]) == 2
    assert best_iteration([rec(1, 9.0), rec(2, 10.5)]) == 1  # a miss never wins


class HotterWithWeight(FakeEvaluator):
    """The plan's hottest point (in the body) rises with the core weight: 50 Gy + weight."""

    def evaluate(self, dose: ArtefactRef, physician_feedback: str = "") -> Evaluated:
        out = super().evaluate(dose, physician_feedback)
        w = float(dose.path.split(":")[1])
        out.stats = [
            {"name": "Body", "kind": "external", "max_gy": 50.0 + w},
            {"name": "Core", "kind": "oar", "max_gy": 20.0},
        ]
        return out


def test_sparing_may_not_make_the_plan_hotter_than_the_first_plan_that_met() -> None:
    result, *_ = _run(evaluator=HotterWithWeight(), improve=True, max_iterations=8)
    # met at 4 (w=8, hottest 58 Gy): later plans must stay <= 58 x 1.02 = 59.16 Gy; w=16 is
    # 66 Gy, so it breaks the loop's own goal, does not meet, and the first plan stays best
    assert [r.iteration for r in result.records] == [1, 2, 3, 4, 5, 6, 7]
    assert result.best_iteration == 4 and result.met_at == 4
    hot = [r for r in result.records[4].check.results if r.goal.structure == "Global"]
    assert hot and hot[0].goal.limit == 59.16 and not hot[0].passed and hot[0].goal.hard
    assert not result.records[4].meets
    assert any("may not make the plan hotter" in f for f in result.records[4].findings)
    first = result.records[3].check
    assert first.all_passed and any(r.goal.structure == "Global" for r in first.results)
    assert all(r.goal.structure != "Global" for r in first.sparing_results())
    assert all(r.goal.structure != "Global" for r in result.records[2].check.results)  # before
    # without improvement the loop adds nothing to the protocol's goals
    plain, *_ = _run(evaluator=HotterWithWeight(), max_iterations=8)
    assert all(r.goal.structure != "Global" for x in plain.records for r in x.check.results)
    # nor where the protocol limits its hot spots itself (bound_hot_spot off): the hotter
    # plan of iteration 5 meets, and sparing goes on from it
    limited, *_ = _run(
        evaluator=HotterWithWeight(), improve=True, bound_hot_spot=False, max_iterations=8
    )
    assert all(r.goal.structure != "Global" for x in limited.records for r in x.check.results)
    assert limited.records[4].meets and limited.best_iteration > 4


def test_before_any_plan_meets_no_plan_may_be_hotter_than_the_protocols_hot_spot_limits() -> None:
    # hottest 51, 52, 54, 58 Gy; the ceiling (52 Gy, above the first plan's 51) + 2 % = 53.04
    result, *_ = _run(evaluator=HotterWithWeight(), hot_spot_ceiling_gy=52.0, max_iterations=8)
    globals_ = [
        next((x for x in r.check.results if x.goal.structure == "Global"), None)
        for r in result.records
    ]
    assert [g.goal.limit if g else None for g in globals_[:3]] == [53.04] * 3
    assert [g.passed for g in globals_[:3]] == [True, True, False]
    assert globals_[2].goal.priority == 1 and globals_[2].goal.hard
    assert any("hot-spot limits" in f for f in result.records[2].findings)
    # the plan that meets every protocol goal is judged by them (no improvement: no bound after)
    assert result.records[3].meets and globals_[3] is None and result.met_at == 4
    # a first plan hotter than the ceiling sets the bound itself: 51 x 1.02
    cooler, *_ = _run(evaluator=HotterWithWeight(), hot_spot_ceiling_gy=40.0, max_iterations=8)
    first = next(x for x in cooler.records[0].check.results if x.goal.structure == "Global")
    assert first.goal.limit == 52.02 and first.passed
    # without a ceiling (Protocol.improvement_settings: no implicit hot-spot goals below
    # priority 1) the loop adds nothing before a plan meets
    off, *_ = _run(evaluator=HotterWithWeight(), max_iterations=8)
    assert all(r.goal.structure != "Global" for x in off.records for r in x.check.results)


def test_a_plan_that_met_what_was_pushed_and_broke_the_rest_by_a_hair_restarts_cold() -> None:
    """Round 1 misses bladder D30; round 2 meets it and misses only the outside maximum, which
    round 1 met, by 0.6 %: the next round starts from zero fluence. Not for a break of 2.5 %,
    nor beside another miss, nor after a plan that was itself a restart, nor with restarts off."""
    from radpilot.loop.core import restart_reason

    bladder = ClinicalGoal("Bladder", "D30", "<=", 15.0, 3, True)
    outside = ClinicalGoal("OutsideTargets", "max", "<=", 80.0, 2, True)

    def record(n: int, bladder_gy: float, outside_gy: float, cold: str = "") -> IterationRecord:
        results = [
            GoalResult(g, v, v <= g.limit, g.limit - v)
            for g, v in ((bladder, bladder_gy), (outside, outside_gy))
        ]
        return IterationRecord(n, START, FmoStats(), ProtocolCheck(results), cold_start=cold)

    first = record(1, 17.0, 79.0)
    why = restart_reason([first, record(2, 14.8, 80.5)], after=3)
    assert why.startswith("OutsideTargets max <= 80 Gy missed by a hair where the plan before")
    assert restart_reason([first, record(2, 14.8, 82.0)], after=3) == ""
    assert restart_reason([first, record(2, 15.5, 80.5)], after=3) == ""
    assert restart_reason([first, record(2, 14.8, 80.5, cold="earlier")], after=3) == ""
    assert restart_reason([first, record(2, 14.8, 80.5)], after=0) == ""
    assert restart_reason([first], after=3) == ""
