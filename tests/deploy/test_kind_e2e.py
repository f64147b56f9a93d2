"""The parts of ``make kind-e2e`` that run without docker: the driver skips cleanly, the in-cluster
client Job is valid and hardened, and its command — the same CLI the local tests use — plans a
case through a real orchestrator and prints a summary the driver can parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.kind_e2e import client_job, missing_tools, parse_summary
from services.cli import build_parser
from tests.deploy.test_k8s_manifests import policy_violations, validate
from tests.doubles.cluster import LLMCluster
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT


def test_skips_with_a_reason_without_docker_and_kind() -> None:
    if missing_tools() is None:
        pytest.skip("docker and kind are here: run make kind-e2e itself")
    out = subprocess.run(
        [sys.executable, "-m", "deploy.kind_e2e"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0 and "kind-e2e: SKIPPED" in out.stdout


def test_client_job_is_valid_and_hardened() -> None:
    job = client_job("plan-1", "tg119_cshape_harder.yaml", 4)
    assert validate(yaml.safe_dump(job)).returncode == 0
    assert policy_violations([job]) == [
        "plan-1/client: no readinessProbe",
        "plan-1/client: no livenessProbe",
    ]  # a batch Job runs to completion: probes do not apply
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert labels["radpilot.io/client"] == "true"  # the NetworkPolicy that lets it reach the API
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    args = build_parser().parse_args(cmd[3:])
    assert args.orchestrator.endswith(":50050") and args.print_summary


def test_client_command_plans_through_an_orchestrator(tmp_path: Path) -> None:
    from radpilot.llm.client import LLMSettings

    cluster = LLMCluster(tmp_path / "svc", LLMSettings(), "")
    try:
        cmd = client_job("plan-x", "tg119_cshape_easier.yaml", 2)["spec"]["template"]["spec"][
            "containers"
        ][0]["command"]
        cmd = [
            {
                "python3": sys.executable,
            }.get(c, c)
            for c in cmd
        ]
        cmd[cmd.index("--orchestrator") + 1] = f"127.0.0.1:{cluster.orch.port}"
        proto = cmd.index("--protocol") + 1
        cmd[proto] = str(ROOT / "protocols" / Path(cmd[proto]).name)
        cmd[cmd.index("--out") + 1] = str(tmp_path / "out")
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        cluster.close()
    assert out.returncode == 0, out.stderr[-2000:]
    summary = parse_summary(out.stdout)
    assert summary["iterations"] >= 1 and summary["protocol"] == "tg119-cshape-easier"
    assert summary["job_id"] and (tmp_path / "out" / "report.html").is_file()
