"""Orchestrator server wiring: job store, clients of the other services, auth, resume."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from radpilot.case_store import CaseStore
from radpilot.v1 import (
    evaluator_pb2_grpc,
    optimizer_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    planner_pb2_grpc,
)
from services.common.auth import BearerToken, access_interceptors, load_token
from services.common.channels import open_channel, replica_target
from services.common.server import RunningServer, start_server
from services.common.tls import TlsConfig
from services.evaluator.server import SERVICE_NAME as EVALUATOR
from services.optimizer.server import SERVICE_NAME as OPTIMIZER
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.core import Clients, Orchestrator
from services.orchestrator.ports import Deadlines
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.store import JobStore
from services.planner.server import SERVICE_NAME as PLANNER

log = logging.getLogger(__name__)
SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


@dataclass
class OrchestratorServer:
    running: RunningServer
    core: Orchestrator
    channels: list[grpc.Channel]
    resumed: list[str]

    @property
    def port(self) -> int:
        return self.running.port

    def stop(self, grace_s: float) -> None:
        self.running.set_serving(False)
        self.core.shutdown()
        self.running.stop(grace_s)
        for ch in self.channels:
            ch.close()
        self.core.jobs.close()


def serve(
    config: OrchestratorConfig, token: str | None = None, tls: TlsConfig | None = None
) -> OrchestratorServer:
    """Start the orchestrator. ``tls`` (default: RADPILOT_TLS_*) secures its public port
    (client certificates only when RADPILOT_TLS_CLIENT_AUTH=1) and its channels to the other
    services, which it presents its certificate to (mutual TLS)."""
    tls = TlsConfig.from_env(public=True) if tls is None else tls
    cases = CaseStore(config.case_store) if config.case_store else CaseStore()
    jobs = JobStore(config.job_db or cases.root / "jobs.sqlite")
    token = load_token() if token is None else token
    client_interceptors = [BearerToken(token)] if token else []

    def channel(target: str, service: str) -> grpc.Channel:
        return grpc.intercept_channel(open_channel(target, [service], tls), *client_interceptors)

    channels = [
        channel(replica_target(list(config.optimizers)), OPTIMIZER),
        channel(replica_target([config.evaluator]), EVALUATOR),
        channel(replica_target([config.planner]), PLANNER),
    ]
    clients = Clients(
        optimizer_pb2_grpc.OptimizerServiceStub(channels[0]),
        evaluator_pb2_grpc.EvaluatorServiceStub(channels[1]),
        planner_pb2_grpc.PlannerServiceStub(channels[2]),
    )
    refs = config.references if config.references and Path(config.references).is_dir() else None
    core = Orchestrator(
        jobs,
        cases,
        clients,
        references_dir=refs,
        retry_budget_s=config.retry_budget_s,
        lease_s=config.lease_s,
        deadlines=Deadlines(
            config.optimize_deadline_s, config.evaluate_deadline_s, config.propose_deadline_s
        ),
        owner=config.instance_id or _owner(config.address),
    )
    running = start_server(
        [
            (
                orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server,
                OrchestratorServicer(core),
            )
        ],
        [SERVICE_NAME],
        config.address,
        enable_reflection=config.reflection,
        interceptors=access_interceptors(token),
        tls=tls,
    )
    if not config.instance_id:
        core.owner = _owner(config.address, running.port)
    resumed = core.resume_unfinished()
    running.set_serving(True)
    log.info("orchestrator serving on port %d (%d job(s) resumed)", running.port, len(resumed))
    return OrchestratorServer(running, core, channels, resumed)


def _owner(address: str, port: int = 0) -> str:
    """host:port names an orchestrator uniquely (ports are bound exclusively), and a restart on
    the same port takes its own jobs back at once instead of waiting for the leases to expire."""
    bound = port or address.rpartition(":")[2]
    return f"{socket.gethostname()}:{bound}"
