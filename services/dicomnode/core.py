"""The DICOM node's work: a spool of received instances, a study table in SQLite, and a dispatcher
that plans complete studies through the orchestrator and sends the dose back.

A study moves through these states (``STATES``)::

    receiving --(RTSTRUCT and every slice it references are here)--> planning --> sending --> sent
        |                                   \\--(no rule matches)--> unrouted
        \\--(quiet for quiet_s, still not complete)--> incomplete          (any step) --> failed

A new instance for a study that is no longer receiving starts it again (a new generation: a
corrected structure set is planned afresh). Planning and sending resume after a restart: the
table keeps the job id and the files to send. Logs name a study by its key (a hash of its UID),
never by a patient identifier.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import sqlite3
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import grpc
import pydicom
from pydicom.dataset import Dataset

from radpilot.v1 import orchestrator_pb2 as pb
from services.client import orchestrator_channel, orchestrator_stub, upload_messages
from services.dicomnode.rules import Destination, RoutingRules, Rule

log = logging.getLogger(__name__)

STATES = ("receiving", "unrouted", "incomplete", "planning", "sending", "sent", "failed")
TERMINAL = ("unrouted", "incomplete", "sent", "failed")
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
# copied from the received CT onto what goes back, so the PACS files the dose with its patient
# (RadPilot's own export carries no identifiers; the node, inside the hospital, restores them)
PATIENT_AND_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)
JOB_DONE = {pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED}


def study_key(study_uid: str) -> str:
    """The name a study goes by outside the node: not reversible to its UID."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:16]


def valid_uid(value: Any) -> str:
    text = str(value or "")
    if len(text) > 64 or not UID.match(text):
        raise ValueError(f"{text[:70]!r} is not a DICOM UID")
    return text


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StructureSetRefs:
    """What an RTSTRUCT says about the images it was drawn on, and what it holds."""

    series_uid: str
    sop_uids: frozenset[str]
    label: str
    roi_names: tuple[str, ...]

    @classmethod
    def of(cls, ds: Dataset) -> StructureSetRefs:
        series, sops = "", set()
        for frame in ds.get("ReferencedFrameOfReferenceSequence", []):
            for study in frame.get("RTReferencedStudySequence", []):
                for s in study.get("RTReferencedSeriesSequence", []):
                    series = series or str(s.get("SeriesInstanceUID", ""))
                    sops |= {
                        str(c.ReferencedSOPInstanceUID) for c in s.get("ContourImageSequence", [])
                    }
        names = tuple(str(r.get("ROIName", "")) for r in ds.get("StructureSetROISequence", []))
        return cls(series, frozenset(sops), str(ds.get("StructureSetLabel", "")), names)


class StudyStore:
    """The node's SQLite database: studies, their instances, and the structure sets' references."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS studies (
              study_uid TEXT PRIMARY KEY, study_key TEXT NOT NULL, state TEXT NOT NULL,
              generation INTEGER NOT NULL DEFAULT 1, calling_ae TEXT NOT NULL DEFAULT '',
              last_instance REAL NOT NULL DEFAULT 0, rule TEXT NOT NULL DEFAULT '',
              protocol TEXT NOT NULL DEFAULT '', structure_set TEXT NOT NULL DEFAULT '',
              case_id TEXT NOT NULL DEFAULT '', job_id TEXT NOT NULL DEFAULT '',
              destination TEXT NOT NULL DEFAULT '', send_attempts INTEGER NOT NULL DEFAULT 0,
              detail TEXT NOT NULL DEFAULT '', updated TEXT NOT NULL DEFAULT '');
            CREATE TABLE IF NOT EXISTS instances (
              study_uid TEXT NOT NULL, sop_uid TEXT NOT NULL, series_uid TEXT NOT NULL,
              sop_class TEXT NOT NULL, generation INTEGER NOT NULL,
              PRIMARY KEY (study_uid, sop_uid));
            CREATE TABLE IF NOT EXISTS structure_sets (
              study_uid TEXT NOT NULL, sop_uid TEXT NOT NULL, refs TEXT NOT NULL,
              PRIMARY KEY (study_uid, sop_uid));
            """
        )

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add_instance(
        self,
        study_uid: str,
        sop_uid: str,
        series_uid: str,
        sop_class: str,
        calling_ae: str,
        refs: StructureSetRefs | None,
    ) -> tuple[str, bool]:
        """Record one received instance; (the study's key, whether it started a new generation)."""
        with self._tx() as db:
            row = db.execute(
                "SELECT state, generation FROM studies WHERE study_uid=?", (study_uid,)
            ).fetchone()
            restarted = False
            if row is None:
                generation = 1
                db.execute(
                    "INSERT INTO studies (study_uid, study_key, state, calling_ae, last_instance,"
                    " updated) VALUES (?, ?, 'receiving', ?, ?, ?)",
                    (study_uid, study_key(study_uid), calling_ae, time.time(), _now()),
                )
            else:
                state, generation = row
                if state in TERMINAL:  # new material after an outcome: plan it afresh
                    generation += 1
                    restarted = True
                    db.execute(
                        "UPDATE studies SET state='receiving', generation=?, rule='', protocol='',"
                        " structure_set='', case_id='', job_id='', destination='',"
                        " send_attempts=0, detail='' WHERE study_uid=?",
                        (generation, study_uid),
                    )
                db.execute(
                    "UPDATE studies SET calling_ae=?, last_instance=?, updated=? WHERE study_uid=?",
                    (calling_ae, time.time(), _now(), study_uid),
                )
            db.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?)",
                (study_uid, sop_uid, series_uid, sop_class, generation),
            )
            if refs is not None:
                db.execute(
                    "INSERT OR REPLACE INTO structure_sets VALUES (?, ?, ?)",
                    (
                        study_uid,
                        sop_uid,
                        json.dumps(
                            {
                                "series_uid": refs.series_uid,
                                "sop_uids": sorted(refs.sop_uids),
                                "label": refs.label,
                                "roi_names": list(refs.roi_names),
                            }
                        ),
                    ),
                )
        return study_key(study_uid), restarted

    def update(self, study_uid: str, **fields: Any) -> None:
        unknown = set(fields) - {
            "state", "rule", "protocol", "structure_set", "case_id", "job_id", "destination",
            "send_attempts", "detail",
        }  # fmt: skip
        if unknown:
            raise ValueError(f"unknown study fields {sorted(unknown)}")
        if "state" in fields and fields["state"] not in STATES:
            raise ValueError(f"unknown study state {fields['state']!r}")
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._tx() as db:
            db.execute(
                f"UPDATE studies SET {sets}, updated=? WHERE study_uid=?",
                (*fields.values(), _now(), study_uid),
            )

    def studies(self, state: str = "") -> list[dict[str, Any]]:
        with self._lock:
            cur = self._db.execute(
                "SELECT s.*, (SELECT COUNT(*) FROM instances i WHERE i.study_uid=s.study_uid"
                " AND i.generation=s.generation) AS instances FROM studies s"
                + (" WHERE s.state=?" if state else "")
                + " ORDER BY s.updated, s.study_key",
                (state,) if state else (),
            )
            names = [c[0] for c in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def present(self, study_uid: str) -> dict[str, set[str]]:
        """The SOP instance UIDs received so far, by series."""
        with self._lock:
            rows = self._db.execute(
                "SELECT series_uid, sop_uid FROM instances WHERE study_uid=?", (study_uid,)
            ).fetchall()
        out: dict[str, set[str]] = {}
        for series, sop in rows:
            out.setdefault(series, set()).add(sop)
        return out

    def structure_sets(self, study_uid: str) -> list[tuple[str, StructureSetRefs]]:
        """The study's structure sets with what they reference, in the order received."""
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_uid, refs FROM structure_sets WHERE study_uid=? ORDER BY rowid",
                (study_uid,),
            ).fetchall()
        out = []
        for sop, text in rows:
            r = json.loads(text)
            out.append(
                (
                    sop,
                    StructureSetRefs(
                        r["series_uid"], frozenset(r["sop_uids"]), r["label"], tuple(r["roi_names"])
                    ),
                )
            )
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Orchestrator:
    """The calls the node makes on the orchestrator's public API (with the API token)."""

    def __init__(self, address: str, token: str = "") -> None:
        self._channel = orchestrator_channel(address)
        self._stub = orchestrator_stub(self._channel, token)

    def create_case(self, zipped: IO[bytes], protocol_yaml: str) -> tuple[str, list[str]]:
        r = self._stub.CreateCase(upload_messages(zipped, protocol_yaml), timeout=1800)
        return r.case_id, list(r.notes)

    def start(self, case_id: str, rule: Rule, key: str) -> str:
        request = pb.StartPlanningRequest(
            case_id=case_id,
            protocol_yaml=rule.protocol_yaml,
            agent=rule.agent,
            max_iterations=rule.max_iterations,
            idempotency_key=key,
        )
        return self._stub.StartPlanning(request, timeout=60).job_id

    def job(self, job_id: str) -> tuple[int, str]:
        r = self._stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30)
        return r.state, r.error

    def export(self, job_id: str) -> bytes:
        return self._stub.ExportPlan(pb.ExportPlanRequest(job_id=job_id), timeout=600).bundle

    def close(self) -> None:
        self._channel.close()


# what sends a file to a destination: (destination, dataset) -> "" on success, else why not
Sender = Callable[[Destination, Dataset], str]


class DicomNodeCore:
    def __init__(
        self,
        spool: str | Path,
        rules: RoutingRules,
        orchestrator: Orchestrator,
        sender: Sender,
        quiet_s: float = 120.0,
        send_attempts: int = 3,
        send_retry_s: float = 5.0,
        poll_s: float = 1.0,
    ) -> None:
        self.spool = Path(spool)
        self.spool.mkdir(parents=True, exist_ok=True)
        self.store = StudyStore(self.spool / "studies.sqlite")
        self.rules = rules
        self.orchestrator = orchestrator
        self.sender = sender
        self.quiet_s = quiet_s
        self.send_attempts = send_attempts
        self.send_retry_s = send_retry_s
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="dicomnode")
        self._thread: threading.Thread | None = None

    # -- receiving ------------------------------------------------------------------------------
    def study_dir(self, study_uid: str) -> Path:
        return self.spool / study_key(study_uid)

    def receive(self, ds: Dataset, encoded: bytes, calling_ae: str) -> str:
        """Spool one instance (``encoded``: the file, preamble and meta included); the study's
        key. ValueError when the instance lacks the UIDs a study needs."""
        study_uid = valid_uid(ds.get("StudyInstanceUID"))
        series_uid = valid_uid(ds.get("SeriesInstanceUID"))
        sop_uid = valid_uid(ds.get("SOPInstanceUID"))
        sop_class = valid_uid(ds.get("SOPClassUID"))
        refs = StructureSetRefs.of(ds) if sop_class == RTSTRUCT else None
        folder = self.study_dir(study_uid)
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".part", delete=False) as f:
            f.write(encoded)
        Path(f.name).replace(folder / f"{sop_uid}.dcm")  # whole files only, never half of one
        key, restarted = self.store.add_instance(
            study_uid, sop_uid, series_uid, sop_class, calling_ae, refs
        )
        if restarted:
            log.info("study %s: new instances after its outcome; receiving again", key)
        return key

    # -- the dispatcher -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dicomnode-dispatch", daemon=True)
        self._thread.start()

    def stop(self, grace_s: float) -> None:
        """Stop taking up work; in-flight steps end at their next poll (planning and sending
        resume from the table after a restart)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(grace_s)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.orchestrator.close()
        self.store.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the dispatcher must outlive any one study's problem
                log.exception("dispatcher tick failed")
            self._stop.wait(0.25)

    def tick(self) -> None:
        """One pass: check receiving studies, hand planning and sending ones to the pool."""
        for s in self.store.studies("receiving"):
            self._check(s)
        for state, work in (("planning", self._plan), ("sending", self._send)):
            for s in self.store.studies(state):
                uid = s["study_uid"]
                with self._busy_lock:
                    if uid in self._busy or self._stop.is_set():
                        continue
                    self._busy.add(uid)
                self._pool.submit(self._guarded, work, s)

    def _guarded(self, work: Callable[[dict[str, Any]], None], s: dict[str, Any]) -> None:
        try:
            work(s)
        except Exception as exc:
            log.exception("study %s failed", s["study_key"])
            self.store.update(s["study_uid"], state="failed", detail=f"internal error: {exc}")
        finally:
            with self._busy_lock:
                self._busy.discard(s["study_uid"])

    def _check(self, s: dict[str, Any]) -> None:
        uid, key = s["study_uid"], s["study_key"]
        present = self.store.present(uid)
        sets = self.store.structure_sets(uid)
        quiet = time.time() - s["last_instance"] >= self.quiet_s
        chosen: tuple[str, StructureSetRefs] | None = None
        missing_detail = "no RTSTRUCT received"
        for sop, refs in reversed(sets):  # the last received structure set first
            have = present.get(refs.series_uid, set())
            if refs.sop_uids and refs.sop_uids <= have:
                chosen = (sop, refs)
                break
            if not refs.sop_uids and have and quiet:  # no slice list: the quiet time decides
                chosen = (sop, refs)
                break
            missing = len(refs.sop_uids - have) if refs.sop_uids else 0
            missing_detail = (
                f"{missing} of the {len(refs.sop_uids)} CT slices the RTSTRUCT references are "
                "missing"
                if refs.sop_uids
                else "the RTSTRUCT references no CT series that arrived"
            )
        if chosen is None:
            if quiet:
                detail = f"incomplete after {self.quiet_s:g} s quiet: {missing_detail}; not planned"
                self.store.update(uid, state="incomplete", detail=detail)
                log.warning("study %s: %s", key, detail)
            return
        sop, refs = chosen
        rule = self.rules.route(s["calling_ae"], refs.label, set(refs.roi_names))
        if rule is None:
            detail = (
                f"no routing rule matches (calling AE {s['calling_ae']}, structure set label "
                f"{refs.label!r}, ROIs {sorted(refs.roi_names)}); not planned"
            )
            self.store.update(uid, state="unrouted", detail=detail)
            log.warning("study %s: %s", key, detail)
            return
        self.store.update(
            uid,
            state="planning",
            rule=rule.name,
            protocol=rule.protocol_path.name,
            structure_set=sop,
            destination=rule.destination.describe(),
            detail="complete; submitting to the orchestrator",
        )
        log.info("study %s complete: rule %s, protocol %s", key, rule.name, rule.protocol_path.name)

    # -- planning -------------------------------------------------------------------------------
    def _rule(self, name: str) -> Rule:
        for r in self.rules.rules:
            if r.name == name:
                return r
        raise LookupError(f"routing rule {name!r} is gone from the rules file")

    def _planned_series(self, s: dict[str, Any]) -> list[str]:
        """The SOP instance UIDs of the CT series the study's chosen structure set references."""
        refs = dict(self.store.structure_sets(s["study_uid"]))[s["structure_set"]]
        return sorted(self.store.present(s["study_uid"]).get(refs.series_uid, set()))

    def _zip(self, s: dict[str, Any]) -> IO[bytes]:
        """The structure set and the CT series it references, zipped in a temporary file."""
        uid = s["study_uid"]
        folder = self.study_dir(uid)
        sops = self._planned_series(s)
        out = tempfile.TemporaryFile(prefix="radpilot-dicomnode-")  # noqa: SIM115 (closed by the upload)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
            for sop in sops:
                z.write(folder / f"{sop}.dcm", f"CT/{sop}.dcm")
            z.write(folder / f"{s['structure_set']}.dcm", "RTSTRUCT.dcm")
        out.seek(0)
        return out

    def _plan(self, s: dict[str, Any]) -> None:
        uid, key = s["study_uid"], s["study_key"]
        job_id = s["job_id"]
        if not job_id:
            rule = self._rule(s["rule"])
            try:
                case_id, notes = self.orchestrator.create_case(self._zip(s), rule.protocol_yaml)
                job_id = self.orchestrator.start(
                    case_id, rule, f"dicomnode-{key}-{s['generation']}"
                )
            except grpc.RpcError as exc:
                code = exc.code()
                if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.store.update(
                        uid, detail=f"orchestrator unavailable, retrying: {exc.details()}"
                    )
                    self._stop.wait(5.0)
                    return  # still planning: the next tick tries again
                detail = f"the orchestrator refused the study ({code.name}): {exc.details()}"
                self.store.update(uid, state="failed", detail=detail)
                log.warning("study %s: %s", key, detail)
                return
            self.store.update(uid, case_id=case_id, job_id=job_id, detail="planning")
            log.info("study %s: case %s, job %s started", key, case_id, job_id)
            if notes:
                log.info("study %s import notes: %s", key, "; ".join(notes))
        while not self._stop.is_set():
            try:
                state, error = self.orchestrator.job(job_id)
            except grpc.RpcError as exc:
                self.store.update(uid, detail=f"cannot reach the orchestrator: {exc.details()}")
                self._stop.wait(5.0)
                continue
            if state in JOB_DONE:
                break
            self._stop.wait(self.poll_s)
        else:
            return  # stopping: the job goes on; a restarted node picks it up from the table
        if state != pb.JOB_STATE_SUCCEEDED:
            detail = f"job {job_id} {pb.JobState.Name(state).removeprefix('JOB_STATE_').lower()}"
            detail += f": {error}" if error else ""
            self.store.update(uid, state="failed", detail=detail)
            log.warning("study %s: %s", key, detail)
            return
        self._outgoing(s, self.orchestrator.export(job_id))
        self.store.update(uid, state="sending", detail="plan ready; sending")

    def _outgoing(self, s: dict[str, Any], bundle: bytes) -> None:
        """The export's RTPLAN and RTDOSE, with the patient's identity restored from the CT,
        written to the study's out/ folder (what _send sends, also after a restart)."""
        folder = self.study_dir(s["study_uid"]) / "out"
        folder.mkdir(exist_ok=True)
        for old in folder.glob("*.dcm"):
            old.unlink()
        ct_sop = self._planned_series(s)[0]
        ct = pydicom.dcmread(
            self.study_dir(s["study_uid"]) / f"{ct_sop}.dcm", stop_before_pixels=True
        )
        with zipfile.ZipFile(io.BytesIO(bundle)) as z:
            names = [n for n in z.namelist() if n in ("dicom/RTPLAN.dcm", "dicom/RTDOSE.dcm")]
            if "dicom/RTDOSE.dcm" not in names:
                raise ValueError("the job's export holds no dicom/RTDOSE.dcm")
            for name in sorted(names, key=lambda n: n != "dicom/RTPLAN.dcm"):  # plan first
                ds = pydicom.dcmread(io.BytesIO(z.read(name)))
                for attr in PATIENT_AND_STUDY:
                    if attr in ct:
                        setattr(ds, attr, ct[attr].value)
                ds.StudyInstanceUID = s["study_uid"]
                ds.save_as(folder / Path(name).name, enforce_file_format=True)

    def _send(self, s: dict[str, Any]) -> None:
        uid, key = s["study_uid"], s["study_key"]
        destination = self._rule(s["rule"]).destination
        folder = self.study_dir(uid) / "out"
        files = sorted(folder.glob("*.dcm"), key=lambda p: p.name != "RTPLAN.dcm")
        if not files:
            self.store.update(uid, state="failed", detail="nothing to send (out/ is empty)")
            return
        attempts = s["send_attempts"]
        why = ""
        while attempts < self.send_attempts and not self._stop.is_set():
            attempts += 1
            self.store.update(uid, send_attempts=attempts)
            why = ""
            for path in files:
                why = self.sender(destination, pydicom.dcmread(path))
                if why:
                    break
            if not why:
                names = ", ".join(p.stem for p in files)
                self.store.update(
                    uid, state="sent", detail=f"{names} sent to {destination.describe()}"
                )
                log.info("study %s: %s sent to %s", key, names, destination.describe())
                return
            log.warning(
                "study %s: sending to %s failed (attempt %d of %d): %s",
                key, destination.describe(), attempts, self.send_attempts, why,
            )  # fmt: skip
            self._stop.wait(self.send_retry_s)
        if attempts >= self.send_attempts:
            detail = f"C-STORE to {destination.describe()} failed after {attempts} attempts: {why}"
            self.store.update(uid, state="failed", detail=detail)
