"""One evaluation and one proposal, by agent name: what the in-process loop and the services share.

Evaluators: ``rules`` (exact check and findings) and ``llm`` (DVH + vision experts and an
aggregator, guarded by the exact check). Planners: ``rules``, ``llm`` (falls back to a rules step),
``bo`` (Optuna over weights; give it every iteration) and ``fixed`` (the protocol's class
solution: the loop stops after one plan, as nothing would change).
"""

from __future__ import annotations

from typing import Any

from radpilot.agents.bo_planner import propose_bo
from radpilot.agents.llm_evaluator import LLMEvaluator, combine
from radpilot.agents.llm_planner import LLMPlanner
from radpilot.agents.rules_planner import propose_rules
from radpilot.agents.types import EvaluationOutcome, MemoryEntry, PlannerOutcome
from radpilot.errors import AgentNotConfiguredError
from radpilot.evaluation.images import dose_images
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.rules import evaluate_rules
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.protocol import Protocol

EVALUATOR_AGENTS = ("rules", "llm")
PLANNER_AGENTS = ("rules", "llm", "bo", "fixed")
JOB_AGENTS = PLANNER_AGENTS  # a job's agent names its planner; "llm" also picks the LLM evaluator


def check_agent(
    agent: str, agents: tuple[str, ...], role: str = "", llm_configured: bool = True
) -> None:
    """The one check of an agent name (ValueError) and of its LLM endpoint (AgentNotConfigured)."""
    if agent not in agents:
        what = f"{role} agent" if role else "agent"
        raise ValueError(f"unknown {what} {agent!r}; use one of {', '.join(agents)}")
    if agent == "llm" and not llm_configured:
        raise AgentNotConfiguredError(
            f"the LLM {role or 'agent'} is not configured (set OPENAI_BASE_URL or "
            "OPENAI_API_KEY for it); use agent 'rules'"
        )


def served_agents(agents: tuple[str, ...], llm_configured: bool) -> list[str]:
    """The agents an instance can serve: all of them, less ``llm`` without an endpoint."""
    return [a for a in agents if a != "llm" or llm_configured]


def evaluator_agent(job_agent: str) -> str:
    return "llm" if job_agent == "llm" else "rules"


def memory_window(job_agent: str, entries: list[Any], length: int) -> list[Any]:
    """The memory the planner sees: the last L iterations, or all of them for BO."""
    return list(entries) if job_agent == "bo" else list(entries)[-length:]


def evaluate_plan(
    agent: str,
    plan: PlanDose,
    protocol: Protocol,
    llm: LLMEvaluator | None = None,
    images: dict[str, bytes] | None = None,
    references: list[dict[str, Any]] | None = None,
    physician: str = "",
) -> EvaluationOutcome:
    check_agent(agent, EVALUATOR_AGENTS, "evaluator", llm is not None)
    rules = evaluate_rules(plan, protocol)
    if agent == "rules" or llm is None:  # (llm is there whenever the agent is "llm")
        return EvaluationOutcome(rules)
    if images is None and llm.client.vision:
        images = dose_images(plan)
    judgement = llm.judge(plan, protocol, rules, images, references or [], physician)
    evaluation, disagreement = combine(rules, judgement)
    return EvaluationOutcome(
        evaluation,
        judgement.decision.value if judgement.decision else "",
        disagreement,
        judgement.calls,
    )


def propose_next(
    agent: str,
    protocol: Protocol,
    current: list[ObjectiveTerm],
    memory: list[MemoryEntry],
    *,
    references: list[dict[str, Any]] | None = None,
    physician: str = "",
    llm: LLMPlanner | None = None,
    seed: int = 0,
    count: int = 1,
) -> PlannerOutcome:
    """The next objective terms; with ``count`` > 1 also up to count - 1 alternatives for the
    same round (rules: bolder and more cautious steps; BO: a batch; LLM: its own alternatives)."""
    check_agent(agent, PLANNER_AGENTS, "planner", llm is not None)
    if not memory:
        raise ValueError("memory is empty: the planner needs at least the last iteration")
    if agent == "fixed":
        return PlannerOutcome(
            list(protocol.objectives), "fixed class solution: the protocol's initial objectives"
        )
    if agent == "bo":
        terms, why, alternatives = propose_bo(protocol, memory, seed, count)
        return PlannerOutcome(terms, why, alternatives=alternatives)
    if agent == "llm" and llm is not None:
        findings = list(memory[-1].findings)
        return llm.propose(
            protocol, current, memory, references or [], findings, physician, count=count
        )
    terms, why, alternatives = propose_rules(protocol, current, memory[-1].check, memory, count)
    return PlannerOutcome(terms, why, alternatives=alternatives)
