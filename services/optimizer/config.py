"""Optimizer service configuration: environment variables, overridable by flags."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass

from radpilot.fmo.backend import MATRIX_LAYOUTS
from services.common.server import add_server_flags


@dataclass(frozen=True)
class OptimizerConfig:
    address: str = "127.0.0.1:50051"
    case_store: str = ""
    backend: str = "numpy"
    max_cases: int = 4  # cases kept resident (their matrices) per replica
    replica: str = ""
    reflection: bool = False
    grace_s: float = 120.0  # longer than the longest solve
    matrix: str = "auto"  # CPU matrix layout: auto | compressed | csr

    @classmethod
    def from_env_and_args(cls, argv: list[str] | None = None) -> OptimizerConfig:
        env = os.environ
        ap = argparse.ArgumentParser(prog="python -m services.optimizer")
        ap.add_argument("--address", default=env.get("RADPILOT_OPTIMIZER_ADDRESS", cls.address))
        ap.add_argument("--case-store", default=env.get("RADPILOT_CASE_STORE", ""))
        ap.add_argument("--backend", default=env.get("RADPILOT_FMO_BACKEND", cls.backend))
        ap.add_argument(
            "--matrix",
            default=env.get("RADPILOT_FMO_MATRIX") or cls.matrix,
            choices=MATRIX_LAYOUTS,
            help="matrix layout: compressed (16-bit; numba on the CPU, CUDA kernels on the GPU), "
            "csr (float32) or auto",
        )
        ap.add_argument(
            "--max-cases", type=int, default=int(env.get("RADPILOT_MAX_CASES", cls.max_cases))
        )
        ap.add_argument("--replica", default=env.get("RADPILOT_REPLICA", socket.gethostname()))
        add_server_flags(ap, cls.grace_s)
        a = ap.parse_args(argv)
        if a.max_cases < 1:
            ap.error("--max-cases must be at least 1")
        return cls(
            a.address,
            a.case_store,
            a.backend,
            a.max_cases,
            a.replica,
            a.reflection,
            a.grace_s,
            a.matrix,
        )
