"""The LLM client against a real local OpenAI-compatible server: retries, timeouts, a server
that is down, structured output refused, token accounting, and the tolerant answer parsers."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Iterator

import pytest

from radpilot.agents.llm_evaluator import parse_evaluation
from radpilot.agents.llm_planner import ProposalError, validate_proposal
from radpilot.evaluation.rules import Decision
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.llm.client import LLMClient, LLMError, LLMSettings, image_part
from radpilot.llm.parse import ParseError, find_json_object
from tests.doubles.llm_server import Reply, ScriptedLLMServer


class Script:
    """Replies served in order (the last one repeats)."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.n = 0

    def __call__(self, request: dict) -> Reply:
        r = self.replies[min(self.n, len(self.replies) - 1)]
        self.n += 1
        return r


@pytest.fixture
def server() -> Iterator[ScriptedLLMServer]:
    with ScriptedLLMServer(Script(Reply("hello"))) as srv:
        yield srv


def _client(srv: ScriptedLLMServer, **kw: object) -> LLMClient:
    settings = {"base_url": srv.base_url, "model": "m", "backoff_s": 0.01, "retries": 2, **kw}
    return LLMClient(LLMSettings(**settings))  # type: ignore[arg-type]


def test_settings_from_env_and_not_configured() -> None:
    s = LLMSettings.from_env(
        {
            "OPENAI_BASE_URL": "http://h:1/v1",
            "RADPILOT_LLM_MODEL": "qwen",
            "RADPILOT_LLM_VISION": "0",
        }
    )
    assert (s.base_url, s.model, s.vision, s.configured) == ("http://h:1/v1", "qwen", False, True)
    assert "api_key" not in s.describe()
    with pytest.raises(match="OPENAI_BASE_URL"):
        LLMClient(LLMSettings.from_env({}))
    with pytest.raises(ValueError, match="json_mode"):
        LLMSettings(json_mode="yaml")


def test_answer_tokens_and_audit_without_image_bytes(server: ScriptedLLMServer) -> None:
    client = _client(server)
    png = b"\x89PNG\r\n\x1a\n" + bytes(100)
    text, call = client.chat(
        "vision_expert",
        [{"role": "user", "content": [{"type": "text", "text": "look"}, image_part(png)]}],
    )
    assert text == "hello" and call.outcome == "used" and call.attempts == 1
    assert call.prompt_tokens > 0 and call.completion_tokens >= 1
    assert call.images == 1 and len(call.image_sha256[0]) == 64
    # the server saw the image as a data URL; the audit keeps only its hash
    sent = server.requests[0]["messages"][0]["content"][1]["image_url"]["url"]
    assert sent.startswith("data:image/png;base64,")
    assert "base64" not in json.dumps(call.to_dict())


def test_429_then_success_is_retried() -> None:
    script = Script(Reply(status=429, headers={"Retry-After": "0"}), Reply("ok"))
    with ScriptedLLMServer(script) as srv:
        text, call = _client(srv).chat("planner", [{"role": "user", "content": "x"}])
    assert text == "ok" and call.attempts == 2 and len(srv.requests) == 2


def test_persistent_5xx_gives_up_after_the_retries() -> None:
    with (
        ScriptedLLMServer(Script(Reply(status=503))) as srv,
        pytest.raises(LLMError, match="503") as info,
    ):
        _client(srv, retries=2).chat("planner", [{"role": "user", "content": "x"}])
    assert info.value.call.attempts == 3 and info.value.call.outcome == "error"


def test_timeout_and_server_down() -> None:
    with (
        ScriptedLLMServer(Script(Reply("late", delay_s=1.5))) as srv,
        pytest.raises(LLMError, match="Timeout") as info,
    ):
        _client(srv, timeout_s=0.3, retries=1).chat("planner", [{"role": "user", "c": 1}])
    assert info.value.call.attempts == 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    client = LLMClient(LLMSettings(base_url=f"http://127.0.0.1:{port}/v1", retries=1, backoff_s=0))
    with pytest.raises(LLMError, match="Connection"):
        client.chat("planner", [{"role": "user", "content": "x"}])


def test_structured_output_refused_falls_back_to_text_mode() -> None:
    def responder(req: dict) -> Reply:
        if "response_format" in req:
            return Reply(status=400, error="response_format is not supported")
        return Reply("<DECISION>meets_protocol</DECISION>")

    with ScriptedLLMServer(responder) as srv:
        client = _client(srv)
        text, call = client.chat("evaluator", [{"role": "user", "content": "x"}], schema={})
    assert "DECISION" in text and call.request["response_format"] == "text"
    assert srv.requests[0]["response_format"]["type"] == "json_schema"
    assert srv.requests[1]["response_format"]["type"] == "json_object"
    assert "response_format" not in srv.requests[2]
    assert call.attempts == 1 and client.json_mode == "text"  # remembered, not retried


# how common OpenAI-compatible servers refuse a response format they cannot do
SERVER_QUIRKS = {
    # llama.cpp's server: HTTP 500 for a json_schema it cannot turn into a grammar
    "llama.cpp": (500, {"json_schema"}, "Failed to parse grammar from response_format json_schema"),
    # vLLM: 400 when guided decoding is not available for the schema
    "vllm": (400, {"json_schema"}, "guided decoding: unsupported json_schema in response_format"),
    # a server that validates the request body: 422 for any response_format
    "strict-validator": (422, {"json_schema", "json_object"}, "Unprocessable: response_format"),
}


@pytest.mark.parametrize("server", sorted(SERVER_QUIRKS))
def test_each_servers_way_of_refusing_a_format_leads_to_one_it_accepts(server: str) -> None:
    status, refused, message = SERVER_QUIRKS[server]

    def responder(req: dict) -> Reply:
        kind = req.get("response_format", {}).get("type")
        if kind in refused:
            return Reply(status=status, error=message)
        return Reply('{"decision": "meets_protocol"}')

    with ScriptedLLMServer(responder) as srv:
        client = _client(srv)
        for _ in range(2):
            text, call = client.chat("evaluator", [{"role": "user", "content": "x"}], schema={})
            assert "meets_protocol" in text and call.outcome == "used"
    accepted = "text" if "json_object" in refused else "json_object"
    assert client.json_mode == accepted
    # the second call went straight to the accepted mode: no repeated refusals
    assert len(srv.requests) == len(refused) + 2


def test_a_500_that_is_not_about_the_format_is_retried_not_downgraded() -> None:
    with ScriptedLLMServer(lambda req: Reply(status=500, error="CUDA out of memory")) as srv:
        client = _client(srv)
        with pytest.raises(LLMError, match="HTTP 500"):
            client.chat("evaluator", [{"role": "user", "content": "x"}], schema={})
    assert client.json_mode == "json_schema"
    assert all(r["response_format"]["type"] == "json_schema" for r in srv.requests)


def test_the_circuit_opens_after_failures_in_a_row_and_closes_after_the_cool_down() -> None:
    answers = iter([Reply(status=503, error="down")] * 4 + [Reply("back")] * 10)
    with ScriptedLLMServer(lambda req: next(answers)) as srv:
        client = LLMClient(
            LLMSettings(
                base_url=srv.base_url,
                retries=0,
                backoff_s=0,
                breaker_failures=2,
                breaker_cooldown_s=0.5,
            )
        )
        for _ in range(2):
            with pytest.raises(LLMError, match="HTTP 503"):
                client.chat("planner", [{"role": "user", "content": "x"}])
        sent = len(srv.requests)
        with pytest.raises(LLMError, match="circuit open") as info:
            client.chat("planner", [{"role": "user", "content": "x"}])
        assert len(srv.requests) == sent  # not called while open
        assert info.value.call.attempts == 0 and info.value.call.validation == "circuit open"
        time.sleep(0.6)
        with pytest.raises(LLMError, match="HTTP 503"):  # half-open: one try, still down
            client.chat("planner", [{"role": "user", "content": "x"}])
        with pytest.raises(LLMError, match="HTTP 503"):
            client.chat("planner", [{"role": "user", "content": "x"}])
        time.sleep(0.6)
        text, call = client.chat("planner", [{"role": "user", "content": "x"}])
    assert text == "back" and call.request["parameters"]["max_tokens"] == 2000


def test_sampling_parameters_are_sent_and_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADPILOT_LLM_SEED", "7")
    monkeypatch.setenv("RADPILOT_LLM_TEMPERATURE", "0.3")
    monkeypatch.setenv("RADPILOT_LLM_MAX_TOKENS", "512")
    with ScriptedLLMServer(lambda req: Reply("ok")) as srv:
        monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
        client = LLMClient(LLMSettings.from_env())
        _, call = client.chat("planner", [{"role": "user", "content": "x"}])
    sent = srv.requests[0]
    assert (sent["seed"], sent["temperature"], sent["max_tokens"]) == (7, 0.3, 512)
    assert call.request["parameters"] == {"temperature": 0.3, "seed": 7, "max_tokens": 512}
    with pytest.raises(ValueError, match="temperature"):
        LLMSettings(temperature=5)
    assert LLMSettings(timeout_s=10, retries=2, backoff_s=1).worst_call_s() == 30 + 1.5 + 3


def test_json_found_in_prose_and_fences() -> None:
    assert find_json_object('Sure! ```json\n{"a": 1}\n``` done') == {"a": 1}
    assert find_json_object('thinking {"x": "}"} and finally {"a": {"b": 2}}') == {"a": {"b": 2}}
    with pytest.raises(ParseError):
        find_json_object("no json here {broken")


def test_evaluation_parser_json_and_tagged_text() -> None:
    d, unmet, _ = parse_evaluation(
        '{"decision": "needs_improvement", "unmet": [{"factor": "D10", "structure": "Core",'
        ' "reason": "12 Gy > 10 Gy"}], "suggestions": "spare the core"}'
    )
    assert d is Decision.NEEDS_IMPROVEMENT and unmet == ["Core: D10 - 12 Gy > 10 Gy"]
    d, unmet, sug = parse_evaluation(
        "Analysis...\n<DECISION>needs improvement</DECISION>\n<UNMET>\n- Core D10: 12 Gy\n"
        "- PTV D10: 56 Gy\n</UNMET><SUGGESTIONS>more core weight</SUGGESTIONS>"
    )
    assert d is Decision.NEEDS_IMPROVEMENT and len(unmet) == 2 and sug == "more core weight"
    assert parse_evaluation("<DECISION>meets_protocol")[0] is Decision.MEETS_PROTOCOL
    for bad in ("the plan looks fine", '{"decision": "maybe"}', '{"decision": "x", "unmet": 3}'):
        with pytest.raises(ParseError):
            parse_evaluation(bad)


CURRENT = [
    ObjectiveTerm("PTV", "squared_deviation", 50.0, 100.0),
    ObjectiveTerm("Core", "squared_overdose", 8.0, 100.0),
]


def _terms(**over: dict) -> dict:
    base = {
        "PTV:squared_deviation": {"weight": 120.0, "dose_gy": 50.0},
        "Core:squared_overdose": {"weight": 200.0, "dose_gy": 7.0},
    }
    base.update(over)
    return {"terms": base, "rationale": "more core"}


def test_proposal_validation() -> None:
    terms, why = validate_proposal(_terms(), CURRENT, 50.0)
    assert [t.weight for t in terms] == [120.0, 200.0] and terms[1].dose_gy == 7.0
    assert why == "more core"
    bad = [
        ({"terms": []}, '"terms"'),
        ({"terms": {**_terms()["terms"], "Bladder:squared_overdose": {"weight": 1}}}, "unknown"),
        ({"terms": {"PTV:squared_deviation": {"weight": 1, "dose_gy": 50}}}, "missing"),
        (_terms(**{"Core:squared_overdose": {"weight": -5, "dose_gy": 7}}), "positive"),
        (_terms(**{"Core:squared_overdose": {"weight": math.nan, "dose_gy": 7}}), "finite"),
        (_terms(**{"Core:squared_overdose": {"weight": "lots", "dose_gy": 7}}), "numbers"),
        (_terms(**{"Core:squared_overdose": {"weight": 100, "dose_gy": -1}}), "negative"),
        (_terms(**{"Core:squared_overdose": {"weight": 10000, "dose_gy": 7}}), "within"),
        (_terms(**{"Core:squared_overdose": {"weight": 100, "dose_gy": 30}}), "at most"),
        (_terms(**{"Core:squared_overdose": {"weight": True, "dose_gy": 7}}), "boolean"),
    ]
    for data, match in bad:
        with pytest.raises(ProposalError, match=match):
            validate_proposal(data, CURRENT, 50.0)


def test_a_step_of_exactly_the_bound_passes_and_drift_is_bounded_over_the_whole_plan() -> None:
    # exactly 1/5 and 5 x the current weight, and exactly 20 % of the prescription in dose
    for w, d in ((100.0 / 5, 8.0), (100.0 * 5, 8.0), (100.0, 8.0 + 0.2 * 50)):
        on_the_bound = _terms(**{"Core:squared_overdose": {"weight": w, "dose_gy": d}})
        validate_proposal(on_the_bound, CURRENT, 50.0)
    for w in (3 / 7, 5 / 7):  # w / (5 w) rounds to just below 1/5 for these
        current = [ObjectiveTerm("PTV", "squared_deviation", 50.0, 120.0),
                   ObjectiveTerm("Core", "squared_overdose", 7.0, w * 5)]  # fmt: skip
        validate_proposal(
            _terms(**{"Core:squared_overdose": {"weight": w, "dose_gy": 7.0}}), current, 50.0
        )
    # a model that drifts a little each step cannot leave the range around the protocol's values
    initial = [ObjectiveTerm("PTV", "squared_deviation", 50.0, 120.0),
               ObjectiveTerm("Core", "squared_overdose", 7.0, 2.0)]  # fmt: skip
    drifted = _terms(**{"Core:squared_overdose": {"weight": 250.0, "dose_gy": 7.0}})
    with pytest.raises(ProposalError, match="protocol's 2"):
        validate_proposal(drifted, CURRENT, 50.0, initial)
    far = [ObjectiveTerm("PTV", "squared_deviation", 50.0, 120.0),
           ObjectiveTerm("Core", "squared_overdose", 95.0, 200.0)]  # fmt: skip
    with pytest.raises(ProposalError, match="twice the prescription"):
        validate_proposal(
            _terms(**{"Core:squared_overdose": {"weight": 200.0, "dose_gy": 104.0}}), far, 50.0
        )


def test_a_kind_with_a_parameter_keeps_it_and_the_prompt_says_what_it_does() -> None:
    from radpilot.llm.prompts import planner_messages
    from radpilot.protocol import load_protocol
    from tests.paths import REPO_ROOT

    current = [*CURRENT, ObjectiveTerm("Core", "max_dvh", 9.0, 50.0, 20.0)]
    answer = _terms(**{"Core:max_dvh": {"weight": 80.0, "dose_gy": 8.0}})
    terms, _ = validate_proposal(answer, current, 50.0)
    assert terms[2] == ObjectiveTerm("Core", "max_dvh", 8.0, 80.0, 20.0)  # parameter kept
    protocol = load_protocol(REPO_ROOT / "protocols" / "tg119_cshape_harder.yaml")
    user = planner_messages(protocol, current, [], [], [], "", 5.0, 10.0)[1]["content"]
    assert "- max_dvh: at most parameter % of the volume above dose_gy" in user
    assert "Core:max_dvh has parameter volume_pct = 20" in user
    assert "- squared_overdose: penalises dose above dose_gy" in user
    in_plan, to_add = user.split("When weights and doses alone")
    assert "- geud" not in in_plan  # only the kinds the plan uses ...
    assert "- geud: generalised EUD" in to_add  # ... every kind for a new term
    assert "(parameter a within [-100, 100], required)" in to_add
