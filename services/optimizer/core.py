"""Optimizer core (no gRPC): resident dose influence matrices per case, FMO, dose artefacts."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from radpilot.case import CaseError
from radpilot.case_store import CaseStore
from radpilot.cases.helpers import Helper, check_helpers
from radpilot.delivery.sequencing import SequencingSettings, deliver, protocol_fractions
from radpilot.fmo import FluenceOptimizer, FMOResult, FMOSettings, ObjectiveTerm
from radpilot.fmo.backend import make_ops
from radpilot.fmo.objectives import ALL_BEAMS
from radpilot.protocol import MAX_PRESCRIPTION_GY
from services.common.metrics import FMO_ITERATIONS, FMO_SECONDS, OPTIMIZE_IN_FLIGHT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    case_id: str
    rows: int
    beamlets: int
    nnz: int
    backend: str
    seconds: float
    loaded: bool = False  # this call loaded the case from the store


@dataclass(frozen=True)
class Optimized:
    result: FMOResult
    dose_path: str
    dose_sha256: str
    case_load_seconds: float = 0.0  # loading the case into this replica (0: already there)


MAX_FMO_ITERATIONS = 100_000


class OptimizerCore:
    def __init__(
        self, store: CaseStore, backend: str = "numpy", max_cases: int = 4, matrix: str = ""
    ) -> None:
        self.store = store
        self.backend = backend
        self.matrix = matrix or None  # None: $RADPILOT_FMO_MATRIX or auto
        self.max_cases = max_cases
        self._optimizers: OrderedDict[str, FluenceOptimizer] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def warm_up(self) -> None:
        """Exercise the backend once (imports, thread pool, device) before reporting ready."""
        import scipy.sparse as sp

        ops = make_ops(
            sp.identity(4, dtype=np.float32, format="csr"), self.backend, matrix=self.matrix
        )
        ops.rmatvec(ops.matvec(ops.asarray(np.ones(4, dtype=np.float32))))
        subset = getattr(ops, "subset", None)  # the numba kernels (gather, products) compile here
        if subset is not None:
            subset(np.arange(2)).matvec(np.ones(4, dtype=np.float32))

    def _lock(self, case_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(case_id, threading.Lock())

    def prepare(self, case_id: str) -> tuple[FluenceOptimizer, Prepared]:
        """The case's optimizer, loading it from the store on a miss (idempotent)."""
        with self._lock(case_id):
            t0 = time.perf_counter()
            opt = self._optimizers.get(case_id)
            loaded = opt is None
            if opt is None:
                # mapped, not read: milliseconds, and replicas on one node share the page cache
                case = self.store.load(case_id, mmap=True)  # CaseNotFoundError -> NOT_FOUND
                # the compressed layout comes from the store too (Case.compressed_source): mapped,
                # not quantised again
                opt = FluenceOptimizer(case, backend=self.backend, matrix=self.matrix)
                with self._guard:
                    self._optimizers[case_id] = opt
                    while len(self._optimizers) > self.max_cases:
                        evicted, _ = self._optimizers.popitem(last=False)
                        log.info("evicted case %s", evicted)
                log.info("prepared case %s in %.1f s", case_id, time.perf_counter() - t0)
            else:
                with self._guard:
                    self._optimizers.move_to_end(case_id)
            A = opt.case.dose_influence
            return opt, Prepared(
                case_id,
                A.shape[0],
                A.shape[1],
                int(A.nnz),
                opt.backend,
                time.perf_counter() - t0,
                loaded,
            )

    def optimize(
        self,
        case_id: str,
        terms: list[ObjectiveTerm],
        normalize_to: str = "",
        warm_start: np.ndarray | None = None,
        max_iterations: int = 0,
        prescription_gy: float = 0.0,
        coverage_pct: float = 0.0,
        helpers: list[Helper] | None = None,
    ) -> Optimized:
        if not 0 <= max_iterations <= MAX_FMO_ITERATIONS:
            raise ValueError(
                f"max_iterations must be within 0..{MAX_FMO_ITERATIONS} (0 = the default)"
            )
        if not (np.isfinite(prescription_gy) and 0 <= prescription_gy <= MAX_PRESCRIPTION_GY):
            raise ValueError(
                f"prescription_gy must be within 0..{MAX_PRESCRIPTION_GY:g} Gy (0 = the case's)"
            )
        opt, prepared = self.prepare(case_id)
        if warm_start is not None and warm_start.size == 0:
            warm_start = None
        if not (coverage_pct == 0 or 0 < coverage_pct < 100):
            raise ValueError("coverage_pct must be within (0, 100), or 0 for the default 95")
        settings = FMOSettings(
            normalize_to=normalize_to or None,
            max_iter=max_iterations or FMOSettings.max_iter,
            coverage_pct=coverage_pct or FMOSettings.coverage_pct,
            prescription_gy=prescription_gy or None,
        )
        helpers = helpers or []
        check_helpers(helpers, set(opt.case.structure_names))
        known = set(opt.case.structure_names) | {h.name for h in helpers} | {ALL_BEAMS}
        unknown = sorted({t.structure for t in terms} - known)
        if unknown:  # a helper of an earlier request does not carry over: send its definition
            raise CaseError(
                f"objective terms name structure(s) {unknown} that case {case_id} lacks and "
                f"the request defines no helper for; it has {sorted(opt.case.structure_names)}"
            )
        with OPTIMIZE_IN_FLIGHT.track_inprogress(), self._lock(case_id):
            # one solve per case at a time: the working set is per solve, helpers per request
            opt.use_helpers([self.store.helper(case_id, opt.case, h) for h in helpers])
            result = opt.solve(terms, x0=warm_start, settings=settings)
        FMO_SECONDS.labels(result.backend).observe(result.seconds)
        FMO_ITERATIONS.observe(result.iterations)
        path, sha = self.store.put_artefact(case_id, "dose", result.dose_rows)
        return Optimized(result, path, sha, prepared.seconds if prepared.loaded else 0.0)

    def sequence(
        self,
        case_id: str,
        fluence: np.ndarray,
        settings: SequencingSettings,
        *,
        fractions: int,
        normalize_to: str = "",
        prescription_gy: float = 0.0,
        coverage_pct: float = 0.0,
        terms: list[ObjectiveTerm] | None = None,
        helpers: list[Helper] | None = None,
    ) -> tuple[dict[str, Any], np.ndarray, str, str]:
        """Sequence a plan on this replica's matrix: (plan JSON, delivered fluence, dose path,
        dose sha256). Bad settings or a beam grid the MLC cannot deliver: DeliveryError."""
        if not (np.isfinite(prescription_gy) and 0 <= prescription_gy <= MAX_PRESCRIPTION_GY):
            raise ValueError(
                f"prescription_gy must be within 0..{MAX_PRESCRIPTION_GY:g} Gy (0 = the case's)"
            )
        if not (coverage_pct == 0 or 0 < coverage_pct < 100):
            raise ValueError("coverage_pct must be within (0, 100), or 0 for the default 95")
        opt, _ = self.prepare(case_id)
        case = opt.case
        if not normalize_to:
            normalize_to = case.targets[0].name if case.targets else ""
        rx = prescription_gy or case.prescription_gy
        helpers = helpers or []
        check_helpers(helpers, set(case.structure_names))
        with self._lock(case_id):
            if terms:
                opt.use_helpers([self.store.helper(case_id, case, h) for h in helpers])
            d = deliver(
                case,
                np.asarray(fluence, dtype=np.float32),
                settings,
                fractions=fractions or protocol_fractions(rx, None),
                target=normalize_to,
                prescription_gy=rx,
                coverage_pct=coverage_pct or 95.0,
                objective=(lambda x: opt.value_and_gradient(x, terms)) if terms else None,
            )
        path, sha = self.store.put_artefact(case_id, "dose", d.dose_rows)
        return d.to_json(rx), d.fluence, path, sha
