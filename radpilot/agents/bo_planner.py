"""The Bayesian-optimisation baseline (the paper's BO): Optuna over weights and objective doses.

Stateless by design, like the planner service: each call rebuilds the study from the iterations
it is given (all of them, for this agent) — their parameters and a plan-quality score computed
from the protocol goals — and asks the sampler (TPE, seeded) for the next parameters. The search
space is each protocol term's weight times 10^u, u in [-1, 1], and, for the overdose terms of
the organs whose goals the first plan misses (once a plan meets: of every organ with a goal), the
objective dose times f, f in [0.5, 1]: a lower objective dose is how a planner asks for more
sparing. Target terms keep the protocol's doses. For the goals the first plan misses the search
also gains the rules planner's goal-shaped terms (``_added_terms``), their weights searched the
same way: the hot-spot goal outside the targets (a sharp smooth maximum: none of the protocol's
terms aim at those voxels), and each organ's missed upper limit (a max-DVH term on its Dx, whose
objective dose is searched too), with, beside an organ's, the target's and the outside's hot-spot
terms (pressing organs down heats the target's edge). The loop does not rank a plan above the
others by a hot spot beyond the protocol's limits (``loop.core._bound_hot_spot``).
The protocol's own parameters (u = 0, f = 1) are the first point: the loop's first iteration.
Asked for a batch (candidates optimised in parallel), it asks the sampler several times with the
constant-liar strategy, so the points of one batch spread out instead of repeating.
"""

from __future__ import annotations

import math
import warnings

import optuna

from radpilot.agents.rules_planner import _hot_spot_limit, _is_max, _site_weight, goal_term
from radpilot.agents.types import MemoryEntry
from radpilot.case import OUTSIDE_TARGETS
from radpilot.dosimetry import parse_metric
from radpilot.evaluation.protocol_check import ProtocolCheck
from radpilot.fmo.objectives import MAX_WEIGHT, ObjectiveTerm, kind_of
from radpilot.protocol import Protocol

SPAN_DECADES = 1.0
DOSE_FRACTION = (0.5, 1.0)  # an organ's overdose objective dose, relative to the protocol's
STARTUP_TRIALS = 4


def plan_quality(check: ProtocolCheck) -> float:
    """Higher is better: minus the protocol shortfall (hard misses x10, by priority), plus a small
    credit for room to spare on met goals (up to 20 % of each limit), as a PQM-like score."""
    credit = 0.0
    for r in check.results:
        if r.passed:
            credit += min(max(r.margin, 0.0) / max(abs(r.goal.limit), 1.0), 0.2) / r.goal.priority
    return -check.shortfall() + 0.1 * credit


def _param(key: str) -> str:
    return "log10x_" + key.replace(":", "__")


def _dose_param(key: str) -> str:
    return "dosex_" + key.replace(":", "__")


def _dose_terms(protocol: Protocol, memory: list[MemoryEntry]) -> set[str]:
    """The terms whose objective dose BO searches: the overdose terms of the organs whose goals
    the first plan (the protocol's own parameters) misses; when it misses none of theirs, of
    every organ with a goal (sparing). Searching every dose would spread a short budget over
    dimensions that do not matter (measured: the harder C-shape, whose first plan misses only a
    target goal, is met by weights alone and not within 16 plans with every dose searched)."""
    organs = _organs(protocol)
    first = memory[0].check if memory else None
    missed = {r.goal.structure for r in first.failed} if first is not None else set()
    if first is not None and not first.failed:
        missed = organs  # met: sparing
    return {
        t.key()
        for t in protocol.objectives
        if kind_of(t).bound() > 0 and t.structure in organs & missed
    }


def _organs(protocol: Protocol) -> set[str]:
    """The structures with an upper limit and no lower limit (organs at risk, not targets)."""
    lower = {g.structure for g in protocol.goals if g.comparator == ">="} | {protocol.target}
    return {g.structure for g in protocol.goals if g.comparator == "<="} - lower - {OUTSIDE_TARGETS}


def _added_terms(protocol: Protocol, memory: list[MemoryEntry]) -> dict[str, ObjectiveTerm]:
    """The terms BO adds to the protocol's, for the goals the first plan misses, each the term
    the rules planner shapes for that goal:
    - a hot-spot goal outside the targets (tight TG-119 prostate: every BO plan missed
      ``OutsideTargets max`` by 6-50 Gy with the protocol's terms alone);
    - an organ's upper limit (a max-DVH term on its Dx, a mean-dose term on its mean): the
      protocol's own terms for that organ are shaped for the shipped limit, and scaling their
      weights and doses did not move a tighter Dx (head & neck parotid D50 <= 10 Gy: BO's best
      plans were worse than the first). Its objective dose is searched like the protocol's
      overdose terms; beside it come the target's and the outside's hot-spot terms."""
    if not memory:
        return {}
    terms = {t.key(): t for t in protocol.objectives}
    weight = max(
        (t.weight for t in protocol.objectives if t.structure == protocol.target), default=1.0
    )
    organs = _organs(protocol)
    missed = [
        r.goal
        for r in memory[0].check.failed
        if r.goal.comparator == "<=" and r.goal.structure in organs | {OUTSIDE_TARGETS}
    ]
    if any(g.structure in organs for g in missed):
        # pushing organs down heats the plan at their edge: the hot-spot goals get their terms
        # too, met or not
        missed += [
            g
            for g in protocol.goals
            if g.comparator == "<="
            and _hot_spot_limit(protocol, g)
            and _is_max(*parse_metric(g.metric))
            and g not in missed
        ]
    out = {}
    for goal in missed:
        # a hot spot's term is weighted like the heaviest target term; an organ's between that
        # and its overdose term's (where the rules planner's starts; geometric mean): at the
        # target's weight the prostate's max-DVH terms made every plan 20-50 % too hot, at the
        # organ's the head & neck parotids did not move
        w = (
            math.sqrt(_site_weight(terms, goal.structure) * weight)
            if goal.structure in organs
            else weight
        )
        term = goal_term(protocol, goal, 1.0, w)
        if term is not None and term.key() not in terms:
            out[term.key()] = term
    return out


def propose_bo(
    protocol: Protocol, memory: list[MemoryEntry], seed: int = 0, count: int = 1
) -> tuple[list[ObjectiveTerm], str, list[list[ObjectiveTerm]]]:
    """The next weights, why, and ``count - 1`` further points of the same batch."""
    extra = _added_terms(protocol, memory)
    base = {t.key(): t for t in protocol.objectives} | extra
    # in a fixed order: the sampler draws the parameters in the order of ``dist``, and a set's
    # order changes with the process's string hashing (PYTHONHASHSEED), so the same plan run
    # twice searched different points
    organ_terms = {k for k, t in extra.items() if t.structure in _organs(protocol)}
    doses = sorted(set(_dose_terms(protocol, memory)) | organ_terms)
    dist: dict[str, optuna.distributions.BaseDistribution] = {
        _param(k): optuna.distributions.FloatDistribution(-SPAN_DECADES, SPAN_DECADES) for k in base
    }
    dist |= {_dose_param(k): optuna.distributions.FloatDistribution(*DOSE_FRACTION) for k in doses}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # "multivariate" is marked experimental; it is what we want
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        sampler = optuna.samplers.TPESampler(
            seed=seed + len(memory),
            n_startup_trials=STARTUP_TRIALS,
            multivariate=True,
            constant_liar=count > 1,
        )
    study = optuna.create_study(direction="maximize", sampler=sampler)
    used = 0
    for m in memory:
        terms = {t.key(): t for t in m.objectives}
        # a plan without the added terms (the first) stands at their weakest point
        terms |= {
            k: t.with_values(t.dose_gy, t.weight * 10**-SPAN_DECADES)
            for k, t in extra.items()
            if k not in terms
        }
        if set(terms) != set(base) or any(t.weight <= 0 for t in terms.values()):
            continue  # not a point of this search space
        params = {
            _param(k): _clip(math.log10(terms[k].weight / t.weight), -SPAN_DECADES, SPAN_DECADES)
            for k, t in base.items()
        }
        params |= {
            _dose_param(k): _clip(terms[k].dose_gy / base[k].dose_gy, *DOSE_FRACTION) for k in doses
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=dist, value=plan_quality(m.check)
            )
        )
        used += 1
    batch = [
        [
            t.with_values(
                round(t.dose_gy * trial.params[_dose_param(k)], 3) if k in doses else t.dose_gy,
                min(MAX_WEIGHT, t.weight * 10 ** trial.params[_param(k)]),
            )
            for k, t in base.items()
        ]
        for trial in (study.ask(dist) for _ in range(max(1, count)))
    ]
    best = max((plan_quality(m.check) for m in memory), default=float("nan"))
    size = f", a batch of {len(batch)}" if len(batch) > 1 else ""
    return (
        batch[0],
        f"BO (TPE) step {used + 1}{size}: best plan quality so far {best:.4f}",
        batch[1:],
    )


def _clip(v: float, low: float, high: float) -> float:
    return min(high, max(low, v))
