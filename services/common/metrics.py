"""Prometheus metrics of the services, served on ``RADPILOT_METRICS_PORT`` (0 = off).

Every service counts its RPCs (in flight, total by status code, latency) through one server
interceptor; the optimizer adds FMO seconds and iterations and ``radpilot_optimize_in_flight``
(the per-pod metric the GPU overlay's HPA scales on); the orchestrator counts jobs and iterations;
the evaluator and planner record LLM latency, tokens and call outcomes.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RPC_IN_FLIGHT = Gauge("radpilot_rpc_in_flight", "RPCs being handled now", ["service", "method"])
RPC_TOTAL = Counter(
    "radpilot_rpc_total", "RPCs handled, by status code", ["service", "method", "code"]
)
RPC_SECONDS = Histogram(
    "radpilot_rpc_seconds",
    "RPC handling time",
    ["service", "method"],
    buckets=(0.005, 0.02, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
OPTIMIZE_IN_FLIGHT = Gauge(
    "radpilot_optimize_in_flight", "Optimize calls being solved on this replica now"
)
FMO_SECONDS = Histogram(
    "radpilot_fmo_seconds",
    "FMO solve time",
    ["backend"],
    buckets=(0.1, 0.5, 1, 2, 5, 10, 20, 40, 80, 160, 320),
)
FMO_ITERATIONS = Histogram(
    "radpilot_fmo_iterations",
    "FMO solver iterations per solve",
    buckets=(10, 25, 50, 100, 200, 400, 800, 1600),
)
JOBS = Counter("radpilot_jobs_total", "Planning jobs by event", ["event"])
ITERATIONS = Counter("radpilot_iterations_total", "Outer-loop iterations stored", ["agent"])
LLM_SECONDS = Histogram(
    "radpilot_llm_seconds",
    "LLM call latency (all attempts)",
    ["role"],
    buckets=(0.5, 1, 2, 5, 10, 20, 40, 80, 160),
)
LLM_TOKENS = Counter("radpilot_llm_tokens_total", "LLM tokens", ["role", "kind"])
LLM_CALLS = Counter("radpilot_llm_calls_total", "LLM calls by outcome", ["role", "outcome"])
DICOM_INSTANCES = Counter(
    "radpilot_dicom_instances_total",
    "DICOM instances the node received, by outcome (stored, refused, invalid, spool_error)",
    ["outcome"],
)
DICOM_ASSOCIATIONS = Counter(
    "radpilot_dicom_associations_total", "DICOM associations asked of the node", ["outcome"]
)


def observe_llm_calls(calls: Iterable[Any]) -> None:
    """Record ``LLMCall`` audit records (called by the services; the core knows no metrics)."""
    for c in calls:
        LLM_CALLS.labels(c.role, c.outcome).inc()
        if c.attempts:
            LLM_SECONDS.labels(c.role).observe(c.seconds)
            LLM_TOKENS.labels(c.role, "prompt").inc(c.prompt_tokens)
            LLM_TOKENS.labels(c.role, "completion").inc(c.completion_tokens)


def start_metrics_server(port: int | None = None, addr: str = "0.0.0.0") -> int:
    """Serve /metrics on ``port`` (default ``$RADPILOT_METRICS_PORT``); 0 = off. Returns it."""
    if port is None:
        port = int(os.environ.get("RADPILOT_METRICS_PORT") or 0)
    if port:
        start_http_server(port, addr)
        log.info("metrics on :%d/metrics", port)
    return port


def _split(method: str) -> tuple[str, str]:
    parts = method.rsplit("/", 2)
    return (parts[-2].rsplit(".", 1)[-1], parts[-1]) if len(parts) >= 2 else ("", method)


class MetricsInterceptor(grpc.ServerInterceptor):
    """In-flight gauge, totals by status code and latency for every unary and streaming RPC."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        if service == "Health":
            return handler

        def code_of(context: grpc.ServicerContext, failed: bool) -> str:
            code = context.code()
            if code is None:
                return "UNKNOWN" if failed else "OK"
            return str(code.name)

        if handler.unary_unary is not None or handler.stream_unary is not None:
            inner = handler.unary_unary or handler.stream_unary
            wrap = (
                grpc.unary_unary_rpc_method_handler
                if handler.unary_unary is not None
                else grpc.stream_unary_rpc_method_handler
            )

            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                gauge = RPC_IN_FLIGHT.labels(service, method)
                gauge.inc()
                t0, failed = time.perf_counter(), True
                try:
                    out = inner(request, context)
                    failed = False
                    return out
                finally:
                    gauge.dec()
                    RPC_SECONDS.labels(service, method).observe(time.perf_counter() - t0)
                    RPC_TOTAL.labels(service, method, code_of(context, failed)).inc()

            return wrap(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                gauge = RPC_IN_FLIGHT.labels(service, method)
                gauge.inc()
                t0, failed = time.perf_counter(), True
                try:
                    yield from inner_stream(request, context)
                    failed = False
                finally:
                    gauge.dec()
                    RPC_SECONDS.labels(service, method).observe(time.perf_counter() - t0)
                    RPC_TOTAL.labels(service, method, code_of(context, failed)).inc()

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
