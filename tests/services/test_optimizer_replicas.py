"""Two optimizer replicas as separate processes behind one round-robin channel."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.v1 import optimizer_pb2, optimizer_pb2_grpc, types_pb2
from services.common.channels import open_channel, replica_target
from services.launcher import port_in
from services.optimizer.server import SERVICE_NAME
from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
TERMS = [
    types_pb2.ObjectiveTerm(structure="PTV", kind="squared_deviation", dose_gy=50, weight=100),
    types_pb2.ObjectiveTerm(structure="Core", kind="squared_overdose", dose_gy=8, weight=60),
]


def _start(store: Path, name: str) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "RADPILOT_CASE_STORE": str(store), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.optimizer",
            "--address",
            "127.0.0.1:0",
            "--replica",
            name,
            "--grace-s",
            "1",
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()  # type: ignore[union-attr]
        port = port_in(line)
        if port:
            return proc, port
    proc.kill()
    raise RuntimeError(f"replica {name} did not start")


def test_calls_spread_over_replicas_and_survive_one_dying(tmp_path) -> None:
    store = CaseStore(tmp_path)
    case_id = load_builtin("analytic-cshape", store, spacing_mm=10.0).case_id
    procs = [_start(tmp_path, f"r{k}") for k in range(2)]
    try:
        target = replica_target([f"127.0.0.1:{port}" for _, port in procs])
        with open_channel(target, [SERVICE_NAME]) as channel:
            stub = optimizer_pb2_grpc.OptimizerServiceStub(channel)
            req = optimizer_pb2.OptimizeRequest(
                case_id=case_id, objectives=TERMS, max_iterations=20
            )
            served = {stub.Optimize(req, timeout=60).replica for _ in range(6)}
            assert served == {"r0", "r1"}  # round robin reached both; each prepared the case itself
            procs[0][0].kill()
            procs[0][0].wait(timeout=10)
            after = [stub.Optimize(req, timeout=60).replica for _ in range(4)]
            assert set(after) == {"r1"}
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def test_single_address_and_dns_targets() -> None:
    assert replica_target(["127.0.0.1:1"]) == "ipv4:127.0.0.1:1"
    assert replica_target(["dns:///optimizer-headless:50051"]) == "dns:///optimizer-headless:50051"
    with pytest.raises(ValueError, match="no replica"):
        replica_target([])
