"""Planner core (no gRPC): dispatch to a planning agent over the protocol's objective terms."""

from __future__ import annotations

from radpilot.agents.rules_planner import MemoryEntry, propose_rules
from radpilot.evaluation.protocol_check import ProtocolCheck
from radpilot.fmo.objectives import ObjectiveTerm, validate_terms
from radpilot.protocol import load_protocol_text
from services.common.errors import FailedPreconditionError

AGENTS = ("rules", "llm", "bo", "fixed")


def propose(
    agent: str,
    protocol_yaml: str,
    current: list[ObjectiveTerm],
    check: ProtocolCheck,
    memory: list[MemoryEntry],
) -> tuple[list[ObjectiveTerm], str]:
    agent = agent or "rules"
    if agent not in AGENTS:
        raise ValueError(f"unknown planner agent {agent!r}; use one of {', '.join(AGENTS)}")
    protocol = load_protocol_text(protocol_yaml, "protocol_yaml")
    validate_terms(current)
    if agent == "fixed":
        return list(protocol.objectives), "fixed class solution: the protocol's initial objectives"
    if agent != "rules":
        raise FailedPreconditionError(f"the {agent!r} planner is not configured here; use 'rules'")
    return propose_rules(protocol, current, check, memory)
