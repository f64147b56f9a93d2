"""The job store: SQLite in WAL mode. Every iteration is written (with its event) in one
transaction before the next one starts, so a restarted orchestrator resumes where it stopped."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from radpilot.errors import ConflictError
from radpilot.loop.record import ArtefactRef, IterationRecord
from radpilot.storage import storage_faults

TERMINAL = ("succeeded", "failed", "cancelled")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY, idempotency_key TEXT UNIQUE, case_id TEXT NOT NULL,
  protocol_yaml TEXT NOT NULL, max_iterations INTEGER NOT NULL, memory_length INTEGER NOT NULL,
  agent TEXT NOT NULL, state TEXT NOT NULL, best_iteration INTEGER NOT NULL DEFAULT 0,
  error TEXT NOT NULL DEFAULT '', created REAL NOT NULL, updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS iterations (
  job_id TEXT NOT NULL, iteration INTEGER NOT NULL, record TEXT NOT NULL,
  PRIMARY KEY (job_id, iteration));
CREATE TABLE IF NOT EXISTS events (
  job_id TEXT NOT NULL, seq INTEGER NOT NULL, event TEXT NOT NULL, PRIMARY KEY (job_id, seq));
CREATE TABLE IF NOT EXISTS feedback (
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, text TEXT NOT NULL,
  applies_from INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS reference_plans (
  reference_id TEXT PRIMARY KEY, protocol TEXT NOT NULL, plan TEXT NOT NULL,
  source TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
  job_id TEXT PRIMARY KEY, iteration INTEGER NOT NULL, plan TEXT NOT NULL,
  dose_path TEXT NOT NULL, dose_sha256 TEXT NOT NULL, error TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
  job_id TEXT PRIMARY KEY, owner TEXT NOT NULL, expires REAL NOT NULL);
"""

INSERT_JOB = (
    "INSERT INTO jobs (job_id, idempotency_key, case_id, protocol_yaml, max_iterations,"
    " memory_length, agent, state, created, updated, llm, candidates)"
    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
)


@dataclass(frozen=True)
class Job:
    job_id: str
    idempotency_key: str | None
    case_id: str
    protocol_yaml: str
    max_iterations: int
    memory_length: int
    agent: str
    state: str
    best_iteration: int
    error: str
    llm: str = ""  # the LLM endpoints and models the job was started with (JSON), "" = none
    candidates: int = 1  # parameter sets optimised side by side per round


def _same_request(job: Job, request: tuple[Any, ...]) -> Job:
    """The job an idempotency key names, if it was created by the same request."""
    fields = ("case_id", "protocol_yaml", "max_iterations", "memory_length", "agent", "candidates")
    differ = [f for f, v in zip(fields, request, strict=True) if getattr(job, f) != v]
    if differ:
        raise ConflictError(
            f"idempotency key {job.idempotency_key!r} was used for job {job.job_id} with a "
            f"different request ({', '.join(differ)} differ): send a new key for a new job"
        )
    return job


class LeaseLostError(Exception):
    """Another orchestrator took a job's lease: this one must stop running the job, unwritten."""


class JobStore:
    def __init__(self, path: str | Path) -> None:
        self._where = f"the job database at {path}"
        with storage_faults(self._where):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA busy_timeout=5000")  # another orchestrator may be writing
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
            if "llm" not in columns:  # job stores of earlier versions
                self._db.execute("ALTER TABLE jobs ADD COLUMN llm TEXT NOT NULL DEFAULT ''")
            if "candidates" not in columns:
                self._db.execute(
                    "ALTER TABLE jobs ADD COLUMN candidates INTEGER NOT NULL DEFAULT 1"
                )
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # notified on every write

    def _write(
        self,
        statements: list[tuple[str, tuple[Any, ...]]],
        job_id: str = "",
        owner: str | None = None,
        unless: Callable[[], bool] | None = None,
    ) -> bool:
        """Run the statements in one transaction: all stored, or none (a full or read-only
        database raises StorageFullError / StorageReadOnlyError and leaves it as it was).
        With ``owner``, write only while no other orchestrator has taken job ``job_id``'s
        lease: else LeaseLostError, nothing written. With ``unless``, checked inside the
        transaction: when it holds, nothing is written and the answer is False."""
        with storage_faults(self._where), self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if owner is not None:
                    self._check_fence(job_id, owner)
                if unless is not None and unless():
                    self._rollback()
                    return False
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
            self.changed.notify_all()
        return True

    def _check_fence(self, job_id: str, owner: str) -> None:
        """Inside a write transaction: raise LeaseLostError when another owner holds (or held,
        expired, and has not released) the job's lease; it took the job over from ``owner``.
        Our own lease, even expired, or none at all means nobody else runs the job."""
        row = self._db.execute("SELECT owner FROM leases WHERE job_id = ?", (job_id,)).fetchone()
        if row is not None and row[0] != owner:
            raise LeaseLostError(
                f"job {job_id} is now run by orchestrator {row[0]}: its lease was not renewed "
                "in time; this orchestrator stops the job without writing"
            )

    def _ended(self, job_id: str) -> bool:
        """Whether the job is gone or in a terminal state (read inside a transaction)."""
        row = self._db.execute("SELECT state FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return row is None or row[0] in TERMINAL

    def _rollback(self) -> None:
        """Roll back the open transaction, if SQLite has not already (it does on a full disk)."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    def _query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- jobs ---------------------------------------------------------------------------------
    def create_job(
        self,
        case_id: str,
        protocol_yaml: str,
        max_iterations: int,
        memory_length: int,
        agent: str,
        idempotency_key: str | None,
        llm: str = "",
        feedback: str = "",
        candidates: int = 1,
    ) -> tuple[Job, bool]:
        """The new job, or the existing one for the same idempotency key; (job, created).
        ``feedback``: the physician's comments from iteration 1, stored with the job."""
        request = (case_id, protocol_yaml, max_iterations, memory_length, agent, candidates)
        if idempotency_key:
            existing = self._query(
                "SELECT job_id FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
            )
            if existing:
                return _same_request(self.job(existing[0][0]), request), False
        job_id = uuid.uuid4().hex
        now = time.time()
        try:
            self._write(
                [
                    (
                        INSERT_JOB,
                        (
                            job_id,
                            idempotency_key or None,
                            case_id,
                            protocol_yaml,
                            max_iterations,
                            memory_length,
                            agent,
                            "queued",
                            now,
                            now,
                            llm,
                            candidates,
                        ),
                    ),
                    *(
                        [
                            (
                                "INSERT INTO feedback (job_id, text, applies_from) VALUES (?,?,1)",
                                (job_id, feedback),
                            )
                        ]
                        if feedback
                        else []
                    ),
                ]
            )
        except sqlite3.IntegrityError:  # a concurrent request with the same key won
            row = self._query(
                "SELECT job_id FROM jobs WHERE idempotency_key = ?", (idempotency_key,)
            )
            return _same_request(self.job(row[0][0]), request), False
        return self.job(job_id), True

    def job(self, job_id: str) -> Job:
        rows = self._query(
            "SELECT job_id, idempotency_key, case_id, protocol_yaml, max_iterations, memory_length,"
            " agent, state, best_iteration, error, llm, candidates FROM jobs WHERE job_id = ?",
            (job_id,),
        )
        if not rows:
            raise KeyError(f"no planning job {job_id!r}")
        return Job(*rows[0])

    def recent_jobs(self, limit: int) -> list[tuple[Job, int, float, float]]:
        """The newest ``limit`` jobs with their number of stored iterations, created, updated."""
        rows = self._query(
            "SELECT job_id, idempotency_key, case_id, protocol_yaml, max_iterations, memory_length,"
            " agent, state, best_iteration, error, llm, candidates,"
            " (SELECT COUNT(*) FROM iterations i WHERE i.job_id = jobs.job_id), created, updated"
            " FROM jobs ORDER BY created DESC, job_id LIMIT ?",
            (limit,),
        )
        return [(Job(*r[:12]), int(r[12]), float(r[13]), float(r[14])) for r in rows]

    def job_count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM jobs")[0][0])

    # -- leases: one orchestrator runs a job ------------------------------------------------------
    def claim(self, job_id: str, owner: str, lease_s: float) -> str:
        """Take (or extend) the lease on a job for ``owner``; "" when it is now ours, else the
        owner that holds an unexpired lease. Atomic across processes (BEGIN IMMEDIATE)."""
        now = time.time()
        with storage_faults(self._where), self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT owner, expires FROM leases WHERE job_id = ?", (job_id,)
                ).fetchone()
                if row is not None and row[0] != owner and row[1] > now:
                    self._rollback()
                    return str(row[0])
                self._db.execute(
                    "INSERT OR REPLACE INTO leases (job_id, owner, expires) VALUES (?,?,?)",
                    (job_id, owner, now + lease_s),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._rollback()
                raise
        return ""

    def renew(self, job_ids: list[str], owner: str, lease_s: float) -> list[str]:
        """Extend ``owner``'s leases; returns the jobs whose lease it no longer holds."""
        lost = []
        expires = time.time() + lease_s
        for job_id in job_ids:
            with storage_faults(self._where), self._lock:
                cur = self._db.execute(
                    "UPDATE leases SET expires = ? WHERE job_id = ? AND owner = ?",
                    (expires, job_id, owner),
                )
            if cur.rowcount != 1:
                lost.append(job_id)
        return lost

    def release(self, job_id: str, owner: str) -> None:
        with storage_faults(self._where), self._lock:
            self._db.execute("DELETE FROM leases WHERE job_id = ? AND owner = ?", (job_id, owner))

    def lease(self, job_id: str) -> tuple[str, float] | None:
        """(owner, expires) of a job's lease, if any."""
        rows = self._query("SELECT owner, expires FROM leases WHERE job_id = ?", (job_id,))
        return (str(rows[0][0]), float(rows[0][1])) if rows else None

    def claimable(self, owner: str) -> list[str]:
        """Unfinished jobs nobody else holds: no lease, an expired one, or ``owner``'s own."""
        rows = self._query(
            "SELECT j.job_id FROM jobs j LEFT JOIN leases l ON l.job_id = j.job_id"
            " WHERE j.state IN ('queued','running')"
            " AND (l.owner IS NULL OR l.owner = ? OR l.expires <= ?) ORDER BY j.created",
            (owner, time.time()),
        )
        return [r[0] for r in rows]

    def mark_running(self, job_id: str) -> bool:
        """queued/running -> running; False when the job was cancelled (or ended) meanwhile."""
        with storage_faults(self._where), self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET state = 'running', updated = ? WHERE job_id = ?"
                " AND state IN ('queued', 'running')",
                (time.time(), job_id),
            )
            self.changed.notify_all()
            return cur.rowcount == 1

    def set_state(
        self,
        job_id: str,
        state: str,
        error: str = "",
        best_iteration: int | None = None,
        event: dict[str, Any] | None = None,
        owner: str | None = None,
    ) -> bool:
        """Set a job's state. With ``owner`` (the end of that orchestrator's run of the job):
        only while it runs the job (else LeaseLostError) and the job has not ended meanwhile
        (a job cancelled while its last step ran stays cancelled: False, nothing written)."""
        stmts: list[tuple[str, tuple[Any, ...]]] = [
            (
                "UPDATE jobs SET state = ?, error = ?,"
                " best_iteration = COALESCE(?, best_iteration),"
                " updated = ? WHERE job_id = ?",
                (state, error, best_iteration, time.time(), job_id),
            )
        ]
        if event is not None:
            stmts.append(self._event_stmt(job_id, event))
        ended = None if owner is None else partial(self._ended, job_id)
        return self._write(stmts, job_id, owner, ended)

    # -- the leaf-sequenced best plan ------------------------------------------------------------
    def set_delivery(
        self,
        job_id: str,
        iteration: int,
        plan: dict[str, Any] | None,
        dose: ArtefactRef | None,
        error: str = "",
        owner: str | None = None,
    ) -> None:
        """The sequenced plan of a job's best iteration (or why it could not be sequenced)."""
        self._write(
            [
                (
                    "INSERT OR REPLACE INTO deliveries (job_id, iteration, plan, dose_path,"
                    " dose_sha256, error) VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        iteration,
                        json.dumps(plan or {}),
                        dose.path if dose else "",
                        dose.sha256 if dose else "",
                        error,
                    ),
                )
            ],
            job_id,
            owner,
        )

    def delivery(self, job_id: str) -> tuple[int, dict[str, Any], ArtefactRef | None, str] | None:
        """(iteration, plan, dose, error) of the job's sequenced plan, or None."""
        rows = self._query(
            "SELECT iteration, plan, dose_path, dose_sha256, error FROM deliveries"
            " WHERE job_id = ?",
            (job_id,),
        )
        if not rows:
            return None
        it, plan, path, sha, error = rows[0]
        return int(it), json.loads(plan), ArtefactRef(path, sha) if path else None, str(error)

    # -- iterations and events -------------------------------------------------------------------
    def _event_stmt(self, job_id: str, event: dict[str, Any]) -> tuple[str, tuple[Any, ...]]:
        return (
            "INSERT INTO events (job_id, seq, event) VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1"
            " FROM events WHERE job_id = ?), ?)",
            (job_id, job_id, json.dumps(event)),
        )

    def add_event(
        self, job_id: str, event: dict[str, Any], once: bool = False, owner: str | None = None
    ) -> bool:
        """Append an event; with ``once``, not when the job already has one of the same kind
        for the same iteration (a resumed loop repeats its step, not its events); with
        ``owner``, only while that orchestrator runs the job (else LeaseLostError)."""
        seen = partial(self._has_event, job_id, event) if once else None
        return self._write([self._event_stmt(job_id, event)], job_id, owner, seen)

    def _has_event(self, job_id: str, event: dict[str, Any]) -> bool:
        """Whether one of the job's last 50 events has this event's kind and iteration (read
        inside the write's transaction: no other orchestrator adds one meanwhile)."""
        for (text,) in self._db.execute(
            "SELECT event FROM events WHERE job_id = ? ORDER BY seq DESC LIMIT 50", (job_id,)
        ):
            old = json.loads(text)
            if old.get("kind") == event.get("kind") and old.get("iteration") == event.get(
                "iteration"
            ):
                return True
        return False

    def add_iteration(
        self,
        job_id: str,
        record: IterationRecord,
        event: dict[str, Any],
        owner: str | None = None,
    ) -> None:
        """Store an iteration and its event in one transaction (never twice: primary key); with
        ``owner``, only while that orchestrator runs the job (else LeaseLostError)."""
        self._write(
            [
                (
                    "INSERT INTO iterations (job_id, iteration, record) VALUES (?,?,?)",
                    (job_id, record.iteration, json.dumps(record.to_json())),
                ),
                self._event_stmt(job_id, event),
            ],
            job_id,
            owner,
        )

    def iterations(self, job_id: str) -> list[IterationRecord]:
        rows = self._query(
            "SELECT record FROM iterations WHERE job_id = ? ORDER BY iteration", (job_id,)
        )
        return [IterationRecord.from_json(json.loads(r[0])) for r in rows]

    def migrate_records(self, store_fluence: Callable[[str, str], ArtefactRef]) -> int:
        """Rewrite iteration records of the pre-typed format (fluence inline as hex) with the
        fluence moved to the case store: ``store_fluence(case_id, hex) -> ref``. Returns how
        many records were rewritten; each is rewritten in its own transaction."""
        rows = self._query(
            "SELECT i.job_id, i.iteration, i.record, j.case_id FROM iterations i"
            " JOIN jobs j ON j.job_id = i.job_id WHERE i.record LIKE '%\"fluence_hex\"%'"
        )
        for job_id, iteration, text, case_id in rows:
            record = IterationRecord.from_json(json.loads(text))
            record.fluence = store_fluence(case_id, record.legacy_fluence_hex)
            record.legacy_fluence_hex = ""
            self._write(
                [
                    (
                        "UPDATE iterations SET record = ? WHERE job_id = ? AND iteration = ?",
                        (json.dumps(record.to_json()), job_id, iteration),
                    )
                ]
            )
        return len(rows)

    def events_since(self, job_id: str, seq: int) -> list[tuple[int, dict[str, Any]]]:
        rows = self._query(
            "SELECT seq, event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq", (job_id, seq)
        )
        return [(r[0], json.loads(r[1])) for r in rows]

    # -- physician feedback ---------------------------------------------------------------------
    def add_feedback(self, job_id: str, text: str, applies_from: int) -> None:
        self._write(
            [
                (
                    "INSERT INTO feedback (job_id, text, applies_from) VALUES (?,?,?)",
                    (job_id, text, applies_from),
                )
            ]
        )

    def feedback_until(self, job_id: str, iteration: int) -> list[str]:
        rows = self._query(
            "SELECT text FROM feedback WHERE job_id = ? AND applies_from <= ? ORDER BY id",
            (job_id, iteration),
        )
        return [r[0] for r in rows]

    # -- reference plans --------------------------------------------------------------------------
    def add_reference(self, reference_id: str, protocol: str, plan: dict[str, Any]) -> bool:
        """Store a reference plan; False when one with the same id is already there."""
        try:
            self._write(
                [
                    (
                        "INSERT INTO reference_plans (reference_id, protocol, plan, source,"
                        " created) VALUES (?,?,?,?,?)",
                        (
                            reference_id,
                            protocol,
                            json.dumps(plan),
                            plan.get("source", ""),
                            time.time(),
                        ),
                    )
                ]
            )
        except sqlite3.IntegrityError:
            return False
        return True

    def references(self, protocol: str | None = None) -> list[dict[str, Any]]:
        if protocol is None:
            rows = self._query("SELECT plan FROM reference_plans ORDER BY created")
        else:
            rows = self._query(
                "SELECT plan FROM reference_plans WHERE protocol = ? ORDER BY created", (protocol,)
            )
        return [json.loads(r[0]) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
