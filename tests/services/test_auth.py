"""Bearer-token access over real gRPC: refused without it, health stays open, token files."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from radpilot.v1 import planner_pb2, planner_pb2_grpc, types_pb2
from services.common.auth import BearerToken, TokenInterceptor, load_token
from services.common.server import start_server
from services.planner.server import SERVICE_NAME
from services.planner.servicer import PlannerServicer
from tests.paths import REPO_ROOT

PROTOCOL = (REPO_ROOT / "protocols" / "tg119_cshape_easier.yaml").read_text()


def test_token_required_except_for_health() -> None:
    running = start_server(
        [(planner_pb2_grpc.add_PlannerServiceServicer_to_server, PlannerServicer())],
        [SERVICE_NAME],
        "127.0.0.1:0",
        interceptors=[TokenInterceptor("s3cret")],
    )
    running.set_serving(True)
    addr = f"127.0.0.1:{running.port}"
    term = types_pb2.ObjectiveTerm(structure="PTV", kind="squared_deviation", dose_gy=50, weight=1)
    req = planner_pb2.ProposeRequest(
        protocol_yaml=PROTOCOL,
        agent="fixed",
        current=[term],
        memory=[planner_pb2.IterationMemory(iteration=1, objectives=[term])],
    )
    try:
        with grpc.insecure_channel(addr) as ch:
            status = (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(), timeout=5)
                .status
            )
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as info:
                planner_pb2_grpc.PlannerServiceStub(ch).Propose(req, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "bearer token" in info.value.details()
        for token, ok in (("wrong", False), ("s3cret", True)):
            with grpc.insecure_channel(addr) as raw:
                ch = grpc.intercept_channel(raw, BearerToken(token))
                stub = planner_pb2_grpc.PlannerServiceStub(ch)
                if ok:
                    assert stub.Propose(req, timeout=5).objectives
                else:
                    with pytest.raises(grpc.RpcError) as info:
                        stub.Propose(req, timeout=5)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(1.0)


def test_token_sources(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert (
        load_token({"RADPILOT_API_TOKEN_FILE": str(f), "RADPILOT_API_TOKEN": "env"}) == "from-file"
    )
    assert load_token({"RADPILOT_API_TOKEN": " env "}) == "env"
    f.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_token({"RADPILOT_API_TOKEN_FILE": str(f)})
    with pytest.raises(ValueError, match="empty API token"):
        TokenInterceptor("")


def test_every_worker_service_requires_the_token(tmp_path: Path) -> None:
    """The optimizer, evaluator and planner refuse calls without the token (health stays
    open), so reaching their ports is not enough to run optimisations or write to the store."""
    from radpilot.v1 import evaluator_pb2, evaluator_pb2_grpc, optimizer_pb2, optimizer_pb2_grpc
    from services.evaluator.config import EvaluatorConfig
    from services.evaluator.server import serve as serve_evaluator
    from services.optimizer.config import OptimizerConfig
    from services.optimizer.server import serve as serve_optimizer
    from services.planner.config import PlannerConfig
    from services.planner.server import serve as serve_planner

    store = str(tmp_path / "store")
    servers = {
        "optimizer": serve_optimizer(
            OptimizerConfig(address="127.0.0.1:0", case_store=store), token="w0rk"
        ),
        "evaluator": serve_evaluator(
            EvaluatorConfig(address="127.0.0.1:0", case_store=store), token="w0rk"
        ),
        "planner": serve_planner(PlannerConfig(address="127.0.0.1:0"), token="w0rk"),
    }
    calls = {
        "optimizer": lambda ch: optimizer_pb2_grpc.OptimizerServiceStub(ch).Optimize(
            optimizer_pb2.OptimizeRequest(case_id="nope"), timeout=10
        ),
        "evaluator": lambda ch: evaluator_pb2_grpc.EvaluatorServiceStub(ch).Evaluate(
            evaluator_pb2.EvaluateRequest(case_id="nope"), timeout=10
        ),
        "planner": lambda ch: planner_pb2_grpc.PlannerServiceStub(ch).Propose(
            planner_pb2.ProposeRequest(), timeout=10
        ),
    }
    try:
        for name, running in servers.items():
            addr = f"127.0.0.1:{running.port}"
            with grpc.insecure_channel(addr) as ch:
                health = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert health.status == health_pb2.HealthCheckResponse.SERVING, name
                with pytest.raises(grpc.RpcError) as info:
                    calls[name](ch)
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            with grpc.insecure_channel(addr) as raw:  # with it, the call reaches the service
                with pytest.raises(grpc.RpcError) as info:
                    calls[name](grpc.intercept_channel(raw, BearerToken("w0rk")))
                assert info.value.code() in (
                    grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ), (name, info.value.code())
    finally:
        for running in servers.values():
            running.stop(1.0)
