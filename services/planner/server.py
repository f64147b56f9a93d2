"""Planner server wiring."""

from __future__ import annotations

import logging

from radpilot.llm.client import client_or_none
from radpilot.v1 import planner_pb2, planner_pb2_grpc
from services.common.auth import access_interceptors
from services.common.server import RunningServer, start_server
from services.common.tls import TlsConfig
from services.planner.config import PlannerConfig
from services.planner.core import PlannerCore
from services.planner.servicer import PlannerServicer

log = logging.getLogger(__name__)
SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name


def serve(
    config: PlannerConfig, token: str | None = None, tls: TlsConfig | None = None
) -> RunningServer:
    """Start the service; ``token`` (default: from the environment) guards every call but health,
    ``tls`` (default: RADPILOT_TLS_*) makes its port (mutual) TLS."""
    core = PlannerCore(client_or_none(config.llm))
    if core.llm is not None:
        log.info("LLM planner enabled: %s", config.llm.describe())
    running = start_server(
        [(planner_pb2_grpc.add_PlannerServiceServicer_to_server, PlannerServicer(core))],
        [SERVICE_NAME],
        config.address,
        enable_reflection=config.reflection,
        interceptors=access_interceptors(token),
        tls=tls,
    )
    running.set_serving(True)
    log.info("planner serving on port %d", running.port)
    return running
