"""A plain reference FMO: the same objective in float64, solved by SciPy's L-BFGS-B.

Not used for planning; it is the yardstick that tests and ``make bench-fmo`` compare the RadPilot
solver against (same terms, same structures, same matrix).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy.optimize import OptimizeResult, minimize

from radpilot.case import Case
from radpilot.fmo.objectives import ObjectiveTerm, kind_of


def float64_objective(
    case: Case, terms: list[ObjectiveTerm]
) -> Callable[[np.ndarray], tuple[float, np.ndarray]]:
    """``x -> (f, grad)`` for Eq. 1's objective, straightforwardly in float64."""
    A = case.dose_influence.astype(np.float64)
    rows = {t.structure: case.objective_rows(t.structure) for t in terms}  # as the solver

    def fg(x: np.ndarray) -> tuple[float, np.ndarray]:
        dose = A @ x
        f, grad_dose = 0.0, np.zeros_like(dose)
        for t in terms:
            r, vw = rows[t.structure]
            v, g = kind_of(t).value_and_gradient(dose[r], t.dose_gy, t.weight, np, vw=vw)
            f += v
            grad_dose[r] += g
        return f, A.T @ grad_dose

    return fg


def solve_lbfgsb(
    case: Case,
    terms: list[ObjectiveTerm],
    x0: np.ndarray,
    callback: Callable[[Any], None] | None = None,
    options: dict[str, Any] | None = None,
) -> OptimizeResult:
    opts = {"maxiter": 20000, "maxfun": 40000, "ftol": 1e-12, "gtol": 1e-10}
    opts.update(options or {})
    return minimize(
        float64_objective(case, terms),
        np.asarray(x0, dtype=np.float64),
        jac=True,
        method="L-BFGS-B",
        bounds=[(0.0, None)] * x0.size,
        callback=callback,
        options=opts,
    )
