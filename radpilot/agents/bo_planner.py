"""The Bayesian-optimisation baseline (the paper's BO): Optuna over the objective weights.

Stateless by design, like the planner service: each call rebuilds the study from the iterations
it is given (all of them, for this agent) — their weights and a plan-quality score computed from
the protocol goals — and asks the sampler (TPE, seeded) for the next weights. The search space is
each protocol term's weight times 10^u, u in [-1, 1]; objective doses stay the protocol's.
Asked for a batch (candidates optimised in parallel), it asks the sampler several times with the
constant-liar strategy, so the points of one batch spread out instead of repeating.
"""

from __future__ import annotations

import math
import warnings

import optuna

from radpilot.agents.types import MemoryEntry
from radpilot.evaluation.protocol_check import ProtocolCheck
from radpilot.fmo.objectives import MAX_WEIGHT, ObjectiveTerm
from radpilot.protocol import Protocol

SPAN_DECADES = 1.0
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


def propose_bo(
    protocol: Protocol, memory: list[MemoryEntry], seed: int = 0, count: int = 1
) -> tuple[list[ObjectiveTerm], str, list[list[ObjectiveTerm]]]:
    """The next weights, why, and ``count - 1`` further points of the same batch."""
    base = {t.key(): t for t in protocol.objectives}
    dist: dict[str, optuna.distributions.BaseDistribution] = {
        _param(k): optuna.distributions.FloatDistribution(-SPAN_DECADES, SPAN_DECADES) for k in base
    }
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
        weights = {t.key(): t.weight for t in m.objectives}
        if set(weights) != set(base) or any(w <= 0 for w in weights.values()):
            continue  # not a point of this search space
        params = {
            _param(k): min(SPAN_DECADES, max(-SPAN_DECADES, math.log10(weights[k] / t.weight)))
            for k, t in base.items()
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=dist, value=plan_quality(m.check)
            )
        )
        used += 1
    batch = [
        [
            ObjectiveTerm(
                t.structure,
                t.kind,
                t.dose_gy,
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
