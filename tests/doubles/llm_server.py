"""A small OpenAI-compatible HTTP server for tests and offline demos: scripted answers, recorded
requests, real sockets.

It serves ``POST /v1/chat/completions`` and ``GET /v1/models`` on loopback. Each request is
recorded (parsed JSON) and answered by a *responder*: a function from the request to a ``Reply``
(status, text, delay, headers). ``role_of`` tells which RadPilot prompt a request carries, so a
responder can answer the evaluator's experts, the aggregator and the planner differently.

``cooperative_responder`` is a scripted stand-in for a model (not a model): it reads the numbers
RadPilot put in the prompt and answers in the required formats, so a whole LLM-driven job can run
without a model. Run it by hand with ``python -m tests.doubles.llm_server --port 8089``.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from radpilot.llm.client import LLMSettings


@dataclass
class Reply:
    text: str = ""
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""  # error message for non-200 replies


Responder = Callable[[dict[str, Any]], Reply]


def _text_of(request: dict[str, Any]) -> str:
    parts = []
    for m in request.get("messages", []):
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts += [p.get("text", "") for p in c if p.get("type") == "text"]
    return "\n".join(parts)


def images_in(request: dict[str, Any]) -> int:
    n = 0
    for m in request.get("messages", []):
        c = m.get("content")
        if isinstance(c, list):
            n += sum(1 for p in c if p.get("type") == "image_url")
    return n


def role_of(request: dict[str, Any]) -> str:
    """Which RadPilot prompt this is: dvh_expert, vision_expert, evaluator, planner or other."""
    msgs = request.get("messages", [])
    system = msgs[0].get("content", "") if msgs else ""
    first_user = msgs[1].get("content", "") if len(msgs) > 1 else ""
    if isinstance(system, str) and "fluence-map optimiser" in system:
        return "planner"
    if images_in(request):
        return "vision_expert"
    if isinstance(first_user, str) and "Two reviewers" in first_user:
        return "evaluator"
    if isinstance(first_user, str) and "dose-volume histogram" in first_user:
        return "dvh_expert"
    return "other"


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that gave up: fine
            super().handle_error(request, client_address)


class ScriptedLLMServer:
    """``with ScriptedLLMServer(responder) as srv: srv.base_url`` -> ``http://127.0.0.1:PORT/v1``."""

    def __init__(self, responder: Responder, host: str = "127.0.0.1", port: int = 0) -> None:
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.raw_bodies: list[bytes] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(
                        200,
                        {
                            "object": "list",
                            "data": [
                                {"id": "scripted", "object": "model", "owned_by": "radpilot-tests"}
                            ],
                        },
                        {},
                    )
                else:
                    self._send(404, {"error": {"message": "not found"}}, {})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": f"no route {self.path}"}}, {})
                    return
                try:
                    req = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "body is not JSON"}}, {})
                    return
                with server._lock:
                    server.requests.append(req)
                    server.raw_bodies.append(raw)
                reply = server.responder(req)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                if reply.status != 200:
                    err = {"message": reply.error or f"scripted {reply.status}", "type": "test"}
                    self._send(reply.status, {"error": err}, reply.headers)
                    return
                prompt_tokens = len(_text_of(req)) // 4 + 85 * images_in(req)
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": req.get("model", "scripted"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": reply.text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {
                            "prompt_tokens": prompt_tokens,
                            "completion_tokens": len(reply.text) // 4,
                            "total_tokens": prompt_tokens + len(reply.text) // 4,
                        },
                    },
                    reply.headers,
                )

        self._httpd = _QuietServer((host, port), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def roles(self) -> list[str]:
        return [role_of(r) for r in self.requests]

    def start(self) -> ScriptedLLMServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> ScriptedLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_GOAL = re.compile(r"^- (\S+) (\S+) (<=|>=) (\S+) \S+: achieved (\S+) \S+ \((met|NOT met)", re.M)
_TARGET = re.compile(r"^Target: (\S+), prescription", re.M)
_CURRENT = re.compile(r"^Current parameters: (\{.*\})$", re.M)
_ALTERNATIVES = re.compile(r"give up to (\d+) further parameter set")


def cooperative_responder(request: dict[str, Any]) -> Reply:
    """Answers each RadPilot prompt sensibly from the numbers in it (a stand-in for a model)."""
    role = role_of(request)
    text = _text_of(request)
    target = (_TARGET.findall(text) or ["the target"])[0]
    if role == "dvh_expert":
        own = text.split("Values of the protocol's metrics")[-1]  # not the reference plans'
        missed = [m for m in _GOAL.findall(own) if m[5] == "NOT met"]
        lines = [f"{s} {metric} {cmp} {lim}: achieved {a}" for s, metric, cmp, lim, a, _ in missed]
        return Reply(
            "Analysis: "
            + ("; ".join(lines) + " are not met." if lines else f"every goal is met; {target} ok.")
        )
    if role == "vision_expert":
        return Reply(f"The high dose follows {target}; no hot spot is visible outside it.")
    if role == "evaluator":
        needs = "are not met" in text
        unmet = []
        for m in re.findall(r"(\S+ \S+ (?:<=|>=) \S+): achieved (\S+)", text):
            unmet.append(
                {"factor": m[0], "structure": m[0].split()[0], "reason": f"achieved {m[1]}"}
            )
        body = {
            "decision": "needs_improvement" if needs else "meets_protocol",
            "unmet": unmet if needs else [],
            "suggestions": "push harder on the missed goals" if needs else "",
        }
        return Reply(json.dumps(body))
    if role == "planner":
        current = json.loads(_CURRENT.findall(text)[-1])
        latest = text.split("Iteration ")[-1]
        weak = {m[0] for m in _GOAL.findall(latest) if m[5] == "NOT met"}
        terms = {}
        for key, v in current.items():
            structure = key.split(":")[0]
            factor = 2.0 if structure in weak else 1.0
            terms[key] = {"weight": v["weight"] * factor, "dose_gy": v["dose_gy"]}
        answer: dict[str, Any] = {
            "terms": terms,
            "rationale": f"doubled the weights on {sorted(weak)}",
        }
        asked = int((_ALTERNATIVES.findall(text) or ["0"])[0])
        if asked:  # a bolder and a more cautious step, then more of the same
            factors = [4.0, 1.5, 3.0, 1.25][:asked]
            answer["alternatives"] = [
                {
                    "terms": {
                        k: {
                            "weight": v["weight"] * (f if k.split(":")[0] in weak else 1.0),
                            "dose_gy": v["dose_gy"],
                        }
                        for k, v in current.items()
                    }
                }
                for f in factors
            ]
        return Reply(json.dumps(answer))
    return Reply("I can only answer RadPilot's prompts.")


def scripted_settings(server: ScriptedLLMServer, **kw: Any) -> LLMSettings:
    """Client settings for a scripted server: its URL, a model name, fast retries."""
    return LLMSettings(base_url=server.base_url, model="scripted", backoff_s=0.01, retries=1, **kw)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8089)
    args = ap.parse_args(argv)
    with ScriptedLLMServer(cooperative_responder, port=args.port) as srv:
        print(f"scripted OpenAI-compatible server on {srv.base_url} (Ctrl-C to stop)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    raise SystemExit(main())
