"""The Kubernetes manifests, rendered by ``kubectl kustomize`` for every overlay: strict schema
validation for a pinned Kubernetes version, and policy on the rendered objects (hardening,
probes, resources, the optimizer's headless Service / HPA / PDB, no ``latest``, no inline secrets,
selectors and ports that match). ``make k8s-validate`` runs these."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.paths import REPO_ROOT

ROOT = REPO_ROOT
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
K8S_VERSION = os.environ.get("K8S_VERSION", "1.34.0")
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]' provides it)")
    return path


def render(folder: Path) -> str:
    return subprocess.run(
        [_tool("kubectl"), "kustomize", str(folder)], check=True, capture_output=True, text=True
    ).stdout


def validate(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_tool("kubernetes-validate"), "--strict", "-k", K8S_VERSION, "--quiet", "-"],
        input=text,
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, str, list[dict[str, Any]]]:
    text = render(K8S / "overlays" / request.param)
    return request.param, text, [d for d in yaml.safe_load_all(text) if d]


def _pods(objs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [
        (o["metadata"]["name"], o["spec"]["template"])
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]


def policy_violations(objs: list[dict[str, Any]]) -> list[str]:
    """Everything the deployment policy forbids, as readable lines (empty = compliant)."""
    bad: list[str] = []
    for name, tpl in _pods(objs):
        spec = tpl["spec"]
        psc = spec.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            bad.append(f"{name}: pod securityContext.runAsNonRoot is not true")
        if psc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            bad.append(f"{name}: pod seccompProfile is not RuntimeDefault")
        if spec.get("automountServiceAccountToken") is not False:
            bad.append(f"{name}: automountServiceAccountToken is not false")
        for c in spec["containers"]:
            cn = f"{name}/{c['name']}"
            res = c.get("resources", {})
            for part in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    if r not in res.get(part, {}):
                        bad.append(f"{cn}: no {part}.{r}")
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    bad.append(f"{cn}: no {probe}")
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{cn}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad.append(f"{cn}: readOnlyRootFilesystem is not true")
            if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                bad.append(f"{cn}: capabilities do not drop ALL")
            if sc.get("privileged"):
                bad.append(f"{cn}: privileged")
            image = c.get("image", "")
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if not tag or tag == "latest":
                bad.append(f"{cn}: image {image!r} has no pinned tag")
            ports = {p.get("name") for p in c.get("ports", [])} | {
                p["containerPort"] for p in c.get("ports", [])
            }
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                p = c.get(probe)
                if p:
                    port = (p.get("grpc") or p.get("httpGet") or p.get("tcpSocket") or {}).get(
                        "port"
                    )
                    if port not in ports:
                        bad.append(f"{cn}: {probe} port {port!r} is not a container port")
            mounted = [m["mountPath"].rstrip("/") + "/" for m in c.get("volumeMounts", [])]
            for e in c.get("env", []):
                secretish = any(k in e["name"].upper() for k in ("KEY", "TOKEN", "PASSWORD"))
                # a path to a file on a mounted volume (a Secret) names a secret, it is not one
                a_file = str(e.get("value", "")).startswith(tuple(mounted)) if mounted else False
                if secretish and "value" in e and not a_file:
                    bad.append(f"{cn}: env {e['name']} has an inline value; use a secretKeyRef")
    for o in objs:
        if o["kind"] == "Secret" and (o.get("data") or o.get("stringData")):
            bad.append(f"Secret {o['metadata']['name']} carries inline values")
        if o["kind"] == "ConfigMap":
            for k, v in (o.get("data") or {}).items():
                # a token budget (RADPILOT_LLM_MAX_TOKENS) is a number, not a credential
                counted = k.upper().endswith("_MAX_TOKENS")
                if any(s in k.upper() for s in ("KEY", "TOKEN", "PASSWORD")) and v and not counted:
                    bad.append(f"ConfigMap {o['metadata']['name']}: {k} holds a secret value")
    templates = _pods(objs)
    for o in objs:
        if o["kind"] != "Service":
            continue
        sel = o["spec"].get("selector", {})
        matches = [
            (n, t)
            for n, t in templates
            if sel and all(t["metadata"]["labels"].get(k) == v for k, v in sel.items())
        ]
        if not matches:
            bad.append(f"Service {o['metadata']['name']}: selector {sel} matches no pod template")
        for port in o["spec"].get("ports", []):
            target = port.get("targetPort", port["port"])
            for n, t in matches:
                names = {p.get("name") for c in t["spec"]["containers"] for p in c.get("ports", [])}
                nums = {p["containerPort"] for c in t["spec"]["containers"] for p in c["ports"]}
                if target not in names | nums:
                    bad.append(f"Service {o['metadata']['name']}: targetPort {target!r} not in {n}")
    return bad


def test_overlay_is_valid_in_strict_mode(rendered) -> None:
    overlay, text, _ = rendered
    result = validate(text)
    assert result.returncode == 0, f"{overlay}: {result.stdout}{result.stderr}"


def test_overlay_meets_the_policy(rendered) -> None:
    overlay, _, objs = rendered
    assert policy_violations(objs) == [], overlay


def test_optimizer_is_scalable_and_protected(rendered) -> None:
    overlay, _, objs = rendered
    by = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    deploy = by[("Deployment", "radpilot-optimizer")]
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    headless = [
        o
        for o in objs
        if o["kind"] == "Service"
        and o["spec"].get("clusterIP") == "None"
        and all(labels.get(k) == v for k, v in o["spec"]["selector"].items())
    ]
    assert headless, f"{overlay}: no headless Service for the optimizer"
    hpa = by[("HorizontalPodAutoscaler", "radpilot-optimizer")]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "radpilot-optimizer"
    pdb = by[("PodDisruptionBudget", "radpilot-optimizer")]
    assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
    container = deploy["spec"]["template"]["spec"]["containers"][0]
    assert "startupProbe" in container
    assert deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 600
    orch = by[("Deployment", "radpilot-orchestrator")]["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in orch["containers"][0]["env"]}
    target = env["RADPILOT_OPTIMIZERS"]
    assert target.startswith("dns:///" + headless[0]["metadata"]["name"] + ".")
    if overlay == "kind":
        assert deploy["spec"]["replicas"] == 2
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        assert container["imagePullPolicy"] == "IfNotPresent"
        assert container["image"].endswith(":dev")
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "radpilot_optimize_in_flight"
        assert {"name": "RADPILOT_FMO_BACKEND", "value": "cupy"} in container["env"]
        assert deploy["spec"]["template"]["spec"]["tolerations"]


def test_network_policies_allow_only_the_design(rendered) -> None:
    _, _, objs = rendered
    pols = {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}
    deny = pols["default-deny"]["spec"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    workers = pols["workers-from-orchestrator"]["spec"]["ingress"][0]["from"][0]
    assert workers["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "radpilot-orchestrator"
    }


def test_a_broken_manifest_fails_validation_and_policy(tmp_path: Path) -> None:
    """What `make k8s-validate` catches: a schema error, and a container stripped of its probe
    and hardening."""
    text = render(K8S / "overlays" / "kind")
    broken_schema = text.replace(
        "revisionHistoryLimit: 5", "revisionHistoryLimit: 5\n  replica: 3", 1
    )
    result = validate(broken_schema)
    assert result.returncode != 0 and "replica" in result.stdout + result.stderr
    objs = [d for d in yaml.safe_load_all(text) if d]
    dep = next(o for o in objs if o["kind"] == "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    del c["livenessProbe"]
    c["securityContext"]["readOnlyRootFilesystem"] = False
    c["image"] = "radpilot:latest"
    c.setdefault("env", []).append({"name": "OPENAI_API_KEY", "value": "sk-inline"})
    bad = "\n".join(policy_violations(objs))
    for needle in ("no livenessProbe", "readOnlyRootFilesystem", "no pinned tag", "inline value"):
        assert needle in bad


def test_protocol_copies_match_the_protocols() -> None:
    copies = sorted(p.name for p in (K8S / "base" / "protocols").glob("*.yaml"))
    assert copies == sorted(p.name for p in (ROOT / "protocols").glob("*.yaml"))
    for name in copies:
        assert (K8S / "base" / "protocols" / name).read_text() == (
            ROOT / "protocols" / name
        ).read_text(), name


def test_the_tls_overlay_mounts_the_certificates_and_probes_health_in_plaintext() -> None:
    objs = [d for d in yaml.safe_load_all(render(K8S / "overlays" / "kind-tls")) if d]
    pods = _pods(objs)
    assert len(pods) == 4
    for name, tpl in pods:
        c = tpl["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        assert mounts["/etc/radpilot/tls"] == "tls", name
        assert volumes["tls"]["secret"]["secretName"] == "radpilot-tls", name
        assert env["RADPILOT_TLS_CERT"] == "/etc/radpilot/tls/tls.crt", name
        assert env["RADPILOT_TLS_KEY"] == "/etc/radpilot/tls/tls.key", name
        assert env["RADPILOT_TLS_CA"] == "/etc/radpilot/tls/ca.crt", name
        assert env["RADPILOT_HEALTH_ADDRESS"].endswith(":8086"), name
        assert {"name": "health", "containerPort": 8086} in c["ports"], name
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                assert c[probe]["grpc"]["port"] == 8086, f"{name} {probe}"
    plain = [d for d in yaml.safe_load_all(render(K8S / "overlays" / "kind")) if d]
    for _name, tpl in _pods(plain):
        assert "RADPILOT_TLS_CERT" not in {e["name"] for e in tpl["spec"]["containers"][0]["env"]}
