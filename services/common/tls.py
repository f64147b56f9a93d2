"""TLS for every server and channel: certificates, key and CA from PEM files.

``RADPILOT_TLS_CERT`` / ``RADPILOT_TLS_KEY`` are this process's certificate chain and private key,
``RADPILOT_TLS_CA`` the CA bundle that verifies the other side. Laid out as cert-manager writes a
Secret (``tls.crt``, ``tls.key``, ``ca.crt``) they are simply the mounted files.

- A server with a certificate serves TLS. It also demands a client certificate signed by the CA
  (mutual TLS) when ``RADPILOT_TLS_CLIENT_AUTH=1`` — the default for the optimizer, evaluator and
  planner when a CA is given, not for the orchestrator's public API (clients there prove who they
  are with the bearer token; set the variable to require certificates from them too).
- A channel with a CA verifies the server against it and, when a certificate and key are given,
  presents them (so the orchestrator is a known client of the workers).
- ``RADPILOT_TLS_SERVER_NAME`` overrides the name checked in the server's certificate (for
  addresses that are not in it).

Without any of these variables everything is plaintext, as on a single workstation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import grpc

ENV = {
    "cert": "RADPILOT_TLS_CERT",
    "key": "RADPILOT_TLS_KEY",
    "ca": "RADPILOT_TLS_CA",
    "client_auth": "RADPILOT_TLS_CLIENT_AUTH",
    "server_name": "RADPILOT_TLS_SERVER_NAME",
}


class TlsConfigError(ValueError):
    """The TLS settings are incomplete or name files that cannot be read."""


def _read(path: str, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{what} {path!r} cannot be read: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise TlsConfigError(f"{what} {path!r} is not a PEM file (no '-----BEGIN' line)")
    return data


@dataclass(frozen=True)
class TlsConfig:
    cert: str = ""  # PEM certificate chain of this process
    key: str = ""  # PEM private key of that certificate
    ca: str = ""  # PEM CA bundle that verifies peers
    client_auth: bool = False  # a server requires client certificates signed by ``ca``
    server_name: str = ""  # the name expected in servers' certificates, when not the address

    @property
    def enabled(self) -> bool:
        return bool(self.cert or self.key or self.ca)

    @classmethod
    def from_env(cls, public: bool = False, env: dict[str, str] | None = None) -> TlsConfig:
        """From the environment; ``public`` marks the orchestrator's API (no client
        certificates unless RADPILOT_TLS_CLIENT_AUTH=1)."""
        e = os.environ if env is None else env
        ca = e.get(ENV["ca"], "").strip()
        flag = e.get(ENV["client_auth"], "").strip().lower()
        if flag not in ("", "0", "1", "true", "false"):
            raise TlsConfigError(f"{ENV['client_auth']} must be 1 or 0, got {flag!r}")
        client_auth = flag in ("1", "true") if flag else (bool(ca) and not public)
        return cls(
            e.get(ENV["cert"], "").strip(),
            e.get(ENV["key"], "").strip(),
            ca,
            client_auth,
            e.get(ENV["server_name"], "").strip(),
        )

    def env(self) -> dict[str, str]:
        """The variables that give child processes these files (each service then applies
        its own client-certificate default: mutual TLS between services, TLS on the API)."""
        if not self.enabled:
            return {}
        return {
            ENV["cert"]: self.cert,
            ENV["key"]: self.key,
            ENV["ca"]: self.ca,
            ENV["server_name"]: self.server_name,
        }

    def server_credentials(self) -> grpc.ServerCredentials:
        if not (self.cert and self.key):
            raise TlsConfigError(
                f"a TLS server needs both {ENV['cert']} and {ENV['key']} (PEM files)"
            )
        if self.client_auth and not self.ca:
            raise TlsConfigError(
                f"mutual TLS needs {ENV['ca']}: the CA that signed the clients' certificates"
            )
        pair = (_read(self.key, ENV["key"]), _read(self.cert, ENV["cert"]))
        return grpc.ssl_server_credentials(
            [pair],
            root_certificates=_read(self.ca, ENV["ca"]) if self.client_auth else None,
            require_client_auth=self.client_auth,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise TlsConfigError(
                f"a client certificate needs both {ENV['cert']} and {ENV['key']} (PEM files)"
            )
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, ENV["ca"]) if self.ca else None,
            private_key=_read(self.key, ENV["key"]) if self.key else None,
            certificate_chain=_read(self.cert, ENV["cert"]) if self.cert else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def open_plain_or_tls(
    target: str, tls: TlsConfig | None, options: list[tuple[str, object]] | None = None
) -> grpc.Channel:
    """A channel to ``target``: TLS when ``tls`` is enabled, plaintext otherwise."""
    opts = list(options or [])
    if tls is not None and tls.enabled:
        return grpc.secure_channel(
            target, tls.channel_credentials(), options=[*opts, *tls.channel_options()]
        )
    return grpc.insecure_channel(target, options=opts)
