"""Fixtures shared by the service tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.doubles.llm_server import ScriptedLLMServer, cooperative_responder


@pytest.fixture(scope="module")
def llm_server() -> Iterator[ScriptedLLMServer]:
    """A scripted OpenAI-compatible server on loopback that answers from the prompts' numbers."""
    with ScriptedLLMServer(cooperative_responder) as srv:
        yield srv
