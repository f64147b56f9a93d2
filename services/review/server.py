"""Review page wiring: the Starlette app on uvicorn, in a thread, with a drain on SIGTERM."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import uvicorn

from services.common.auth import load_token
from services.review.app import create_app
from services.review.config import ReviewConfig
from services.review.core import ReviewCore

log = logging.getLogger(__name__)


@dataclass
class RunningReview:
    server: uvicorn.Server
    thread: threading.Thread
    core: ReviewCore
    port: int

    def stop(self, grace_s: float) -> None:
        """Finish the requests in flight (live-update streams are closed) and stop."""
        self.server.should_exit = True
        self.thread.join(grace_s + 5)
        self.core.close()


def serve(config: ReviewConfig, token: str | None = None) -> RunningReview:
    """Start the page; ``token`` (default: RADPILOT_API_TOKEN) is the login and what the page
    presents to the orchestrator."""
    core = ReviewCore(
        config.orchestrator, load_token() if token is None else token, config.session_hours
    )
    host, _, port = config.address.rpartition(":")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(core),
            host=host,
            port=int(port),
            log_level="warning",
            timeout_graceful_shutdown=int(max(1, config.grace_s)),
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, name="review-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            core.close()
            raise RuntimeError(f"the review page could not listen on {config.address}")
        time.sleep(0.02)
    bound = int(server.servers[0].sockets[0].getsockname()[1])
    log.info("review serving on port %d (orchestrator %s)", bound, config.orchestrator)
    return RunningReview(server, thread, core, bound)
