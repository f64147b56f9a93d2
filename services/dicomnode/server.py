"""DICOM node wiring: the Storage SCP (pynetdicom), the C-STORE sender, the status API."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from radpilot.v1 import dicomnode_pb2, dicomnode_pb2_grpc
from services.common.auth import access_interceptors, load_token
from services.common.metrics import DICOM_ASSOCIATIONS
from services.common.server import RunningServer, start_server
from services.common.tls import TlsConfig
from services.dicomnode.config import DicomNodeConfig
from services.dicomnode.core import DicomNodeCore, Orchestrator, Sender
from services.dicomnode.rules import Destination, load_rules
from services.dicomnode.servicer import DicomNodeServicer, StorageServicer

log = logging.getLogger(__name__)
SERVICE_NAME = dicomnode_pb2.DESCRIPTOR.services_by_name["DicomNodeService"].full_name
OK_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and the warnings (stored all the same)


def c_store_sender(calling_ae: str, timeout_s: float = 60.0) -> Sender:
    """Sends one data set per association to a destination AE; "" when it was stored."""

    def send(destination: Destination, ds: Dataset) -> str:
        ae = AE(ae_title=calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
        syntaxes = [str(ds.file_meta.TransferSyntaxUID), ExplicitVRLittleEndian]
        ae.add_requested_context(ds.SOPClassUID, list(dict.fromkeys(syntaxes)))
        ae.add_requested_context(ds.SOPClassUID, ImplicitVRLittleEndian)
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            how = "rejected" if assoc.is_rejected else "could not be established"
            return f"the association with {destination.describe()} {how}"
        try:
            status = assoc.send_c_store(ds)
        finally:
            assoc.release()
        if not status:
            return "no C-STORE response (connection lost or timed out)"
        code = int(status.Status)
        if code in OK_STATUSES:
            return ""
        comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
        return f"C-STORE status 0x{code:04X}{comment}"

    return send


@dataclass
class RunningNode:
    """The Storage SCP, the dispatcher and the status API; stop() drains all three."""

    grpc_server: RunningServer
    scp: Any
    core: DicomNodeCore

    @property
    def port(self) -> int:
        return self.grpc_server.port

    @property
    def dicom_port(self) -> int:
        return int(self.scp.server_address[1])

    def stop(self, grace_s: float) -> None:
        self.grpc_server.set_serving(False)
        self.scp.shutdown()  # no new associations; those in progress finish their transfer
        self.core.stop(grace_s)
        self.grpc_server.stop(grace_s)


def serve(
    config: DicomNodeConfig, token: str | None = None, tls: TlsConfig | None = None
) -> RunningNode:
    """Start the node. ``token`` (default: RADPILOT_API_TOKEN) guards the status API and is what
    the node presents to the orchestrator."""
    token = load_token() if token is None else token
    rules = load_rules(config.rules)
    core = DicomNodeCore(
        config.spool_dir,
        rules,
        Orchestrator(config.orchestrator, token),
        c_store_sender(config.ae_title),
        quiet_s=config.quiet_s,
        send_attempts=config.send_attempts,
        send_retry_s=config.send_retry_s,
    )
    storage = StorageServicer(core)
    ae = AE(ae_title=config.ae_title)
    ae.require_calling_aet = list(config.calling_aes)
    ae.supported_contexts = AllStoragePresentationContexts
    ae.add_supported_context(Verification)
    handlers: list[Any] = [
        (evt.EVT_C_ECHO, storage.on_echo),
        (evt.EVT_C_STORE, storage.on_store),
        (evt.EVT_REJECTED, lambda event: DICOM_ASSOCIATIONS.labels("rejected").inc()),
        (evt.EVT_ACCEPTED, lambda event: DICOM_ASSOCIATIONS.labels("accepted").inc()),
    ]
    scp = ae.start_server(
        (config.dicom_host, config.dicom_port), block=False, evt_handlers=handlers
    )
    running = start_server(
        [(dicomnode_pb2_grpc.add_DicomNodeServiceServicer_to_server, DicomNodeServicer(core))],
        [SERVICE_NAME],
        config.address,
        enable_reflection=config.reflection,
        interceptors=access_interceptors(token),
        tls=tls,
    )
    node = RunningNode(running, scp, core)
    core.start()
    running.set_serving(True)
    log.info(
        "dicomnode AE %s listening for DICOM on port %d (calling AEs: %s); %d routing rules",
        config.ae_title, node.dicom_port, ", ".join(config.calling_aes), len(rules.rules),
    )  # fmt: skip
    log.info("dicomnode serving on port %d", running.port)
    return node
