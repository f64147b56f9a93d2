"""Aperture refinement: leaf tips and segment weights optimised together after sequencing."""

from __future__ import annotations

import numpy as np
import pytest

import radpilot.delivery.sequencing as sq
from radpilot.case import Case
from radpilot.delivery import SequencingSettings, deliver, load_mlc
from radpilot.delivery.apertures import (
    _boxes,
    _entries,
    _fluence_and_grad,
    leaf_rule_breaks,
)
from radpilot.delivery.sequencing import fluence_of_segments
from radpilot.evaluation.metrics import PlanDose
from radpilot.loop.inprocess import protocol_optimizer
from radpilot.protocol import load_protocol
from tests.paths import REPO_ROOT

HARDER = REPO_ROOT / "protocols" / "tg119_cshape_harder.yaml"


@pytest.fixture(scope="module")
def optimum(analytic_case: Case) -> tuple[np.ndarray, np.ndarray]:
    p = load_protocol(HARDER)
    # the protocol's terms include one on its ring helper, which the optimizer builds
    r = protocol_optimizer(analytic_case, p).solve(list(p.objectives), settings=p.fmo_settings())
    return r.fluence, r.dose_rows


def _deliver(case: Case, fluence: np.ndarray, **settings):
    return deliver(
        case,
        fluence,
        SequencingSettings(**settings),
        fractions=25,
        target="PTV",
        prescription_gy=50.0,
    )


def test_fluence_model_and_its_gradient(analytic_case: Case, optimum) -> None:
    fluence, _ = optimum
    d = _deliver(analytic_case, fluence, apertures=False)
    mlc = load_mlc()
    parts, left, right, weights = _entries(d.beams, mlc)
    n = analytic_case.num_beamlets
    # at the sequencer's apertures the model gives what the leaves deliver
    x, _ = _fluence_and_grad(parts, n, weights, left, right, None)
    truth = fluence_of_segments(analytic_case, mlc, [b.segments for b in d.beams])
    assert np.allclose(x, truth, rtol=1e-6, atol=1e-3 * truth.max())
    # tips off the beamlet edges (where the fluence is smooth in them): central differences
    rng = np.random.default_rng(3)
    free = np.concatenate([p.free for p in parts])
    L = left + np.where(free, 0.7, 0.0)
    R = right - np.where(free, 0.9, 0.0)
    c = rng.normal(size=n)  # objective c . x: its gradient in beamlet space is c
    _, g = _fluence_and_grad(parts, n, weights, L, R, c)
    theta = np.concatenate([weights, L, R])
    ns, ne = weights.size, L.size
    picks = [0, ns - 1, *(ns + np.flatnonzero(free)[:5]), *(ns + ne + np.flatnonzero(free)[-5:])]
    for i in picks:
        h = 1e-3 if i < ns else 0.05
        up, down = theta.copy(), theta.copy()
        up[i] += h
        down[i] -= h

        def value(t: np.ndarray) -> float:
            return float(
                c @ _fluence_and_grad(parts, n, t[:ns], t[ns : ns + ne], t[ns + ne :], None)[0]
            )

        assert g[i] == pytest.approx((value(up) - value(down)) / (2 * h), rel=1e-6, abs=1e-9)


def test_boxes_keep_every_point_deliverable(analytic_case: Case, optimum) -> None:
    fluence, _ = optimum
    d = _deliver(analytic_case, fluence, apertures=False)
    mlc = load_mlc()
    parts, left, right, _ = _entries(d.beams, mlc)
    l_lo, l_hi, r_lo, r_hi = _boxes(parts, left, right, mlc)
    assert np.all(l_lo <= left) and np.all(left <= l_hi)
    assert np.all(r_lo <= right) and np.all(right <= r_hi)
    # the box corners that close a pair, and that push neighbours towards each other, still
    # keep the minimum gap and never cross an opposing neighbour's tip
    free = np.concatenate([p.free for p in parts])
    assert np.all((r_lo - l_hi)[free] >= mlc.min_leaf_gap_mm - 1e-9)
    # closed pairs do not move
    assert np.all((l_lo == l_hi)[~free]) and np.all((r_lo == r_hi)[~free])
    at = 0
    for part in parts:
        idx = np.flatnonzero(part.free) + at
        local = np.flatnonzero(part.free)
        same = part.seg[local[1:]] == part.seg[local[:-1]]
        for a, b in zip(idx[:-1][same], idx[1:][same], strict=True):
            assert l_hi[a] <= r_lo[b] and l_hi[b] <= r_lo[a]
        at += part.row.size


def test_refined_apertures_follow_the_machine_and_the_optimum(
    analytic_case: Case, optimum, monkeypatch: pytest.MonkeyPatch
) -> None:
    fluence, dose = optimum
    plain = _deliver(analytic_case, fluence, apertures=False)
    refined = _deliver(analytic_case, fluence)
    mlc = load_mlc()
    info = refined.summary(50.0)["apertures"]
    assert info["objective_after"] < info["objective_before"] and info["moved_tips"] > 0
    assert "apertures" not in plain.summary(50.0)
    for b in refined.beams:
        for s in b.segments:
            assert leaf_rule_breaks(s.left_mm, s.right_mm, mlc) == []
            # on the RT Plan's 0.01 mm grid, so the exported plan keeps the rules too
            for tips in (s.left_mm, s.right_mm):
                assert np.allclose(tips * 100, np.round(tips * 100), atol=1e-6)
            lo, hi = s.jaw_x_mm
            is_open = s.right_mm - s.left_mm > mlc.min_leaf_gap_mm + 1e-6
            assert lo <= s.left_mm[is_open].min() + 1e-9 and hi >= s.right_mm[is_open].max() - 1e-9
    # the delivered fluence is what the moved leaves give, and it is nearer the optimum's dose
    again = fluence_of_segments(analytic_case, mlc, [b.segments for b in refined.beams])
    assert np.allclose(again, refined.fluence, rtol=1e-4, atol=1e-6)

    def rms(d) -> float:
        return float(np.sqrt(np.mean((d.dose_rows - dose) ** 2)))

    # on the fit's measure alone (the hot-spot hold trades some of it for the hot spots)
    monkeypatch.setattr(sq, "HOLD_WEIGHT", 0.0)
    monkeypatch.setattr(sq, "ORGAN_WEIGHT", 0.0)
    assert rms(_deliver(analytic_case, fluence)) < rms(plain)
    # normalised like the plan
    assert PlanDose(analytic_case, refined.dose_rows).metric("PTV", "D95") == pytest.approx(
        50.0, abs=0.01
    )


def test_leaf_rule_breaks_names_what_a_machine_refuses() -> None:
    mlc = load_mlc()
    n = mlc.num_pairs
    left, right = np.full(n, -10.0), np.full(n, 10.0)
    assert leaf_rule_breaks(left, right, mlc) == []
    bad_gap = right.copy()
    bad_gap[5] = left[5] + 0.1
    assert any("pair 5: gap" in b for b in leaf_rule_breaks(left, bad_gap, mlc))
    crossed_l, crossed_r = left.copy(), right.copy()
    crossed_l[7], crossed_r[7] = 20.0, 30.0  # opens right of its neighbours' right tips
    breaks = leaf_rule_breaks(crossed_l, crossed_r, mlc)
    assert any("pairs 6/7" in b for b in breaks) and any("pairs 7/8" in b for b in breaks)
    far = right.copy()
    far[0] = mlc.leaf_travel_mm[1] + 5
    assert any("outside the leaf travel" in b for b in leaf_rule_breaks(left, far, mlc))


def test_objective_refit_iterations_shrink_with_the_matrix(analytic_case: Case) -> None:
    from types import SimpleNamespace

    from radpilot.delivery.sequencing import _objective_iterations

    def cap(nnz: int) -> int:
        return _objective_iterations(SimpleNamespace(dose_influence=SimpleNamespace(nnz=nnz)))

    assert _objective_iterations(analytic_case) == 150  # a small matrix gets every iteration
    assert cap(6 * 10**7) == 75 and cap(173_048_790) == 30 and cap(10**10) == 30


def test_hot_spot_hold_pays_for_dose_above_the_optimum_s_hot_spots(
    analytic_case: Case, optimum
) -> None:
    fluence, dose = optimum
    case = analytic_case
    hold = sq._HotSpotHold.of(case, dose, dose, 95.0)
    outside = np.ones(case.row_voxels.size, dtype=bool)
    for t in case.targets:
        outside[case.rows_of(t.name)] = False
    core = case.rows_of("Core")
    caps = hold.described["caps_gy"]
    # the caps: the optimum's hottest point outside the targets, the PTV's maximum inside, each
    # organ's maximum in it; a row pays above the lowest cap it is under
    assert caps["OutsideTargets"] == pytest.approx(dose[outside].max(), abs=1e-3)
    assert caps["targets"] == pytest.approx(dose[~outside].max(), abs=1e-3)
    assert caps["Core"] == pytest.approx(dose[core].max(), abs=1e-3)
    assert caps["Core"] < caps["OutsideTargets"]
    assert hold.caps.min() == pytest.approx(caps["Core"], abs=1e-3)
    # the floors: the optimum's D95 on the PTV, or a row's own dose where that is less
    d95 = PlanDose(case, dose).metric("PTV", "D95")
    assert hold.described["floors_gy"]["PTV"] == pytest.approx(d95, abs=0.05)
    assert hold.floors.max() == pytest.approx(d95, abs=0.05)
    assert hold.floors.min() < d95 - 1.0
    # the organ ceilings: each organ row outside the targets at its own optimum dose
    held_core = np.isin(hold.rows, core[outside[core]])
    assert held_core.any() and np.all(np.isfinite(hold.ceilings) == held_core)
    assert np.allclose(hold.ceilings[held_core], dose[hold.rows[held_core]])
    assert hold.described["organ_rows"] == int(held_core.sum())
    A = case.dose_influence[hold.rows]

    def f(x: np.ndarray) -> tuple[float, np.ndarray]:  # the penalty as a function of fluence
        value, g = hold.penalty(np.asarray(A @ x, dtype=np.float64))
        return value, A.T @ g

    x0 = fluence.astype(np.float64)
    assert f(x0)[0] == pytest.approx(0.0, abs=1e-6)  # the optimum breaks nothing it holds
    # hotter everywhere: pays above the caps; cooler everywhere: pays below the floors
    assert f(1.1 * x0)[0] > 0 and f(0.9 * x0)[0] > 0
    rng = np.random.default_rng(5)
    x = x0 * (1.0 + 0.2 * rng.standard_normal(x0.size)).clip(0.0)
    value, g = f(x)
    assert value > 0
    for _ in range(3):
        step = rng.standard_normal(x.size) * 1e-3 * x0.mean()  # float32 doses: not smaller
        fd = (f(x + step)[0] - f(x - step)[0]) / 2.0
        assert g @ step == pytest.approx(fd, rel=1e-2)
    # in the fit's measure the held rows among the fit's rows share its products: the same sum
    fit = sq._DoseFit.of(case, dose)
    plain, held = fit.objective(case), fit.objective(case, hold)
    (pv, pg), (hv, hg), (v, g) = plain(x), held(x), f(x)
    assert hv == pytest.approx(pv + v, rel=1e-6)
    assert np.allclose(hg, pg + g, rtol=1e-4, atol=1e-6 * np.abs(hg).max())


def test_moving_the_leaves_holds_the_hot_spot_outside_the_targets(
    analytic_case: Case, optimum, monkeypatch: pytest.MonkeyPatch
) -> None:
    fluence, dose = optimum

    def hottest(d) -> float:
        spot = PlanDose(analytic_case, d.dose_rows).hottest_outside_targets()
        assert spot is not None
        return spot[0]

    held = _deliver(analytic_case, fluence)
    monkeypatch.setattr(sq, "HOLD_WEIGHT", 0.0)
    monkeypatch.setattr(sq, "ORGAN_WEIGHT", 0.0)
    free = _deliver(analytic_case, fluence)
    assert "hold" in held.summary(50.0)["apertures"]
    assert "hold" not in free.summary(50.0)["apertures"]
    optimum_hot = PlanDose(analytic_case, dose).hottest_outside_targets()[0]
    assert hottest(held) < hottest(free)
    assert hottest(held) - optimum_hot < 0.5 * (hottest(free) - optimum_hot)


def test_moving_the_leaves_keeps_the_organ_near_its_optimum_dose(
    analytic_case: Case, optimum, monkeypatch: pytest.MonkeyPatch
) -> None:
    fluence, dose = optimum
    core = analytic_case.rows_of("Core")

    def overdose(d) -> float:  # Gy^2 above the optimum on the organ's rows
        return float(np.sum(np.maximum(d.dose_rows[core] - dose[core], 0.0) ** 2))

    held = _deliver(analytic_case, fluence)
    assert held.summary(50.0)["apertures"]["hold"]["organ_rows"] > 0
    monkeypatch.setattr(sq, "ORGAN_WEIGHT", 0.0)
    unheld = _deliver(analytic_case, fluence)
    assert overdose(held) < overdose(unheld)
