"""What the review page knows: logins, and the orchestrator's API (with the API token).

The login token is the API token itself: whoever may call the orchestrator may review. A login
opens a session (a random id in an HttpOnly, SameSite=Strict cookie, kept in memory here) with
its own CSRF token for the forms that change a job (feedback, approval).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from radpilot.v1 import orchestrator_pb2 as pb
from services.client import orchestrator_channel, orchestrator_stub

VIEW_CACHE = 256  # DVHs and rendered slices kept (an iteration's dose never changes once stored)


@dataclass(frozen=True)
class Session:
    expires: float
    csrf: str


class ReviewCore:
    def __init__(self, orchestrator: str, token: str, session_hours: float = 8.0) -> None:
        if not token:
            raise ValueError(
                "the review page needs RADPILOT_API_TOKEN: it is the login, and what the page "
                "presents to the orchestrator"
            )
        self._token = token
        self._channel = orchestrator_channel(orchestrator)
        self.stub = orchestrator_stub(self._channel, token)
        self.session_s = session_hours * 3600
        self._sessions: dict[str, Session] = {}
        self._views: OrderedDict[tuple[str, int, int], pb.GetIterationViewResponse] = OrderedDict()
        self._lock = threading.Lock()

    # -- logins ------------------------------------------------------------------------------------
    def login(self, presented: str) -> str | None:
        """A new session id when ``presented`` is the token, else None."""
        if not hmac.compare_digest(presented.strip().encode(), self._token.encode()):
            return None
        sid = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
            self._sessions[sid] = Session(now + self.session_s, secrets.token_urlsafe(24))
        return sid

    def session(self, sid: str | None) -> Session | None:
        with self._lock:
            s = self._sessions.get(sid or "")
            if s is None or s.expires < time.time():
                return None
            return s

    def logout(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    # -- the orchestrator --------------------------------------------------------------------------
    def jobs(self) -> list[pb.JobSummary]:
        return list(self.stub.ListPlanningJobs(pb.ListPlanningJobsRequest(), timeout=30).jobs)

    def job(self, job_id: str) -> pb.GetPlanningJobResponse:
        return self.stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30)

    def view(
        self, job_id: str, iteration: int, slice_index: int = -1
    ) -> pb.GetIterationViewResponse:
        """An iteration's DVH (and, for ``slice_index`` >= 0, that slice): kept once fetched,
        since a stored iteration's dose never changes (``iteration`` must not be 0 here)."""
        key = (job_id, iteration, slice_index)
        with self._lock:
            if key in self._views:
                self._views.move_to_end(key)
                return self._views[key]
        request = pb.GetIterationViewRequest(job_id=job_id, iteration=iteration, slice=slice_index)
        view = self.stub.GetIterationView(request, timeout=120)
        with self._lock:
            self._views[key] = view
            while len(self._views) > VIEW_CACHE:
                self._views.popitem(last=False)
        return view

    def watch(self, job_id: str, from_sequence: int = 0) -> Any:
        """The job's event stream: an iterator of WatchPlanningResponse with ``cancel()``."""
        request = pb.WatchPlanningRequest(job_id=job_id, from_sequence=from_sequence)
        return self.stub.WatchPlanning(request, timeout=24 * 3600)

    def feedback(self, job_id: str, text: str) -> int:
        request = pb.SubmitFeedbackRequest(job_id=job_id, text=text)
        return self.stub.SubmitFeedback(request, timeout=30).applies_from_iteration

    def approve(self, job_id: str, description: str) -> pb.ApprovePlanResponse:
        request = pb.ApprovePlanRequest(job_id=job_id, description=description)
        return self.stub.ApprovePlan(request, timeout=120)

    def export(self, job_id: str) -> pb.ExportPlanResponse:
        return self.stub.ExportPlan(pb.ExportPlanRequest(job_id=job_id), timeout=600)

    def close(self) -> None:
        self._channel.close()
