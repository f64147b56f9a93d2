"""The warm-start preconditioner: exact curvature, a positive definite metric on the free
beamlets, held beamlets, and warm starts that reach the same optimum with it as without."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from threadpoolctl import threadpool_info

from radpilot.case import Case
from radpilot.fmo import FluenceOptimizer, FMOSettings, ObjectiveTerm, precondition
from radpilot.fmo.objectives import fluence_differences, objective_kind
from radpilot.fmo.precondition import ENV, Preconditioner, wanted

TERMS = [
    ObjectiveTerm("PTV", "squared_deviation", 50.0, 100.0),
    ObjectiveTerm("PTV", "squared_overdose", 52.5, 300.0),
    ObjectiveTerm("Core", "squared_overdose", 8.0, 60.0),
    ObjectiveTerm("NormalTissue", "squared_overdose", 25.0, 5.0),
]


@pytest.mark.parametrize(
    ("kind", "parameter"),
    [
        ("squared_deviation", None),
        ("squared_overdose", None),
        ("squared_underdose", None),
        ("max_dvh", 30.0),
        ("min_dvh", 80.0),
    ],
)
def test_voxel_curvature_is_the_line_search_second_derivative(
    kind: str, parameter: float | None
) -> None:
    k = objective_kind(kind, parameter)
    rng = np.random.default_rng(5)
    dose = rng.uniform(30, 70, size=80)
    vw = rng.uniform(0.2, 1.0, size=80)
    n = float(vw.sum())
    c = k.curvature(dose, 50.0, 7.0, np, n, vw)
    assert c.shape == dose.shape and (c >= 0).all() and (c > 0).any()
    q = rng.normal(size=dose.size)
    # along any line the value's second derivative at t = 0 is q^T diag(c) q
    assert k.along(dose, q, 50.0, 7.0, np, n, vw)(0.0)[1] == pytest.approx(float(c @ (q * q)))


@pytest.mark.parametrize("kind", ["mean_dose", "geud", "smooth_max"])
def test_structure_penalties_leave_their_curvature_to_lbfgs(kind: str) -> None:
    k = objective_kind(kind, 4.0 if kind == "geud" else None)
    assert k.curvature(np.full(5, 60.0), 40.0, 1.0, np, 5.0) is None


def test_fluence_hessian_is_the_quadratic_form(analytic_case: Case) -> None:
    smooth = objective_kind("fluence_smoothness")
    D = fluence_differences(analytic_case.beams)
    x = np.random.default_rng(2).uniform(0, 1, size=analytic_case.num_beamlets)
    value, _ = smooth.value_and_gradient_x(x, D, 3.0)
    assert 0.5 * float(x @ (smooth.hessian_x(D, 3.0) @ x)) == pytest.approx(value, rel=1e-10)


def test_metric_is_positive_on_the_free_beamlets_and_zero_elsewhere() -> None:
    rng = np.random.default_rng(4)
    rows = rng.normal(size=(40, 6))
    hessian = rows.T @ rows
    carrying = np.array([0, 2, 3, 5, 7, 8])
    pre = Preconditioner(carrying, hessian, damping=0.02, n=10)
    free = np.ones(10, dtype=bool)
    free[[3, 4]] = False  # one beamlet of the matrix held, one outside it held
    apply = pre.inverse(free)
    for _ in range(5):
        q = rng.normal(size=10)
        out = apply(np.where(free, q, 0.0))
        assert (out[~free] == 0).all()
        assert float(q[free] @ out[free]) > 0
    # a beamlet outside the matrix gets the diagonal scaling
    q = np.zeros(10)
    q[1] = 1.0
    assert apply(q)[1] == pytest.approx(1.0 / pre.diag[1])


def test_a_beamlet_at_zero_pushed_down_is_held() -> None:
    pre = Preconditioner(np.array([0, 1]), np.eye(2), damping=0.02, n=3)
    x = np.array([1.0, 1e-6, 0.0])
    g = np.array([1.0, 5.0, -1.0])
    # the near-zero beamlet pushed down is held; one at zero pulled up is free
    assert pre.held(x, g).tolist() == [False, True, False]


def test_warm_start_reaches_the_same_optimum_with_the_metric(analytic_case: Case) -> None:
    opt = FluenceOptimizer(analytic_case)
    first = opt.solve(TERMS)
    assert first.preconditioner == ""  # a cold start has nothing to build it from
    changed = [
        ObjectiveTerm(
            t.structure, t.kind, t.dose_gy, t.weight * (2 if t.structure == "Core" else 1)
        )
        for t in TERMS
    ]
    plain = opt.solve(changed, x0=first.fluence, settings=FMOSettings(warm_preconditioner=False))
    pre = opt.solve(changed, x0=first.fluence, settings=FMOSettings(warm_preconditioner=True))
    assert plain.preconditioner == ""
    assert pre.preconditioner  # built, and its fate recorded
    assert pre.converged
    assert pre.objective <= plain.objective * (1 + 1e-4)
    np.testing.assert_allclose(pre.dose_rows, opt.dose(pre.fluence), rtol=1e-3, atol=1e-3)


def test_damping_must_be_positive() -> None:
    with pytest.raises(ValueError, match="damping"):
        FMOSettings(damping=0.0)


def test_the_environment_turns_it_on_or_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert wanted(None, "numpy") is True  # on by default on the CPU
    assert wanted(None, "cupy") is False  # not on the GPU: the build runs on the host
    assert wanted(True, "cupy") is True  # the setting wins
    monkeypatch.setenv(ENV, "off")
    assert wanted(None, "numpy") is False
    monkeypatch.setenv(ENV, "on")
    assert wanted(None, "numpy") is True
    assert wanted(False, "numpy") is False
    monkeypatch.setenv(ENV, "maybe")
    with pytest.raises(ValueError, match=ENV):
        wanted(None, "numpy")


def test_the_build_is_the_curvature_weighted_gram_matrix(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    dense = rng.uniform(size=(300, 12)) * (rng.uniform(size=(300, 12)) < 0.3)
    matrix = sp.csr_matrix(dense.astype(np.float32))
    x = np.where(rng.uniform(size=12) < 0.7, 1.0, 0.0)
    curvature = np.where(rng.uniform(size=300) < 0.5, rng.uniform(0.1, 3.0, size=300), 0.0)
    smooth = sp.identity(12, format="csr") * 0.5
    # rows in chunks smaller than the matrix, so the rank-k updates accumulate
    monkeypatch.setattr(precondition, "ROW_CHUNK", 64)
    pre = precondition.build(matrix, x, curvature, [smooth], damping=0.02)
    assert pre is not None
    on = np.flatnonzero(x > 0)
    a = dense[:, on]
    expected = a.T @ (curvature[:, None] * a) + 0.5 * np.eye(on.size)
    np.testing.assert_allclose(pre.hessian, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(pre.carrying, on)


def test_it_fits_while_the_line_search_keeps_most_of_its_steps() -> None:
    pre = Preconditioner(np.array([0, 1]), np.eye(2), damping=0.02, n=2)
    pre.steps.extend([1.0, 1.0])
    assert not pre.fits()  # three steps are needed to judge
    pre.steps.append(0.05)
    assert pre.fits()  # median 1.0
    pre.steps.extend([0.1, 0.02])
    assert not pre.fits()  # median 0.05: the metric no longer describes the objective


@pytest.mark.parametrize(
    "term",
    [
        ObjectiveTerm("PTV", "min_dvh", 50.0, 100.0, 95.0),
        ObjectiveTerm("NormalTissue", "smooth_max", 40.0, 100.0, 1.0),
        ObjectiveTerm("Core", "mean_dose", 5.0, 10.0),
    ],
)
def test_no_metric_for_terms_without_a_fixed_voxel_curvature(
    analytic_case: Case, term: ObjectiveTerm
) -> None:
    opt = FluenceOptimizer(analytic_case)
    first = opt.solve(TERMS)
    on = FMOSettings(warm_preconditioner=True)
    warm = opt.solve([*TERMS, term], x0=first.fluence, settings=on)
    assert warm.preconditioner == ""
    assert warm.converged


def test_blas_runs_on_one_thread_while_it_iterates() -> None:
    pre = Preconditioner(np.array([0]), np.eye(1), damping=0.02, n=1)

    def blas_threads() -> set[int]:
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    before = blas_threads()
    with precondition.iterating(pre):
        assert blas_threads() == {1}
    assert blas_threads() == before
    with precondition.iterating(None):
        assert blas_threads() == before
