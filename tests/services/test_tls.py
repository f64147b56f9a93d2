"""TLS and mutual TLS over real sockets: a generated CA, a worker that demands client
certificates, the whole local cluster over TLS, clients from another CA or in plaintext refused;
and servers that bind their port exclusively."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import planner_pb2, planner_pb2_grpc, types_pb2
from services.client import orchestrator_stub
from services.common.auth import BearerToken
from services.common.server import BindError, start_server
from services.common.tls import TlsConfig, TlsConfigError, open_plain_or_tls
from services.launcher import LocalCluster, launch
from services.planner.config import PlannerConfig
from services.planner.server import serve as serve_planner
from tests.doubles.certs import Issued, TestCA
from tests.paths import PROTOCOLS

HARDER = (PROTOCOLS / "tg119_cshape_harder.yaml").read_text()
TOKEN = "tls-t0ken"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued]:
    root = tmp_path_factory.mktemp("pki")
    ca, other = TestCA(), TestCA("another CA")
    return {
        "service": ca.issue(root / "service", "radpilot-service"),
        "client": ca.issue(root / "client", "physics-workstation"),
        "stranger": other.issue(root / "stranger", "stranger"),
    }


def _propose_request() -> planner_pb2.ProposeRequest:
    term = types_pb2.ObjectiveTerm(structure="PTV", kind="squared_deviation", dose_gy=50, weight=1)
    return planner_pb2.ProposeRequest(
        protocol_yaml=HARDER,
        agent="fixed",
        current=[term],
        memory=[planner_pb2.IterationMemory(iteration=1, objectives=[term])],
    )


def _propose(address: str, tls: TlsConfig | None) -> grpc.StatusCode:
    with open_plain_or_tls(address, tls) as raw:
        stub = planner_pb2_grpc.PlannerServiceStub(grpc.intercept_channel(raw, BearerToken(TOKEN)))
        try:
            stub.Propose(_propose_request(), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_a_worker_with_mutual_tls_admits_only_clients_with_a_certificate_from_its_ca(
    pki: dict[str, Issued], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RADPILOT_HEALTH_ADDRESS", "127.0.0.1:0")
    running = serve_planner(
        PlannerConfig(address="127.0.0.1:0"), token=TOKEN, tls=pki["service"].tls(client_auth=True)
    )
    address = f"127.0.0.1:{running.port}"
    try:
        assert _propose(address, pki["client"].tls()) == grpc.StatusCode.OK
        # no client certificate, a certificate from another CA, or no TLS at all: no connection
        assert _propose(address, pki["client"].tls(with_cert=False)) == grpc.StatusCode.UNAVAILABLE
        stranger = TlsConfig(
            str(pki["stranger"].cert), str(pki["stranger"].key), str(pki["client"].ca)
        )
        assert _propose(address, stranger) == grpc.StatusCode.UNAVAILABLE
        assert _propose(address, None) == grpc.StatusCode.UNAVAILABLE
        # a client that trusts another CA refuses the server
        assert _propose(address, pki["stranger"].tls()) == grpc.StatusCode.UNAVAILABLE
        # probes that cannot speak TLS use the plaintext health-only port
        assert running.health_port
        with grpc.insecure_channel(f"127.0.0.1:{running.health_port}") as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert status.status == health_pb2.HealthCheckResponse.SERVING
            stub = planner_pb2_grpc.PlannerServiceStub(ch)
            with pytest.raises(grpc.RpcError) as info:
                stub.Propose(_propose_request(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED  # health only
    finally:
        running.stop(1.0)


def test_tls_settings_that_cannot_work_are_refused_with_the_variable_to_fix(
    pki: dict[str, Issued], tmp_path: Path
) -> None:
    with pytest.raises(TlsConfigError, match="RADPILOT_TLS_KEY"):
        TlsConfig(cert=str(pki["service"].cert)).server_credentials()
    with pytest.raises(TlsConfigError, match="RADPILOT_TLS_CA"):
        TlsConfig(
            str(pki["service"].cert), str(pki["service"].key), client_auth=True
        ).server_credentials()
    missing = tmp_path / "nope.crt"
    with pytest.raises(TlsConfigError, match=r"nope\.crt"):
        TlsConfig(str(missing), str(pki["service"].key)).server_credentials()
    (tmp_path / "junk.crt").write_text("not a certificate")
    with pytest.raises(TlsConfigError, match="not a PEM"):
        TlsConfig(str(tmp_path / "junk.crt"), str(pki["service"].key)).server_credentials()
    env = {"RADPILOT_TLS_CA": str(pki["service"].ca)}
    assert TlsConfig.from_env(env=env).client_auth  # workers: mutual TLS once a CA is given
    assert not TlsConfig.from_env(public=True, env=env).client_auth  # the public API: TLS
    with pytest.raises(TlsConfigError, match="RADPILOT_TLS_CLIENT_AUTH"):
        TlsConfig.from_env(env={**env, "RADPILOT_TLS_CLIENT_AUTH": "maybe"})


def test_a_second_server_on_a_taken_port_fails_to_start_with_a_clear_message() -> None:
    first = start_server([], ["x"], "127.0.0.1:0", tls=TlsConfig(), health_address="")
    try:
        with pytest.raises(BindError, match=f"127.0.0.1:{first.port}.*in use"):
            start_server([], ["x"], f"127.0.0.1:{first.port}", tls=TlsConfig(), health_address="")
    finally:
        first.stop(0.5)


@pytest.fixture(scope="module")
def tls_cluster(
    tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Issued]
) -> Iterator[LocalCluster]:
    root = tmp_path_factory.mktemp("tls-cluster")
    c = launch(root / "store", root / "run", token=TOKEN, tls=pki["service"].tls())
    try:
        yield c
    finally:
        c.stop()


def test_the_local_cluster_plans_over_mutual_tls(
    tls_cluster: LocalCluster, pki: dict[str, Issued]
) -> None:
    with open_plain_or_tls(tls_cluster.orchestrator, pki["client"].tls(with_cert=False)) as raw:
        stub = orchestrator_stub(raw, TOKEN)
        case = stub.CreateCase(
            iter([pb.CreateCaseRequest(builtin="analytic-cshape", parameters={"spacing_mm": "8"})]),
            timeout=120,
        ).case_id
        start = pb.StartPlanningRequest(case_id=case, protocol_yaml=HARDER, max_iterations=2)
        job_id = stub.StartPlanning(start, timeout=30).job_id
        events = list(stub.WatchPlanning(pb.WatchPlanningRequest(job_id=job_id), timeout=300))
        job = stub.GetPlanningJob(pb.GetPlanningJobRequest(job_id=job_id), timeout=30)
    assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
    # the FMO and the evaluation went over the orchestrator's mutual-TLS channels
    assert any(e.kind == pb.EVENT_KIND_FMO_DONE for e in events)
    assert any(e.kind == pb.EVENT_KIND_EVALUATED for e in events)
    run = tls_cluster.run_dir
    assert "serving on port" in (run / "evaluator.log").read_text()


@pytest.mark.parametrize("who", ["stranger", "plaintext"])
def test_the_tls_cluster_refuses_clients_it_cannot_verify(
    tls_cluster: LocalCluster, pki: dict[str, Issued], who: str
) -> None:
    tls = pki["stranger"].tls() if who == "stranger" else None
    with (
        open_plain_or_tls(tls_cluster.orchestrator, tls) as raw,
        pytest.raises(grpc.RpcError) as info,
    ):
        orchestrator_stub(raw, TOKEN).GetPlanningJob(
            pb.GetPlanningJobRequest(job_id="x"), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_workers_of_the_tls_cluster_refuse_a_client_without_a_certificate(
    tls_cluster: LocalCluster, pki: dict[str, Issued]
) -> None:
    planner = f"127.0.0.1:{tls_cluster.ports['planner']}"
    assert _propose(planner, pki["client"].tls(with_cert=False)) == grpc.StatusCode.UNAVAILABLE
    assert _propose(planner, pki["client"].tls()) == grpc.StatusCode.OK
