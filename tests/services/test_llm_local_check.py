"""make llm-local-check: skipped without a model file; against a running endpoint (here the
scripted server standing in for llama.cpp/vLLM/Ollama) it runs two LLM iterations and reports
valid answers, fallbacks and seconds per call."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.llm_local_check import main, summarise
from tests.doubles.llm_server import ScriptedLLMServer


def test_without_a_model_file_it_is_skipped_with_the_reason(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLM_GGUF", raising=False)
    assert main([]) == 0
    assert "skipped: no model file given" in capsys.readouterr().out
    assert main(["--gguf", "/nonexistent/model.gguf"]) == 2


def test_against_a_running_endpoint_it_reports_valid_answers_and_fallbacks(
    llm_server: ScriptedLLMServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--base-url", llm_server.base_url, "--model", "scripted", "--out", str(tmp_path)]
    assert main([*argv, "--store", str(tmp_path / "store"), "--iterations", "2"]) == 0
    result = json.loads((tmp_path / "llm-check.json").read_text())
    assert result["asked"] >= 3 and result["valid_rate"] == 1.0 and result["fallbacks"] == 0
    assert set(result["by_role"]) >= {"dvh_expert", "evaluator"}
    assert "valid (100 %)" in capsys.readouterr().out


def test_summary_counts_skipped_experts_out_and_invalid_answers_in() -> None:
    calls = [
        {"role": "dvh_expert", "outcome": "invalid", "validation": "invalid: ...", "attempts": 1},
        {"role": "vision_expert", "outcome": "skipped", "validation": "text-only", "attempts": 0},
        {"role": "evaluator", "outcome": "used", "validation": "ok", "attempts": 1, "seconds": 2},
        {
            "role": "planner",
            "outcome": "fallback",
            "validation": "bad",
            "attempts": 1,
            "seconds": 4,
        },
    ]
    s = summarise(calls)
    assert (s["asked"], s["valid_answers"], s["fallbacks"]) == (3, 1, 1)
    assert s["valid_rate"] == pytest.approx(1 / 3, abs=1e-3) and s["seconds_per_call_max"] == 4
