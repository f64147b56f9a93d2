from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from radpilot.case import Case
from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ROOT / "protocols"


@pytest.fixture(scope="session", autouse=True)
def _no_llm_endpoint_from_the_environment() -> Iterator[None]:
    """Tests that want an LLM start their own local server, and tests that want an API token or
    TLS set their own: none inherits the developer's."""
    saved = {
        k: os.environ.pop(k)
        for k in list(os.environ)
        if k.startswith(("OPENAI_", "RADPILOT_API_TOKEN", "RADPILOT_TLS_", "RADPILOT_HEALTH_"))
    }
    yield
    os.environ.update(saved)


@pytest.fixture(scope="session")
def store(tmp_path_factory: pytest.TempPathFactory) -> CaseStore:
    """The shared case store (``$RADPILOT_CASE_STORE``), so a second run skips pyRadPlan."""
    root = os.environ.get("RADPILOT_CASE_STORE")
    return CaseStore(root) if root else CaseStore(tmp_path_factory.mktemp("case-store"))


@pytest.fixture(scope="session")
def analytic_case(store: CaseStore) -> Case:
    return load_builtin("analytic-cshape", store)


@pytest.fixture(scope="session")
def tg119_case(store: CaseStore) -> Case:
    """TG-119 C-shape at the default (coarse) 5 mm grid and 5 mm bixels."""
    return load_builtin("tg119-cshape", store)


# what the bad-input suite (tests/services/test_bad_inputs.py) tried, printed after the run
BAD_INPUT_COUNTS: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if BAD_INPUT_COUNTS:
        terminalreporter.write_line(
            f"bad-input suite: {BAD_INPUT_COUNTS['tried']} bad inputs tried, "
            f"{BAD_INPUT_COUNTS['clear']} answered with a clear client error; "
            f"{BAD_INPUT_COUNTS['auth_tried']} auth probes, {BAD_INPUT_COUNTS['auth_held']} held"
        )
