"""A compressed dose influence matrix for the CPU: 4 bytes per non-zero instead of 8.

One iteration of the FMO streams ``A`` twice (``A @ x`` and ``A.T @ g``), and on the CPU that is
bound by memory bandwidth, not arithmetic. Float32 CSR moves 8 bytes per non-zero each way (a
4-byte value and a 4-byte column index). Here each row keeps

- its column indices as ``uint16`` (a case has fewer than 65,536 beamlets; otherwise this layout
  is refused and the float32 CSR backend is used), and
- its values as ``uint16`` codes with one float32 scale per row: ``a_ij = q_ij * scale_i`` with
  ``scale_i = max_j a_ij / 65535``, so the rounding error of any entry is at most
  ``max_j a_ij / 131070`` (7.6e-6 of the row's largest entry).

The kernels are compiled with numba (parallel, no GIL) and accumulate in float32. ``A @ x`` runs
rows in parallel and multiplies each row's sum by its scale once; ``A.T @ g`` gives each thread a
block of rows and a private beamlet vector (a few thousand entries, in cache), skipping rows where
``g`` is zero, and adds the private vectors at the end. One layout serves both products, and a
working set is the same arrays read through a list of its rows (no copy).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import scipy.sparse as sp

from radpilot.case import as_csr32

MAX_COLUMNS = 65_536  # uint16 column indices
_CODE_MAX = 65_535.0
BLOCKS_PER_THREAD = 8  # A.T @ g: row blocks per thread (load balance vs private vectors)


def numba_available() -> tuple[bool, str]:
    try:
        import numba  # noqa: F401
    except ImportError:
        return False, "numba is not installed (pip install numba)"
    return True, ""


def _kernels() -> tuple[Any, Any, Any, Any]:
    """The four numba kernels, compiled on first use (and cached on disk by numba)."""
    global _KERNELS
    if _KERNELS is None:
        from numba import njit, prange

        # Indices into the arrays are unsigned (``indptr`` and ``edges`` arrive as uint64):
        # numba wraps negative signed indices, and that check on every load cost the products
        # about a third of their time. fastmath lets LLVM reorder the float32 sums (A @ x: by
        # up to ~1e-6 of a row's sum; the rounding of the codes is 7.6e-6 of its largest entry).
        # ``rows`` selects the matrix's rows (all of them, or a working set's): a working set
        # reads its rows in place instead of copying them (a copy into fresh memory cost up to
        # a second per round on this VM; reading through ``rows`` costs ~10 % per product)
        @njit(parallel=True, cache=True, nogil=True, fastmath=True)
        def matvec(indptr, rows, indices, codes, scale, x, out):
            for i in prange(rows.size):
                r = rows[i]
                acc = np.float32(0.0)
                for k in range(indptr[r], indptr[r + 1]):
                    acc += np.float32(codes[k]) * x[indices[k]]
                out[i] = acc * scale[r]

        @njit(parallel=True, cache=True, nogil=True, fastmath=True)
        def rmatvec(indptr, rows, indices, codes, scale, g, edges, partial):
            for b in prange(edges.size - 1):
                acc = partial[b]
                for i in range(edges[b], edges[b + 1]):
                    r = rows[i]
                    gr = g[i] * scale[r]
                    if gr != 0.0:
                        for k in range(indptr[r], indptr[r + 1]):
                            acc[indices[k]] += gr * np.float32(codes[k])

        @njit(parallel=True, cache=True, nogil=True)
        def gather(indptr, values, rows, new_indptr, out):
            for i in prange(rows.size):
                src = indptr[rows[i]]
                dst = new_indptr[i]
                for k in range(new_indptr[i + 1] - dst):
                    out[dst + k] = values[src + k]

        @njit(parallel=True, cache=True, nogil=True)
        def spmm(indptr, indices, data, s_indptr, s_indices, s_data, out):
            for r in prange(indptr.size - 1):
                for k in range(indptr[r], indptr[r + 1]):
                    j = indices[k]
                    v = np.float64(data[k])
                    for p in range(s_indptr[j], s_indptr[j + 1]):
                        out[r, s_indices[p]] += v * s_data[p]

        _KERNELS = (matvec, rmatvec, gather, spmm)
    return _KERNELS


_KERNELS: tuple[Any, Any, Any, Any] | None = None


def times_sparse(A: sp.csr_matrix, S: sp.spmatrix) -> np.ndarray:
    """``A @ S`` as a dense float64 array for a CSR ``A`` with many rows and a sparse ``S`` with
    few columns (beamlets x segments): one parallel pass over ``A``, no sparse result to build
    (SciPy's sparse product took 1.4 s for the 3 mm fit rows; numba missing: SciPy's)."""
    if not numba_available()[0]:
        return np.asarray((A @ S).todense(), dtype=np.float64)
    S = sp.csr_matrix(S, dtype=np.float64)
    out = np.zeros((A.shape[0], S.shape[1]), dtype=np.float64)
    kernel = _kernels()[3]
    kernel(A.indptr, A.indices, A.data, S.indptr, S.indices, S.data, out)
    return out


def quantise(A: sp.spmatrix) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(indptr int64, indices uint16, codes uint16, scale float32) of a CSR matrix."""
    A = as_csr32(A)
    if A.shape[1] > MAX_COLUMNS:
        raise ValueError(
            f"the compressed matrix takes at most {MAX_COLUMNS} beamlets; this one has "
            f"{A.shape[1]} (use --matrix csr)"
        )
    if A.nnz and float(A.data.min()) < 0:
        raise ValueError("the compressed matrix needs non-negative dose influence values")
    indptr = A.indptr.astype(np.int64)
    lengths = np.diff(indptr)
    row_max = np.zeros(A.shape[0], dtype=np.float32)
    full = lengths > 0
    if A.nnz:
        row_max[full] = np.maximum.reduceat(A.data, indptr[:-1][full])
    scale = (row_max / np.float32(_CODE_MAX)).astype(np.float32)
    inv = np.zeros_like(scale)
    np.divide(1.0, scale, out=inv, where=scale > 0)
    codes = np.rint(A.data * np.repeat(inv, lengths)).astype(np.uint16)
    return indptr, A.indices.astype(np.uint16), codes, scale


def gather_rows(
    indptr: np.ndarray, rows: np.ndarray, *arrays: np.ndarray
) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """Rows ``rows`` of a CSR-like matrix: the new ``indptr`` (int64) and, for each per-non-zero
    array (indices, values, codes), its copy restricted to those rows, gathered in parallel by
    numba (SciPy's row indexing runs on one core and takes seconds for a 3 mm working set)."""
    gather = _kernels()[2]
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    indptr = np.ascontiguousarray(indptr, dtype=np.int64)
    lengths = indptr[rows + 1] - indptr[rows]
    new_indptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_indptr[1:])
    out = []
    for a in arrays:
        b = np.empty(int(new_indptr[-1]), dtype=a.dtype)
        gather(indptr, a, rows, new_indptr, b)
        out.append(b)
    return new_indptr, tuple(out)


class CompressedCpuOps:
    """The CPU backend on the compressed layout (same interface as ``CpuOps``). ``rows``: the
    rows of the stored arrays this instance is (all of them, or a working set's, in order)."""

    name = "numpy"
    matrix = "compressed"
    xp = np

    def __init__(
        self,
        A: sp.spmatrix | None,
        threads: int | None = None,
        arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
        num_columns: int = 0,
        rows: np.ndarray | None = None,
    ) -> None:
        ok, why = numba_available()
        if not ok:
            raise ImportError(why)
        if arrays is None:
            assert A is not None
            arrays, num_columns = quantise(A), int(A.shape[1])
        self.indptr, self.indices, self.codes, self.scale = arrays
        # the kernels index with unsigned integers (no wrap-around check per load): same bytes
        self.indptr = np.ascontiguousarray(self.indptr, dtype=np.int64)
        self._uptr = self.indptr.view(np.uint64)
        stored = int(self.indptr.size - 1)
        if stored >= 2**32:
            raise ValueError(
                f"the compressed matrix takes fewer than 2**32 rows; this one has {stored}"
            )
        if rows is None:
            self.rows = np.arange(stored, dtype=np.uint32)
        else:
            self.rows = np.ascontiguousarray(rows, dtype=np.uint32)
        self.shape = (int(self.rows.size), int(num_columns))
        lengths = self.indptr[self.rows + 1] - self.indptr[self.rows]
        cumulative = np.zeros(self.rows.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=cumulative[1:])
        self.nnz = int(cumulative[-1])
        self.threads = max(1, threads or len(os.sched_getaffinity(0)))
        nblocks = max(1, min(self.threads * BLOCKS_PER_THREAD, self.shape[0]))
        # blocks of about equal non-zeros, not rows: dense rows near the target cost more
        cuts = np.searchsorted(cumulative, np.linspace(0, self.nnz, nblocks + 1))
        cuts[0], cuts[-1] = 0, self.shape[0]
        self._edges = np.unique(np.clip(cuts, 0, self.shape[0])).astype(np.int64)
        self._uedges = self._edges.view(np.uint64)
        self._matvec, self._rmatvec, _, _ = _kernels()

    @property
    def bytes_per_nonzero(self) -> float:
        """Bytes read per non-zero: index and code, and per row its pointers, scale and entry
        in ``rows``."""
        per_row = self.indptr.itemsize + self.scale.itemsize + self.rows.itemsize
        per_nonzero = self.indices.itemsize + self.codes.itemsize
        return per_nonzero + per_row * self.shape[0] / max(self.nnz, 1)

    def _threads(self) -> None:
        import numba

        most = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
        numba.set_num_threads(min(self.threads, most))

    def matvec(self, x: Any) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(self.shape[0], dtype=np.float32)
        self._threads()
        self._matvec(self._uptr, self.rows, self.indices, self.codes, self.scale, x, out)
        return out

    def rmatvec(self, g: Any) -> np.ndarray:
        g = np.ascontiguousarray(g, dtype=np.float32)
        partial = np.zeros((self._edges.size - 1, self.shape[1]), dtype=np.float32)
        self._threads()
        self._rmatvec(
            self._uptr, self.rows, self.indices, self.codes, self.scale, g, self._uedges, partial
        )
        return partial.sum(axis=0)

    def subset(self, rows: np.ndarray) -> CompressedCpuOps:
        """Rows ``rows`` of this matrix (a working set): a view on the same arrays, neither
        copied nor quantised again."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= self.shape[0]):
            raise IndexError(f"working-set rows must lie in [0, {self.shape[0]})")
        picked = self.rows[rows]  # rows of the stored arrays
        return CompressedCpuOps(
            None,
            self.threads,
            arrays=(self.indptr, self.indices, self.codes, self.scale),
            num_columns=self.shape[1],
            rows=picked,
        )

    def asarray(self, a: Any, dtype: Any = np.float32) -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return np.asarray(a)
