"""The CLI's errors: one line with the status and the server's message, an exit code per class
(2 bad input, 3 unavailable, 4 not found / not possible now, 1 other), a traceback only with
--debug. Against a real orchestrator over gRPC, and one real process for the exit status."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import main
from tests.paths import PROTOCOLS, REPO_ROOT
from tests.services.test_orchestrator import TOKEN, Cluster

HARDER = str(PROTOCOLS / "tg119_cshape_harder.yaml")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cli"))
    try:
        yield c
    finally:
        c.close()


def _run(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, token: str
) -> tuple[int, str]:
    monkeypatch.setenv("RADPILOT_API_TOKEN", token)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize(
    ("args", "token", "code", "message"),
    [
        (["--max-iterations", "0"], TOKEN, 2, r"^radpilot: INVALID_ARGUMENT: max_iterations"),
        (["--param", "spacing_mm=0"], TOKEN, 2, r"^radpilot: INVALID_ARGUMENT: case parameter"),
        (["--agent", "llm"], TOKEN, 4, r"^radpilot: FAILED_PRECONDITION: agent 'llm' needs"),
        ([], "wrong", 1, r"^radpilot: UNAUTHENTICATED: missing or wrong bearer token"),
        (["--dicom", HARDER], TOKEN, 2, r"^radpilot: --dicom .*: not a folder"),
        (["--protocol", "/no/such.yaml"], TOKEN, 2, r"^radpilot: protocol file .* does not exist"),
    ],
)
def test_plan_errors_are_one_line_with_an_exit_code_per_class(
    cluster: Cluster,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    args: list[str],
    token: str,
    code: int,
    message: str,
) -> None:
    argv = ["plan", "--case", "analytic-cshape", "--param", "spacing_mm=8", "--out", str(tmp_path)]
    argv += ["--orchestrator", f"127.0.0.1:{cluster.orch.port}", *args]
    rc, err = _run(argv, capsys, monkeypatch, token)
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_export_of_an_unknown_job_is_not_found(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["export", "nope", "/tmp/x", "--orchestrator", f"127.0.0.1:{cluster.orch.port}"]
    rc, err = _run(argv, capsys, monkeypatch, TOKEN)
    assert rc == 4 and err.startswith("radpilot: NOT_FOUND: ")


def test_an_unreachable_orchestrator_exits_3_and_debug_shows_the_traceback(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "services", "plan", "--orchestrator", "127.0.0.1:1"]
    argv += ["--case", "analytic-cshape", "--out", str(tmp_path)]
    run = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert run.stderr.startswith("radpilot: UNAVAILABLE: ") and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    debug = subprocess.run(
        [argv[0], "-m", "services", "--debug", *argv[3:]],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr
