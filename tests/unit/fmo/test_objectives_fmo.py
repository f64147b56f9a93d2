"""FMO: objective gradients, linearity, D95 normalisation, solver quality and input errors."""

from __future__ import annotations

import numpy as np
import pytest

from radpilot.case import Case, CaseError
from radpilot.dosimetry import dose_at_volume
from radpilot.fmo import FluenceOptimizer, FMOSettings, ObjectiveError, ObjectiveTerm
from radpilot.fmo.objectives import objective_kind, objective_kinds, validate_terms
from radpilot.fmo.reference import solve_lbfgsb

TERMS = [
    ObjectiveTerm("PTV", "squared_deviation", 50.0, 100.0),
    ObjectiveTerm("PTV", "squared_overdose", 52.5, 300.0),
    ObjectiveTerm("Core", "squared_overdose", 8.0, 60.0),
    ObjectiveTerm("NormalTissue", "squared_overdose", 25.0, 5.0),
]


@pytest.mark.parametrize("kind", ["squared_deviation", "squared_overdose", "squared_underdose"])
def test_gradient_matches_finite_differences(kind: str) -> None:
    k = objective_kind(kind)
    rng = np.random.default_rng(3)
    dose = rng.uniform(30, 70, size=50)  # float64, away from kinks at 50 by the draw
    dose = dose[np.abs(dose - 50.0) > 1e-2]
    value, grad = k.value_and_gradient(dose, 50.0, 7.0, np)
    assert value == pytest.approx(k.value(dose, 50.0, 7.0, np))
    h = 1e-6
    for i in range(0, dose.size, 7):
        e = np.zeros_like(dose)
        e[i] = h
        fd = (k.value(dose + e, 50.0, 7.0, np) - k.value(dose - e, 50.0, 7.0, np)) / (2 * h)
        assert grad[i] == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_kinds_penalise_the_right_side() -> None:
    d = np.array([40.0, 60.0])
    assert objective_kind("squared_overdose").value(d, 50, 1, np) == pytest.approx(50.0)
    assert objective_kind("squared_underdose").value(d, 50, 1, np) == pytest.approx(50.0)
    assert objective_kind("squared_deviation").value(d, 50, 1, np) == pytest.approx(100.0)
    assert set(objective_kinds()) >= {"squared_deviation", "squared_overdose", "squared_underdose"}


def test_full_gradient_matches_finite_differences(analytic_case: Case) -> None:
    opt = FluenceOptimizer(analytic_case)
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, analytic_case.num_beamlets) * 0.05
    prepared = opt._prepare(TERMS)
    dose = opt.ops.matvec(x.astype(np.float32))
    _, g_dose = opt._value_grad(dose, prepared)
    g = opt.ops.rmatvec(g_dose).astype(np.float64)
    for j in rng.choice(x.size, 5, replace=False):
        step = 1e-2 * x[j]
        xp, xm = x.copy(), x.copy()
        xp[j] += step
        xm[j] -= step
        fd = (opt.objective(xp, TERMS) - opt.objective(xm, TERMS)) / (2 * step)
        assert g[j] == pytest.approx(fd, rel=2e-2, abs=1e-3 * abs(g).max())


def test_dose_is_linear_in_fluence(analytic_case: Case) -> None:
    opt = FluenceOptimizer(analytic_case)
    rng = np.random.default_rng(1)
    a, b = rng.random(analytic_case.num_beamlets), rng.random(analytic_case.num_beamlets)
    np.testing.assert_allclose(
        opt.dose(2.0 * a + 3.0 * b), 2.0 * opt.dose(a) + 3.0 * opt.dose(b), rtol=1e-4, atol=1e-4
    )


def test_threaded_products_match_scipy(analytic_case: Case) -> None:
    from radpilot.fmo.backend import CpuOps

    A = analytic_case.dose_influence
    rng = np.random.default_rng(2)
    x = rng.random(A.shape[1]).astype(np.float32)
    g = rng.random(A.shape[0]).astype(np.float32)
    for threads in (1, 3):
        ops = CpuOps(A, threads=threads)
        np.testing.assert_allclose(ops.matvec(x), A @ x, rtol=1e-5)
        np.testing.assert_allclose(ops.rmatvec(g), A.T @ g, rtol=1e-4)


def test_solve_normalises_d95_exactly_and_reaches_scipy_optimum(analytic_case: Case) -> None:
    opt = FluenceOptimizer(analytic_case)
    res = opt.solve(TERMS, settings=FMOSettings(rel_tol=1e-7, max_iter=2000, working_set=False))
    assert res.converged
    ptv = res.dose_rows[analytic_case.rows_of("PTV")]
    assert dose_at_volume(ptv, 95) == pytest.approx(50.0, abs=1e-4)
    assert np.all(res.fluence >= 0)
    assert all(
        b <= a * (1 + 1e-6)
        for a, b in zip(res.objective_history, res.objective_history[1:], strict=False)
    )
    # the same objective in float64 with SciPy's L-BFGS-B, run to its own convergence
    x0 = np.full(analytic_case.num_beamlets, 0.01)
    ref = solve_lbfgsb(analytic_case, TERMS, x0, options={"maxiter": 5000, "ftol": 1e-13})
    assert res.objective <= ref.fun * 1.002


def test_working_set_reaches_the_full_optimum(analytic_case: Case) -> None:
    opt = FluenceOptimizer(analytic_case)
    full = opt.solve(TERMS, settings=FMOSettings(rel_tol=1e-7, max_iter=3000, working_set=False))
    # a narrow band forces voxels to turn active outside the set, and so more than one round
    narrow = FMOSettings(rel_tol=1e-7, max_iter=3000, working_set=True, band=0.05)
    ws = opt.solve(TERMS, settings=narrow)
    assert len(ws.working_set_rows) > 1
    assert ws.working_set_rows[0] < analytic_case.row_voxels.size
    assert ws.objective == pytest.approx(full.objective, rel=1e-3)
    # the accepted plan leaves no left-out voxel active: its full objective is what it reports
    assert ws.verified_history[-1][1] == pytest.approx(
        opt.objective(ws.fluence / ws.scale_factor, TERMS), rel=1e-4
    )
    np.testing.assert_allclose(ws.dose_rows, opt.dose(ws.fluence), rtol=1e-3, atol=1e-3)


def test_warm_start_needs_fewer_products(analytic_case: Case) -> None:
    opt = FluenceOptimizer(analytic_case)
    first = opt.solve(TERMS)
    changed = [
        ObjectiveTerm(
            t.structure, t.kind, t.dose_gy, t.weight * (2 if t.structure == "Core" else 1)
        )
        for t in TERMS
    ]
    cold = FluenceOptimizer(analytic_case).solve(changed)
    warm = opt.solve(changed, x0=first.fluence)
    assert warm.objective <= cold.objective * 1.002
    assert warm.sparse_products < cold.sparse_products


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"structure": "PTV", "kind": "nope", "dose_gy": 50, "weight": 1},
            "unknown objective kind",
        ),
        (
            {
                "structure": "PTV",
                "kind": "squared_deviation",
                "dose_gy": 50,
                "weight": float("nan"),
            },
            "finite",
        ),
        (
            {"structure": "PTV", "kind": "squared_deviation", "dose_gy": 50, "weight": -1},
            "within 0",
        ),
        (
            {"structure": "PTV", "kind": "squared_deviation", "dose_gy": float("inf"), "weight": 1},
            "finite",
        ),
        ({"structure": "PTV", "kind": "squared_deviation", "weight": 1}, "lacks"),
    ],
)
def test_bad_terms_are_rejected_with_a_clear_message(raw: dict, message: str) -> None:
    with pytest.raises(ObjectiveError, match=message):
        ObjectiveTerm.from_dict(raw)


def test_bad_term_sets(analytic_case: Case) -> None:
    with pytest.raises(ObjectiveError, match="at least one"):
        validate_terms([])
    with pytest.raises(ObjectiveError, match="repeat"):
        validate_terms([TERMS[0], TERMS[0]])
    with pytest.raises(ObjectiveError, match="zero"):
        validate_terms([ObjectiveTerm("PTV", "squared_deviation", 50, 0)])
    with pytest.raises(CaseError, match="Rectum"):
        FluenceOptimizer(analytic_case).solve([ObjectiveTerm("Rectum", "squared_overdose", 50, 1)])
    with pytest.raises(ValueError, match="warm-start"):
        FluenceOptimizer(analytic_case).solve(TERMS, x0=np.full(3, np.nan))
