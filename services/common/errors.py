"""Domain errors -> gRPC status codes, in one place (an interceptor applies it to every RPC)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from radpilot.errors import (
    CaseNotFoundError,
    ConflictError,
    FailedPreconditionError,
    StorageFullError,
    UnavailableError,
)

log = logging.getLogger(__name__)


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The one mapping of domain errors (``radpilot.errors``) to status codes."""
    # order matters: CaseNotFoundError is a KeyError; AgentNotConfiguredError a precondition
    if isinstance(exc, CaseNotFoundError | KeyError):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, ConflictError):
        return grpc.StatusCode.ALREADY_EXISTS
    if isinstance(exc, StorageFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, FailedPreconditionError):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(exc, UnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(exc, ValueError):  # CaseError, ProtocolError, MetricError, WireError, ...
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def _message(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return str(text) or type(exc).__name__


class ErrorInterceptor(grpc.ServerInterceptor):
    """Turns domain exceptions raised by servicers into status codes with a useful message."""

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method

        def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
            def unary(request: Any, context: grpc.ServicerContext) -> Any:
                try:
                    return fn(request, context)
                except Exception as exc:
                    _abort(context, method, exc)

            return unary

        def guard_stream(fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
            def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                try:
                    yield from fn(request, context)
                except Exception as exc:
                    _abort(context, method, exc)

            return stream

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                guard(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                guard_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                guard(handler.stream_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _abort(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    if isinstance(exc, grpc.RpcError) or context.code() not in (None, grpc.StatusCode.OK):
        raise exc  # already a status (context.abort raises)
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
        context.abort(code, f"internal error in {method}: {type(exc).__name__}")
    log.info("%s -> %s: %s", method, code.name, _message(exc))
    context.abort(code, _message(exc))
