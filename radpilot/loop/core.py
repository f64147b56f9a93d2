"""The outer loop (paper Algorithm 1), written once: optimise -> evaluate -> remember -> propose.

It speaks to three ports and a sink, plain Python protocols that the in-process runner
(``radpilot.loop.inprocess``) wires to the library and the orchestrator wires to gRPC clients and
its job store. Defined here and nowhere else: the stopping rules, the memory window, the guardrail
("meets the protocol" only when the evaluator says so *and* the exact check passes every goal),
the best-plan ranking, the loop's events, and riding out an unavailable service (the same step
is retried with backoff within a budget; nothing is stored twice).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Protocol, TypeVar

from radpilot.agents.step import memory_window
from radpilot.errors import StepFailedError, UnavailableError
from radpilot.evaluation.protocol_check import (
    GLOBAL,
    HAIR,
    GoalResult,
    ProtocolCheck,
    relative_miss,
    sparing_gains,
    stalled,
)
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.loop.record import MEETS, NEEDS_IMPROVEMENT, ArtefactRef, FmoStats, IterationRecord
from radpilot.protocol import ClinicalGoal

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_RETRY_BUDGET_S = 180.0
MAX_CANDIDATES = 8
HOT_SPOT_SLACK = 0.02  # improving may raise the hottest point by at most 2 % of its value
# An organ-at-risk goal whose miss did not shrink by this fraction of itself over
# LoopSettings.restart_after rounds restarts the FMO from zero fluence (restart_reason).
# Measured on bench-tightened (rules, 8 FMO calls; docs/benchmarks.md) and the harder C-shape at
# 3 mm: 0.25 (the rules planner's STALL_GAIN) restarted too seldom to meet one more tightened
# protocol; restarting for any goal missed three rounds in a row met 5 of 9 but lost the 3 mm
# C-shape (a restart while its PTV maximum was closing in); hot-spot goals (a target's maximum,
# the outside maximum) restarting at 0.5 lost the tight prostate's plan 8. Organ goals at 0.5:
# 4 of 9 (3 before), the 3 mm C-shape unchanged (met at plan 8).
RESTART_GAIN = 0.5


# -- what the ports answer ---------------------------------------------------------------------
@dataclass
class Optimized:
    dose: ArtefactRef
    fluence: ArtefactRef
    fmo: FmoStats
    # set by SequencingOptimizer: ``dose`` is then the deliverable dose, this the optimum's
    optimal_dose: ArtefactRef | None = None
    delivery: dict[str, Any] = field(default_factory=dict)
    sequence_seconds: float = 0.0


@dataclass
class Evaluated:
    check: ProtocolCheck
    findings: list[str]
    meets: bool  # the evaluator's decision (the loop applies the guardrail on top)
    llm_decision: str = ""
    disagreement: bool = False
    llm_calls: list[dict[str, Any]] = field(default_factory=list)
    stats: list[dict[str, Any]] = field(default_factory=list)
    dvh: dict[str, Any] = field(default_factory=dict)  # DVHTable.compact().to_dict()


@dataclass
class Proposal:
    objectives: list[ObjectiveTerm]
    rationale: str = ""
    llm_calls: list[dict[str, Any]] = field(default_factory=list)
    reference_ids: list[str] = field(default_factory=list)
    # further parameter sets for the same round (asked with count > 1), optimised in parallel
    alternatives: list[list[ObjectiveTerm]] = field(default_factory=list)


# -- the ports ---------------------------------------------------------------------------------
class OptimizerPort(Protocol):
    def optimize(self, objectives: list[ObjectiveTerm], warm: ArtefactRef | None) -> Optimized:
        """One FMO; ``warm`` is the previous iteration's fluence. UnavailableError: retry."""
        ...


class EvaluatorPort(Protocol):
    def evaluate(self, dose: ArtefactRef, physician_feedback: str = "") -> Evaluated:
        """Judge one plan dose against the protocol (and the physician's comments in force).
        UnavailableError: retry."""
        ...


class PlannerPort(Protocol):
    def propose(
        self,
        current: list[ObjectiveTerm],
        memory: list[IterationRecord],
        physician_feedback: str,
        count: int = 1,
    ) -> Proposal:
        """The next objective terms from the remembered iterations, and up to ``count - 1``
        alternatives to optimise beside them. UnavailableError: retry."""
        ...


class IterationSink(Protocol):
    def stored(self) -> list[IterationRecord]:
        """Iterations already stored for this run (resume continues after the last)."""
        ...

    def physician_feedback(self, iteration: int) -> str:
        """The physician's feedback in force at an iteration ("" when none)."""
        ...

    def event(self, event: dict[str, Any]) -> None:
        """A progress event; a sink that resumes must not store the same (kind, iteration) twice."""
        ...

    def add(self, record: IterationRecord, event: dict[str, Any]) -> None:
        """Store a finished iteration and its event together (atomically where it can)."""
        ...

    def check_stop(self) -> None:
        """Raise (any exception) to stop between steps: cancelled, shutting down."""
        ...


# what one iteration keeps of its sequenced plan's summary
DELIVERY_KEYS = ("segments", "segments_per_beam", "total_mu", "mu_per_gy", "max_dose_difference_gy")
Sequence = Callable[[ArtefactRef], tuple[dict[str, Any], ArtefactRef]]


class SequencingOptimizer:
    """An optimizer port whose plans are judged as they would be delivered (the protocol's
    ``delivery: {every_iteration: true}``): each FMO's fluence is leaf-sequenced at once (the
    first try: segment weights fitted to the optimal dose) by ``sequence(fluence)``
    -> (plan JSON, deliverable dose), and the deliverable dose is what the evaluator checks and
    the loop ranks. Warm starts keep using the optimal fluence. A plan that cannot be sequenced
    (``errors``: the MLC cannot deliver the case's grid, a bad setting) is judged on its optimum,
    and no later plan is sequenced: the reason is kept with the iteration."""

    def __init__(
        self,
        inner: OptimizerPort,
        sequence: Sequence,
        errors: tuple[type[Exception], ...],
    ) -> None:
        self.inner, self.sequence, self.errors = inner, sequence, errors
        self.error = ""

    def optimize(self, objectives: list[ObjectiveTerm], warm: ArtefactRef | None) -> Optimized:
        opt = self.inner.optimize(objectives, warm)
        if self.error:
            return replace(opt, delivery={"error": self.error})
        t0 = time.perf_counter()
        try:
            plan, dose = self.sequence(opt.fluence)
        except self.errors as exc:
            self.error = str(exc)
            log.warning("the plan was not sequenced; judged on its fluence optimum: %s", exc)
            return replace(opt, delivery={"error": self.error})
        summary = plan["summary"]
        return replace(
            opt,
            dose=dose,
            optimal_dose=opt.dose,
            delivery={k: summary[k] for k in DELIVERY_KEYS if k in summary},
            sequence_seconds=time.perf_counter() - t0,
        )


@dataclass(frozen=True)
class LoopSettings:
    max_iterations: int = 6
    memory_length: int = 4
    agent: str = "rules"  # the planner's name: BO remembers every iteration
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S  # how long to wait for a service to return
    retry_first_s: float = 0.5  # first backoff; doubles up to retry_max_s
    retry_max_s: float = 10.0
    # Candidates in parallel: from round 2 on the planner proposes up to K parameter sets per
    # round, optimised and evaluated side by side; the loop continues from the best of the round.
    # max_iterations counts rounds. parallel: FMOs at once (0 = all of a round's; in process 1).
    candidates: int = 1
    parallel: int = 0
    # After the protocol is met: go on lowering the organ-at-risk metrics (the protocol's
    # after_goals_met: improve) until a round gains less than min_gain (Gy, or % for Vx goals).
    improve: bool = False
    min_gain: float = 0.5
    improve_idle_rounds: int = 3  # rounds in a row that break a goal or trade worse: stop
    # while sparing, no plan hotter than the first that met (+2 %): the protocol's hot-spot
    # limits do that job where it has them (Protocol.improvement_settings)
    bound_hot_spot: bool = True
    # before any plan meets, no plan hotter than this or the first plan's hottest point (+2 %):
    # the protocol's highest implicit hot-spot limit (Gy) where those rank below priority 1;
    # None: no bound before meeting (Protocol.improvement_settings)
    hot_spot_ceiling_gy: float | None = None
    # Before any plan meets the protocol, when the rounds' best plans have missed an organ-at-risk
    # goal for this many rounds in a row (none of them a restart) without its miss halving, the
    # next round's FMO starts from zero fluence instead of the best plan's: the max- and min-DVH
    # terms are not convex, and a warm start stays in the valley it is in (restart_reason).
    # 0: never.
    restart_after: int = 3

    def __post_init__(self) -> None:
        if not 1 <= self.candidates <= MAX_CANDIDATES:
            raise ValueError(f"candidates must be within 1..{MAX_CANDIDATES}")
        if self.max_iterations < 1:
            raise ValueError("max_iterations must be at least 1")
        if self.memory_length < 1:
            raise ValueError("memory_length must be at least 1")
        if self.retry_budget_s < 0:
            raise ValueError("retry_budget_s must be >= 0")
        if self.min_gain < 0 or self.improve_idle_rounds < 1:
            raise ValueError("min_gain must be >= 0 and improve_idle_rounds >= 1")
        if self.restart_after < 0:
            raise ValueError("restart_after must be >= 0 (0: always warm-start)")

    @property
    def best_min_gain(self) -> float:
        """What a plan that meets must gain on the best one met before it to replace it."""
        return self.min_gain if self.improve else 0.0


@dataclass
class LoopResult:
    records: list[IterationRecord]
    best_iteration: int
    met_at: int  # first iteration that met the protocol, 0 = never

    @property
    def rounds(self) -> int:
        return self.records[-1].round if self.records else 0

    @property
    def best(self) -> IterationRecord:
        return next(r for r in self.records if r.iteration == self.best_iteration)


def best_iteration(records: list[IterationRecord], min_gain: float = 0.0) -> int:
    """The best iteration by the protocol's priorities, then by how far goals are missed;
    the earliest of equals; among plans that meet the protocol, a later one only where it
    lowers an organ-at-risk goal metric by ``min_gain`` (see ``_best``). 0 when there is none."""
    if not records:
        return 0
    return _best(records, min_gain).iteration


def first_met(records: list[IterationRecord]) -> int:
    return next((r.iteration for r in records if r.meets), 0)


def _rounds(records: list[IterationRecord]) -> list[list[IterationRecord]]:
    """The records grouped by round, in order."""
    out: list[list[IterationRecord]] = []
    for r in records:
        if out and out[-1][0].round == r.round:
            out[-1].append(r)
        else:
            out.append([r])
    return out


def _best(records: list[IterationRecord], min_gain: float = 0.0) -> IterationRecord:
    """The best record by the ranking. With ``min_gain``, a plan that meets the protocol
    replaces the best one met before it only where it also lowers some organ-at-risk goal
    metric by ``min_gain`` (in iteration order): a smaller gain is within what the dose
    calculation and leaf sequencing move by themselves, not a better plan."""
    top = max(records, key=lambda r: (*r.check.rank(), -r.iteration))
    if min_gain <= 0 or not top.meets:
        return top
    best: IterationRecord | None = None
    for r in sorted(records, key=lambda r: r.iteration):
        if r.meets and (best is None or _gain(best, r) >= min_gain):
            best = r
    assert best is not None
    return best


def _gain(best: IterationRecord, r: IterationRecord) -> float:
    """What ``r`` gains on ``best``: the most it lowers an organ-at-risk goal metric where it
    meets every goal and ranks above ``best``; -inf where it does not."""
    if not (r.meets and r.check.rank() > best.check.rank()):
        return float("-inf")
    return max(sparing_gains(best.check, r.check).values(), default=0.0)


def finished(records: list[IterationRecord]) -> bool:
    """True when a stored run needs no further iteration (met, or nothing left to try)."""
    if not records:
        return False
    rounds = _rounds(records)
    last_round, last = rounds[-1], records[-1]
    planned = rounds[-2][-1].candidates if len(rounds) > 1 else [[]]
    if len(last_round) < len(planned):
        return False  # stopped part-way through a round of candidates
    # no proposal: met (and not improving, or the improvement ended) or the budget was spent
    return not last.proposal or last.proposal == _anchor(records).objectives


def _anchor(records: list[IterationRecord]) -> IterationRecord:
    """The plan the next round starts from: once a plan meets the protocol, the best plan so
    far (the improvement phase never continues from a plan that breaks a goal); before that,
    the best of the last round."""
    if any(r.meets for r in records):
        return _best(records)
    return _best(_rounds(records)[-1])


def restart_reason(records: list[IterationRecord], after: int) -> str:
    """Why the next round should start from zero fluence ("" = warm, from ``_anchor``): no plan
    has met the protocol, the best plans of the last ``after`` rounds (none of them a restart)
    each missed the same organ-at-risk goal (``ProtocolCheck.sparing_results``: not a target's
    or the outside's hot spot), and its miss shrank by less than RESTART_GAIN of itself. The max-
    and min-DVH terms are not convex: cold solves of the loop's own objectives met the TG-119
    prostate's bladder D30 <= 15 Gy where the warm chain crept 18.3 -> 16.7 Gy over five plans
    (docs/benchmarks.md). Also when the last round's step broke goals by a hair and met the rest
    (``_broken_by_a_hair``), from the second round on."""
    rounds = _rounds(records)
    if not after or len(rounds) < 2 or any(r.meets for r in records):
        return ""
    last = rounds[-after:]
    if len(rounds) >= after and not any(r.cold_start for rnd in last for r in rnd):
        checks = [_best(rnd).check for rnd in last]
        for miss in checks[-1].sparing_results():
            ends = None if miss.passed else stalled(miss.goal, checks, RESTART_GAIN)
            if ends is not None:
                return (
                    f"{miss.goal.label} missed in the last {after} rounds, the miss not halved "
                    f"({ends[0].achieved:.2f} -> {ends[1].achieved:.2f} {miss.goal.unit})"
                )
    return _broken_by_a_hair(rounds)


def _broken_by_a_hair(rounds: list[list[IterationRecord]]) -> str:
    """Why to restart (or ""): the last round's best plan (itself warm-started) misses only goals
    the round before's best plan met, each by less than ``HAIR`` of its limit, while that plan
    missed others. The step met what it pushed; what it broke is what the warm chain carried
    along. (TG-119 prostate, rectum D30 <= 35 Gy and bladder D30 <= 15 Gy, judged leaf-sequenced:
    plan 6 met bladder D30 with the outside maximum 0.52 Gy over, at the body's lateral edge;
    three more warm plans pushing that hot spot left it 0.7-1.2 Gy over, and one cold solve of
    plan 6's own objectives met every goal.)"""
    before = _best(rounds[-2]).check.protocol_only()
    last = _best(rounds[-1])
    if last.cold_start or not before.failed:
        return ""
    now = last.check.protocol_only()
    broken = [r for r in now.failed if (b := before.result(r.goal)) is not None and b.passed]
    if not broken or len(broken) < len(now.failed):
        return ""
    if any(relative_miss(r) >= HAIR for r in broken):
        return ""
    return (
        f"{', '.join(r.goal.label for r in broken)} missed by a hair where the plan before met "
        "it, every other goal met: the warm start carried it along"
    )


def _start(records: list[IterationRecord], after: int) -> tuple[ArtefactRef | None, str]:
    """The fluence the next round starts from (None: zero) and, for a restart, why."""
    if not records:
        return None, ""
    why = restart_reason(records, after)
    return (None, why) if why else (_anchor(records).fluence, "")


def _hottest(record: IterationRecord) -> tuple[str, float] | None:
    """The hottest point of a plan (from its structure statistics) and the body's name."""
    if not record.stats:
        return None
    body = next((s["name"] for s in record.stats if s.get("kind") == "external"), "")
    return body, max(float(s["max_gy"]) for s in record.stats)


def _bound_hot_spot(
    records: list[IterationRecord], new: list[IterationRecord], settings: LoopSettings
) -> None:
    """Plans may not buy organ dose with a hotter plan than the loop allows: a plan that breaks
    the bound does not meet the protocol and ranks below every plan that keeps every priority-1
    goal. Each plan of ``new`` gets the hard, priority-1 goal "Global max <= limit", with the
    limit
    - once a plan meets the protocol (``settings.improve`` and ``bound_hot_spot``): that plan's
      hottest point + 2 % (the plan that first met keeps it with room), so sparing never makes
      the plan hotter, and the planner steps back from a plan that breaks it;
    - before (``settings.hot_spot_ceiling_gy``): the protocol's highest hot-spot limit or the
      first plan's hottest point, whichever is higher, + 2 % (without the 2 %, a plan 0.3 Gy
      over the C-shape's outside limit missed a priority-1 goal, and the rules agent, stepping
      back, no longer met "core mean <= 6 Gy"). The implicit hot-spot goals rank beside the
      organ goals (priority 2 by default) by their miss relative to the limit, so without it a
      plan 41 % over the outside limit outranked a first plan that missed a 12 Gy bladder goal
      by 24 Gy (bench-tightened, BO's goal-shaped organ terms: best plans at 119-151 %). It
      decides which plan is reported and ranked best; the rules planner does not step on it
      (``propose_rules``)."""
    met = next((r for r in records if r.meets), None)
    for r in new:
        if any(x.goal.structure == GLOBAL for x in r.check.results):
            continue
        hot = _hottest(r)
        if hot is None:
            continue
        if met is not None and r.iteration >= met.iteration:
            if not (settings.improve and settings.bound_hot_spot):
                continue
            ref = _hottest(met)
            limit = round(ref[1] * (1 + HOT_SPOT_SLACK), 2) if ref else None
            why = "sparing may not make the plan hotter than the first plan that met the protocol"
        else:
            if settings.hot_spot_ceiling_gy is None:
                continue
            ref = _hottest(records[0])
            ceiling = max(settings.hot_spot_ceiling_gy, ref[1] if ref else 0.0)
            limit = round(ceiling * (1 + HOT_SPOT_SLACK), 2)
            why = (
                "no goal may be traded for a point hotter than the protocol's hot-spot limits "
                "(or the first plan's hottest point) allow"
            )
        if limit is None:
            continue
        goal = ClinicalGoal(GLOBAL, "max", "<=", limit, 1, True)
        result = GoalResult(goal, hot[1], hot[1] <= limit, limit - hot[1])
        r.check = ProtocolCheck([*r.check.results, result])
        if not result.passed:
            r.decision = NEEDS_IMPROVEMENT
            where = f" (in {hot[0]})" if hot[0] else ""
            r.findings.append(f"{result.finding()}: {why}{where}")


def improvement(records: list[IterationRecord], settings: LoopSettings) -> tuple[bool, str]:
    """Whether the loop goes on after the protocol was met, and why not (a sentence).

    A round *gains* when its best plan meets every goal, ranks above the best plan so far and
    lowers at least one organ-at-risk goal metric by ``min_gain``. The improvement ends with a
    round that meets every goal but gains less (converged), or after ``improve_idle_rounds``
    rounds in a row that do not gain (each broke a goal or traded one organ for another)."""
    rounds = _rounds(records)
    first = next((i for i, rnd in enumerate(rounds) if any(r.meets for r in rnd)), None)
    if first is None:
        return True, ""
    best = _best(rounds[first])
    if not settings.improve:
        return False, (
            f"the protocol is met at iteration {best.iteration}; "
            "after_goals_met: stop ends the loop there"
        )
    idle = 0
    for rnd in rounds[first + 1 :]:
        top = _best(rnd)
        most = _gain(best, top)
        if most >= settings.min_gain:
            best, idle = top, 0
            continue
        if most > float("-inf"):
            return False, (
                f"improvement ended: round {top.round} met every goal but lowered no "
                f"organ-at-risk metric by {settings.min_gain:g} or more (at most {most:.2f})"
            )
        idle += 1
        if idle >= settings.improve_idle_rounds:
            return False, (
                f"improvement ended: {idle} round(s) in a row did not improve on iteration "
                f"{best.iteration} without breaking a goal"
            )
    return True, ""


def run_loop(
    objectives: list[ObjectiveTerm],
    optimizer: OptimizerPort,
    evaluator: EvaluatorPort,
    planner: PlannerPort,
    sink: IterationSink,
    settings: LoopSettings,
) -> LoopResult:
    """Run (or resume) the loop from the protocol's initial ``objectives`` until the plan meets
    the protocol, the planner has nothing new, or the round budget is spent.

    A round optimises one parameter set (round 1: the protocol's) or, with ``candidates`` K > 1,
    the planner's K alternatives side by side, each warm-started from the previous round's best
    plan (or from zero fluence where ``restart_reason`` says so); every candidate is an iteration
    of its own (numbered in order) and the next round is proposed from the round's best by the
    ranking. Records are stored in candidate order once the round is evaluated; the last one
    carries the proposal. A run stopped part-way through a round resumes with the candidates not
    yet stored."""
    records = list(sink.stored())
    if finished(records):
        return _result(records, settings)
    rounds = _rounds(records)
    planned: list[list[ObjectiveTerm]] = [list(objectives)]
    done: list[IterationRecord] = []
    warm: ArtefactRef | None = None
    cold = ""  # why the round starts from zero fluence ("" = warm, or round 1)
    rnd = 1
    if rounds:
        previous = rounds[-2] if len(rounds) > 1 else []
        planned_last = previous[-1].candidates if previous else [list(objectives)]
        if len(rounds[-1]) < len(planned_last):  # resume part-way through the last round
            rnd, planned, done = rounds[-1][0].round, planned_last, rounds[-1]
            warm, cold = _start(records[: -len(rounds[-1])], settings.restart_after)
        else:
            rnd, planned = rounds[-1][0].round + 1, records[-1].candidates
            warm, cold = _start(records, settings.restart_after)
    while rnd <= settings.max_iterations:
        sink.check_stop()
        first_it = (records[-1].iteration if records else 0) + 1
        todo = list(enumerate(planned))[len(done) :]
        run = partial(_candidate, optimizer, evaluator, sink, settings, rnd, warm, cold)
        jobs = [(first_it + n, k, terms) for n, (k, terms) in enumerate(todo)]
        workers = min(len(jobs), settings.parallel or len(jobs))
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix=f"round-{rnd}") as pool:
                futures = [pool.submit(run, *job) for job in jobs]
                new = [f.result() for f in futures]
        else:
            new = [run(*job) for job in jobs]
        this_round = [*done, *new]
        so_far = [*records, *new]
        _bound_hot_spot(so_far, new, settings)
        best = _best(this_round)
        anchor = _anchor(so_far)
        carrier = new[-1]
        go_on, why_not = improvement(so_far, settings)
        if go_on and rnd < settings.max_iterations:
            sink.check_stop()
            _propose(planner, sink, settings, so_far, this_round, anchor, carrier)
        elif why_not:
            carrier.rationale = why_not
        for record in new:
            sink.check_stop()
            sink.add(
                record,
                {
                    "kind": "proposal",
                    "iteration": record.iteration,
                    "round": record.round,
                    "candidate": record.candidate,
                    "proposal": [o.to_dict() for o in record.proposal],
                    "message": record.rationale,
                },
            )
            records.append(record)
        log.info(
            "round %d: best iteration %d %s",
            rnd,
            best.iteration,
            "meets protocol" if best.meets else "needs improvement",
        )
        if finished(records):
            break
        rnd, planned, done = rnd + 1, carrier.candidates, []
        warm, cold = _start(records, settings.restart_after)
    return _result(records, settings)


def _candidate(
    optimizer: OptimizerPort,
    evaluator: EvaluatorPort,
    sink: IterationSink,
    settings: LoopSettings,
    rnd: int,
    warm: ArtefactRef | None,
    cold: str,
    it: int,
    k: int,
    objectives: list[ObjectiveTerm],
) -> IterationRecord:
    """Optimise and evaluate one parameter set: one iteration's record, not yet stored.
    ``warm``: the fluence it starts from (None: zero; ``cold`` says why, after round 1)."""
    tag = {"iteration": it, "round": rnd, "candidate": k}
    sink.check_stop()
    start = {"message": f"starts from zero fluence, not the best plan: {cold}"} if cold else {}
    sink.event({"kind": "iteration_started", **tag, **start})
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    opt = _retrying(settings, sink, "optimizer", partial(optimizer.optimize, objectives, warm))
    seconds["optimize"] = time.perf_counter() - t0 - opt.sequence_seconds
    if opt.optimal_dose is not None:
        seconds["sequence"] = opt.sequence_seconds
    delivered = ""
    if "segments" in opt.delivery:
        delivered = (
            f"; judged as delivered: {opt.delivery['segments']} segments, "
            f"{opt.delivery['total_mu']:.0f} MU per fraction"
        )
    elif "error" in opt.delivery:
        delivered = f"; not sequenced ({opt.delivery['error']}): judged on the fluence optimum"
    sink.event(
        {
            "kind": "fmo_done",
            **tag,
            "fmo": opt.fmo.to_json(),
            "message": f"served by {opt.fmo.replica or 'this process'}{delivered}",
        }
    )
    sink.check_stop()
    t0 = time.perf_counter()
    feedback = sink.physician_feedback(it)
    ev = _retrying(settings, sink, "evaluator", partial(evaluator.evaluate, opt.dose, feedback))
    seconds["evaluate"] = time.perf_counter() - t0
    meets = ev.meets and ev.check.all_passed  # the guardrail
    sink.event(
        {
            "kind": "evaluated",
            **tag,
            "goals": [r.to_dict() for r in ev.check.results],
            "message": "; ".join(ev.findings),
        }
    )
    log.info("iteration %d: %s", it, "meets protocol" if meets else "needs improvement")
    return IterationRecord(
        iteration=it,
        objectives=list(objectives),
        fmo=opt.fmo,
        check=ev.check,
        findings=list(ev.findings),
        decision=MEETS if meets else NEEDS_IMPROVEMENT,
        dose=opt.dose,
        fluence=opt.fluence,
        physician_feedback=feedback,
        llm_decision=ev.llm_decision,
        disagreement=ev.disagreement,
        llm_calls=[{**c, "iteration": it} for c in ev.llm_calls],
        seconds=seconds,
        stats=list(ev.stats),
        dvh=dict(ev.dvh),
        round=rnd,
        candidate=k,
        optimal_dose=opt.optimal_dose,
        delivery=dict(opt.delivery),
        cold_start=cold,
    )


def _propose(
    planner: PlannerPort,
    sink: IterationSink,
    settings: LoopSettings,
    records: list[IterationRecord],
    this_round: list[IterationRecord],
    best: IterationRecord,
    carrier: IterationRecord,
) -> None:
    """Ask the planner for the next round from the round's best plan; the proposal goes on the
    round's last record (``carrier``). The planner remembers the path the loop took (the best of
    each round; BO: every plan), and alternatives already tried are dropped."""
    path = [_best(r) for r in _rounds(records)]
    memory = memory_window(
        settings.agent, records if settings.agent == "bo" else path, settings.memory_length
    )
    if best.meets and best not in memory:
        memory = [best, *memory]  # improving: the plan to improve on stays in view
    t0 = time.perf_counter()
    prop = _retrying(
        settings,
        sink,
        "planner",
        partial(
            planner.propose,
            list(best.objectives),
            memory,
            best.physician_feedback,
            settings.candidates,
        ),
    )
    carrier.seconds["propose"] = time.perf_counter() - t0
    tried = [r.objectives for r in records]
    alternatives: list[list[ObjectiveTerm]] = []
    for terms in prop.alternatives[: settings.candidates - 1]:
        if terms and terms not in tried and terms != prop.objectives and terms not in alternatives:
            alternatives.append(list(terms))
    carrier.proposal = list(prop.objectives)
    carrier.alternatives = alternatives
    if best.meets:
        prefix = f"improving on iteration {best.iteration}, which meets every goal: "
    elif len(this_round) > 1:
        prefix = f"from iteration {best.iteration}, the best of round {best.round}: "
    else:
        prefix = ""
    carrier.rationale = prefix + prop.rationale
    carrier.reference_ids = list(prop.reference_ids)
    carrier.llm_calls += [{**c, "iteration": carrier.iteration} for c in prop.llm_calls]


def _result(records: list[IterationRecord], settings: LoopSettings) -> LoopResult:
    return LoopResult(records, best_iteration(records, settings.best_min_gain), first_met(records))


def _retrying(settings: LoopSettings, sink: IterationSink, step: str, call: Callable[[], T]) -> T:
    """Call a port; while it says UnavailableError, wait (doubling) and call again, until the
    retry budget is spent. Stop requests are honoured between attempts."""
    start = time.monotonic()
    delay = settings.retry_first_s
    attempt = 0
    while True:
        attempt += 1
        try:
            return call()
        except UnavailableError as exc:
            waited = time.monotonic() - start
            if waited + delay > settings.retry_budget_s:
                raise StepFailedError(
                    f"UNAVAILABLE: the {step} did not come back within the "
                    f"{settings.retry_budget_s:g} s retry budget ({attempt} attempt(s)): {exc}"
                ) from exc
            log.warning(
                "%s unavailable (attempt %d), retrying in %.1f s: %s", step, attempt, delay, exc
            )
            sink.check_stop()
            time.sleep(delay)
            sink.check_stop()
            delay = min(delay * 2, settings.retry_max_s)
