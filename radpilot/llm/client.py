"""LLM access over any OpenAI-compatible Chat Completions endpoint, with an audit record per call.

Configuration comes from the environment (or explicit arguments), so a hospital can point RadPilot
at a model server inside its own network:

- ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``: the official client's own variables (a local server
  that ignores keys needs none; a placeholder is sent);
- ``RADPILOT_LLM_MODEL`` (default ``gpt-4o``), ``RADPILOT_LLM_TIMEOUT_S`` (per request, 120),
  ``RADPILOT_LLM_RETRIES`` (3), ``RADPILOT_LLM_VISION`` (1; 0 for a text-only model),
  ``RADPILOT_LLM_JSON`` (``json_schema`` | ``json_object`` | ``text``: how strict output is asked),
  ``RADPILOT_LLM_TEMPERATURE`` (0), ``RADPILOT_LLM_SEED`` (none), ``RADPILOT_LLM_MAX_TOKENS``
  (2000), ``RADPILOT_LLM_BREAKER_FAILURES`` (3) and ``RADPILOT_LLM_BREAKER_COOLDOWN_S`` (300).

An endpoint that refuses the structured-output request (HTTP 400, 422, or a 500 that names the
response format, as llama.cpp's server answers) is asked again less strictly: ``json_schema`` ->
``json_object`` -> tagged text, remembered for the client's life; one that refuses images (a 400,
or llama.cpp's 500, naming them) gets no more images from this client (the vision expert is
switched off, recorded).
A circuit breaker stops calling an endpoint after N failed calls in a row, for a cool-down: the
agents fall back at once instead of waiting out every timeout. ``worst_call_s`` is the longest
one logical call may take (all attempts and backoffs), from which the orchestrator derives its
step deadlines.

Retries (429, 5xx, timeouts, refused connections) are done here with exponential backoff and
jitter, honouring ``Retry-After``, so that every attempt is counted in the audit record. Image bytes
never enter the audit: each image is replaced by its SHA-256.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from radpilot.errors import AgentNotConfiguredError

DEFAULT_MODEL = "gpt-4o"
JSON_MODES = ("json_schema", "json_object", "text")


class LLMError(RuntimeError):
    """The endpoint could not give an answer (after retries), or rejected the request."""

    def __init__(self, message: str, call: LLMCall, status: int | None = None) -> None:
        super().__init__(message)
        self.call = call
        self.status = status


@dataclass(frozen=True)
class LLMSettings:
    model: str = DEFAULT_MODEL
    base_url: str | None = None
    api_key: str | None = None
    timeout_s: float = 120.0
    retries: int = 3
    backoff_s: float = 1.0
    vision: bool = True
    json_mode: str = "json_schema"
    temperature: float = 0.0
    seed: int | None = None
    max_tokens: int = 2000
    breaker_failures: int = 3  # failed calls in a row that open the circuit (0 = never)
    breaker_cooldown_s: float = 300.0

    def __post_init__(self) -> None:
        if self.json_mode not in JSON_MODES:
            raise ValueError(f"json_mode must be one of {', '.join(JSON_MODES)}")
        if self.timeout_s <= 0 or self.retries < 0 or self.backoff_s < 0:
            raise ValueError("timeout_s must be positive; retries and backoff_s not negative")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be within 0..2, got {self.temperature}")
        if not 16 <= self.max_tokens <= 100_000:
            raise ValueError(f"max_tokens must be within 16..100000, got {self.max_tokens}")
        if self.breaker_failures < 0 or self.breaker_cooldown_s < 0:
            raise ValueError("breaker_failures and breaker_cooldown_s must not be negative")

    def worst_call_s(self) -> float:
        """The longest one logical call can take: every attempt timing out, with the longest
        backoffs (jitter at most 1.5x; Retry-After is capped at 60 s)."""
        backoffs = sum(max(self.backoff_s * 2**k * 1.5, 0.0) for k in range(self.retries))
        return (self.retries + 1) * self.timeout_s + backoffs

    def parameters(self) -> dict[str, Any]:
        """The sampling parameters sent with (and recorded for) every call."""
        return {"temperature": self.temperature, "seed": self.seed, "max_tokens": self.max_tokens}

    @property
    def configured(self) -> bool:
        return bool(self.base_url or self.api_key)

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: Any) -> LLMSettings:
        e = os.environ if env is None else env
        values: dict[str, Any] = {
            "model": e.get("RADPILOT_LLM_MODEL") or DEFAULT_MODEL,
            "base_url": e.get("OPENAI_BASE_URL") or None,
            "api_key": e.get("OPENAI_API_KEY") or None,
            "timeout_s": float(e.get("RADPILOT_LLM_TIMEOUT_S") or 120.0),
            "retries": int(e.get("RADPILOT_LLM_RETRIES") or 3),
            "backoff_s": float(e.get("RADPILOT_LLM_BACKOFF_S") or 1.0),
            "vision": (e.get("RADPILOT_LLM_VISION") or "1").lower() not in ("0", "false", "no"),
            "json_mode": e.get("RADPILOT_LLM_JSON") or "json_schema",
            "temperature": float(e.get("RADPILOT_LLM_TEMPERATURE") or 0.0),
            "seed": int(e["RADPILOT_LLM_SEED"]) if e.get("RADPILOT_LLM_SEED") else None,
            "max_tokens": int(e.get("RADPILOT_LLM_MAX_TOKENS") or 2000),
            "breaker_failures": int(e.get("RADPILOT_LLM_BREAKER_FAILURES") or 3),
            "breaker_cooldown_s": float(e.get("RADPILOT_LLM_BREAKER_COOLDOWN_S") or 300.0),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        """What may be logged: never the key."""
        return {
            "model": self.model,
            "base_url": self.base_url or "(openai default)",
            "timeout_s": self.timeout_s,
            "retries": self.retries,
            "vision": self.vision,
            "json_mode": self.json_mode,
            **self.parameters(),
            "breaker": f"{self.breaker_failures} failures, {self.breaker_cooldown_s:g} s",
        }


@dataclass
class LLMCall:
    """The audit record of one logical call (all its attempts)."""

    role: str
    model: str
    request: dict[str, Any]  # messages with image bytes replaced by their hashes
    response_text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    attempts: int = 0
    # used | retried | fallback | error | skipped | overridden (the protocol check reversed the
    # model's "meets") | invalid (an expert's answer failed a sanity check and was not used)
    outcome: str = "used"
    validation: str = ""  # the parse/validation result, "ok" or what was wrong
    error: str = ""
    image_sha256: list[str] = field(default_factory=list)
    iteration: int = 0
    endpoint: str = ""  # the base URL the call went to (never the key)

    @property
    def images(self) -> int:
        return len(self.image_sha256)

    def to_dict(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "role": self.role,
            "model": self.model,
            "endpoint": self.endpoint,
            "images": self.images,
            "image_sha256": list(self.image_sha256),
            "outcome": self.outcome,
            "validation": self.validation,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "attempts": self.attempts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "request": self.request,
            "response_text": self.response_text,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LLMCall:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


def count_outcomes(calls: list[dict[str, Any]]) -> dict[str, int]:
    """How many audited calls (``LLMCall.to_dict()``) ended in each outcome."""
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.get("outcome", "")] = counts.get(c.get("outcome", ""), 0) + 1
    return counts


def image_part(png: bytes) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


def _redact(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """The messages as audited: each data-URL image becomes its SHA-256."""
    hashes: list[str] = []
    out: list[dict[str, Any]] = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image_url":
                    url = p["image_url"]["url"]
                    raw = base64.b64decode(url.split(",", 1)[1]) if "," in url else url.encode()
                    h = hashlib.sha256(raw).hexdigest()
                    hashes.append(h)
                    parts.append({"type": "image_url", "image_sha256": h, "bytes": len(raw)})
                else:
                    parts.append(p)
            out.append({**m, "content": parts})
        else:
            out.append(dict(m))
    return out, hashes


class LLMClient:
    """A thread-safe wrapper of ``openai.OpenAI`` that returns text plus an audit record."""

    def __init__(self, settings: LLMSettings) -> None:
        if not settings.configured:
            raise AgentNotConfiguredError(
                "no LLM endpoint is configured: set OPENAI_BASE_URL (a local OpenAI-compatible "
                "server) or OPENAI_API_KEY"
            )
        import openai  # imported here: a service without an endpoint starts ~1 s sooner

        self.settings = settings
        self._client = openai.OpenAI(
            base_url=settings.base_url,
            api_key=settings.api_key or "not-needed",
            timeout=settings.timeout_s,
            max_retries=0,  # retries are ours, so the audit counts them
        )
        self._json_mode = settings.json_mode
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._failures_in_a_row = 0
        self._open_until = 0.0  # the circuit is open (no calls) until this monotonic time
        self.images_refused = ""  # why the endpoint refused images (then no more are sent)

    @property
    def vision(self) -> bool:
        """Whether images may be sent: configured so, and not refused by the endpoint."""
        return self.settings.vision and not self.images_refused

    @property
    def endpoint(self) -> str:
        return self.settings.base_url or "(openai default)"

    def _response_format(self, schema: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
        if schema is None or self._json_mode == "text":
            return None
        if self._json_mode == "json_object":
            return {"type": "json_object"}
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}

    def chat(
        self,
        role: str,
        messages: list[dict[str, Any]],
        *,
        schema: dict[str, Any] | None = None,
        schema_name: str = "answer",
        max_tokens: int | None = None,
    ) -> tuple[str, LLMCall]:
        """One logical call with retries. Raises LLMError (its audit record attached as .call)."""
        import openai

        audited, hashes = _redact(messages)
        params = self.settings.parameters()
        if max_tokens is not None:
            params["max_tokens"] = max_tokens
        call = LLMCall(
            role,
            self.settings.model,
            {"messages": audited, "parameters": params},
            image_sha256=hashes,
            endpoint=self.endpoint,
        )
        t0 = time.perf_counter()
        with self._lock:
            closed_in = self._open_until - time.monotonic()
        if closed_in > 0:
            call.validation = "circuit open"
            return self._fail(
                call,
                t0,
                0,
                f"circuit open: {self.settings.breaker_failures} calls in a row failed; the "
                f"endpoint is not called for another {closed_in:.0f} s",
                None,
                count=False,
            )
        attempt = 0
        while True:
            attempt += 1
            fmt = self._response_format(schema, schema_name)
            kwargs: dict[str, Any] = {
                "model": self.settings.model,
                "messages": messages,
                "temperature": params["temperature"],
                "max_tokens": params["max_tokens"],
            }
            if params["seed"] is not None:
                kwargs["seed"] = params["seed"]
            if fmt is not None:
                kwargs["response_format"] = fmt
            call.request["response_format"] = fmt["type"] if fmt else "text"
            try:
                resp = self._client.chat.completions.create(**kwargs)
            except openai.APIStatusError as exc:  # 429 (RateLimitError) and 5xx are retried
                code = exc.status_code
                if fmt is not None and _refuses_format(code, exc):
                    # no structured output of this kind here: ask less strictly from now on
                    # (llama.cpp's server says so with a 500, vLLM with a 400 or 422)
                    self._downgrade(fmt["type"])
                    attempt -= 1  # not a failed attempt: the same question, asked differently
                    continue
                if hashes and code in (400, 500) and _refuses_images(exc):
                    # a text-only model (vLLM and Ollama say 400; llama.cpp without its vision
                    # projector may say 500): no more images to this endpoint, and no retry
                    with self._lock:
                        self.images_refused = _brief(exc)
                    return self._fail(call, t0, attempt, f"rejected: {_brief(exc)}", 400)
                if code == 400:
                    return self._fail(call, t0, attempt, f"rejected: {_brief(exc)}", 400)
                if (code == 429 or code >= 500) and attempt <= self.settings.retries:
                    self._sleep(attempt, exc.response.headers.get("retry-after"))
                    continue
                return self._fail(call, t0, attempt, f"HTTP {code}: {_brief(exc)}", code)
            except (openai.APITimeoutError, openai.APIConnectionError) as exc:
                if attempt <= self.settings.retries:
                    self._sleep(attempt, None)
                    continue
                return self._fail(call, t0, attempt, f"{type(exc).__name__}: {_brief(exc)}", None)
            break
        text = ""
        if resp.choices:
            text = resp.choices[0].message.content or ""
        call.response_text = text
        call.attempts = attempt
        call.seconds = time.perf_counter() - t0
        if resp.usage is not None:
            call.prompt_tokens = int(resp.usage.prompt_tokens or 0)
            call.completion_tokens = int(resp.usage.completion_tokens or 0)
            with self._lock:
                self.prompt_tokens += call.prompt_tokens
                self.completion_tokens += call.completion_tokens
        if not text.strip():
            call.outcome, call.error = "error", "empty answer"
            self._record(ok=False)
            raise LLMError("the model returned an empty answer", call)
        self._record(ok=True)
        return text, call

    def _downgrade(self, current: str) -> None:
        with self._lock:
            if self._json_mode == current:
                self._json_mode = "json_object" if current == "json_schema" else "text"

    @property
    def json_mode(self) -> str:
        """How structured output is asked for now (after any downgrade)."""
        return self._json_mode

    def _record(self, ok: bool) -> None:
        """Count failed calls in a row; open the circuit when there are enough."""
        with self._lock:
            if ok:
                self._failures_in_a_row = 0
                return
            self._failures_in_a_row += 1
            n = self.settings.breaker_failures
            if n and self._failures_in_a_row >= n:
                self._open_until = time.monotonic() + self.settings.breaker_cooldown_s
                self._failures_in_a_row = 0

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = self.settings.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random())
        if retry_after:
            with contextlib.suppress(ValueError):
                delay = max(delay, min(float(retry_after), 60.0))
        time.sleep(delay)

    def _fail(
        self,
        call: LLMCall,
        t0: float,
        attempts: int,
        message: str,
        status: int | None,
        count: bool = True,
    ) -> tuple[str, LLMCall]:
        call.outcome, call.error = "error", message
        call.attempts, call.seconds = attempts, time.perf_counter() - t0
        if count and status != 400:  # a rejected request says nothing of the endpoint's health
            self._record(ok=False)
        raise LLMError(message, call, status)


_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "response format", "grammar")


def _refuses_format(code: int, exc: Exception) -> bool:
    """An answer that says the endpoint cannot do the requested structured output."""
    return code in (400, 422, 500) and any(w in str(exc).lower() for w in _FORMAT_WORDS)


_IMAGE_WORDS = ("image", "multimodal", "vision", "mmproj")


def _refuses_images(exc: Exception) -> bool:
    """An error answer (400, or llama.cpp's 500) that says the model cannot take images."""
    return any(w in str(exc).lower() for w in _IMAGE_WORDS)


def _brief(exc: Exception) -> str:
    text = str(exc)
    return text if len(text) <= 300 else text[:297] + "..."


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def client_or_none(settings: LLMSettings) -> LLMClient | None:
    """A client when an endpoint is configured, else None (agent "llm" is then refused)."""
    return LLMClient(settings) if settings.configured else None
