"""Review page configuration: environment variables, overridable by flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from services.common.server import add_server_flags


@dataclass(frozen=True)
class ReviewConfig:
    address: str = "127.0.0.1:8080"  # HTTP: the page (no TLS here: put it behind the proxy)
    orchestrator: str = "127.0.0.1:50050"
    session_hours: float = 8.0  # a login lasts this long
    grace_s: float = 10.0
    reflection: bool = False

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> ReviewConfig:
        env = os.environ
        ap = argparse.ArgumentParser(prog="python -m services.review")
        ap.add_argument("--address", default=env.get("RADPILOT_REVIEW_ADDRESS", cls.address))
        ap.add_argument(
            "--orchestrator", default=env.get("RADPILOT_ORCHESTRATOR", cls.orchestrator)
        )
        ap.add_argument(
            "--session-hours",
            type=float,
            default=float(env.get("RADPILOT_REVIEW_SESSION_HOURS", cls.session_hours)),
        )
        add_server_flags(ap, cls.grace_s)
        a = ap.parse_args(argv)
        host, _, port = a.address.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            ap.error(f"--address {a.address!r}: give host:port (port 0 picks a free one)")
        if not 0.1 <= a.session_hours <= 24 * 30:
            ap.error("--session-hours must be within 0.1..720")
        return cls(a.address, a.orchestrator, a.session_hours, a.grace_s, a.reflection)
