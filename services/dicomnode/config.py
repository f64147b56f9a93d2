"""DICOM node configuration: environment variables, overridable by flags."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass

from services.common.server import add_server_flags

# DICOM AE titles: 1-16 characters of the default repertoire, no backslash or control characters
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def ae_title(value: str, what: str) -> str:
    """``value`` as an AE title (stripped), or ValueError naming ``what`` and the rule."""
    title = value.strip()
    if not AE_TITLE.match(title):
        raise ValueError(
            f"{what} {value!r} is not an AE title: 1-16 printable characters, no backslash"
        )
    return title


@dataclass(frozen=True)
class DicomNodeConfig:
    address: str = "127.0.0.1:50060"  # the status API (gRPC) and health
    ae_title: str = "RADPILOT"
    dicom_host: str = "127.0.0.1"
    dicom_port: int = 11112
    # calling AE titles allowed to associate; empty = refuse everyone (a node must name its peers)
    calling_aes: tuple[str, ...] = ()
    spool: str = ""  # default: ~/.cache/radpilot/dicom-spool
    rules: str = ""  # the routing rules (YAML)
    orchestrator: str = "127.0.0.1:50050"
    # a study whose RTSTRUCT and referenced slices are not all there this long after its last
    # instance is reported incomplete and never planned
    quiet_s: float = 120.0
    send_attempts: int = 3
    send_retry_s: float = 5.0
    reflection: bool = False
    grace_s: float = 30.0

    @property
    def spool_dir(self) -> str:
        return self.spool or os.path.join(os.path.expanduser("~"), ".cache/radpilot/dicom-spool")

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> DicomNodeConfig:
        env = os.environ
        ap = argparse.ArgumentParser(prog="python -m services.dicomnode")
        ap.add_argument("--address", default=env.get("RADPILOT_DICOMNODE_ADDRESS", cls.address))
        ap.add_argument("--ae-title", default=env.get("RADPILOT_DICOM_AE_TITLE", cls.ae_title))
        ap.add_argument("--dicom-host", default=env.get("RADPILOT_DICOM_HOST", cls.dicom_host))
        ap.add_argument(
            "--dicom-port",
            type=int,
            default=int(env.get("RADPILOT_DICOM_PORT", cls.dicom_port)),
            help="the DICOM (C-ECHO, C-STORE) port; 0 picks a free one",
        )
        ap.add_argument(
            "--calling-aes",
            default=env.get("RADPILOT_DICOM_CALLING_AES", ""),
            help="comma-separated AE titles allowed to send (others are refused at association)",
        )
        ap.add_argument("--spool", default=env.get("RADPILOT_DICOM_SPOOL", cls.spool))
        ap.add_argument(
            "--rules",
            default=env.get("RADPILOT_DICOM_RULES", cls.rules),
            help="routing rules (YAML): which protocol, agent and destination for a study",
        )
        ap.add_argument(
            "--orchestrator", default=env.get("RADPILOT_ORCHESTRATOR", cls.orchestrator)
        )
        ap.add_argument(
            "--quiet-s",
            type=float,
            default=float(env.get("RADPILOT_DICOM_QUIET_S", cls.quiet_s)),
            help="seconds after a study's last instance before an incomplete study is reported",
        )
        ap.add_argument(
            "--send-attempts",
            type=int,
            default=int(env.get("RADPILOT_DICOM_SEND_ATTEMPTS", cls.send_attempts)),
        )
        ap.add_argument(
            "--send-retry-s",
            type=float,
            default=float(env.get("RADPILOT_DICOM_SEND_RETRY_S", cls.send_retry_s)),
        )
        add_server_flags(ap, cls.grace_s)
        a = ap.parse_args(argv)
        try:
            title = ae_title(a.ae_title, "--ae-title")
            callers = tuple(
                ae_title(x, "--calling-aes entry") for x in a.calling_aes.split(",") if x.strip()
            )
        except ValueError as exc:
            ap.error(str(exc))
        if not callers:
            ap.error("--calling-aes (RADPILOT_DICOM_CALLING_AES) must name at least one AE title")
        if not a.rules:
            ap.error("--rules (RADPILOT_DICOM_RULES) must name the routing rules file")
        if not 0 <= a.dicom_port <= 65535:
            ap.error("--dicom-port must be within 0..65535")
        if not 1 <= a.quiet_s <= 86400:
            ap.error("--quiet-s must be within 1..86400 seconds")
        if not 1 <= a.send_attempts <= 20:
            ap.error("--send-attempts must be within 1..20")
        if not 0 <= a.send_retry_s <= 3600:
            ap.error("--send-retry-s must be within 0..3600 seconds")
        return cls(
            a.address,
            title,
            a.dicom_host,
            a.dicom_port,
            callers,
            a.spool,
            a.rules,
            a.orchestrator,
            a.quiet_s,
            a.send_attempts,
            a.send_retry_s,
            a.reflection,
            a.grace_s,
        )
