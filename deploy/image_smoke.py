"""``make image-smoke``: build the RadPilot image with podman from a locally made Debian base,
start the orchestrator in it (read-only root, non-root user, no network but the published port)
and check its gRPC health from the host. Skips, saying why, where podman is absent.

There is no registry here, so the base image is made with ``debootstrap`` (Debian bookworm,
python3 + venv) and ``podman import``; it is kept as ``localhost/radpilot-base:bookworm`` for the
next run. Podman runs with ``runc``, cgroupfs and ulimits this host accepts (a containers.conf
written under out/podman/). Writes out/image-smoke.json with timings.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out"
BASE = "localhost/radpilot-base:bookworm"
IMAGE = "localhost/radpilot:smoke"
CA_BUNDLE = os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt")
CONF = """[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def sh(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(args), flush=True)
    return subprocess.run(list(args), check=True, text=True, **kw)  # type: ignore[call-overload]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_base() -> None:
    if subprocess.run(["podman", "image", "exists", BASE]).returncode == 0:
        print(f"base image {BASE} exists")
        return
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is missing: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(prefix="radpilot-rootfs-") as rootfs:
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", rootfs)
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        sh("podman", "import", "-", BASE, stdin=tar.stdout)
        tar.wait()


def health(port: int, deadline_s: float) -> str:
    end = time.monotonic() + deadline_s
    last = "no answer"
    while time.monotonic() < end:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            try:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=3)
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return last
            except grpc.RpcError as exc:
                last = exc.code().name
        time.sleep(1)
    return last


def main() -> int:
    if shutil.which("podman") is None:
        print(
            "image-smoke: SKIPPED — podman is not installed (apt-get install podman buildah "
            "runc debootstrap); nothing was built"
        )
        return 0
    conf = OUT / "podman" / "containers.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(CONF)
    os.environ["CONTAINERS_CONF"] = str(conf)
    t0 = time.perf_counter()
    make_base()
    t_base = time.perf_counter() - t0
    build = ["podman", "build", "-f", "Containerfile", "--build-arg", f"BASE_IMAGE={BASE}"]
    if Path(CA_BUNDLE).is_file():  # this host's CA bundle, for a TLS-inspecting proxy
        build += ["--secret", f"id=ca,src={CA_BUNDLE}"]
    sh(*build, "-t", IMAGE, ".", cwd=str(ROOT))
    t_build = time.perf_counter() - t0 - t_base
    size = sh(
        "podman", "image", "inspect", IMAGE, "--format", "{{.Size}}", capture_output=True
    ).stdout.strip()
    user = sh(
        "podman", "image", "inspect", IMAGE, "--format", "{{.Config.User}}", capture_output=True
    ).stdout.strip()
    port = _free_port()
    name = f"radpilot-smoke-{port}"
    sh(
        "podman",
        "run",
        "-d",
        "--rm",
        "--name",
        name,
        "--read-only",
        "--tmpfs",
        "/tmp",
        "--tmpfs",
        "/data:mode=1777",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "-p",
        f"127.0.0.1:{port}:50050",
        IMAGE,
        "services.orchestrator",
        "--address",
        "0.0.0.0:50050",
    )
    try:
        t1 = time.perf_counter()
        status = health(port, 90)
        t_health = time.perf_counter() - t1
        whoami = subprocess.run(
            ["podman", "exec", name, "python3", "-c", "import os; print(os.getuid())"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        logs = subprocess.run(["podman", "logs", name], capture_output=True, text=True)
    finally:
        subprocess.run(["podman", "stop", "-t", "10", name], capture_output=True)
    result = {
        "status": status,
        "image": IMAGE,
        "image_bytes": int(size or 0),
        "user": user,
        "uid_in_container": whoami,
        "seconds": {
            "base": round(t_base, 1),
            "build": round(t_build, 1),
            "to_serving": round(t_health, 1),
        },
    }
    (OUT / "image-smoke.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if status != "SERVING":
        print(logs.stdout[-4000:], logs.stderr[-4000:], file=sys.stderr)
        print(f"image-smoke: FAILED — the orchestrator's health is {status}", file=sys.stderr)
        return 1
    print("image-smoke: the orchestrator in the image answers SERVING")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
