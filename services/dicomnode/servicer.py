"""The node's two faces: DICOM event handlers (C-ECHO, C-STORE) and the gRPC status API."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from pydicom.uid import UID

from radpilot.v1 import dicomnode_pb2, dicomnode_pb2_grpc
from services.common.metrics import DICOM_INSTANCES
from services.dicomnode.core import STATES, DicomNodeCore

log = logging.getLogger(__name__)

SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122  # refused: the node plans from images and RT objects only
CANNOT_UNDERSTAND = 0xC000  # the data set lacks what a study needs (its UIDs)
OUT_OF_RESOURCES = 0xA700  # the spool could not be written


def accepted_sop_class(uid: str) -> bool:
    """Images (CT, MR, PET, ...) and RT objects are kept; the rest (reports, documents,
    presentation states, key objects) is refused with SOP_CLASS_NOT_SUPPORTED."""
    name = UID(uid).name
    return name.endswith("Image Storage") or name.startswith(("RT ", "Enhanced RT "))


class StorageServicer:
    """pynetdicom event handlers; the calling AE title was checked at association."""

    def __init__(self, core: DicomNodeCore) -> None:
        self.core = core

    def on_echo(self, event: Any) -> int:
        return SUCCESS

    def on_store(self, event: Any) -> int | tuple[int, str]:
        calling = str(event.assoc.requestor.ae_title).strip()
        sop_class = str(event.request.AffectedSOPClassUID)
        if not accepted_sop_class(sop_class):
            DICOM_INSTANCES.labels("refused").inc()
            log.warning("refused an instance of %s from %s", UID(sop_class).name, calling)
            return SOP_CLASS_NOT_SUPPORTED
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            key = self.core.receive(ds, event.encoded_dataset(), calling)
        except ValueError as exc:
            DICOM_INSTANCES.labels("invalid").inc()
            log.warning("refused an instance from %s: %s", calling, exc)
            return CANNOT_UNDERSTAND
        except OSError as exc:
            DICOM_INSTANCES.labels("spool_error").inc()
            log.error("could not spool an instance from %s: %s", calling, exc.strerror)
            return OUT_OF_RESOURCES
        DICOM_INSTANCES.labels("stored").inc()
        log.debug("stored an instance of %s for study %s", UID(sop_class).name, key)
        return SUCCESS


class DicomNodeServicer(dicomnode_pb2_grpc.DicomNodeServiceServicer):
    def __init__(self, core: DicomNodeCore) -> None:
        self.core = core

    def ListStudies(
        self, request: dicomnode_pb2.ListStudiesRequest, context: grpc.ServicerContext
    ) -> dicomnode_pb2.ListStudiesResponse:
        if request.state and request.state not in STATES:
            raise ValueError(f"unknown state {request.state!r}; use one of {', '.join(STATES)}")
        return dicomnode_pb2.ListStudiesResponse(
            studies=[
                dicomnode_pb2.StudyRecord(
                    study_key=s["study_key"],
                    state=s["state"],
                    calling_ae=s["calling_ae"],
                    instances=s["instances"],
                    rule=s["rule"],
                    protocol=s["protocol"],
                    case_id=s["case_id"],
                    job_id=s["job_id"],
                    destination=s["destination"],
                    send_attempts=s["send_attempts"],
                    detail=s["detail"],
                    updated=s["updated"],
                )
                for s in self.core.store.studies(request.state)
            ]
        )
