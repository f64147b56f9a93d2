"""The CuPy backends (cuSPARSE CSR, and the compressed layout's RawKernels) give the NumPy
backend's products and plan.

Skipped, with the reason, where CuPy or a CUDA device is absent.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from radpilot.case import Case
from radpilot.fmo import FluenceOptimizer, ObjectiveTerm, gpu_compressed
from radpilot.fmo.backend import gpu_available
from radpilot.fmo.compressed import quantise

ok, why = gpu_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not ok, reason=f"GPU backend unavailable: {why}")]

TERMS = [
    ObjectiveTerm("PTV", "squared_deviation", 50.0, 100.0),
    ObjectiveTerm("Core", "squared_overdose", 8.0, 60.0),
    ObjectiveTerm("NormalTissue", "squared_overdose", 25.0, 5.0),
]


def test_cupy_products_match_numpy(analytic_case: Case) -> None:
    cpu = FluenceOptimizer(analytic_case, backend="numpy").ops
    gpu = FluenceOptimizer(analytic_case, backend="cupy", matrix="csr").ops
    assert gpu.matrix == "csr"
    rng = np.random.default_rng(0)
    x = rng.random(cpu.shape[1]).astype(np.float32)
    g = rng.random(cpu.shape[0]).astype(np.float32)
    np.testing.assert_allclose(gpu.to_host(gpu.matvec(x)), cpu.matvec(x), rtol=1e-4)
    np.testing.assert_allclose(gpu.to_host(gpu.rmatvec(g)), cpu.rmatvec(g), rtol=1e-3)


def test_cupy_solve_matches_numpy(analytic_case: Case) -> None:
    a = FluenceOptimizer(analytic_case, backend="numpy").solve(TERMS)
    b = FluenceOptimizer(analytic_case, backend="cupy", matrix="csr").solve(TERMS)
    assert b.backend == "cupy"
    assert b.objective == pytest.approx(a.objective, rel=5e-3)


def _dequantised(case: Case) -> sp.csr_matrix:
    """The compressed matrix's exact values as float32 CSR: the reference for its kernels."""
    indptr, indices, codes, scale = quantise(case.dose_influence)
    data = codes.astype(np.float32) * np.repeat(scale, np.diff(indptr))
    return sp.csr_matrix((data, indices.astype(np.int32), indptr), shape=case.dose_influence.shape)


def test_compressed_gpu_products_match_the_dequantised_matrix(
    analytic_case: Case, monkeypatch: pytest.MonkeyPatch
) -> None:
    gpu = FluenceOptimizer(analytic_case, backend="cupy").ops  # auto: the compressed kernels
    assert gpu.matrix == "compressed" and gpu.bytes_per_nonzero < 4.5
    ref = _dequantised(analytic_case)
    rng = np.random.default_rng(0)
    x = rng.random(ref.shape[1]).astype(np.float32)
    g = rng.random(ref.shape[0]).astype(np.float32)
    g[rng.random(g.size) < 0.5] = 0.0  # rows the transposed product skips
    np.testing.assert_allclose(gpu.to_host(gpu.matvec(x)), ref @ x, rtol=1e-5, atol=1e-6)
    want = ref.T @ g
    for rows_per_block in (256, 1024, 4096):  # every schedule make bench-gpu compares
        for chunked in (False, True):
            gpu.rows_per_block, gpu.chunked = rows_per_block, chunked
            got = gpu.to_host(gpu.rmatvec(g))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(gpu_compressed, "SHARED_LIMIT", 0)  # the global-memory kernel
    np.testing.assert_allclose(gpu.to_host(gpu.rmatvec(g)), want, rtol=1e-4, atol=1e-5)


def test_compressed_gpu_solve_matches_numpy(analytic_case: Case) -> None:
    a = FluenceOptimizer(analytic_case, backend="numpy").solve(TERMS)
    b = FluenceOptimizer(analytic_case, backend="cupy", matrix="compressed").solve(TERMS)
    assert b.backend == "cupy"
    assert b.objective == pytest.approx(a.objective, rel=5e-3)


def test_cupy_solves_every_objective_kind_like_numpy(analytic_case: Case) -> None:
    """The newer kinds (structure penalties, DVH percentiles) on the device path."""
    terms = [
        *TERMS,
        ObjectiveTerm("Core", "mean_dose", 6.0, 50.0),
        ObjectiveTerm("Core", "geud", 9.0, 50.0, 8.0),
        ObjectiveTerm("Core", "max_dvh", 10.0, 50.0, 10.0),
        ObjectiveTerm("Core", "smooth_max", 15.0, 50.0),
        ObjectiveTerm("PTV", "min_dvh", 49.0, 50.0, 99.0),
    ]
    a = FluenceOptimizer(analytic_case, backend="numpy").solve(terms)
    b = FluenceOptimizer(analytic_case, backend="cupy").solve(terms)
    assert b.backend == "cupy"
    assert b.objective == pytest.approx(a.objective, rel=1e-2)
    for key, value in a.term_values.items():
        assert b.term_values[key] == pytest.approx(value, rel=5e-2, abs=1e-3 * a.objective)
