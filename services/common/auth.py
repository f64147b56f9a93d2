"""Bearer-token access for the public API (and, when configured, service-to-service calls).

The token comes from ``RADPILOT_API_TOKEN`` or the file named by ``RADPILOT_API_TOKEN_FILE`` (a
mounted Secret). Health and reflection stay open so probes and tooling work without it. Tokens
are compared in constant time.
"""

from __future__ import annotations

import collections
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def load_token(env: dict[str, str] | None = None) -> str:
    e = os.environ if env is None else env
    path = e.get("RADPILOT_API_TOKEN_FILE", "")
    if path:
        token = Path(path).read_text().strip()
        if not token:
            raise ValueError(f"token file {path} is empty")
        return token
    return e.get("RADPILOT_API_TOKEN", "").strip()


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` with UNAUTHENTICATED."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("an empty API token would let everyone in; set RADPILOT_API_TOKEN")
        self._token = token.encode()

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'",
            )

        def deny_stream(request_iterator: Any, context: grpc.ServicerContext) -> Any:
            deny(None, context)

        self._deny = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.stream_unary_rpc_method_handler(deny_stream)

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        handler = continuation(handler_call_details)
        if scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), self._token
        ):
            return handler
        if handler is not None and handler.request_streaming:
            return self._deny_stream
        return self._deny


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
):
    """Client side: adds the bearer token to every call."""

    def __init__(self, token: str) -> None:
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: Any) -> Any:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), self._metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(
        self, continuation: Any, client_call_details: Any, request: Any
    ) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(
        self, continuation: Any, client_call_details: Any, request_iterator: Any
    ) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)


def access_interceptors(token: str | None = None) -> list[grpc.ServerInterceptor]:
    """The server side of access control, the same for every service: with a token (given, or
    from RADPILOT_API_TOKEN / RADPILOT_API_TOKEN_FILE when None) every call but health needs it;
    without one the service is open (a single-user workstation)."""
    token = load_token() if token is None else token
    return [TokenInterceptor(token)] if token else []
