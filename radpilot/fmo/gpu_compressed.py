"""The compressed dose influence matrix on a CUDA GPU: CuPy RawKernels over the CPU's layout.

The same 4 bytes per non-zero as ``radpilot.fmo.compressed`` (uint16 column index, uint16 code,
one float32 scale per row, int64 row pointers), so the matrix built for the CPU goes to the device
as it is, and one copy serves both products:

- ``A @ x``: one warp per row; its lanes stride over the row's non-zeros, accumulate
  ``code * x[col]`` in float32, reduce with warp shuffles, and lane 0 writes ``sum * scale``.
- ``A.T @ g``: each block takes a run of rows and keeps a private beamlet vector in shared memory
  (a case's few thousand beamlets fit); its warps take one row at a time, skip rows where
  ``g * scale`` is zero (far from every active objective), and add ``g * scale * code`` into the
  shared vector; the block then adds its vector into the output. Where the beamlets do not fit
  in shared memory the adds go straight to the output in global memory. The schedule (rows per
  block, warps interleaved or on contiguous runs) was timed on an H200 (``make bench-gpu``):
  256 interleaved rows per block was fastest; more rows per block leave too few blocks.

CuPy is imported only here, when the GPU backend is asked for the compressed layout; it is the
GPU's default layout. The kernels are checked against the dequantised matrix in
``tests/unit/fmo/test_gpu.py`` where a device exists (they passed on an H200, 2026-12-04).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from radpilot.fmo.backend import DeviceArrays, cupy_on_device
from radpilot.fmo.compressed import quantise

WARP = 32
THREADS = 256  # 8 warps per block
ROWS_PER_BLOCK = 256  # A.T @ g: rows per block (H200: 0.54 ms at 256, 0.73 at 1024, 2.6 at 4096)
CHUNKED = False  # A.T @ g: each warp a contiguous run of its block's rows (else interleaved)
SHARED_LIMIT = 48 * 1024  # bytes of static-limit shared memory a block may ask for

SOURCE = r"""
extern "C" __global__ void compressed_matvec(
    const long long* __restrict__ indptr, const unsigned short* __restrict__ indices,
    const unsigned short* __restrict__ codes, const float* __restrict__ scale,
    const float* __restrict__ x, float* __restrict__ out, const long long rows)
{
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;  /* the whole warp leaves together: one row per warp */
    const long long end = indptr[row + 1];
    float acc = 0.0f;
    for (long long k = indptr[row] + lane; k < end; k += 32) {
        acc += (float)codes[k] * x[indices[k]];
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        acc += __shfl_down_sync(0xffffffffu, acc, offset);
    }
    if (lane == 0) out[row] = acc * scale[row];
}

extern "C" __global__ void compressed_rmatvec_shared(
    const long long* __restrict__ indptr, const unsigned short* __restrict__ indices,
    const unsigned short* __restrict__ codes, const float* __restrict__ scale,
    const float* __restrict__ g, float* __restrict__ out, const long long rows,
    const int cols, const long long rows_per_block, const int chunked)
{
    extern __shared__ float acc[];
    for (int c = threadIdx.x; c < cols; c += blockDim.x) acc[c] = 0.0f;
    __syncthreads();
    const int warps = blockDim.x / 32;
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    long long first = (long long)blockIdx.x * rows_per_block;
    long long last = min(first + rows_per_block, rows);
    long long step = warps;
    if (chunked) {
        /* each warp a contiguous run of the block's rows: warps working at once sit further
           apart in the volume and add into different beamlets (fewer colliding atomics) */
        const long long per_warp = (rows_per_block + warps - 1) / warps;
        first += warp * per_warp;
        last = min(first + per_warp, last);
        step = 1;
    } else {
        first += warp;  /* interleaved: the block's warps on neighbouring rows at once */
    }
    for (long long r = first; r < last; r += step) {
        const float gr = g[r] * scale[r];
        if (gr == 0.0f) continue;
        const long long end = indptr[r + 1];
        for (long long k = indptr[r] + lane; k < end; k += 32) {
            atomicAdd(&acc[indices[k]], gr * (float)codes[k]);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = acc[c];
        if (v != 0.0f) atomicAdd(&out[c], v);
    }
}

extern "C" __global__ void compressed_rmatvec_global(
    const long long* __restrict__ indptr, const unsigned short* __restrict__ indices,
    const unsigned short* __restrict__ codes, const float* __restrict__ scale,
    const float* __restrict__ g, float* __restrict__ out, const long long rows)
{
    const long long row = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float gr = g[row] * scale[row];
    if (gr == 0.0f) return;
    const long long end = indptr[row + 1];
    for (long long k = indptr[row] + lane; k < end; k += 32) {
        atomicAdd(&out[indices[k]], gr * (float)codes[k]);
    }
}
"""

_MODULE: Any = None


def _module(cp: Any) -> Any:
    """The compiled kernels (NVRTC, once per process; CuPy caches the binary on disk)."""
    global _MODULE
    if _MODULE is None:
        _MODULE = cp.RawModule(code=SOURCE, options=("--std=c++14",))
    return _MODULE


class CompressedGpuOps(DeviceArrays):
    """The CuPy backend on the compressed layout (same interface as ``CupyOps``)."""

    name = "cupy"
    matrix = "compressed"

    def __init__(
        self,
        A: sp.spmatrix | None,
        device: int = 0,
        arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None,
        num_columns: int = 0,
    ) -> None:
        cp = self.xp = cupy_on_device(device)
        if arrays is None:
            assert A is not None
            arrays, num_columns = quantise(A), int(A.shape[1])
        indptr, indices, codes, scale = arrays
        self.shape = (int(indptr.size - 1), int(num_columns))
        self.nnz = int(codes.size)
        self._indptr = cp.asarray(indptr, dtype=cp.int64)
        self._indices = cp.asarray(indices, dtype=cp.uint16)
        self._codes = cp.asarray(codes, dtype=cp.uint16)
        self._scale = cp.asarray(scale, dtype=cp.float32)
        module = _module(cp)
        self._matvec = module.get_function("compressed_matvec")
        self._rmatvec_shared = module.get_function("compressed_rmatvec_shared")
        self._rmatvec_global = module.get_function("compressed_rmatvec_global")
        self._shared_bytes = 4 * self.shape[1]
        self.rows_per_block = ROWS_PER_BLOCK  # A.T @ g's schedule (make bench-gpu tunes it)
        self.chunked = CHUNKED

    @property
    def bytes_per_nonzero(self) -> float:
        arrays = (self._indptr, self._indices, self._codes, self._scale)
        return sum(int(a.nbytes) for a in arrays) / max(self.nnz, 1)

    def _warp_grid(self) -> tuple[int]:
        return ((self.shape[0] * WARP + THREADS - 1) // THREADS,)

    def matvec(self, x: Any) -> Any:
        cp = self.xp
        x = cp.ascontiguousarray(cp.asarray(x, dtype=cp.float32))
        out = cp.empty(self.shape[0], dtype=cp.float32)
        if self.shape[0]:
            args = (self._indptr, self._indices, self._codes, self._scale, x, out)
            self._matvec(self._warp_grid(), (THREADS,), (*args, np.int64(self.shape[0])))
        return out

    def rmatvec(self, g: Any) -> Any:
        cp = self.xp
        g = cp.ascontiguousarray(cp.asarray(g, dtype=cp.float32))
        out = cp.zeros(self.shape[1], dtype=cp.float32)
        if not self.shape[0]:
            return out
        args = (self._indptr, self._indices, self._codes, self._scale, g, out)
        rows = np.int64(self.shape[0])
        if self._shared_bytes <= SHARED_LIMIT:
            per_block, chunked = self.rows_per_block, np.int32(self.chunked)
            blocks = (self.shape[0] + per_block - 1) // per_block
            self._rmatvec_shared(
                (blocks,),
                (THREADS,),
                (*args, rows, np.int32(self.shape[1]), np.int64(per_block), chunked),
                shared_mem=self._shared_bytes,
            )
        else:
            self._rmatvec_global(self._warp_grid(), (THREADS,), (*args, rows))
        return out
