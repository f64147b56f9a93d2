"""Fluence map optimisation (GPT-RadPlan Eq. 1): weighted dose objectives, x >= 0, D95 = Rx.

Solver: projected limited-memory quasi-Newton with an exact line search.

- The direction is L-BFGS on the free beamlets (a beamlet at zero whose gradient pushes it
  further down is held), projected onto ``x >= 0``; the step ``p = P(x + d) - x`` is feasible for
  every ``t`` in ``[0, 1]``.
- Dose is linear in fluence, so along ``p`` the dose is ``dose + t * (A p)``: one sparse product
  gives the whole line, and the objective along it is a convex piecewise quadratic in ``t`` that a
  safeguarded Newton search minimises exactly without touching ``A`` again.
- One iteration therefore costs exactly two sparse products (``A p`` and ``A.T g``).
- Beamlet-space vectors (a few thousand entries) stay on the host in float64; dose-space vectors
  and ``A`` stay on the device in float32. On a GPU only two small vectors cross per iteration.
- Stop when the relative objective decrease stays below ``rel_tol`` for ``patience`` iterations,
  when the projected gradient vanishes, or at ``max_iter``.

Working set (CPU): an overdose term only counts voxels above its objective dose. Most normal-
tissue voxels sit far below it, yet every iteration would pay for their dose. The solver therefore
iterates on the rows that are active or within ``band`` (a fraction of the objective dose) of
becoming active, then computes the full dose once: if any left-out voxel has become active, it is
added (with its band) and the iteration resumes from where it was. The returned optimum is the
optimum of the full problem: it is only accepted once no left-out voxel is active.

After the solve the fluence is scaled so that the normalisation target's D95 equals the
prescription exactly (dose is linear in fluence, and Dx of a scaled dose is the scaled Dx).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radpilot.case import Case, CaseError, Structure
from radpilot.dosimetry import dose_at_volume
from radpilot.fmo import precondition
from radpilot.fmo.backend import MatrixOps, Packed, make_ops, subset_ops, uses_compressed
from radpilot.fmo.objectives import (
    FluencePenalty,
    ObjectiveKind,
    ObjectiveTerm,
    fluence_differences,
    is_fluence_kind,
    kind_of,
    validate_terms,
)

GREW = "working set grew"


@dataclass(frozen=True)
class FMOSettings:
    max_iter: int = 1000  # the first FMO of every shipped case converges well within it
    rel_tol: float = 1e-5
    patience: int = 3
    memory: int = 10
    normalize_to: str | None = None  # target whose D95 is set to the prescription; None = first
    coverage_pct: float = 95.0
    prescription_gy: float | None = None  # the normalisation dose; None = the case's
    working_set: bool | None = None  # None: on for the CPU backend
    band: float = 0.1  # working-set margin, as a fraction of each term's objective dose
    max_rounds: int = 8
    audit_every: int = 25  # iterations between full-dose checks of a working set
    record_iterates: bool = False  # keep (seconds, fluence) per iteration, for benchmarks
    # a warm start builds the objective's Hessian on its beamlets as L-BFGS's initial matrix
    # (radpilot.fmo.precondition); None: $RADPILOT_FMO_WARM_PRECONDITIONER, else on (CPU)
    warm_preconditioner: bool | None = None
    damping: float = 0.02  # the preconditioner's diagonal shift, x its mean diagonal

    def __post_init__(self) -> None:
        if min(self.max_iter, self.memory, self.patience, self.max_rounds, self.audit_every) < 1:
            raise ValueError("max_iter, memory, patience, max_rounds, audit_every must be >= 1")
        if not 0 < self.rel_tol < 1:
            raise ValueError("rel_tol must be within (0, 1)")
        if not 0 <= self.band <= 1:
            raise ValueError("band must be within [0, 1]")
        if not self.damping > 0:
            raise ValueError("damping must be > 0")


@dataclass
class FMOResult:
    fluence: np.ndarray  # float32, D95-normalised
    dose_rows: np.ndarray  # float32, one value per row of A, D95-normalised
    objective: float  # at the solver's optimum, before normalisation
    objective_normalized: float  # the same objective at the normalised fluence
    objective_history: list[float]  # per iteration; inside a working set, that set's objective
    time_history: list[float]  # seconds since the solve started, per history entry
    verified_history: list[tuple[float, float]]  # (seconds, full objective) where it is known
    iterations: int
    seconds: float
    backend: str
    converged: bool
    stop_reason: str
    scale_factor: float
    sparse_products: int
    working_set_rows: list[int] = field(default_factory=list)  # rows iterated on, per round
    iterates: list[tuple[float, np.ndarray]] = field(default_factory=list)  # if recorded
    term_values: dict[str, float] = field(default_factory=dict)
    # the warm-start preconditioner: "" (none built), "kept", or "dropped at iteration N (why)"
    preconditioner: str = ""

    def stats(self) -> dict[str, Any]:
        return {
            "objective": self.objective,
            "objective_normalized": self.objective_normalized,
            "iterations": self.iterations,
            "seconds": self.seconds,
            "backend": self.backend,
            "converged": self.converged,
            "stop_reason": self.stop_reason,
            "scale_factor": self.scale_factor,
            "sparse_products": self.sparse_products,
            "working_set_rows": self.working_set_rows[-1] if self.working_set_rows else 0,
            "term_values": self.term_values,
        }


@dataclass
class _Term:
    term: ObjectiveTerm
    kind: ObjectiveKind
    rows: Any  # device index array into the rows of the space's matrix
    n: float  # the structure's full volume in voxels (the mean's denominator)
    vw: Any = None  # device array: each row's volume fraction in the structure (None: 1)
    host_vw: np.ndarray | None = None  # the same for every row of the structure, on the host


@dataclass
class _Space:
    """A set of rows of ``A`` to iterate on, with the terms' rows mapped into it."""

    ops: MatrixOps
    terms: list[_Term]
    rows: np.ndarray | None  # case rows kept (sorted); None = all rows


@dataclass
class _State:
    x: np.ndarray
    dose: Any
    f: float
    g: np.ndarray


class FluenceOptimizer:
    """Holds one case's dose influence matrix on a backend; solves many FMO problems on it."""

    def __init__(
        self,
        case: Case,
        backend: str = "numpy",
        threads: int | None = None,
        matrix: str | None = None,
        packed: Packed | None = None,
    ) -> None:
        """``packed``: the case's matrix already in the compressed layout (from the case store),
        used when that layout is chosen; without it a case loaded from the store maps the
        store's copy (``Case.compressed_source``), and any other case is quantised here."""
        self.case = case
        self._backend_name = backend
        self._threads = threads
        self._matrix = matrix
        case.require_matrix()
        if (
            packed is None
            and case.compressed_source is not None
            and uses_compressed(backend, case.num_beamlets, matrix)
        ):
            packed = case.compressed_source()  # mapped from the case store: no quantising
        self.ops: MatrixOps = make_ops(
            case.dose_influence, backend, threads=threads, matrix=matrix, packed=packed
        )
        self.xp = self.ops.xp
        self._rows: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        self._helpers: dict[str, Structure] = {}  # helper structures terms may name
        self.sparse_products = 0
        # fluence-space terms of the solve in progress: (kind, weight), on the operator below
        self._fluence_terms: list[tuple[FluencePenalty, float]] = []
        self._differences: Any = None  # neighbouring-beamlet differences (built on first use)
        # the solve in progress: its warm-start preconditioner, and what became of it
        self._pre: precondition.Preconditioner | None = None
        self._pre_note = ""
        self._it_base = 0  # iterations of the solve before the current working-set round

    @property
    def backend(self) -> str:
        return self.ops.name

    @property
    def matrix(self) -> str:
        """The matrix layout in use: ``compressed`` or ``csr``."""
        return str(getattr(self.ops, "matrix", "csr"))

    def host_rows(self, structure: str) -> np.ndarray:
        """The rows objective terms on a structure act on (``Case.objective_rows``)."""
        return self._objective_rows(structure)[0]

    def use_helpers(self, helpers: list[Structure]) -> None:
        """Helper structures (``radpilot.cases.helpers``) that objective terms may name beside
        the case's own; one of a name already in use replaces it."""
        names = set(self.case.structure_names)
        for h in helpers:
            if h.name in names:
                raise CaseError(
                    f"helper {h.name!r} has the name of a structure of case {self.case.name!r}"
                )
            old = self._helpers.get(h.name)
            same = (
                old is not None
                and np.array_equal(old.voxel_indices, h.voxel_indices)
                and np.array_equal(
                    old.weights if old.weights is not None else [],
                    h.weights if h.weights is not None else [],
                )
            )
            if not same:  # a new or changed helper: its voxels must have rows (once per change)
                if (~np.isin(h.voxel_indices, self.case.row_voxels)).any():
                    raise CaseError(f"helper {h.name!r} has voxels without rows in the matrix")
                self._helpers[h.name] = h
                self._rows.pop(h.name, None)

    def _structure(self, name: str) -> Structure:
        helper = self._helpers.get(name)
        return helper if helper is not None else self.case.structure(name)

    def _objective_rows(self, structure: str) -> tuple[np.ndarray, np.ndarray | None]:
        if structure not in self._rows:
            helper = self._helpers.get(structure)
            self._rows[structure] = (
                (np.searchsorted(self.case.row_voxels, helper.voxel_indices), helper.weights)
                if helper is not None
                else self.case.objective_rows(structure)
            )
        return self._rows[structure]

    def _volume(self, structure: str) -> float:
        return self._structure(structure).volume_voxels

    def rows(self, structure: str) -> Any:
        return self.xp.asarray(self.host_rows(structure))

    def _prepare(self, terms: list[ObjectiveTerm]) -> list[_Term]:
        """The dose terms, mapped to rows; the fluence terms are kept for the solve apart."""
        validate_terms(terms)
        self._fluence_terms = []
        for t in terms:
            kind = kind_of(t)
            if isinstance(kind, FluencePenalty) and t.weight > 0:
                if self._differences is None:
                    self._differences = fluence_differences(self.case.beams)
                self._fluence_terms.append((kind, t.weight))
        terms = [t for t in terms if not is_fluence_kind(t.kind)]
        names = set(self.case.structure_names) | set(self._helpers)
        unknown = sorted({t.structure for t in terms} - names)
        if unknown:
            raise CaseError(
                f"objective terms name structure(s) {unknown} that case {self.case.name!r} lacks;"
                f" it has {sorted(names)} (a helper structure needs its definition)"
            )
        out = []
        for t in terms:
            if t.weight > 0:
                rows, vw = self._objective_rows(t.structure)
                out.append(
                    _Term(
                        t,
                        kind_of(t),
                        self.xp.asarray(rows),
                        self._volume(t.structure),
                        self.xp.asarray(vw) if vw is not None else None,
                        vw,
                    )
                )
        return out

    # -- fluence-space terms (host arrays, both backends) -----------------------------------
    def _fx(self, x: np.ndarray) -> tuple[float, np.ndarray | float]:
        """Value and gradient of the solve's fluence terms at ``x`` (0, 0 when it has none)."""
        f, g = 0.0, 0.0
        for kind, w in self._fluence_terms:
            v, gk = kind.value_and_gradient_x(x, self._differences, w)
            f, g = f + v, g + gk
        return f, g

    def _fx_line(self, x: np.ndarray, step: np.ndarray) -> tuple[float, float]:
        a, b = 0.0, 0.0
        for kind, w in self._fluence_terms:
            ak, bk = kind.along_x(x, step, self._differences, w)
            a, b = a + ak, b + bk
        return a, b

    # -- objective on a dose vector -------------------------------------------------------
    def _value_grad(self, dose: Any, terms: list[_Term]) -> tuple[float, Any]:
        xp = self.xp
        grad = xp.zeros_like(dose)
        total = 0.0
        for t in terms:
            v, g = t.kind.value_and_gradient(
                dose[t.rows], t.term.dose_gy, t.term.weight, xp, t.n, t.vw
            )
            total += v
            grad[t.rows] += g
        return total, grad

    def term_values(
        self, dose_rows: Any, terms: list[ObjectiveTerm], fluence: np.ndarray | None = None
    ) -> dict[str, float]:
        """Each term's value; fluence terms need the ``fluence`` (skipped without it)."""
        xp = self.xp
        dose = self.ops.asarray(dose_rows)
        out = {}
        for t in terms:
            kind = kind_of(t)
            if isinstance(kind, FluencePenalty):
                if fluence is not None:
                    if self._differences is None:
                        self._differences = fluence_differences(self.case.beams)
                    x = np.asarray(fluence, dtype=np.float64)
                    out[t.key()] = kind.value_and_gradient_x(x, self._differences, t.weight)[0]
                continue
            rows, vw = self._objective_rows(t.structure)
            out[t.key()] = kind_of(t).value(
                dose[xp.asarray(rows)],
                t.dose_gy,
                t.weight,
                xp,
                self._volume(t.structure),
                xp.asarray(vw) if vw is not None else None,
            )
        return out

    def objective(self, fluence: np.ndarray, terms: list[ObjectiveTerm]) -> float:
        """Eq. 1's objective at a fluence (no normalisation)."""
        dose = self.ops.matvec(self.ops.asarray(fluence))
        self.sparse_products += 1
        prepared = self._prepare(terms)
        return self._value_grad(dose, prepared)[0] + self._fx(np.asarray(fluence, float))[0]

    def value_and_gradient(
        self, fluence: np.ndarray, terms: list[ObjectiveTerm]
    ) -> tuple[float, np.ndarray]:
        """Eq. 1's objective at a fluence and its gradient in beamlet space (two products)."""
        prepared = self._prepare(terms)
        x = np.asarray(fluence, dtype=np.float64)
        dose = self.ops.matvec(self.ops.asarray(x.astype(np.float32)))
        f, g_dose = self._value_grad(dose, prepared)
        g = self.ops.to_host(self.ops.rmatvec(g_dose)).astype(np.float64)
        self.sparse_products += 2
        fx, gx = self._fx(x)
        return f + fx, g + gx

    def dose(self, fluence: np.ndarray) -> np.ndarray:
        self.sparse_products += 1
        return self.ops.to_host(self.ops.matvec(self.ops.asarray(fluence)))

    # -- working set --------------------------------------------------------------------------
    def _near_active(self, dose_full: Any, terms: list[_Term], band: float) -> np.ndarray:
        """Case rows that are active, or within ``band`` x objective dose of it, for some term."""
        xp = self.xp
        keep = np.zeros(self.case.row_voxels.size, dtype=bool)
        for t in terms:
            r = dose_full[t.rows] - t.term.dose_gy
            near = self.ops.to_host(t.kind.near_active(r, band * t.term.dose_gy, xp))
            keep[self.host_rows(t.term.structure)[near.astype(bool)]] = True
        return np.flatnonzero(keep)

    def _space(self, terms: list[_Term], rows: np.ndarray | None) -> _Space:
        if rows is None:
            return _Space(self.ops, terms, None)
        ops = subset_ops(
            self.ops,
            self.case.dose_influence,
            rows,
            self._backend_name,
            threads=self._threads,
            matrix=self._matrix,
        )
        mapped = []
        for t in terms:
            full = self.host_rows(t.term.structure)
            sel = np.isin(full, rows, assume_unique=True)
            vw = ops.xp.asarray(t.host_vw[sel]) if t.host_vw is not None else None
            mapped.append(
                _Term(
                    t.term,
                    t.kind,
                    ops.xp.asarray(np.searchsorted(rows, full[sel])),
                    t.n,
                    vw,
                    t.host_vw,
                )
            )
        return _Space(ops, mapped, rows)

    # -- exact line search ------------------------------------------------------------------
    def _line_search(
        self,
        dose: Any,
        q: Any,
        terms: list[_Term],
        slope0: float,
        fluence_line: tuple[float, float] = (0.0, 0.0),
    ) -> float:
        """argmin over t in [0, 1] of the objective at ``dose + t q``.

        Along the line the voxel penalties are piecewise quadratic in ``t`` and the structure
        penalties smooth and convex; each kind gives the first and second derivative
        (``ObjectiveKind.along``), and a safeguarded Newton search brackets the minimum.
        """
        lines = [
            t.kind.along(dose[t.rows], q[t.rows], t.term.dose_gy, t.term.weight, self.xp, t.n, t.vw)
            for t in terms
        ]

        fa, fb = fluence_line  # fluence terms: f'(t) = fa + fb t along the same step

        def derivs(step: float) -> tuple[float, float]:
            d1 = fa + fb * step
            d2 = fb
            for line in lines:
                a, b = line(step)
                d1 += a
                d2 += b
            return d1, d2

        d1_hi, _ = derivs(1.0)
        if d1_hi <= 0.0:
            return 1.0
        lo, hi, d1_lo = 0.0, 1.0, slope0
        t = d1_lo / (d1_lo - d1_hi)  # secant guess
        for _ in range(12):
            d1, d2 = derivs(t)
            if abs(d1) <= 1e-6 * abs(slope0):
                break
            if d1 < 0:
                lo, d1_lo = t, d1
            else:
                hi, d1_hi = t, d1
            t_new = t - d1 / d2 if d2 > 0 else -1.0
            if not lo < t_new < hi:
                t_new = (
                    lo + (hi - lo) * d1_lo / (d1_lo - d1_hi) if d1_hi != d1_lo else 0.5 * (lo + hi)
                )
            if abs(t_new - t) <= 1e-7:
                t = t_new
                break
            t = t_new
        return t

    # -- the solve --------------------------------------------------------------------------
    def solve(
        self,
        terms: list[ObjectiveTerm],
        x0: np.ndarray | None = None,
        settings: FMOSettings | None = None,
    ) -> FMOResult:
        s = settings or FMOSettings()
        ops, xp = self.ops, self.xp
        prepared = self._prepare(terms)
        norm_name = s.normalize_to or self.case.targets[0].name
        norm_rows = self.rows(norm_name)
        products0 = self.sparse_products
        t_start = time.perf_counter()

        n = self.case.num_beamlets
        if x0 is None:
            # cold start: uniform fluence giving the prescription as mean target dose
            unit = ops.matvec(ops.asarray(np.ones(n, dtype=np.float32)))
            self.sparse_products += 1
            mean_target = float(xp.mean(unit[norm_rows], dtype=xp.float64))
            if mean_target <= 0:
                raise CaseError(f"no beamlet reaches {norm_name}; check the beam geometry")
            x = np.full(n, self.case.prescription_gy / mean_target, dtype=np.float64)
            dose_full = unit * np.float32(x[0])
        else:
            x = np.asarray(x0, dtype=np.float64).copy()
            if x.shape != (n,) or not np.all(np.isfinite(x)):
                raise ValueError(f"warm-start fluence must be {n} finite values")
            np.maximum(x, 0.0, out=x)
            dose_full = ops.matvec(ops.asarray(x))
            self.sparse_products += 1
            x, dose_full = self._rescale(x, dose_full, prepared)
        self._pre, self._pre_note = None, ""
        if x0 is not None and precondition.wanted(s.warm_preconditioner, self.backend):
            self._pre = self._preconditioner(x, dose_full, prepared, s.damping)
            self._pre_note = "kept" if self._pre is not None else ""

        use_ws = s.working_set if s.working_set is not None else self.backend == "numpy"
        history: list[float] = []
        times: list[float] = []
        verified: list[tuple[float, float]] = []
        iterates: list[tuple[float, np.ndarray]] | None = [] if s.record_iterates else None
        ws_rows: list[int] = []
        it_total, converged, reason = 0, False, "max_iter"
        rows: np.ndarray | None = None
        # curvature pairs live in beamlet space, so they carry over from one working set to the next
        mem: deque[tuple[np.ndarray, np.ndarray, float]] = deque(maxlen=s.memory)
        for round_no in range(s.max_rounds):
            if use_ws and round_no < s.max_rounds - 1:
                # each regrowth reaches further, so few rounds (each a copy of rows of A) are needed
                near = self._near_active(dose_full, prepared, s.band * (1 + round_no))
                rows = near if rows is None else np.union1d(rows, near)
                if rows.size > 0.6 * self.case.row_voxels.size:
                    rows = None  # not worth a copy of A
            else:
                rows = None
            space = self._space(prepared, rows)
            ws_rows.append(int(rows.size) if rows is not None else int(self.case.row_voxels.size))
            dose = dose_full if rows is None else dose_full[space.ops.xp.asarray(rows)]
            state = self._start(space, x, dose)
            history.append(state.f)
            times.append(time.perf_counter() - t_start)
            left_out = np.ones(self.case.row_voxels.size, dtype=bool)
            if rows is not None:
                left_out[rows] = False

            def audit(x_now: np.ndarray, left_out: np.ndarray = left_out) -> int:
                """Full dose and objective; how many left-out voxels have turned active."""
                nonlocal dose_full
                dose_full = ops.matvec(ops.asarray(x_now.astype(np.float32)))
                self.sparse_products += 1
                f_full = self._value_grad(dose_full, prepared)[0] + self._fx(x_now)[0]
                verified.append((time.perf_counter() - t_start, f_full))
                return int(left_out[self._near_active(dose_full, prepared, 0.0)].sum())

            self._it_base = it_total
            with precondition.iterating(self._pre):
                state, its, converged, reason = self._iterate(
                    space,
                    state,
                    s,
                    s.max_iter - it_total,
                    mem,
                    history,
                    times,
                    t_start,
                    audit if rows is not None else None,
                    iterates,
                )
            it_total += its
            x = state.x
            if rows is None:
                verified.extend(zip(times[-its - 1 :], history[-its - 1 :], strict=True))
                dose_full = state.dose
                break
            if reason != GREW and not audit(x):
                break  # no left-out voxel is active: the working-set optimum is the full optimum
            if it_total >= s.max_iter:
                converged, reason = False, "max_iter"
                break

        # exact dose at the final fluence (the running update accumulates float32 rounding)
        x32 = x.astype(np.float32)
        dose = ops.matvec(ops.asarray(x32))
        self.sparse_products += 1
        f_final = self._value_grad(dose, prepared)[0] + self._fx(x32.astype(np.float64))[0]
        verified.append((time.perf_counter() - t_start, f_final))
        # normalise the coverage exactly as dosimetry reports it (volume-weighted, at the
        # target's sample points where the case has them)
        raw_host = ops.to_host(dose).astype(np.float32)
        target_dose, target_weights = self.case.dose_in(norm_name, raw_host)
        d95 = dose_at_volume(target_dose, s.coverage_pct, target_weights)
        if d95 <= 0:
            raise CaseError(f"the optimised plan gives {norm_name} no dose; cannot normalise")
        scale = (s.prescription_gy or self.case.prescription_gy) / d95
        dose = dose * np.float32(scale)
        f_norm = (
            self._value_grad(dose, prepared)[0] + self._fx(x32.astype(np.float64) * float(scale))[0]
        )
        dose_host = raw_host * np.float32(scale)
        seconds = time.perf_counter() - t_start
        return FMOResult(
            fluence=(x32 * np.float32(scale)).astype(np.float32),
            dose_rows=dose_host,
            objective=f_final,
            objective_normalized=f_norm,
            objective_history=history,
            time_history=times,
            verified_history=verified,
            iterations=it_total,
            seconds=seconds,
            backend=self.backend,
            converged=converged,
            stop_reason=reason,
            scale_factor=float(scale),
            sparse_products=self.sparse_products - products0,
            working_set_rows=ws_rows,
            iterates=iterates or [],
            term_values=self.term_values(
                dose_host,
                [t for t in terms if t.weight > 0],
                (x32 * np.float32(scale)).astype(np.float64),
            ),
            preconditioner=self._pre_note,
        )

    def _preconditioner(
        self,
        x: np.ndarray,
        dose: Any,
        terms: list[_Term],
        damping: float,
    ) -> precondition.Preconditioner | None:
        """The objective's Hessian on the beamlets ``x`` gives fluence (``dose``: its dose on
        every case row); None where a term has no fixed curvature per voxel."""
        if any(t.kind.whole_structure for t in terms):
            # a dose-volume term's active voxels move with its percentile, and a structure
            # penalty's curvature is not diagonal: measured on the rules loop's plans, the
            # metric then stopped solves early, above the plain solve's objective
            return None
        dose = self.ops.to_host(dose)
        curvature = np.zeros(self.case.row_voxels.size, dtype=np.float64)
        for t in terms:
            at = self.ops.to_host(t.rows)
            vw = self.ops.to_host(t.vw) if t.vw is not None else None
            band = precondition.CURVATURE_BAND * abs(t.term.dose_gy)
            c = t.kind.curvature(dose[at], t.term.dose_gy, t.term.weight, np, t.n, vw, band)
            if c is None:
                return None  # a kind without a curvature model (a smooth maximum)
            curvature[at] += c
        fluence = [kind.hessian_x(self._differences, w) for kind, w in self._fluence_terms]
        return precondition.build(self.case.dose_influence, x, curvature, fluence, damping)

    def _preconditioned_step(
        self, x: np.ndarray, g: np.ndarray, mem: deque[Any], iteration: int
    ) -> tuple[np.ndarray | None, float]:
        """The projected L-BFGS step on the preconditioner's metric (None: there is none, or it
        gave no descent direction, and this iteration takes a plain step)."""
        pre = self._pre
        if pre is None:
            return None, 0.0
        held = pre.held(x, g)
        for _ in range(2):
            d = _two_loop(np.where(held, 0.0, g), mem, float(x.max()), pre.inverse(~held))
            step = np.maximum(x + np.where(held, -x, d), 0.0) - x  # held beamlets go to zero
            slope = float(g @ step)
            if slope < 0:
                pre.misses = 0
                return step, slope
            # projecting bent the step uphill: hold the beamlets it clipped, and solve again
            held |= x + d < 0
        pre.misses += 1  # this iteration takes a plain L-BFGS step
        if pre.misses >= 3:
            self._drop_preconditioner(iteration, "no descent direction")
        return None, 0.0

    def _drop_preconditioner(self, iteration: int, why: str) -> None:
        self._pre = None
        self._pre_note = f"dropped at iteration {iteration} ({why})"

    def _rescale(self, x: np.ndarray, dose: Any, terms: list[_Term]) -> tuple[np.ndarray, Any]:
        """Best multiple of a warm start: dose is linear in fluence, so the ray costs no product.

        A warm start is usually a plan normalised for other weights; this puts it back on scale.
        """
        _, g_dose = self._value_grad(dose, terms)
        # d/dc f(c x) at c = 1 (a fluence term is quadratic in x: its share is 2 f_x(x))
        slope = float(self.xp.sum(g_dose * dose, dtype=self.xp.float64)) + 2 * self._fx(x)[0]
        direction = 1.0 if slope < 0 else -1.0
        t = self._line_search(
            dose, direction * dose, terms, -abs(slope), self._fx_line(x, direction * x)
        )
        if t <= 0:
            return x, dose
        c = 1.0 + direction * t
        return x * c, dose * np.float32(c)

    def _start(self, space: _Space, x: np.ndarray, dose: Any) -> _State:
        f, g_dose = self._value_grad(dose, space.terms)
        g = space.ops.to_host(space.ops.rmatvec(g_dose)).astype(np.float64)
        self.sparse_products += 1
        fx, gx = self._fx(x)
        return _State(x, dose, f + fx, g + gx)

    def _iterate(
        self,
        space: _Space,
        st: _State,
        s: FMOSettings,
        max_iter: int,
        mem: deque[tuple[np.ndarray, np.ndarray, float]],
        history: list[float],
        times: list[float],
        t_start: float,
        audit: Callable[[np.ndarray], int] | None = None,
        iterates: list[tuple[float, np.ndarray]] | None = None,
    ) -> tuple[_State, int, bool, str]:
        ops, terms = space.ops, space.terms
        x, dose, f, g = st.x, st.dose, st.f, st.g
        regrow_at = max(100, int(0.02 * int(dose.size)))
        stall, it = 0, 0
        while it < max_iter:
            it += 1
            step, slope0 = self._preconditioned_step(x, g, mem, self._it_base + it)
            if step is None:
                free = (x > 0) | (g < 0)
                gf = np.where(free, g, 0.0)
                if not np.any(gf):
                    return _State(x, dose, f, g), it - 1, True, "projected gradient is zero"
                step = np.maximum(x + _two_loop(gf, mem, float(x.max())) * free, 0.0) - x
                slope0 = float(g @ step)
            if slope0 >= 0:  # not a descent direction: restart from projected steepest descent
                mem.clear()
                step = np.maximum(x + _two_loop(gf, mem, float(x.max())), 0.0) - x
                slope0 = float(g @ step)
                if slope0 >= 0:
                    return _State(x, dose, f, g), it - 1, True, "no descent direction"
            q = ops.matvec(ops.asarray(step))
            self.sparse_products += 1
            t = self._line_search(dose, q, terms, slope0, self._fx_line(x, step))
            if t <= 0 and self._pre is not None:
                self._drop_preconditioner(self._it_base + it, "line search made no progress")
                continue
            if t <= 0:
                return _State(x, dose, f, g), it, True, "line search made no progress"
            x_new = np.maximum(x + t * step, 0.0)
            dose = dose + np.float32(t) * q
            f_new, g_dose = self._value_grad(dose, terms)
            g_new = ops.to_host(ops.rmatvec(g_dose)).astype(np.float64)
            fx, gx = self._fx(x_new)
            f_new, g_new = f_new + fx, g_new + gx
            self.sparse_products += 1
            sv, yv = x_new - x, g_new - g
            sy = float(sv @ yv)
            if sy > 1e-12 * float(yv @ yv):
                mem.append((sv, yv, sy))
            rel = (f - f_new) / max(abs(f), 1e-30)
            x, g, f = x_new, g_new, f_new
            history.append(f)
            times.append(time.perf_counter() - t_start)
            if iterates is not None:
                iterates.append((times[-1], x.astype(np.float32)))
            stall = stall + 1 if rel < s.rel_tol else 0
            if self._pre is not None:
                self._pre.steps.append(t)
                if stall >= s.patience:
                    if self._pre.fits():
                        # full steps that no longer gain: the optimum, on a metric that still
                        # describes the objective here
                        reason = (
                            f"relative decrease < {s.rel_tol:g} for {s.patience} iterations "
                            "(preconditioned)"
                        )
                        return _State(x, dose, f, g), it, True, reason
                    # short steps: the active voxels have moved away from the metric's; plain
                    # L-BFGS (its curvature pairs kept) takes the solve to its own stopping rule
                    stall = 0
                    self._drop_preconditioner(self._it_base + it, "stalled on short steps")
            if stall >= s.patience:
                reason = f"relative decrease < {s.rel_tol:g} for {s.patience} iterations"
                return _State(x, dose, f, g), it, True, reason
            # mid-solve, a few stray voxels wait for the end; many mean the set is stale
            if audit is not None and it % s.audit_every == 0 and audit(x) > regrow_at:
                return _State(x, dose, f, g), it, False, GREW
        return _State(x, dose, f, g), it, False, "max_iter"


def _two_loop(
    g: np.ndarray,
    mem: deque[tuple[np.ndarray, np.ndarray, float]],
    x_max: float,
    h0: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """L-BFGS direction ``-H g`` from the stored curvature pairs; ``h0`` is the initial inverse
    Hessian (None: a multiple of the identity)."""
    q = g.copy()
    alphas = []
    for sv, yv, sy in reversed(mem):
        a = float(sv @ q) / sy
        alphas.append(a)
        q -= a * yv
    if h0 is not None:
        q = h0(q)
    elif mem:
        sv, yv, sy = mem[-1]
        q *= sy / float(yv @ yv)
    else:
        # first step: the largest move is half the largest fluence; the line search trims it
        q *= 0.5 * max(x_max, 1e-12) / max(float(np.abs(q).max()), 1e-30)
    for (sv, yv, sy), a in zip(mem, reversed(alphas), strict=True):
        b = float(yv @ q) / sy
        q += (a - b) * sv
    return -q
