"""Optimizer server wiring: store, core, servicer, health (ready once the backend is warm)."""

from __future__ import annotations

import logging

from radpilot.case_store import CaseStore
from radpilot.v1 import optimizer_pb2, optimizer_pb2_grpc
from services.common.auth import access_interceptors
from services.common.server import RunningServer, start_server
from services.common.tls import TlsConfig
from services.optimizer.config import OptimizerConfig
from services.optimizer.core import OptimizerCore
from services.optimizer.servicer import OptimizerServicer

log = logging.getLogger(__name__)
SERVICE_NAME = optimizer_pb2.DESCRIPTOR.services_by_name["OptimizerService"].full_name


def serve(
    config: OptimizerConfig, token: str | None = None, tls: TlsConfig | None = None
) -> RunningServer:
    """Start the service; ``token`` (default: from the environment) guards every call but health,
    ``tls`` (default: RADPILOT_TLS_*) makes its port (mutual) TLS."""
    store = CaseStore(config.case_store) if config.case_store else CaseStore()
    core = OptimizerCore(
        store, backend=config.backend, max_cases=config.max_cases, matrix=config.matrix
    )
    running = start_server(
        [
            (
                optimizer_pb2_grpc.add_OptimizerServiceServicer_to_server,
                OptimizerServicer(core, config.replica),
            )
        ],
        [SERVICE_NAME],
        config.address,
        enable_reflection=config.reflection,
        interceptors=access_interceptors(token),
        tls=tls,
    )
    core.warm_up()
    running.set_serving(True)
    log.info(
        "optimizer %s serving on port %d (%s backend)", config.replica, running.port, config.backend
    )
    return running
