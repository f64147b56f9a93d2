"""Planner server wiring."""

from __future__ import annotations

import logging

from radpilot.v1 import planner_pb2, planner_pb2_grpc
from services.common.server import RunningServer, start_server
from services.planner.config import PlannerConfig
from services.planner.servicer import PlannerServicer

log = logging.getLogger(__name__)
SERVICE_NAME = planner_pb2.DESCRIPTOR.services_by_name["PlannerService"].full_name


def serve(config: PlannerConfig) -> RunningServer:
    running = start_server(
        [(planner_pb2_grpc.add_PlannerServiceServicer_to_server, PlannerServicer())],
        [SERVICE_NAME],
        config.address,
        enable_reflection=config.reflection,
    )
    running.set_serving(True)
    log.info("planner serving on port %d", running.port)
    return running
