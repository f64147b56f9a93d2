"""The CuPy backend gives the NumPy backend's plan.

Skipped, with the reason, where CuPy or a CUDA device is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from radpilot.case import Case
from radpilot.fmo import FluenceOptimizer, ObjectiveTerm
from radpilot.fmo.backend import gpu_available

ok, why = gpu_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=f"GPU backend unavailable: {why}")]

TERMS = [
    ObjectiveTerm("PTV", "squared_deviation", 50.0, 100.0),
    ObjectiveTerm("Core", "squared_overdose", 8.0, 60.0),
    ObjectiveTerm("NormalTissue", "squared_overdose", 25.0, 5.0),
]


def test_cupy_products_match_numpy(analytic_case: Case) -> None:
    cpu = FluenceOptimizer(analytic_case, backend="numpy").ops
    gpu = FluenceOptimizer(analytic_case, backend="cupy").ops
    rng = np.random.default_rng(0)
    x = rng.random(cpu.shape[1]).astype(np.float32)
    g = rng.random(cpu.shape[0]).astype(np.float32)
    np.testing.assert_allclose(gpu.to_host(gpu.matvec(x)), cpu.matvec(x), rtol=1e-4)
    np.testing.assert_allclose(gpu.to_host(gpu.rmatvec(g)), cpu.rmatvec(g), rtol=1e-3)


def test_cupy_solve_matches_numpy(analytic_case: Case) -> None:
    a = FluenceOptimizer(analytic_case, backend="numpy").solve(TERMS)
    b = FluenceOptimizer(analytic_case, backend="cupy").solve(TERMS)
    assert b.backend == "cupy"
    assert b.objective == pytest.approx(a.objective, rel=5e-3)
