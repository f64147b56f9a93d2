"""Planner service configuration: environment variables, overridable by flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from services.common.server import add_server_flags


@dataclass(frozen=True)
class PlannerConfig:
    address: str = "127.0.0.1:50053"
    reflection: bool = False
    grace_s: float = 30.0

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> PlannerConfig:
        env = os.environ
        ap = argparse.ArgumentParser(prog="python -m services.planner")
        ap.add_argument("--address", default=env.get("RADPILOT_PLANNER_ADDRESS", cls.address))
        add_server_flags(ap, cls.grace_s)
        a = ap.parse_args(argv)
        return cls(a.address, a.reflection, a.grace_s)
