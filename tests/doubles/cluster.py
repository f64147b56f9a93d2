"""The four services in this process, on loopback sockets (real gRPC), for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from radpilot.llm.client import LLMSettings
from radpilot.v1 import orchestrator_pb2 as pb
from radpilot.v1 import orchestrator_pb2_grpc
from services.common.auth import BearerToken
from services.evaluator.config import EvaluatorConfig
from services.evaluator.server import serve as serve_evaluator
from services.optimizer.config import OptimizerConfig
from services.optimizer.server import serve as serve_optimizer
from services.orchestrator.config import OrchestratorConfig
from services.orchestrator.server import serve as serve_orchestrator
from services.planner.config import PlannerConfig
from services.planner.server import serve as serve_planner


class LLMCluster:
    def __init__(
        self, root: Path, llm: LLMSettings, refs: str, token: str = "", **orchestrator: Any
    ) -> None:
        """``token``: the orchestrator's API token ("" = open); ``stub`` presents it."""
        self.root = root
        store = str(root / "store")
        self.workers = [
            serve_optimizer(OptimizerConfig(address="127.0.0.1:0", case_store=store)),
            serve_evaluator(EvaluatorConfig(address="127.0.0.1:0", case_store=store, llm=llm)),
            serve_planner(PlannerConfig(address="127.0.0.1:0", llm=llm)),
        ]
        self.orch = serve_orchestrator(
            OrchestratorConfig(
                address="127.0.0.1:0",
                case_store=store,
                optimizers=(f"127.0.0.1:{self.workers[0].port}",),
                evaluator=f"127.0.0.1:{self.workers[1].port}",
                planner=f"127.0.0.1:{self.workers[2].port}",
                references=refs,
                **orchestrator,
            ),
            token=token,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.orch.port}")
        channel = (
            grpc.intercept_channel(self.channel, BearerToken(token)) if token else self.channel
        )
        self.stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

    def close(self) -> None:
        self.channel.close()
        self.orch.stop(1.0)
        for w in self.workers:
            w.stop(1.0)


def analytic_case(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, spacing_mm: int = 8) -> str:
    """CreateCase of the analytic C-shape on a coarse grid (seconds); its case id."""
    request = pb.CreateCaseRequest(
        builtin="analytic-cshape", parameters={"spacing_mm": str(spacing_mm)}
    )
    return stub.CreateCase(iter([request]), timeout=120).case_id
