"""Planner service configuration: environment variables, overridable by flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from radpilot.llm.client import LLMSettings
from services.common.server import add_server_flags


@dataclass(frozen=True)
class PlannerConfig:
    address: str = "127.0.0.1:50053"
    reflection: bool = False
    grace_s: float = 30.0
    # the LLM endpoint for agent "llm": OPENAI_BASE_URL / OPENAI_API_KEY / RADPILOT_LLM_*
    llm: LLMSettings = field(default_factory=LLMSettings.from_env)

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> PlannerConfig:
        env = os.environ
        ap = argparse.ArgumentParser(prog="python -m services.planner")
        ap.add_argument("--address", default=env.get("RADPILOT_PLANNER_ADDRESS", cls.address))
        add_server_flags(ap, cls.grace_s)
        ap.add_argument(
            "--llm-model", default=None, help="model name (default: $RADPILOT_LLM_MODEL or gpt-4o)"
        )
        a = ap.parse_args(argv)
        return cls(a.address, a.reflection, a.grace_s, LLMSettings.from_env(model=a.llm_model))
