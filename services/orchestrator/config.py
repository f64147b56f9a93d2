"""Orchestrator configuration: environment variables, overridable by flags."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from radpilot.agents.references import shipped_library_dir
from radpilot.loop.core import DEFAULT_RETRY_BUDGET_S
from services.common.server import add_server_flags
from services.orchestrator.core import DEFAULT_LEASE_S


@dataclass(frozen=True)
class OrchestratorConfig:
    address: str = "127.0.0.1:50050"
    case_store: str = ""
    job_db: str = ""  # default: <case store>/jobs.sqlite
    optimizers: tuple[str, ...] = ("127.0.0.1:50051",)  # replicas, or one dns:/// target
    evaluator: str = "127.0.0.1:50052"
    planner: str = "127.0.0.1:50053"
    reflection: bool = False
    grace_s: float = 30.0
    # reference plans seeded into the job store's library at start ("" = none)
    references: str = str(shipped_library_dir())
    # how long a job waits for an unavailable evaluator/planner/optimizer before it fails
    retry_budget_s: float = DEFAULT_RETRY_BUDGET_S
    # a running job's lease in the job store: another orchestrator on the same database takes
    # the job over only when its holder stopped renewing for this long
    lease_s: float = DEFAULT_LEASE_S
    # who holds the leases ("" = <host>:<port>, unique while the port is bound exclusively)
    instance_id: str = ""
    # per-step deadlines of the gRPC calls (seconds); LLM steps get at least what the evaluator's
    # and the planner's LLM settings can take (services/orchestrator/ports.Deadlines.for_llm)
    optimize_deadline_s: float = 600.0
    evaluate_deadline_s: float = 120.0
    propose_deadline_s: float = 60.0

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> OrchestratorConfig:
        env = os.environ
        ap = argparse.ArgumentParser(prog="python -m services.orchestrator")
        ap.add_argument("--address", default=env.get("RADPILOT_ORCHESTRATOR_ADDRESS", cls.address))
        ap.add_argument("--case-store", default=env.get("RADPILOT_CASE_STORE", ""))
        ap.add_argument("--job-db", default=env.get("RADPILOT_JOB_DB", ""))
        ap.add_argument(
            "--optimizers",
            default=env.get("RADPILOT_OPTIMIZERS", ",".join(cls.optimizers)),
            help="comma-separated host:port of every optimizer replica, or dns:///name:port",
        )
        ap.add_argument("--evaluator", default=env.get("RADPILOT_EVALUATOR", cls.evaluator))
        ap.add_argument("--planner", default=env.get("RADPILOT_PLANNER", cls.planner))
        ap.add_argument(
            "--references",
            default=env.get("RADPILOT_REFERENCES", cls.references),
            help="folder of reference-plan JSON files seeded into the library ('' for none)",
        )
        ap.add_argument(
            "--retry-budget-s",
            type=float,
            default=float(env.get("RADPILOT_RETRY_BUDGET_S", cls.retry_budget_s)),
            help="seconds a job waits (retrying with backoff) for a service that is unavailable",
        )
        ap.add_argument(
            "--job-lease-s",
            type=float,
            default=float(env.get("RADPILOT_JOB_LEASE_S", cls.lease_s)),
            help="seconds a crashed orchestrator's jobs stay reserved before another takes them",
        )
        ap.add_argument(
            "--instance-id",
            default=env.get("RADPILOT_ORCHESTRATOR_ID", cls.instance_id),
            help="this orchestrator's name in job leases (default: host:port)",
        )
        for step, default in (
            ("optimize", cls.optimize_deadline_s),
            ("evaluate", cls.evaluate_deadline_s),
            ("propose", cls.propose_deadline_s),
        ):
            ap.add_argument(
                f"--{step}-deadline-s",
                type=float,
                default=float(env.get(f"RADPILOT_{step.upper()}_DEADLINE_S", default)),
                help=f"deadline of one {step} call in seconds",
            )
        add_server_flags(ap, cls.grace_s)
        a = ap.parse_args(argv)
        for step in ("optimize", "evaluate", "propose"):
            if not 1 <= getattr(a, f"{step}_deadline_s") <= 86400:
                ap.error(f"--{step}-deadline-s must be within 1..86400 seconds")
        if not 1 <= a.job_lease_s <= 3600:
            ap.error("--job-lease-s must be within 1..3600 seconds")
        optimizers = tuple(x.strip() for x in a.optimizers.split(",") if x.strip())
        if not optimizers:
            ap.error("--optimizers needs at least one address")
        if not 0 <= a.retry_budget_s <= 86400:
            ap.error("--retry-budget-s must be within 0..86400 seconds")
        return cls(
            a.address,
            a.case_store,
            a.job_db,
            optimizers,
            a.evaluator,
            a.planner,
            a.reflection,
            a.grace_s,
            a.references,
            a.retry_budget_s,
            a.job_lease_s,
            a.instance_id,
            a.optimize_deadline_s,
            a.evaluate_deadline_s,
            a.propose_deadline_s,
        )
