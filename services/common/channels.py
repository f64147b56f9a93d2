"""Client channels between services: one channel over all replicas, round robin, retries.

Locally the target lists every replica (``ipv4:127.0.0.1:50051,127.0.0.1:50061``); in Kubernetes
it is the optimizer's headless Service (``dns:///optimizer-headless:50051``), which resolves to
every pod. Calls are spread with ``round_robin`` and retried on UNAVAILABLE only, so a replica
that goes away costs a retry on another, not a failed job.
"""

from __future__ import annotations

import json

import grpc

from services.common.server import MAX_MESSAGE_BYTES
from services.common.tls import TlsConfig, open_plain_or_tls

RETRY_POLICY = {
    "maxAttempts": 4,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}


def service_config(service_names: list[str]) -> str:
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {"name": [{"service": name} for name in service_names], "retryPolicy": RETRY_POLICY}
            ],
        }
    )


def replica_target(addresses: list[str]) -> str:
    """A target over several ``host:port`` replicas; a ``dns:///`` name passes through."""
    if not addresses:
        raise ValueError("no replica addresses: give at least one host:port")
    if len(addresses) == 1 and ":///" in addresses[0]:
        return addresses[0]
    return "ipv4:" + ",".join(addresses)


def open_channel(
    target: str, service_names: list[str], tls: TlsConfig | None = None
) -> grpc.Channel:
    """A channel to every replica behind ``target``; TLS (and a client certificate) when
    ``tls`` is enabled."""
    return open_plain_or_tls(
        target,
        tls,
        [
            ("grpc.service_config", service_config(service_names)),
            ("grpc.enable_retries", 1),
            # a restarted service is found again within seconds, not gRPC's default 2 minutes
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.min_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ],
    )
