"""Planner core (no gRPC): dispatch to a planning agent over the protocol's objective terms."""

from __future__ import annotations

from typing import Any

from radpilot.agents.llm_planner import LLMPlanner
from radpilot.agents.step import PLANNER_AGENTS, check_agent, propose_next
from radpilot.agents.types import MemoryEntry, PlannerOutcome
from radpilot.fmo.objectives import ObjectiveTerm, validate_terms
from radpilot.llm.client import LLMClient
from radpilot.loop.core import MAX_CANDIDATES
from radpilot.protocol import load_protocol_text


class PlannerCore:
    def __init__(self, llm: LLMClient | None = None) -> None:
        self.llm = LLMPlanner(llm) if llm is not None else None

    def propose(
        self,
        agent: str,
        protocol_yaml: str,
        current: list[ObjectiveTerm],
        memory: list[MemoryEntry],
        references: list[dict[str, Any]] | None = None,
        physician: str = "",
        count: int = 1,
    ) -> PlannerOutcome:
        agent = agent or "rules"
        if not 1 <= count <= MAX_CANDIDATES:
            raise ValueError(
                f"candidates must be within 0..{MAX_CANDIDATES} (0 = one), got {count}"
            )
        check_agent(agent, PLANNER_AGENTS, "planner", self.llm is not None)
        protocol = load_protocol_text(protocol_yaml, "protocol_yaml")
        validate_terms(current)
        return propose_next(
            agent,
            protocol,
            current,
            memory,
            references=references,
            physician=physician,
            llm=self.llm,
            seed=0,
            count=count,
        )
