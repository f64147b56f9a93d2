"""A curvature preconditioner for warm-started solves: the objective's Hessian on the beamlets
that carry fluence, built once from the warm start, as the L-BFGS initial inverse Hessian.

Why: the voxel penalties make the FMO a bound-constrained least-squares problem whose Hessian
``A^T C A`` (``C`` the penalties' curvature on each active voxel) is badly conditioned. Plain
L-BFGS, whose initial matrix is a multiple of the identity, spends most of a warm start in the
same slow tail as a cold solve (on the 3 mm TG-119 C-shape ~110 iterations after doubling one
weight, against ~190 cold). A warm start already knows which beamlets carry fluence and which
voxels are active, so the Hessian on those beamlets is a dense matrix of a few thousand squared at
most, computed once from the rows of ``A`` that some penalty acts on (BLAS ``syrk``, ~0.3 s for
1,000 beamlets and 20,000 rows here); with it as the initial matrix the same warm start needs a
few dozen iterations.

- **Which curvature.** Voxel penalties (``ObjectiveKind.curvature``) and fluence terms
  (``FluencePenalty.hessian_x``). A voxel within ``CURVATURE_BAND`` of its objective dose counts
  as active: the step would otherwise run into the voxels just below their threshold (measured:
  line-search steps shrinking to 1e-5). Where a term's value depends on the whole structure
  (mean, gEUD, dose-volume terms) or has no per-voxel curvature (smooth maximum) none is built:
  with their curvature modelled (diagonal plus rank one) the metric stopped the rules loop's
  solves above the plain solve's objective, or took longer.
- **When.** On by default for warm starts on the CPU (``FMOSettings.warm_preconditioner``,
  ``$RADPILOT_FMO_WARM_PRECONDITIONER=on|off``). On the benchmark's weight change and five more
  changes of its objective it reached a lower objective than plain L-BFGS, sooner on all but the
  largest change (core dose 8 -> 4 Gy, weight x4); in the rules loop only the warm starts before
  the planner adds structure terms use it (docs/benchmarks.md).
- **Damping.** The penalties are piecewise quadratic: a full Newton step along a direction of
  tiny curvature crosses many kinks. ``damping`` x the matrix's mean diagonal is added to its
  diagonal (Levenberg-Marquardt), which keeps the steps inside the region the matrix describes.
- **Bounds.** The solver applies it to the beamlets it treats as free; a free beamlet outside the
  warm start's fluence gets a diagonal scaling. The Cholesky factor is refreshed only when the
  free set has drifted by more than ``REFACTOR_DRIFT`` of its size (a compression of the old
  factor's matrix is still positive definite, so a stale factor is still a valid metric).
- **Stopping and safety.** A solve that stalls while the line search keeps most of the metric's
  steps (median of the last three >= ``STEP_FIT``) has converged on a metric that still fits.
  One that stalls on short steps, goes three iterations in a row without a descent direction on
  it, or whose line search makes no progress drops it and goes on as plain L-BFGS (its curvature
  pairs kept) to plain L-BFGS's own stopping rule. While it iterates, BLAS runs on one thread.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg as sla
import scipy.linalg.blas as blas
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

REFACTOR_DRIFT = 0.02  # refactor when this fraction of the free beamlets has changed
MAX_BEAMLETS = 3000  # above this many beamlets with fluence the matrix costs more than it saves
ROW_CHUNK = 8192  # rows of A made dense at a time (bounds the memory of the build)
EPS_ACTIVE = 1e-3  # a beamlet below this fraction of the largest, pushed down, is held at zero
# a voxel within this fraction of its term's objective dose of turning active counts as active:
# a damped Newton step would otherwise run into the voxels just below their threshold
CURVATURE_BAND = 0.05
STEP_FIT = 0.25  # the median of the last steps (fraction of the metric's step) that still fits
ENV = "RADPILOT_FMO_WARM_PRECONDITIONER"
DEFAULT_ON = True  # on the CPU backend; see "When" above


def wanted(setting: bool | None, backend: str) -> bool:
    """Whether a warm start builds the preconditioner: the setting, else $RADPILOT_FMO_WARM_
    PRECONDITIONER (on/off), else ``DEFAULT_ON`` on the CPU backend (on a GPU the host-side
    build would cost more than the whole solve)."""
    if setting is not None:
        return setting
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    if value:
        raise ValueError(f"{ENV} must be on or off, got {value!r}")
    return DEFAULT_ON and backend == "numpy"


def iterating(pre: Preconditioner | None) -> contextlib.AbstractContextManager[Any]:
    """The context of the iterations on ``pre``: BLAS on one thread. Its per-iteration solves
    are small, and BLAS threads that wait for more work between them take the cores from the
    sparse products' threads (measured on the 3 mm C-shape: each product 35-50 % slower). The
    limit is the process's: solves running side by side in one optimizer replica (one per case)
    each set it and put back what they found, so one may end with another's limit in place."""
    if pre is None:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


class Preconditioner:
    """``H0 = (M + mu I)^-1`` on the free beamlets, ``M`` the Hessian at the warm start."""

    def __init__(self, carrying: np.ndarray, hessian: np.ndarray, damping: float, n: int) -> None:
        self.carrying = carrying  # beamlet indices the matrix is over (fluence > 0 at the start)
        self.hessian = hessian
        mean_diag = float(np.mean(np.diag(hessian))) if carrying.size else 1.0
        self.mu = damping * max(mean_diag, 1e-30)
        self.diag = np.full(n, max(mean_diag, 1e-30) + self.mu)  # beamlets outside the matrix
        self.diag[carrying] = np.diag(hessian) + self.mu
        self.misses = 0  # consecutive iterations whose step on this metric did not descend
        self.steps: deque[float] = deque(maxlen=3)  # the last line-search steps along its steps
        self._on: np.ndarray | None = None  # which of ``carrying`` the factor covers
        self._factor: Any = None

    def fits(self) -> bool:
        """Whether the metric still describes the objective: the line search keeps most of its
        steps (measured: where it no longer does, steps shrink to 0.01-0.2)."""
        return len(self.steps) == self.steps.maxlen and float(np.median(self.steps)) >= STEP_FIT

    def held(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        """Beamlets held at their bound this iteration: at or near zero and pushed down
        (an epsilon-active set, so a Newton step does not drag near-zero beamlets along)."""
        proj = np.linalg.norm(x - np.maximum(x - g / self.diag, 0.0))
        eps = min(EPS_ACTIVE * float(x.max(initial=0.0)), proj)
        return (x <= eps) & (g > 0)

    def inverse(self, free: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
        """``q -> H0 q`` on the free beamlets (zero elsewhere)."""
        on = free[self.carrying]
        if self._on is None or np.count_nonzero(on != self._on) > REFACTOR_DRIFT * max(
            int(on.sum()), 1
        ):
            idx = np.flatnonzero(on)
            block = self.hessian[np.ix_(idx, idx)]
            block[np.diag_indices_from(block)] += self.mu
            self._factor = sla.cho_factor(block, overwrite_a=True) if idx.size else None
            self._on = on
        covered = self.carrying[self._on]
        factor = self._factor

        def apply(q: np.ndarray) -> np.ndarray:
            out = np.where(free, q / self.diag, 0.0)
            if factor is not None:
                out[covered] = sla.cho_solve(factor, np.where(free[covered], q[covered], 0.0))
                out[covered[~free[covered]]] = 0.0
            return out

        return apply


def build(
    matrix: sp.csr_matrix,
    x: np.ndarray,
    row_curvature: np.ndarray,
    fluence_hessians: list[Any],
    damping: float,
) -> Preconditioner | None:
    """The preconditioner at fluence ``x``; ``row_curvature`` is the penalties' summed second
    derivative on each row of ``matrix`` (dose per unit fluence), ``fluence_hessians`` sparse
    beamlet-space Hessians of the fluence terms. None where it would not pay (no beamlet
    carries fluence, too many do, or no voxel is curved)."""
    carrying = np.flatnonzero(x > 0)
    active = np.flatnonzero(row_curvature > 0)
    if not 0 < carrying.size <= MAX_BEAMLETS or active.size == 0:
        return None
    # A^T C A as the sum of (sqrt(C) A)^T (sqrt(C) A): BLAS's symmetric rank-k update does
    # half the work of a general product; it fills the upper triangle
    upper = np.zeros((carrying.size, carrying.size), dtype=np.float32, order="F")
    sub = matrix[active][:, carrying]
    root = np.sqrt(row_curvature[active]).astype(np.float32)
    for start in range(0, active.size, ROW_CHUNK):
        block = sub[start : start + ROW_CHUNK].toarray()
        block *= root[start : start + ROW_CHUNK, None]
        # a C-ordered block is its transpose in Fortran order: block^T block without a copy
        upper = blas.ssyrk(1.0, block.T, beta=1.0, c=upper, trans=0, overwrite_c=1)
    hessian = np.triu(upper).astype(np.float64)
    hessian += np.triu(hessian, 1).T
    for h in fluence_hessians:
        hessian += h[carrying][:, carrying].toarray()
    return Preconditioner(carrying, hessian, damping, x.size)
