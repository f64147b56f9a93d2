"""``make kind-e2e``: RadPilot end to end on a kind cluster.

Creates a cluster, builds the image and loads it into kind, applies the kind overlay, waits for the
rollouts, and then, with the official ``kubernetes`` client:

1. runs a planning job from an in-cluster Job that calls the same ``radpilot plan --orchestrator``
   client the local tests use, and checks the summary it prints;
2. scales the optimizer to 3 (through the HPA's floor), runs another job and reads every
   optimizer pod's metrics: Optimize calls must be spread over more than one replica;
3. starts a longer job, deletes an optimizer pod while it runs, and checks that the job finishes;
4. deletes the cluster (``--keep`` leaves it).

Needs docker (with a running engine) and kind; where either is missing it prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import re
import secrets
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "radpilot"
IMAGE = "radpilot:dev"
PROTOCOLS = "/etc/radpilot/protocols"
TOKEN_REF = {"name": "radpilot-api-token", "key": "token"}
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def client_command(job: str, protocol: str, max_iterations: int) -> list[str]:
    """The in-cluster client: the same CLI the local tests use, against the orchestrator."""
    return [
        "python3", "-m", "services", "plan",
        "--orchestrator", f"radpilot-orchestrator.{NAMESPACE}.svc.cluster.local:50050",
        "--case", "analytic-cshape",
        "--protocol", f"{PROTOCOLS}/{protocol}",
        "--max-iterations", str(max_iterations),
        "--out", f"/tmp/{job}",
        "--print-summary",
    ]  # fmt: skip


def client_job(name: str, protocol: str, max_iterations: int, image: str = IMAGE) -> dict[str, Any]:
    """A hardened batch Job running ``client_command`` (the token comes from the Secret)."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": NAMESPACE,
            "labels": {"app.kubernetes.io/name": name},
        },
        "spec": {
            "backoffLimit": 0,
            "ttlSecondsAfterFinished": 3600,
            "activeDeadlineSeconds": 1800,
            "template": {
                "metadata": {
                    "labels": {"app.kubernetes.io/name": name, "radpilot.io/client": "true"}
                },
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 10001,
                        "runAsGroup": 10001,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "client",
                            "image": image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": client_command(name, protocol, max_iterations),
                            "env": [
                                {
                                    "name": "RADPILOT_API_TOKEN",
                                    "valueFrom": {
                                        "secretKeyRef": {
                                            "name": "radpilot-api-token",
                                            "key": "token",
                                        }
                                    },
                                }
                            ],
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "256Mi"},
                                "limits": {"cpu": "1", "memory": "1Gi"},
                            },
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "privileged": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"]},
                            },
                            "volumeMounts": [
                                {"name": "tmp", "mountPath": "/tmp"},
                                {"name": "protocols", "mountPath": PROTOCOLS, "readOnly": True},
                            ],
                        }
                    ],
                    "volumes": [
                        {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
                        {"name": "protocols", "configMap": {"name": "radpilot-protocols"}},
                    ],
                },
            },
        },
    }


def parse_summary(log: str) -> dict[str, Any]:
    lines = [ln for ln in log.splitlines() if ln.startswith("SUMMARY ")]
    if not lines:
        raise AssertionError(f"the client printed no summary; its log ends:\n{log[-2000:]}")
    return json.loads(lines[-1][len("SUMMARY ") :])


def missing_tools() -> str | None:
    for tool in ("docker", "kind"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if info.returncode != 0:
        return "docker has no running engine (docker info failed)"
    return None


def sh(*args: str) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run(list(args), check=True)


class E2E:
    def __init__(self, cluster: str) -> None:
        from kubernetes import client, config

        config.load_kube_config(context=f"kind-{cluster}")
        self.core = client.CoreV1Api()
        self.apps = client.AppsV1Api()
        self.batch = client.BatchV1Api()
        self.autoscaling = client.AutoscalingV2Api()

    def wait_rollouts(self, timeout_s: float = 600) -> None:
        end = time.monotonic() + timeout_s
        pending: list[str] = []
        while time.monotonic() < end:
            pending = []
            for d in self.apps.list_namespaced_deployment(NAMESPACE).items:
                want = d.spec.replicas or 0
                if (d.status.updated_replicas or 0) < want or (d.status.ready_replicas or 0) < want:
                    pending.append(d.metadata.name)
            if not pending:
                return
            time.sleep(5)
        raise AssertionError(f"deployments not ready after {timeout_s:.0f} s: {pending}")

    def run_job(self, name: str, protocol: str, iterations: int, during: Any = None) -> dict:
        self.batch.create_namespaced_job(NAMESPACE, client_job(name, protocol, iterations))
        end = time.monotonic() + 1800
        acted = False
        while time.monotonic() < end:
            job = self.batch.read_namespaced_job_status(name, NAMESPACE)
            if during is not None and not acted and (job.status.active or 0) > 0:
                time.sleep(10)  # let it reach its first Optimize calls
                during()
                acted = True
            if job.status.succeeded or job.status.failed:
                break
            time.sleep(3)
        pods = self.core.list_namespaced_pod(NAMESPACE, label_selector=f"job-name={name}").items
        log = self.core.read_namespaced_pod_log(pods[0].metadata.name, NAMESPACE)
        if not job.status.succeeded:
            raise AssertionError(f"client job {name} failed:\n{log[-3000:]}")
        return parse_summary(log)

    def optimizer_pods(self) -> list[str]:
        pods = self.core.list_namespaced_pod(
            NAMESPACE, label_selector="app.kubernetes.io/name=radpilot-optimizer"
        ).items
        return [p.metadata.name for p in pods if p.status.phase == "Running"]

    def optimize_calls(self, pod: str) -> float:
        from kubernetes.stream import stream

        script = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9090/metrics').read().decode())"
        text = stream(
            self.core.connect_get_namespaced_pod_exec, pod, NAMESPACE,
            command=["python3", "-c", script], stderr=True, stdin=False, stdout=True, tty=False,
        )  # fmt: skip
        m = re.search(
            r'radpilot_rpc_total\{code="OK",method="Optimize",service="OptimizerService"\} (\S+)',
            text,
        )
        return float(m.group(1)) if m else 0.0

    def scale_optimizer(self, replicas: int) -> None:
        self.autoscaling.patch_namespaced_horizontal_pod_autoscaler(
            "radpilot-optimizer", NAMESPACE, {"spec": {"minReplicas": replicas}}
        )
        self.apps.patch_namespaced_deployment_scale(
            "radpilot-optimizer", NAMESPACE, {"spec": {"replicas": replicas}}
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", default="radpilot-e2e")
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    args = ap.parse_args(argv)
    why = missing_tools()
    if why:
        print(
            f"kind-e2e: SKIPPED — {why}; it needs docker with a running engine and kind "
            "(see docs/deploy.md)"
        )
        return 0
    kubectl = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or "kubectl"
    sh("kind", "create", "cluster", "--name", args.cluster, "--wait", "120s")
    try:
        ca = ["--secret", f"id=ca,src={CA_BUNDLE}"] if Path(CA_BUNDLE).is_file() else []
        sh("docker", "build", "-f", str(ROOT / "Containerfile"), *ca, "-t", IMAGE, str(ROOT))
        sh("kind", "load", "docker-image", IMAGE, "--name", args.cluster)
        sh(
            kubectl,
            "--context",
            f"kind-{args.cluster}",
            "apply",
            "-k",
            str(ROOT / "deploy" / "k8s" / "overlays" / "kind"),
        )
        e2e = E2E(args.cluster)
        from kubernetes import client

        e2e.core.create_namespaced_secret(
            NAMESPACE,
            client.V1Secret(
                metadata=client.V1ObjectMeta(name="radpilot-api-token"),
                string_data={"token": secrets.token_urlsafe(24)},
            ),
        )
        e2e.wait_rollouts()
        summary = e2e.run_job("plan-1", "tg119_cshape_easier.yaml", 4)
        assert summary["iterations"] >= 1 and summary["goals"], summary
        print(
            f"1. job {summary['job_id']}: {summary['iterations']} iteration(s), "
            f"all goals met: {summary['all_goals_met']}"
        )

        e2e.scale_optimizer(3)
        e2e.wait_rollouts()
        e2e.run_job("plan-2", "tg119_cshape_harder.yaml", 6)
        calls = {pod: e2e.optimize_calls(pod) for pod in e2e.optimizer_pods()}
        print(f"2. Optimize calls per optimizer pod: {calls}")
        assert sum(1 for v in calls.values() if v > 0) >= 2, calls

        def kill_one() -> None:
            victim = e2e.optimizer_pods()[0]
            print(f"3. deleting optimizer pod {victim} mid-job", flush=True)
            e2e.core.delete_namespaced_pod(victim, NAMESPACE)

        summary = e2e.run_job("plan-3", "tg119_cshape_harder.yaml", 8, during=kill_one)
        print(f"3. job {summary['job_id']} finished with {summary['iterations']} iteration(s)")
        print("kind-e2e: PASSED")
        return 0
    finally:
        if not args.keep:
            subprocess.run(["kind", "delete", "cluster", "--name", args.cluster])


if __name__ == "__main__":
    raise SystemExit(main())
