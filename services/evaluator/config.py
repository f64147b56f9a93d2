"""Evaluator service configuration: environment variables, overridable by flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from radpilot.llm.client import LLMSettings
from services.common.server import add_server_flags


@dataclass(frozen=True)
class EvaluatorConfig:
    address: str = "127.0.0.1:50052"
    case_store: str = ""
    max_cases: int = 4
    reflection: bool = False
    grace_s: float = 30.0
    # the LLM endpoint for agent "llm": OPENAI_BASE_URL / OPENAI_API_KEY / RADPILOT_LLM_*
    llm: LLMSettings = field(default_factory=LLMSettings.from_env)

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> EvaluatorConfig:
        env = os.environ
        ap = argparse.ArgumentParser(prog="python -m services.evaluator")
        ap.add_argument("--address", default=env.get("RADPILOT_EVALUATOR_ADDRESS", cls.address))
        ap.add_argument("--case-store", default=env.get("RADPILOT_CASE_STORE", ""))
        ap.add_argument(
            "--max-cases", type=int, default=int(env.get("RADPILOT_MAX_CASES", cls.max_cases))
        )
        add_server_flags(ap, cls.grace_s)
        ap.add_argument(
            "--llm-model", default=None, help="model name (default: $RADPILOT_LLM_MODEL or gpt-4o)"
        )
        a = ap.parse_args(argv)
        if a.max_cases < 1:
            ap.error("--max-cases must be at least 1")
        llm = LLMSettings.from_env(model=a.llm_model)
        return cls(a.address, a.case_store, a.max_cases, a.reflection, a.grace_s, llm)
