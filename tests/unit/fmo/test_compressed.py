"""The compressed CPU matrix (16-bit indices and values, numba kernels): products, objective and
plan against float32 CSR, the working set's row subsets, and how the layout is chosen."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from radpilot.case import Case
from radpilot.dosimetry import dose_at_volume
from radpilot.errors import BackendUnavailableError
from radpilot.fmo import FluenceOptimizer, FMOSettings, ObjectiveTerm
from radpilot.fmo.backend import CpuOps, make_ops, matrix_layout, take_rows
from radpilot.fmo.compressed import CompressedCpuOps, quantise, times_sparse

TERMS = [
    ObjectiveTerm("PTV", "squared_deviation", 50.0, 100.0),
    ObjectiveTerm("PTV", "squared_overdose", 52.5, 300.0),
    ObjectiveTerm("Core", "squared_overdose", 8.0, 60.0),
    ObjectiveTerm("NormalTissue", "squared_overdose", 25.0, 5.0),
]


def _random(rows: int = 3000, cols: int = 400, seed: int = 1) -> sp.csr_matrix:
    A = sp.random(rows, cols, density=0.05, format="csr", dtype=np.float32, random_state=seed)
    A.data = np.abs(A.data) * np.float32(1e-3)  # dose influence magnitudes, >= 0
    A.data[A.indptr[5] : A.indptr[6]] = 0  # an empty row
    A.eliminate_zeros()
    return A.tocsr()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_products_match_float32_csr(threads: int) -> None:
    A = _random()
    rng = np.random.default_rng(2)
    x = rng.random(A.shape[1]).astype(np.float32)
    g = rng.random(A.shape[0]).astype(np.float32)
    g[::3] = 0  # rows whose gradient vanishes are skipped
    ops = CompressedCpuOps(A, threads=threads)
    assert ops.shape == A.shape and ops.nnz == A.nnz
    np.testing.assert_allclose(ops.matvec(x), A @ x, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ops.rmatvec(g), A.T @ g, rtol=1e-4)
    assert ops.bytes_per_nonzero < 5  # 2 + 2 bytes, plus per-row pointer (8) and scale (4)


def test_each_entry_is_within_half_a_code_of_its_row_maximum() -> None:
    A = _random()
    indptr, indices, codes, scale = quantise(A)
    back = sp.csr_matrix((codes * np.repeat(scale, np.diff(indptr)), indices, indptr), A.shape)
    err = abs(back - A).max(axis=1).toarray().ravel()
    row_max = abs(A).max(axis=1).toarray().ravel()
    assert np.all(err <= row_max * (0.5 / 65535 + 1e-6))  # + float32 rounding of q * scale


def test_subset_is_the_same_rows_read_in_place() -> None:
    A = _random()
    ops = CompressedCpuOps(A)
    rows = np.array([0, 5, 7, 100, 2998, 2999])
    sub = ops.subset(rows)
    assert sub.codes is ops.codes and sub.indices is ops.indices  # a view: nothing copied
    assert sub.shape == (rows.size, A.shape[1]) and sub.nnz == A[rows].nnz
    x = np.random.default_rng(0).random(A.shape[1]).astype(np.float32)
    np.testing.assert_array_equal(sub.matvec(x), ops.matvec(x)[rows])
    g = np.zeros(A.shape[0], dtype=np.float32)
    g[rows] = np.arange(1, rows.size + 1)
    np.testing.assert_allclose(sub.rmatvec(g[rows]), ops.rmatvec(g), rtol=1e-6)
    # a working set of a working set: rows 1 and 4 of ``rows``
    np.testing.assert_array_equal(sub.subset(np.array([1, 4])).matvec(x), ops.matvec(x)[[5, 2998]])
    with pytest.raises(IndexError, match="working-set rows"):
        ops.subset(np.array([A.shape[0]]))


def test_csr_working_set_rows_are_gathered_exactly() -> None:
    A = _random()
    rows = np.array([0, 5, 6, 7, 100, 2998, 2999])  # row 5 is empty
    sub = CpuOps(A).subset(rows)
    assert isinstance(sub, CpuOps) and sub.shape == (rows.size, A.shape[1])
    x = np.random.default_rng(3).random(A.shape[1]).astype(np.float32)
    np.testing.assert_array_equal(sub.matvec(x), A[rows] @ x)
    g = np.arange(rows.size, dtype=np.float32)
    np.testing.assert_allclose(sub.rmatvec(g), A[rows].T @ g, rtol=1e-6)


def test_objective_and_plan_match_csr(analytic_case: Case) -> None:
    comp = FluenceOptimizer(analytic_case, matrix="compressed")
    csr = FluenceOptimizer(analytic_case, matrix="csr")
    assert (comp.matrix, csr.matrix) == ("compressed", "csr")
    x = np.random.default_rng(4).random(analytic_case.num_beamlets)
    assert comp.objective(x, TERMS) == pytest.approx(csr.objective(x, TERMS), rel=1e-4)
    settings = FMOSettings(rel_tol=1e-7, max_iter=2000)
    a, b = comp.solve(TERMS, settings=settings), csr.solve(TERMS, settings=settings)
    for name, pct in (("PTV", 95), ("PTV", 10), ("Core", 10), ("NormalTissue", 50)):
        rows = analytic_case.rows_of(name)
        da, db = dose_at_volume(a.dose_rows[rows], pct), dose_at_volume(b.dose_rows[rows], pct)
        assert da == pytest.approx(db, abs=0.1), (name, pct)


def test_the_layout_is_chosen_by_argument_environment_or_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    A = _random()
    assert isinstance(make_ops(A), CompressedCpuOps)  # auto: compressed (the measured winner)
    assert isinstance(make_ops(A, matrix="csr"), CpuOps)
    assert isinstance(make_ops(A, matrix="compressed"), CompressedCpuOps)
    monkeypatch.setenv("RADPILOT_FMO_MATRIX", "csr")
    assert matrix_layout() == "csr" and isinstance(make_ops(A), CpuOps)
    monkeypatch.setenv("RADPILOT_FMO_MATRIX", "zip")
    with pytest.raises(ValueError, match="unknown matrix layout 'zip'"):
        make_ops(A)
    monkeypatch.delenv("RADPILOT_FMO_MATRIX")
    wide = sp.csr_matrix((np.ones(2, np.float32), ([0, 1], [0, 70000])), shape=(2, 70001))
    assert isinstance(make_ops(wide), CpuOps)  # auto: too many beamlets for 16-bit indices
    with pytest.raises(BackendUnavailableError, match="use --matrix csr"):
        make_ops(wide, matrix="compressed")


def test_the_gpu_layouts_are_asked_for_the_same_way() -> None:
    from radpilot.fmo.backend import gpu_available, gpu_layout, uses_compressed

    # auto on the GPU: the compressed kernels where the beamlets fit (the measured winner there)
    assert gpu_layout(3000) == "compressed" and uses_compressed("cupy", 3000)
    assert gpu_layout(3000, "csr") == "csr" and not uses_compressed("cupy", 3000, "csr")
    assert gpu_layout(70001) == "csr"  # too many beamlets for 16-bit indices: cuSPARSE
    with pytest.raises(BackendUnavailableError, match="use --matrix csr"):
        gpu_layout(70001, "compressed")
    wide = sp.csr_matrix((np.ones(2, np.float32), ([0, 1], [0, 70000])), shape=(2, 70001))
    with pytest.raises(BackendUnavailableError, match="at most 65536 beamlets"):
        make_ops(wide, backend="cupy", matrix="compressed")  # refused before any device is used
    if gpu_available()[0]:
        return  # tests/unit/fmo/test_gpu.py checks both GPU layouts where a device exists
    for layout in ("csr", "compressed"):  # no CuPy or no device: one clear error, either layout
        with pytest.raises(BackendUnavailableError, match=r"CuPy|CUDA"):
            make_ops(_random(), backend="cupy", matrix=layout)


def test_the_optimizer_service_takes_the_layout(store, analytic_case: Case) -> None:
    from services.optimizer.config import OptimizerConfig
    from services.optimizer.core import OptimizerCore

    config = OptimizerConfig.from_env_and_args(["--matrix", "compressed"])
    core = OptimizerCore(store, matrix=config.matrix)
    core.warm_up()  # compiles the kernels before the service says it is ready
    opt, _ = core.prepare(analytic_case.case_id)
    assert opt.matrix == "compressed"
    # the replica took the layout from the store (kept there for the next one), not its own
    assert (store.path(analytic_case.case_id) / "compressed" / "parts.json").is_file()
    assert not opt.ops.codes.flags.writeable  # mapped from the stored file
    assert OptimizerCore(store).prepare(analytic_case.case_id)[0].matrix == "compressed"  # auto
    csr = OptimizerCore(store, matrix="csr").prepare(analytic_case.case_id)[0]
    assert csr.matrix == "csr"
    with pytest.raises(SystemExit):
        OptimizerConfig.from_env_and_args(["--matrix", "zip"])


def test_product_with_a_sparse_segment_matrix_is_scipys_dense() -> None:
    A = _random()
    S = sp.random(A.shape[1], 17, density=0.1, format="csc", random_state=4)  # beamlets x segments
    M = times_sparse(A, S)
    assert M.shape == (A.shape[0], 17) and M.dtype == np.float64
    np.testing.assert_allclose(M, (A.astype(np.float64) @ S).toarray(), rtol=1e-12, atol=1e-15)


def test_rows_of_a_csr_matrix_are_taken_exactly() -> None:
    A = _random()
    rows = np.array([2999, 0, 5, 5, 17])  # any order, repeats, an empty row
    M = take_rows(A, rows)
    assert M.dtype == A.dtype and (A[rows] != M).nnz == 0
