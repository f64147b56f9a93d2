"""Building and running a gRPC server: limits, interceptors, health, reflection, SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from radpilot.wire import MAX_ARRAY_BYTES
from services.common.errors import ErrorInterceptor
from services.common.metrics import MetricsInterceptor, start_metrics_server
from services.common.tls import TlsConfig

log = logging.getLogger(__name__)

# gRPC's message limit sits a little above the array limit, so an oversized array is refused by
# radpilot.wire with a message that says what to do, not by the transport.
MAX_MESSAGE_BYTES = MAX_ARRAY_BYTES + 1024 * 1024


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    services: Sequence[str]
    health_server: grpc.Server | None = None  # plaintext health only, beside a TLS port
    health_port: int = 0

    def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        self.health.set("", status)
        for name in self.services:
            self.health.set(name, status)

    def stop(self, grace_s: float) -> None:
        """Not-serving first (load balancers stop sending), then drain, then stop."""
        self.set_serving(False)
        self.server.stop(grace_s).wait()
        if self.health_server is not None:
            self.health_server.stop(0).wait()


class BindError(RuntimeError):
    """The server's address cannot be listened on (taken, or not an address of this host)."""


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise BindError(
            f"cannot listen on {address}: the port is in use (is another RadPilot service "
            "running there?) or the host is not one of this machine's addresses; "
            "choose another --address"
        )
    return port


# no SO_REUSEPORT: a second server on a taken port fails at start instead of sharing it
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # clients re-resolve and spread onto new replicas when connections age out
    ("grpc.max_connection_age_ms", 5 * 60 * 1000),
    ("grpc.max_connection_age_grace_ms", 10 * 60 * 1000),
]


def start_server(
    register: Sequence[tuple[Callable[[Any, grpc.Server], None], Any]],
    service_names: Sequence[str],
    address: str,
    workers: int = 8,
    enable_reflection: bool = False,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    tls: TlsConfig | None = None,
    public: bool = False,
    health_address: str | None = None,
) -> RunningServer:
    """Start a server on ``address`` (port 0 picks one); its health starts NOT_SERVING.

    ``tls`` (default: from RADPILOT_TLS_*; ``public`` for the orchestrator's API) makes the port
    TLS or mutual TLS. ``health_address`` (default: RADPILOT_HEALTH_ADDRESS, "" for none) adds a
    plaintext port that serves only health, for probes that cannot speak TLS (Kubernetes')."""
    tls = TlsConfig.from_env(public=public) if tls is None else tls
    credentials = tls.server_credentials() if tls.enabled else None
    if health_address is None:
        health_address = os.environ.get("RADPILOT_HEALTH_ADDRESS", "")
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers),
        interceptors=[MetricsInterceptor(), *interceptors, ErrorInterceptor()],
        options=SERVER_OPTIONS,
    )
    for add, servicer in register:
        add(servicer, server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if enable_reflection:
        reflection.enable_server_reflection(
            [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
        )
    port = _bind(server, address, credentials)
    health_server, health_port = None, 0
    if health_address:
        health_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = _bind(health_server, health_address, None)
    server.start()
    if health_server is not None:
        health_server.start()
    running = RunningServer(
        server, health_servicer, port, service_names, health_server, health_port
    )
    running.set_serving(False)
    return running


class Stoppable(Protocol):
    def stop(self, grace_s: float) -> None: ...


def wait_for_termination(running: Stoppable, grace_s: float) -> None:
    """Block until SIGTERM/SIGINT, then shut down gracefully."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: draining for up to %.0f s", signum, grace_s)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    running.stop(grace_s)
    log.info("stopped")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log collectors (and people with jq) want from services."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging() -> None:
    """JSON lines by default; RADPILOT_LOG_FORMAT=text for plain lines."""
    handler = logging.StreamHandler()
    if os.environ.get("RADPILOT_LOG_FORMAT", "json") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=os.environ.get("RADPILOT_LOG_LEVEL", "INFO"), handlers=[handler])


def run_service(load_config: Callable[[], Any], serve: Callable[[Any], Stoppable]) -> None:
    """A server process's main: logging, configuration, serve, wait for SIGTERM, drain."""
    setup_logging()
    config = load_config()
    start_metrics_server()
    wait_for_termination(serve(config), config.grace_s)


def add_server_flags(ap: Any, default_grace_s: float) -> None:
    """The flags every server takes (besides its address)."""
    env = os.environ
    ap.add_argument(
        "--reflection", action="store_true", default=env.get("RADPILOT_REFLECTION") == "1"
    )
    ap.add_argument(
        "--grace-s",
        type=float,
        default=float(env.get("RADPILOT_GRACE_S", default_grace_s)),
        help="seconds to drain in-flight calls after SIGTERM",
    )
