"""Prometheus metrics over a real scrape: RPC counters by status code, in-flight gauges, FMO
histograms and the optimizer's in-flight metric the GPU HPA scales on."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest

from radpilot.case import Case
from radpilot.v1 import optimizer_pb2, optimizer_pb2_grpc, planner_pb2, planner_pb2_grpc
from services.common.convert import helpers_to_proto, terms_to_proto
from services.common.metrics import start_metrics_server
from services.optimizer.config import OptimizerConfig
from services.optimizer.server import serve as serve_optimizer
from services.planner.config import PlannerConfig
from services.planner.server import serve as serve_planner
from tests.services.test_planner_service import PROTOCOL, _request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def metrics_url() -> str:
    port = start_metrics_server(_free_port(), "127.0.0.1")
    return f"http://127.0.0.1:{port}/metrics"


def _scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def test_rpc_and_fmo_metrics(metrics_url: str, analytic_case: Case, store) -> None:
    planner = serve_planner(PlannerConfig(address="127.0.0.1:0"))
    optimizer = serve_optimizer(
        OptimizerConfig(address="127.0.0.1:0", case_store=str(store.root), replica="m0")
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{planner.port}") as ch:
            stub = planner_pb2_grpc.PlannerServiceStub(ch)
            stub.Propose(_request(), timeout=30)
            with pytest.raises(grpc.RpcError):
                stub.Propose(planner_pb2.ProposeRequest(protocol_yaml="x"), timeout=30)
        with grpc.insecure_channel(f"127.0.0.1:{optimizer.port}") as ch:
            opt = optimizer_pb2_grpc.OptimizerServiceStub(ch)
            opt.Optimize(
                optimizer_pb2.OptimizeRequest(
                    case_id=analytic_case.case_id,
                    objectives=terms_to_proto(PROTOCOL.objectives),
                    helpers=helpers_to_proto(list(PROTOCOL.all_helpers)),  # its ring
                    normalize_to="PTV",
                ),
                timeout=120,
            )
        m = _scrape(metrics_url)
    finally:
        planner.stop(1.0)
        optimizer.stop(1.0)
    ok = 'radpilot_rpc_total{code="OK",method="Propose",service="PlannerService"}'
    bad = 'radpilot_rpc_total{code="INVALID_ARGUMENT",method="Propose",service="PlannerService"}'
    assert m[ok] >= 1 and m[bad] >= 1
    assert m['radpilot_rpc_in_flight{method="Propose",service="PlannerService"}'] == 0
    assert m['radpilot_rpc_total{code="OK",method="Optimize",service="OptimizerService"}'] >= 1
    assert m['radpilot_fmo_seconds_count{backend="numpy"}'] >= 1
    assert m["radpilot_fmo_iterations_count"] >= 1
    assert m["radpilot_optimize_in_flight"] == 0
    assert not any("Health" in k for k in m)  # health checks are not counted
