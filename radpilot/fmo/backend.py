"""Array backends for the FMO: NumPy/SciPy on the CPU, CuPy/cupyx on a CUDA GPU.

The solver is written once against an array namespace ``xp``; this module supplies ``xp`` and
the two sparse products every iteration needs, ``A @ x`` and ``A.T @ g``, kept resident on the
device between solves. CuPy is imported only when the GPU backend is asked for.

On the CPU, SciPy's sparse products run on one core. The CPU backend splits ``A`` into row blocks
and runs the blocks on a thread pool (SciPy's kernels release the GIL): ``A @ x`` fills each
block's slice of the output, ``A.T @ g`` adds up per-block beamlet vectors (a few thousand
entries), so no thread writes where another does.

``A.T @ g`` skips every block where ``g`` is all zero. In FMO most rows carry an overdose
objective whose gradient vanishes wherever the dose is under its objective dose; rows follow the
voxel order (slice by slice), so whole blocks away from the target drop out of the product.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp

from radpilot.case import as_csr32
from radpilot.errors import BackendUnavailableError


class MatrixOps(Protocol):
    @property
    def xp(self) -> Any: ...
    @property
    def name(self) -> str: ...
    @property
    def shape(self) -> tuple[int, int]: ...

    def matvec(self, x: Any) -> Any: ...
    def rmatvec(self, g: Any) -> Any: ...
    def asarray(self, a: Any, dtype: Any = ...) -> Any: ...
    def to_host(self, a: Any) -> np.ndarray: ...


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges) if b > a]


def _row_view(A: sp.csr_matrix, a: int, b: int) -> sp.csr_matrix:
    """Rows ``a:b`` of a CSR matrix sharing its value and index arrays (no copy)."""
    lo, hi = int(A.indptr[a]), int(A.indptr[b])
    indptr = (A.indptr[a : b + 1] - lo).astype(A.indptr.dtype)
    # SciPy's constructor copies; an empty matrix of the right shape takes the views instead
    M = sp.csr_matrix((b - a, A.shape[1]), dtype=A.dtype)
    M.data, M.indices, M.indptr = A.data[lo:hi], A.indices[lo:hi], indptr
    M.has_canonical_format = True  # rows of a canonical matrix stay canonical
    return M


def _transposed_view(M: sp.csr_matrix) -> sp.csc_matrix:
    """``M.T`` as a CSC matrix on the same arrays (SciPy's ``.T`` prunes, i.e. copies, views)."""
    T = sp.csc_matrix((M.shape[1], M.shape[0]), dtype=M.dtype)
    T.data, T.indices, T.indptr = M.data, M.indices, M.indptr
    T.has_canonical_format = True
    return T


def take_rows(A: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """Rows ``rows`` of a CSR matrix, gathered in parallel with numba where it is installed,
    else by SciPy's (one-core) row indexing (seconds for a 3 mm working set)."""
    from radpilot.fmo.compressed import gather_rows, numba_available

    if not numba_available()[0]:
        return A[rows]
    indptr, (indices, data) = gather_rows(A.indptr, rows, A.indices, A.data)
    M = sp.csr_matrix((int(rows.size), int(A.shape[1])), dtype=A.dtype)
    M.data, M.indices, M.indptr = data, indices, indptr.astype(A.indptr.dtype)
    M.has_canonical_format = True  # rows of a canonical matrix stay canonical
    return M


BLOCKS = 64  # row blocks: small enough to skip, large enough to keep the pool busy


class CpuOps:
    """NumPy/SciPy backend with block-parallel sparse products."""

    name = "numpy"
    matrix = "csr"
    xp = np

    def __init__(self, A: sp.spmatrix, threads: int | None = None) -> None:
        A = as_csr32(A)
        self._A = A
        self.shape = (int(A.shape[0]), int(A.shape[1]))
        self.nnz = int(A.nnz)
        self.threads = max(1, threads or len(os.sched_getaffinity(0)))
        nblocks = max(self.threads, min(BLOCKS, self.shape[0] // 1000 or 1))
        self._row_blocks = [(a, b, _row_view(A, a, b)) for a, b in _split(self.shape[0], nblocks)]
        self._transposed = [_transposed_view(M) for _, _, M in self._row_blocks]
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _run(self, fn: Any, blocks: list[Any]) -> None:
        if self._pool is None:
            for blk in blocks:
                fn(blk)
            return
        # one task per thread, each over an interleaved share of the blocks
        shares = [blocks[k :: self.threads] for k in range(self.threads)]
        list(self._pool.map(lambda share: [fn(b) for b in share], shares))

    def matvec(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        out = np.empty(self.shape[0], dtype=np.float32)

        def part(blk: tuple[int, int, sp.csr_matrix]) -> None:
            a, b, M = blk
            out[a:b] = M @ x

        self._run(part, self._row_blocks)
        return out

    def rmatvec(self, g: np.ndarray) -> np.ndarray:
        g = np.asarray(g, dtype=np.float32)
        live = [k for k, (a, b, _) in enumerate(self._row_blocks) if g[a:b].any()]
        partial = np.zeros((max(len(live), 1), self.shape[1]), dtype=np.float32)

        def part(j: int) -> None:
            a, b, _ = self._row_blocks[live[j]]
            # streams the block once, scattering into a beamlet vector that fits in cache
            partial[j] = self._transposed[live[j]] @ g[a:b]

        self._run(part, list(range(len(live))))
        return partial.sum(axis=0)

    def subset(self, rows: np.ndarray) -> CpuOps:
        """Rows ``rows`` of ``A`` (a working set) on the same backend (``take_rows``)."""
        return CpuOps(take_rows(self._A, rows), threads=self.threads)

    def asarray(self, a: Any, dtype: Any = np.float32) -> np.ndarray:
        return np.asarray(a, dtype=dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return np.asarray(a)


def cupy_on_device(device: int = 0) -> Any:
    """CuPy with CUDA device ``device`` in use; BackendUnavailableError saying why it cannot be."""
    try:
        import cupy as cp
    except ImportError as exc:
        raise BackendUnavailableError(
            "the cupy backend needs CuPy (pip install 'radpilot[gpu]')"
        ) from exc
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            raise BackendUnavailableError("CuPy found no CUDA device")
    except cp.cuda.runtime.CUDARuntimeError as exc:
        raise BackendUnavailableError(f"CuPy cannot reach a CUDA device: {exc}") from exc
    cp.cuda.Device(device).use()
    return cp


class DeviceArrays:
    """What every GPU backend shares: arrays to and from the device, and waiting for it."""

    xp: Any

    def asarray(self, a: Any, dtype: Any = np.float32) -> Any:
        return self.xp.asarray(a, dtype=dtype)

    def to_host(self, a: Any) -> np.ndarray:
        return self.xp.asnumpy(a)

    def synchronize(self) -> None:
        self.xp.cuda.Device().synchronize()


class CupyOps(DeviceArrays):
    """CuPy backend: ``A`` and ``A.T`` as cuSPARSE CSR matrices resident on the GPU."""

    name = "cupy"
    matrix = "csr"

    def __init__(self, A: sp.spmatrix, device: int = 0) -> None:
        self.xp = cupy_on_device(device)
        import cupyx.scipy.sparse as csp

        A = as_csr32(A)
        self.shape = (int(A.shape[0]), int(A.shape[1]))
        self.nnz = int(A.nnz)
        self._A = csp.csr_matrix(A)
        self._AT = csp.csr_matrix(as_csr32(A.T))  # a transposed product on cuSPARSE is slower

    def matvec(self, x: Any) -> Any:
        return self._A @ self.xp.asarray(x, dtype=self.xp.float32)

    def rmatvec(self, g: Any) -> Any:
        return self._AT @ self.xp.asarray(g, dtype=self.xp.float32)


def gpu_available() -> tuple[bool, str]:
    """Whether the CuPy backend can run here, and why not when it cannot."""
    try:
        import cupy as cp
    except ImportError:
        return False, "CuPy is not installed (pip install 'radpilot[gpu]')"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as exc:
        return False, f"CuPy cannot reach a CUDA device: {exc}"
    return (n > 0, "" if n > 0 else "no CUDA device")


MATRIX_LAYOUTS = ("auto", "compressed", "csr")
DEFAULT_MATRIX = "auto"
# What ``auto`` means on the CPU: the compressed layout where numba is installed and the beamlets
# fit, else float32 CSR. On the 3 mm TG-119 matrix on the 2-core development machine
# (docs/benchmarks.md, `make bench-fmo`) its kernels take A @ x in 23 ms and A.T @ g in 28 ms
# against 40 and 36 for CSR, and reach the FMO target 2-3x sooner (working sets read in place);
# RADPILOT_FMO_MATRIX=csr (or --matrix csr) chooses CSR.
AUTO_LAYOUT = "compressed"


def matrix_layout(matrix: str | None = None) -> str:
    """The CPU matrix layout asked for: the argument, else $RADPILOT_FMO_MATRIX, else auto."""
    value = (matrix or os.environ.get("RADPILOT_FMO_MATRIX") or DEFAULT_MATRIX).strip().lower()
    if value not in MATRIX_LAYOUTS:
        raise ValueError(
            f"unknown matrix layout {value!r} (RADPILOT_FMO_MATRIX / --matrix); use "
            f"{', '.join(MATRIX_LAYOUTS)}"
        )
    return value


def cpu_layout(num_beamlets: int, matrix: str | None = None) -> str:
    """The CPU layout a matrix with ``num_beamlets`` columns gets: ``compressed`` or ``csr``.
    BackendUnavailableError when ``compressed`` is asked for and cannot be had."""
    from radpilot.fmo.compressed import MAX_COLUMNS, numba_available

    layout = matrix_layout(matrix)
    explicit = layout == "compressed"
    if layout == "auto":
        layout = AUTO_LAYOUT
    if layout == "csr":
        return "csr"
    ok, why = numba_available()
    fits = num_beamlets <= MAX_COLUMNS
    if explicit and not (ok and fits):
        raise BackendUnavailableError(
            f"the compressed matrix cannot be used here: {why or f'{num_beamlets} beamlets'}; "
            "use --matrix csr"
        )
    return "compressed" if ok and fits else "csr"


Packed = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # the compressed layout's arrays


def _cpu_ops(
    A: sp.spmatrix, threads: int | None, matrix: str | None, packed: Packed | None = None
) -> MatrixOps:
    if cpu_layout(int(A.shape[1]), matrix) == "csr":
        return CpuOps(A, threads=threads)
    from radpilot.fmo.compressed import CompressedCpuOps

    if packed is not None:
        return CompressedCpuOps(None, threads, arrays=packed, num_columns=int(A.shape[1]))
    return CompressedCpuOps(A, threads=threads)


def gpu_layout(num_beamlets: int, matrix: str | None = None) -> str:
    """The GPU layout a matrix with ``num_beamlets`` columns gets: ``compressed`` or ``csr``.
    ``auto`` is the compressed layout where it fits: on an H200 it reached the FMO target 1.28x
    sooner than cuSPARSE on float32 CSR, in half the device memory (docs/benchmarks.md,
    ``make bench-gpu``). BackendUnavailableError when ``compressed`` is asked for and the
    matrix has too many beamlets."""
    from radpilot.fmo.compressed import MAX_COLUMNS

    layout = matrix_layout(matrix)
    if layout == "csr":
        return "csr"
    if num_beamlets <= MAX_COLUMNS:
        return "compressed"
    if layout == "compressed":
        raise BackendUnavailableError(
            f"the compressed matrix takes at most {MAX_COLUMNS} beamlets; this one has "
            f"{num_beamlets}: use --matrix csr"
        )
    return "csr"


def uses_compressed(backend: str, num_beamlets: int, matrix: str | None = None) -> bool:
    """Whether ``make_ops`` builds the compressed layout for this backend, size and request (the
    case store then hands it the stored arrays instead of quantising again)."""
    if backend in ("cupy", "gpu") or (backend == "auto" and gpu_available()[0]):
        return gpu_layout(num_beamlets, matrix) == "compressed"
    return cpu_layout(num_beamlets, matrix) == "compressed"


def _gpu_ops(A: sp.spmatrix, matrix: str | None, packed: Packed | None = None) -> MatrixOps:
    """The GPU backend: the compressed layout's RawKernels (``auto`` where the beamlets fit,
    ``compressed``; ``radpilot.fmo.gpu_compressed``) or cuSPARSE on float32 CSR (``csr``)."""
    if gpu_layout(int(A.shape[1]), matrix) == "csr":
        return CupyOps(A)
    from radpilot.fmo.gpu_compressed import CompressedGpuOps

    if packed is not None:
        return CompressedGpuOps(None, arrays=packed, num_columns=int(A.shape[1]))
    return CompressedGpuOps(A)


def subset_ops(
    ops: MatrixOps,
    A: sp.spmatrix,
    rows: np.ndarray,
    backend: str,
    threads: int | None = None,
    matrix: str | None = None,
) -> MatrixOps:
    """The backend for rows ``rows`` of ``A`` (a working set); the compressed layout takes its
    own rows without quantising again."""
    subset = getattr(ops, "subset", None)
    if subset is not None:
        return subset(rows)
    return make_ops(A[rows], backend, threads=threads, matrix=matrix)


def make_ops(
    A: sp.spmatrix,
    backend: str = "numpy",
    threads: int | None = None,
    matrix: str | None = None,
    packed: Packed | None = None,
) -> MatrixOps:
    """The backend for ``A``. ``matrix``: ``compressed`` (16-bit indices and values; numba
    kernels on the CPU, CuPy RawKernels on the GPU), ``csr`` (float32 CSR: SciPy on the CPU,
    cuSPARSE on the GPU) or ``auto`` (the CPU's ``AUTO_LAYOUT``; ``gpu_layout`` on the GPU).
    ``packed``: ``A`` already in the compressed layout (``CaseStore.compressed``), used when
    that layout is chosen instead of quantising ``A`` again."""
    if backend in ("numpy", "cpu"):
        return _cpu_ops(A, threads, matrix, packed)
    if backend in ("cupy", "gpu"):
        return _gpu_ops(A, matrix, packed)
    if backend == "auto":
        ok, _ = gpu_available()
        return _gpu_ops(A, matrix, packed) if ok else _cpu_ops(A, threads, matrix, packed)
    raise ValueError(f"unknown FMO backend {backend!r}; use numpy, cupy or auto")
