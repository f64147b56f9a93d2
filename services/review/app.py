"""The review page's routes (Starlette): log in, jobs, a job's live page, feedback, approval,
export. Every route but /login and /healthz needs a session; the forms that change a job also
need the session's CSRF token. Orchestrator errors become pages that say what went wrong."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import anyio.to_thread
import grpc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Route

from radpilot.v1 import orchestrator_pb2 as pb
from services.review import pages
from services.review.core import ReviewCore, Session

log = logging.getLogger(__name__)
COOKIE = "radpilot_review"
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
MAX_FEEDBACK = 2000


def _problem(exc: grpc.RpcError) -> tuple[int, str]:
    code = exc.code()
    return HTTP_STATUS.get(code, 502), f"{code.name}: {exc.details()}"


def create_app(core: ReviewCore, secure_cookie: bool = False) -> Starlette:
    def session(request: Request) -> Session | None:
        return core.session(request.cookies.get(COOKIE))

    def to_login() -> Response:
        return RedirectResponse("/login", status_code=303)

    async def call(fn: Any, *args: Any) -> Any:
        return await anyio.to_thread.run_sync(fn, *args)

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def login_form(request: Request) -> Response:
        return HTMLResponse(pages.login_page())

    async def login(request: Request) -> Response:
        form = await request.form()
        sid = core.login(str(form.get("token", "")))
        if sid is None:
            log.warning("review login refused (wrong token) from %s", request.client)
            return HTMLResponse(pages.login_page("That token is not this installation's."), 401)
        response = RedirectResponse("/jobs", status_code=303)
        response.set_cookie(
            COOKIE, sid, max_age=int(core.session_s), httponly=True, samesite="strict",
            secure=secure_cookie,
        )  # fmt: skip
        return response

    async def logout(request: Request) -> Response:
        core.logout(request.cookies.get(COOKIE))
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE)
        return response

    async def index(request: Request) -> Response:
        return RedirectResponse("/jobs", status_code=303)

    async def jobs(request: Request) -> Response:
        if session(request) is None:
            return to_login()
        try:
            found = await call(core.jobs)
        except grpc.RpcError as exc:
            status, text = _problem(exc)
            return HTMLResponse(pages.page("Jobs", "", error=text), status)
        return HTMLResponse(pages.jobs_page(found))

    async def _views(job: pb.GetPlanningJobResponse) -> list[pb.GetIterationViewResponse]:
        out = []
        for r in job.iterations:
            try:
                out.append(await call(core.view, job.job_id, r.iteration, -1))
            except grpc.RpcError:  # an iteration without a stored dose has no curve
                continue
        return out

    async def job_page(request: Request) -> Response:
        s = session(request)
        if s is None:
            return to_login()
        job_id = request.path_params["job_id"]
        try:
            job = await call(core.job, job_id)
            views = await _views(job)
        except grpc.RpcError as exc:
            status, text = _problem(exc)
            return HTMLResponse(pages.page("Job", "", error=text), status)
        best = job.best_iteration or (job.iterations[-1].iteration if job.iterations else 0)
        start = next((v for v in views if v.iteration == best), views[-1] if views else None)
        note = request.query_params.get("note", "")
        error = request.query_params.get("error", "")
        return HTMLResponse(pages.job_page(job, views, start, s.csrf, note, error))

    async def fragment(request: Request) -> Response:
        if session(request) is None:
            return PlainTextResponse("log in again", 401)
        job_id, part = request.path_params["job_id"], request.path_params["part"]
        if part not in ("iterations", "state", "dvh"):
            return PlainTextResponse(f"no page {part!r} here", 404)
        try:
            job = await call(core.job, job_id)
            if part == "iterations":
                return HTMLResponse(pages.iterations_fragment(job))
            if part == "state":
                return HTMLResponse(pages.state_fragment(job))
            return HTMLResponse(pages.dvh_fragment(await _views(job), job.best_iteration))
        except grpc.RpcError as exc:
            status, text = _problem(exc)
            return PlainTextResponse(text, status)

    async def events(request: Request) -> Response:
        if session(request) is None:
            return PlainTextResponse("log in again", 401)
        stream = core.watch(request.path_params["job_id"])

        async def feed() -> AsyncIterator[str]:
            try:
                while True:
                    event = await anyio.to_thread.run_sync(
                        next, stream, None, abandon_on_cancel=True
                    )
                    if event is None:
                        return
                    yield f"data: {json.dumps(pages.event_text(event))}\n\n"
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.CANCELLED:
                    text = f"live updates stopped: {exc.details()}"
                    yield f"data: {json.dumps({'kind': 'error', 'text': text, 'done': True})}\n\n"
            finally:
                stream.cancel()  # the browser left: stop the server stream too

        return StreamingResponse(
            feed(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def slice_png(request: Request) -> Response:
        if session(request) is None:
            return PlainTextResponse("log in again", 401)
        p = request.path_params
        try:
            view = await call(core.view, p["job_id"], p["iteration"], p["index"])
        except grpc.RpcError as exc:
            status, text = _problem(exc)
            return PlainTextResponse(text, status)
        return Response(
            view.slice_png,
            media_type="image/png",
            headers={"Cache-Control": "private, max-age=3600"},
        )

    async def _form(request: Request) -> tuple[str, dict[str, str]] | Response:
        """A job form's (job id, fields), or the response refusing it: no session (to the
        login page) or no CSRF token of this session (403)."""
        s = session(request)
        if s is None:
            return to_login()
        form = await request.form()
        if str(form.get("csrf", "")) != s.csrf:
            return PlainTextResponse("the form is stale: reload the page and send it again", 403)
        return request.path_params["job_id"], {k: str(v) for k, v in form.items()}

    def back(job_id: str, **message: str) -> Response:
        key, text = next(iter(message.items()))
        return RedirectResponse(f"/jobs/{quote(job_id)}?{key}={quote(text)}", status_code=303)

    async def feedback(request: Request) -> Response:
        checked = await _form(request)
        if isinstance(checked, Response):
            return checked
        job_id, form = checked
        text = form.get("text", "").strip()
        if not text or len(text) > MAX_FEEDBACK:
            return back(job_id, error=f"Feedback must be 1 to {MAX_FEEDBACK} characters.")
        try:
            applies = await call(core.feedback, job_id, text)
        except grpc.RpcError as exc:
            return back(job_id, error=_problem(exc)[1])
        return back(job_id, note=f"Feedback sent: it applies from iteration {applies}.")

    async def approve(request: Request) -> Response:
        checked = await _form(request)
        if isinstance(checked, Response):
            return checked
        job_id, form = checked
        try:
            r = await call(core.approve, job_id, form.get("description", "").strip())
        except grpc.RpcError as exc:
            return back(job_id, error=_problem(exc)[1])
        return back(
            job_id,
            note=f"Approved: reference {r.reference_id} added to {r.protocol} "
            f"({r.references} reference plans now).",
        )

    async def export(request: Request) -> Response:
        if session(request) is None:
            return to_login()
        job_id = request.path_params["job_id"]
        try:
            r = await call(core.export, job_id)
        except grpc.RpcError as exc:
            return back(job_id, error=_problem(exc)[1])
        return Response(
            r.bundle,
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{r.filename}"'},
        )

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/login", login_form, methods=["GET"]),
        Route("/login", login, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Route("/jobs", jobs),
        Route("/jobs/{job_id}", job_page),
        Route("/jobs/{job_id}/events", events),
        Route("/jobs/{job_id}/export", export),
        Route("/jobs/{job_id}/feedback", feedback, methods=["POST"]),
        Route("/jobs/{job_id}/approve", approve, methods=["POST"]),
        Route("/jobs/{job_id}/iterations/{iteration:int}/slices/{index:int}.png", slice_png),
        Route("/jobs/{job_id}/{part:str}", fragment),
    ]
    return Starlette(routes=routes)
