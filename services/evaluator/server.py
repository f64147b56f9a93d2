"""Evaluator server wiring."""

from __future__ import annotations

import logging

from radpilot.case_store import CaseStore
from radpilot.llm.client import client_or_none
from radpilot.v1 import evaluator_pb2, evaluator_pb2_grpc
from services.common.auth import access_interceptors
from services.common.server import RunningServer, start_server
from services.common.tls import TlsConfig
from services.evaluator.config import EvaluatorConfig
from services.evaluator.core import EvaluatorCore
from services.evaluator.servicer import EvaluatorServicer

log = logging.getLogger(__name__)
SERVICE_NAME = evaluator_pb2.DESCRIPTOR.services_by_name["EvaluatorService"].full_name


def serve(
    config: EvaluatorConfig, token: str | None = None, tls: TlsConfig | None = None
) -> RunningServer:
    """Start the service; ``token`` (default: from the environment) guards every call but health,
    ``tls`` (default: RADPILOT_TLS_*) makes its port (mutual) TLS."""
    store = CaseStore(config.case_store) if config.case_store else CaseStore()
    core = EvaluatorCore(store, max_cases=config.max_cases, llm=client_or_none(config.llm))
    if core.llm is not None:
        log.info("LLM evaluator enabled: %s", config.llm.describe())
    running = start_server(
        [(evaluator_pb2_grpc.add_EvaluatorServiceServicer_to_server, EvaluatorServicer(core))],
        [SERVICE_NAME],
        config.address,
        enable_reflection=config.reflection,
        interceptors=access_interceptors(token),
        tls=tls,
    )
    running.set_serving(True)
    log.info("evaluator serving on port %d", running.port)
    return running
