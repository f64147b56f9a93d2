"""Run the four services as separate local processes on loopback (``radpilot serve``).

Each server picks a free port and logs it; the launcher reads the ports from the logs, wires the
orchestrator to every optimizer replica, the evaluator and the planner, and waits until the
orchestrator's health says SERVING. ``stop()`` sends SIGTERM (drain) and then kills stragglers.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.tls import TlsConfig, open_plain_or_tls

ROOT = Path(__file__).resolve().parent.parent


_PORT = re.compile(r"serving on port (\d+)")


def port_in(log_line: str) -> int | None:
    """The port a server announces in its log ("... serving on port N ..."), if this line has it."""
    m = _PORT.search(log_line)
    return int(m.group(1)) if m else None


class LaunchError(RuntimeError):
    """A service did not come up; its log says why."""


@dataclass
class LocalCluster:
    run_dir: Path
    token: str
    tls: TlsConfig = field(default_factory=TlsConfig)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    commands: dict[str, tuple[str, list[str], dict[str, str]]] = field(default_factory=dict)

    @property
    def orchestrator(self) -> str:
        return f"127.0.0.1:{self.ports['orchestrator']}"

    def stop(self, timeout: float = 20.0) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def kill(self, name: str) -> None:
        """Kill one service without warning (for failure tests)."""
        self.procs[name].kill()
        self.procs[name].wait(10)

    def restart(self, name: str, timeout: float = 120.0) -> None:
        """Start a killed service again with the same command on the same port (its clients
        reconnect to the address they know)."""
        if self.procs[name].poll() is None:
            self.kill(name)
        module, args, env = self.commands[name]
        _start(self, name, module, args, env, f"127.0.0.1:{self.ports[name]}")
        self.ports[name] = _port(self, name, timeout)
        if name == "orchestrator":
            _wait_serving(self.orchestrator, timeout, self.tls)


def _start(
    cluster: LocalCluster,
    name: str,
    module: str,
    args: list[str],
    env: dict[str, str],
    address: str = "127.0.0.1:0",
) -> None:
    cluster.commands[name] = (module, args, env)
    log = (cluster.run_dir / f"{name}.log").open("w")
    cluster.procs[name] = subprocess.Popen(
        [sys.executable, "-m", module, "--address", address, *args],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _port(cluster: LocalCluster, name: str, timeout: float) -> int:
    path = cluster.run_dir / f"{name}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            port = port_in(line)
            if port:
                return port
        if cluster.procs[name].poll() is not None:
            break
        time.sleep(0.05)
    tail = "\n".join(path.read_text().splitlines()[-15:])
    raise LaunchError(f"{name} did not start; the end of {path}:\n{tail}")


def launch(
    case_store: str | Path,
    run_dir: str | Path,
    optimizer_replicas: int = 1,
    token: str | None = None,
    timeout: float = 120.0,
    tls: TlsConfig | None = None,
    job_db: str | Path | None = None,
) -> LocalCluster:
    """Start the services; ``tls`` (default: RADPILOT_TLS_* of this process) runs every port
    with TLS and the services' channels with mutual TLS. ``job_db`` (default: RADPILOT_JOB_DB,
    else ``<case store>/jobs.sqlite``) is the orchestrator's job database."""
    if optimizer_replicas < 1:
        raise ValueError("optimizer_replicas must be at least 1")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    tls = TlsConfig.from_env(public=True) if tls is None else tls
    cluster = LocalCluster(run, token if token is not None else secrets.token_urlsafe(24), tls)
    env = {
        **os.environ,
        **tls.env(),
        **({"RADPILOT_JOB_DB": str(job_db)} if job_db else {}),
        "RADPILOT_CASE_STORE": str(case_store),
        "RADPILOT_API_TOKEN": cluster.token,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TQDM_DISABLE": "1",
    }
    try:
        for k in range(optimizer_replicas):
            _start(
                cluster,
                f"optimizer-{k}",
                "services.optimizer",
                ["--replica", f"optimizer-{k}"],
                env,
            )
        _start(cluster, "evaluator", "services.evaluator", [], env)
        _start(cluster, "planner", "services.planner", [], env)
        for name in list(cluster.procs):
            cluster.ports[name] = _port(cluster, name, timeout)
        optimizers = ",".join(
            f"127.0.0.1:{cluster.ports[f'optimizer-{k}']}" for k in range(optimizer_replicas)
        )
        _start(
            cluster,
            "orchestrator",
            "services.orchestrator",
            [
                "--optimizers",
                optimizers,
                "--evaluator",
                f"127.0.0.1:{cluster.ports['evaluator']}",
                "--planner",
                f"127.0.0.1:{cluster.ports['planner']}",
            ],
            env,
        )
        cluster.ports["orchestrator"] = _port(cluster, "orchestrator", timeout)
        _wait_serving(cluster.orchestrator, timeout, tls)
    except BaseException:
        cluster.stop(5)
        raise
    return cluster


def _wait_serving(address: str, timeout: float, tls: TlsConfig | None = None) -> None:
    deadline = time.monotonic() + timeout
    with open_plain_or_tls(address, tls) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise LaunchError(f"the orchestrator at {address} never became ready")
