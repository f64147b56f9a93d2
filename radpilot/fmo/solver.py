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

After the solve the fluence is scaled so that the normalisation target's D95 equals the
prescription exactly (dose is linear in fluence, and Dx of a scaled dose is the scaled Dx).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radpilot.case import Case, CaseError
from radpilot.evaluation.dvh import dose_at_volume
from radpilot.fmo.backend import MatrixOps, make_ops
from radpilot.fmo.objectives import ObjectiveKind, ObjectiveTerm, objective_kind, validate_terms


@dataclass(frozen=True)
class FMOSettings:
    max_iter: int = 400
    rel_tol: float = 1e-5
    patience: int = 3
    memory: int = 10
    normalize_to: str | None = None  # target whose D95 is set to the prescription; None = first
    coverage_pct: float = 95.0

    def __post_init__(self) -> None:
        if self.max_iter < 1 or self.memory < 1 or self.patience < 1:
            raise ValueError("max_iter, memory and patience must be at least 1")
        if not 0 < self.rel_tol < 1:
            raise ValueError("rel_tol must be within (0, 1)")


@dataclass
class FMOResult:
    fluence: np.ndarray  # float32, D95-normalised
    dose_rows: np.ndarray  # float32, one value per row of A, D95-normalised
    objective: float  # at the solver's optimum, before normalisation
    objective_normalized: float  # the same objective at the normalised fluence
    objective_history: list[float]
    time_history: list[float]  # seconds since the solve started, per history entry
    iterations: int
    seconds: float
    backend: str
    converged: bool
    stop_reason: str
    scale_factor: float
    sparse_products: int
    term_values: dict[str, float] = field(default_factory=dict)

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
            "term_values": self.term_values,
        }


@dataclass
class _Term:
    term: ObjectiveTerm
    kind: ObjectiveKind
    rows: Any  # device index array


class FluenceOptimizer:
    """Holds one case's dose influence matrix on a backend; solves many FMO problems on it."""

    def __init__(self, case: Case, backend: str = "numpy", threads: int | None = None) -> None:
        self.case = case
        self.ops: MatrixOps = make_ops(case.dose_influence, backend, threads=threads)
        self.xp = self.ops.xp
        self._rows: dict[str, Any] = {}
        self._last_memory: list[tuple[np.ndarray, np.ndarray, float]] = []
        self.sparse_products = 0

    @property
    def backend(self) -> str:
        return self.ops.name

    def rows(self, structure: str) -> Any:
        if structure not in self._rows:
            self._rows[structure] = self.xp.asarray(self.case.rows_of(structure))
        return self._rows[structure]

    def _prepare(self, terms: list[ObjectiveTerm]) -> list[_Term]:
        validate_terms(terms)
        names = set(self.case.structure_names)
        unknown = sorted({t.structure for t in terms} - names)
        if unknown:
            raise CaseError(
                f"objective terms name structure(s) {unknown} that case {self.case.name!r} lacks;"
                f" it has {sorted(names)}"
            )
        return [
            _Term(t, objective_kind(t.kind), self.rows(t.structure)) for t in terms if t.weight > 0
        ]

    # -- objective on a dose vector -------------------------------------------------------
    def _value_grad(self, dose: Any, terms: list[_Term]) -> tuple[float, Any]:
        xp = self.xp
        grad = xp.zeros_like(dose)
        total = 0.0
        for t in terms:
            v, g = t.kind.value_and_gradient(dose[t.rows], t.term.dose_gy, t.term.weight, xp)
            total += v
            grad[t.rows] += g
        return total, grad

    def term_values(self, dose_rows: Any, terms: list[ObjectiveTerm]) -> dict[str, float]:
        xp = self.xp
        dose = self.ops.asarray(dose_rows)
        return {
            t.key(): objective_kind(t.kind).value(
                dose[self.rows(t.structure)], t.dose_gy, t.weight, xp
            )
            for t in terms
        }

    def objective(self, fluence: np.ndarray, terms: list[ObjectiveTerm]) -> float:
        """Eq. 1's objective at a fluence (no normalisation)."""
        dose = self.ops.matvec(self.ops.asarray(fluence))
        self.sparse_products += 1
        return self._value_grad(dose, self._prepare(terms))[0]

    def dose(self, fluence: np.ndarray) -> np.ndarray:
        self.sparse_products += 1
        return self.ops.to_host(self.ops.matvec(self.ops.asarray(fluence)))

    # -- exact line search ------------------------------------------------------------------
    def _line_search(self, dose: Any, q: Any, terms: list[_Term], slope0: float) -> float:
        """argmin over t in [0, 1] of the objective at ``dose + t q``.

        The objective along the line is convex and piecewise quadratic in ``t``.
        """
        xp = self.xp
        parts = [
            (
                t.kind,
                dose[t.rows] - t.term.dose_gy,
                q[t.rows],
                2.0 * t.term.weight / max(int(t.rows.size), 1),
            )
            for t in terms
        ]

        def derivs(step: float) -> tuple[float, float]:
            d1 = 0.0
            d2 = 0.0
            for kind, r, qq, c in parts:
                rt = r + step * qq
                d1 += c * float(xp.sum(kind.shaped(rt, xp) * qq, dtype=xp.float64))
                d2 += c * float(xp.sum(kind.slope(rt, xp) * qq * qq, dtype=xp.float64))
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
            dose = unit * np.float32(x[0])
        else:
            x = np.asarray(x0, dtype=np.float64).copy()
            if x.shape != (n,) or not np.all(np.isfinite(x)):
                raise ValueError(f"warm-start fluence must be {n} finite values")
            np.maximum(x, 0.0, out=x)
            dose = ops.matvec(ops.asarray(x))
            self.sparse_products += 1

        f, g_dose = self._value_grad(dose, prepared)
        g = ops.to_host(ops.rmatvec(g_dose)).astype(np.float64)
        self.sparse_products += 1
        mem: deque[tuple[np.ndarray, np.ndarray, float]] = deque(maxlen=s.memory)
        if x0 is not None:
            # A warm start is usually a normalised plan for other weights: first rescale it
            # optimally (dose is linear in fluence, so the whole ray x0 * c costs no product),
            # then reuse the previous solve's curvature pairs, which still describe A.
            direction = x if float(g @ x) < 0 else -x
            q = dose if float(g @ x) < 0 else -dose
            t = self._line_search(dose, q, prepared, float(g @ direction))
            if t > 0:
                x = x + t * direction
                dose = dose + np.float32(t) * q
                f, g_dose = self._value_grad(dose, prepared)
                g = ops.to_host(ops.rmatvec(g_dose)).astype(np.float64)
                self.sparse_products += 1
            mem.extend(p for p in self._last_memory if p[0].shape == x.shape)
        history = [f]
        times = [time.perf_counter() - t_start]
        stall = 0
        converged, reason, it = False, "max_iter", 0

        for it in range(1, s.max_iter + 1):
            free = (x > 0) | (g < 0)
            gf = np.where(free, g, 0.0)
            if not np.any(gf):
                converged, reason = True, "projected gradient is zero"
                it -= 1
                break
            d = _two_loop(gf, mem, float(x.max())) * free
            step = np.maximum(x + d, 0.0) - x
            slope0 = float(g @ step)
            if slope0 >= 0:  # not a descent direction: restart from projected steepest descent
                mem.clear()
                step = np.maximum(x + _two_loop(gf, mem, float(x.max())), 0.0) - x
                slope0 = float(g @ step)
                if slope0 >= 0:
                    converged, reason = True, "no descent direction"
                    it -= 1
                    break
            q = ops.matvec(ops.asarray(step))
            self.sparse_products += 1
            t = self._line_search(dose, q, prepared, slope0)
            if t <= 0:
                converged, reason = True, "line search made no progress"
                break
            x_new = np.maximum(x + t * step, 0.0)
            dose = dose + np.float32(t) * q
            f_new, g_dose = self._value_grad(dose, prepared)
            g_new = ops.to_host(ops.rmatvec(g_dose)).astype(np.float64)
            self.sparse_products += 1
            sv, yv = x_new - x, g_new - g
            sy = float(sv @ yv)
            if sy > 1e-12 * float(yv @ yv):
                mem.append((sv, yv, sy))
            rel = (f - f_new) / max(abs(f), 1e-30)
            x, g, f = x_new, g_new, f_new
            history.append(f)
            times.append(time.perf_counter() - t_start)
            stall = stall + 1 if rel < s.rel_tol else 0
            if stall >= s.patience:
                converged, reason = (
                    True,
                    f"relative decrease < {s.rel_tol:g} for {s.patience} iterations",
                )
                break

        self._last_memory = list(mem)
        # exact dose at the final fluence (the running update accumulates float32 rounding)
        x32 = x.astype(np.float32)
        dose = ops.matvec(ops.asarray(x32))
        self.sparse_products += 1
        f_final = self._value_grad(dose, prepared)[0]
        d95 = dose_at_volume(dose[norm_rows], s.coverage_pct)
        if d95 <= 0:
            raise CaseError(f"the optimised plan gives {norm_name} no dose; cannot normalise")
        scale = self.case.prescription_gy / d95
        dose = dose * np.float32(scale)
        f_norm = self._value_grad(dose, prepared)[0]
        dose_host = ops.to_host(dose).astype(np.float32)
        seconds = time.perf_counter() - t_start
        return FMOResult(
            fluence=(x32 * np.float32(scale)).astype(np.float32),
            dose_rows=dose_host,
            objective=f_final,
            objective_normalized=f_norm,
            objective_history=history,
            time_history=times,
            iterations=it,
            seconds=seconds,
            backend=self.backend,
            converged=converged,
            stop_reason=reason,
            scale_factor=float(scale),
            sparse_products=self.sparse_products - products0,
            term_values=self.term_values(dose_host, [p.term for p in prepared]),
        )


def _two_loop(
    g: np.ndarray, mem: deque[tuple[np.ndarray, np.ndarray, float]], x_max: float
) -> np.ndarray:
    """L-BFGS direction ``-H g`` from the stored curvature pairs."""
    q = g.copy()
    alphas = []
    for sv, yv, sy in reversed(mem):
        a = float(sv @ q) / sy
        alphas.append(a)
        q -= a * yv
    if mem:
        sv, yv, sy = mem[-1]
        q *= sy / float(yv @ yv)
    else:
        # first step: the largest move is half the largest fluence; the line search trims it
        q *= 0.5 * max(x_max, 1e-12) / max(float(np.abs(q).max()), 1e-30)
    for (sv, yv, sy), a in zip(mem, reversed(alphas), strict=True):
        b = float(yv @ q) / sy
        q += (a - b) * sv
    return -q
