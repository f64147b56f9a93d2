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


# what the bad-input suite (tests/services/test_bad_inputs.py) tried, printed after the run: its
# tests record their counts as a report property, which pytest-xdist carries from its workers
BAD_INPUT_PROPERTY = "bad_input_counts"
BAD_INPUT_COUNTS: dict[str, int] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    for name, value in report.user_properties:
        if name == BAD_INPUT_PROPERTY and isinstance(value, dict):
            BAD_INPUT_COUNTS.update(value)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    c = BAD_INPUT_COUNTS
    parts = []
    if "tried" in c:
        parts.append(
            f"{c['tried']} bad inputs tried, {c['clear']} answered with a clear client error"
        )
    if "auth_tried" in c:
        parts.append(f"{c['auth_tried']} auth probes, {c['auth_held']} held")
    if parts:
        terminalreporter.write_line("bad-input suite: " + "; ".join(parts))
