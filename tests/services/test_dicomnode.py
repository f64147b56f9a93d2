"""The DICOM node against a real PACS and a second, independent DICOM client.

Orthanc (Debian's ``orthanc``) is started on loopback ports with its own configuration; the test
uploads a CT series and RTSTRUCT (written by pydicom and rt-utils) to it over its REST API and
asks it to send the study to RadPilot's node by C-STORE. The node plans it through the four
services (separate processes) and sends the RTDOSE back to Orthanc, where the test finds it in
the same study. dcmtk's ``storescu`` is the second sender. Bad input: an unknown calling AE,
a non-image SOP class, a data set without UIDs, a half-received series, a study no rule routes.

Skipped, saying why, where Orthanc or dcmtk is not installed (.ci/run installs both).
"""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from radpilot.v1 import dicomnode_pb2, dicomnode_pb2_grpc
from services.common.auth import BearerToken
from services.dicomnode.config import DicomNodeConfig
from services.dicomnode.server import RunningNode, serve
from services.launcher import LocalCluster, launch
from tests.doubles.dicom_data import FOREIGN_PROTOCOL, IDENTIFIERS, NEEDLES, write_patient

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
STORESCU = "/usr/bin/storescu"  # dcmtk's (a venv's pynetdicom installs its own storescu too)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Pacs:
    """Orthanc on loopback: its REST API and its DICOM port."""

    proc: subprocess.Popen
    http: int
    dicom: int

    def rest(self, method: str, path: str, body: bytes | dict | None = None) -> Any:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data, method=method)
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read()
        return json.loads(text) if text[:1] in (b"{", b"[") else text


@dataclass
class Setup:
    pacs: Pacs
    node: RunningNode
    cluster: LocalCluster
    patient: Path
    root: Path

    def studies(self, token: str | None = None) -> list[dicomnode_pb2.StudyRecord]:
        with grpc.insecure_channel(f"127.0.0.1:{self.node.port}") as ch:
            channel = grpc.intercept_channel(ch, BearerToken(token or self.cluster.token))
            stub = dicomnode_pb2_grpc.DicomNodeServiceStub(channel)
            return list(stub.ListStudies(dicomnode_pb2.ListStudiesRequest(), timeout=10).studies)

    def wait(self, timeout: float = 300.0) -> list[Any]:
        """The studies, once the first has an outcome (sent, failed, incomplete, unrouted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            studies = self.studies()
            if studies and studies[0].state not in ("receiving", "planning", "sending"):
                return studies
            time.sleep(0.5)
        pytest.fail(f"no outcome in {timeout:g} s: {self.studies()}")


def _start_orthanc(root: Path, node_dicom_port: int, dicom: int) -> Pacs:
    http = _free_port()
    config = {
        "Name": "RadPilotTestPACS",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAet": "ORTHANC",
        "DicomPort": dicom,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {"radpilot": ["RADPILOT", "127.0.0.1", node_dicom_port]},
        "Plugins": [],
        "SaveJobs": False,
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = (root / "orthanc.log").open("w")
    proc = subprocess.Popen(
        [ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
    )
    pacs = Pacs(proc, http, dicom)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            pacs.rest("GET", "/system")
            return pacs
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    proc.kill()
    pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    if not Path(ORTHANC).is_file():
        pytest.skip("Orthanc is not installed (.ci/run installs Debian's orthanc where it can)")
    root = tmp_path_factory.mktemp("dicomnode")
    patient = root / "patient"
    patient.mkdir()
    write_patient(patient)
    (root / "protocol.yaml").write_text(FOREIGN_PROTOCOL)
    orthanc_dicom = _free_port()
    rules = {
        "rules": [
            {
                "name": "nowhere",  # plans, then finds nobody listening at its destination
                "calling_aes": ["FAILSCU"],
                "protocol": "protocol.yaml",
                "agent": "fixed",
                "max_iterations": 1,
                "destination": {"ae_title": "GONE", "host": "127.0.0.1", "port": _free_port()},
            },
            {
                "name": "cord",
                "roi_names": ["PTV", "Spinal_Cord"],
                "protocol": "protocol.yaml",
                "agent": "rules",
                "max_iterations": 2,
                "destination": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc_dicom},
            },
        ]
    }
    (root / "rules.yaml").write_text(json.dumps(rules))  # JSON is YAML
    cluster = launch(root / "store", root / "run")
    config = DicomNodeConfig(
        address="127.0.0.1:0",
        ae_title="RADPILOT",
        dicom_port=0,
        calling_aes=("ORTHANC", "STORESCU", "TESTSCU", "FAILSCU"),
        spool=str(root / "spool"),
        rules=str(root / "rules.yaml"),
        orchestrator=cluster.orchestrator,
        quiet_s=3.0,
        send_retry_s=0.5,
    )
    node = serve(config, token=cluster.token)
    pacs = None
    try:
        pacs_root = root / "orthanc"
        pacs_root.mkdir()
        pacs = _start_orthanc(pacs_root, node.dicom_port, orthanc_dicom)
        yield Setup(pacs, node, cluster, patient, root)
    finally:
        if pacs is not None:
            pacs.proc.terminate()
            pacs.proc.wait(20)
        node.stop(5)
        cluster.stop()


def _files(folder: Path) -> list[Path]:
    """A written patient's files: the CT slices (IMG0000, ...) and structures.dcm."""
    return sorted(p for p in folder.iterdir() if p.is_file())


def _scu(calling: str = "TESTSCU") -> AE:
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.481.3")  # RT Structure Set Storage
    return ae


def test_orthanc_sends_a_study_and_finds_the_plan_dose_in_it(setup: Setup) -> None:
    pacs = setup.pacs
    files = _files(setup.patient)
    study_id = ""
    for f in files:
        study_id = pacs.rest("POST", "/instances", f.read_bytes())["ParentStudy"]
    assert len(pacs.rest("GET", f"/studies/{study_id}/instances")) == len(files)
    # Orthanc sends the study to RadPilot's node (C-STORE, calling AE ORTHANC)
    pacs.rest("POST", "/modalities/radpilot/store", {"Resources": [study_id], "Synchronous": True})
    sent = setup.wait(timeout=400)
    record = sent[0]
    assert record.state == "sent", record.detail
    assert record.calling_ae == "ORTHANC" and record.rule == "cord" and record.job_id
    assert record.instances == len(files) and record.send_attempts == 1
    assert "RTDOSE sent to ORTHANC@127.0.0.1" in record.detail
    # the dose is in the same study at the PACS, with the patient's own identity and geometry
    instances = pacs.rest("GET", f"/studies/{study_id}/instances?expand")
    doses = [
        i
        for i in instances
        if pacs.rest("GET", f"/instances/{i['ID']}/simplified-tags").get("Modality") == "RTDOSE"
    ]
    assert len(doses) == 1
    dose = pydicom.dcmread(io.BytesIO(pacs.rest("GET", f"/instances/{doses[0]['ID']}/file")))
    ct = pydicom.dcmread(files[0])
    assert dose.StudyInstanceUID == ct.StudyInstanceUID
    assert dose.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert str(dose.PatientID) == IDENTIFIERS["PatientID"] == str(ct.PatientID)
    assert str(dose.PatientName) == IDENTIFIERS["PatientName"]
    assert dose.DoseUnits == "GY" and float(dose.DoseGridScaling) > 0
    # the identifiers went back to the PACS, and nowhere else: not to the status API or the logs
    text = json.dumps([str(s) for s in setup.studies()])
    for log in (setup.root / "run").glob("*.log"):
        text += log.read_text()
    for needle in NEEDLES:
        assert needle not in text, f"{needle!r} leaked"


def test_dcmtk_storescu_is_a_second_client(setup: Setup) -> None:
    if not Path(STORESCU).is_file():
        pytest.skip("dcmtk is not installed (.ci/run installs Debian's dcmtk where it can)")
    copy = setup.root / "storescu-patient"
    copy.mkdir()
    write_patient(copy)  # a second patient: new UIDs, a new study
    before = len(setup.studies())
    out = subprocess.run(
        [STORESCU, "-aet", "STORESCU", "-aec", "RADPILOT", "127.0.0.1", str(setup.node.dicom_port),
         *map(str, _files(copy))],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        mine = [s for s in setup.studies() if s.calling_ae == "STORESCU"]
        if mine and mine[0].state in ("sent", "failed"):
            break
        time.sleep(0.5)
    assert len(setup.studies()) == before + 1
    assert mine[0].state == "sent", mine[0].detail


def test_an_unknown_calling_ae_is_refused_at_association(setup: Setup) -> None:
    assoc = _scu("STRANGER").associate("127.0.0.1", setup.node.dicom_port, ae_title="RADPILOT")
    assert assoc.is_rejected
    ok = _scu().associate("127.0.0.1", setup.node.dicom_port, ae_title="RADPILOT")
    assert ok.is_established
    assert ok.send_c_echo().Status == 0x0000
    ok.release()


def _instance(sop_class: str, **attrs: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def test_bad_instances_get_a_failure_status_and_are_not_kept(setup: Setup) -> None:
    assoc = _scu().associate("127.0.0.1", setup.node.dicom_port, ae_title="RADPILOT")
    assert assoc.is_established
    try:
        report = _instance(
            "1.2.840.10008.5.1.4.1.1.88.11",
            StudyInstanceUID=generate_uid(),
            SeriesInstanceUID=generate_uid(),
            Modality="SR",
        )
        assert assoc.send_c_store(report).Status == 0x0122  # SOP class not supported
        no_uids = _instance("1.2.840.10008.5.1.4.1.1.2", Modality="CT")
        assert assoc.send_c_store(no_uids).Status == 0xC000  # cannot understand
    finally:
        assoc.release()
    assert not any(s.study_key == "" for s in setup.studies())
    assert not list((setup.root / "spool").glob(f"*/{report.SOPInstanceUID}.dcm"))


def test_a_half_received_series_times_out_and_is_never_planned(setup: Setup) -> None:
    half = setup.root / "half-patient"
    half.mkdir()
    write_patient(half)
    cts = [p for p in _files(half) if p.name != "structures.dcm"]
    assoc = _scu().associate("127.0.0.1", setup.node.dicom_port, ae_title="RADPILOT")
    try:
        for p in [*cts[: len(cts) // 2], half / "structures.dcm"]:
            assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0x0000
    finally:
        assoc.release()
    key = pydicom.dcmread(cts[0]).StudyInstanceUID
    from services.dicomnode.core import study_key

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        mine = [s for s in setup.studies() if s.study_key == study_key(key)]
        if mine and mine[0].state != "receiving":
            break
        time.sleep(0.3)
    assert mine[0].state == "incomplete" and not mine[0].job_id
    missing = len(cts) - len(cts) // 2
    assert f"{missing} of the {len(cts)} CT slices the RTSTRUCT references are missing" in (
        mine[0].detail
    )


def test_a_study_no_rule_matches_is_reported_unrouted(setup: Setup) -> None:
    other = setup.root / "unrouted-patient"
    other.mkdir()
    write_patient(other)
    rs = pydicom.dcmread(other / "structures.dcm")
    for roi in rs.StructureSetROISequence:
        if roi.ROIName == "Spinal_Cord":
            roi.ROIName = "Cord_PRV"  # the rule asks for Spinal_Cord
    rs.save_as(other / "structures.dcm")
    assoc = _scu().associate("127.0.0.1", setup.node.dicom_port, ae_title="RADPILOT")
    try:
        for p in _files(other):
            assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0x0000
    finally:
        assoc.release()
    from services.dicomnode.core import study_key

    key = study_key(rs.StudyInstanceUID)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        mine = [s for s in setup.studies() if s.study_key == key]
        if mine and mine[0].state != "receiving":
            break
        time.sleep(0.3)
    assert mine[0].state == "unrouted" and not mine[0].job_id
    assert "no routing rule matches" in mine[0].detail and "Cord_PRV" in mine[0].detail


def test_the_status_api_needs_the_token_and_a_known_state(setup: Setup) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{setup.node.port}") as ch:
        stub = dicomnode_pb2_grpc.DicomNodeServiceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.ListStudies(dicomnode_pb2.ListStudiesRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        authed = dicomnode_pb2_grpc.DicomNodeServiceStub(
            grpc.intercept_channel(ch, BearerToken(setup.cluster.token))
        )
        with pytest.raises(grpc.RpcError) as err:
            authed.ListStudies(dicomnode_pb2.ListStudiesRequest(state="lost"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown state 'lost'" in err.value.details()


def test_a_destination_that_does_not_answer_fails_the_study_after_the_retries(
    setup: Setup,
) -> None:
    lost = setup.root / "lost-patient"
    lost.mkdir()
    write_patient(lost)
    assoc = _scu("FAILSCU").associate("127.0.0.1", setup.node.dicom_port, ae_title="RADPILOT")
    try:
        for p in _files(lost):
            assert assoc.send_c_store(pydicom.dcmread(p)).Status == 0x0000
    finally:
        assoc.release()
    from services.dicomnode.core import study_key

    key = study_key(pydicom.dcmread(lost / "structures.dcm").StudyInstanceUID)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        mine = [s for s in setup.studies() if s.study_key == key]
        if mine and mine[0].state in ("sent", "failed", "incomplete", "unrouted"):
            break
        time.sleep(0.5)
    record = mine[0]
    assert record.state == "failed" and record.rule == "nowhere" and record.job_id
    assert record.send_attempts == 3  # the node's default
    assert "C-STORE to GONE@127.0.0.1" in record.detail and "after 3 attempts" in record.detail
    assert "could not be established" in record.detail
    # the plan itself was made: the job succeeded, only the way back failed
    assert "sent" not in record.detail
