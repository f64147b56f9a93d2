"""Leaf sequencing: MLC models, decompositions, the delivered dose and the RT Plan round trip."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radpilot.case import Beam, Case, CaseError
from radpilot.case_store import CaseStore
from radpilot.delivery import BeamGrid, SequencingSettings, deliver, load_mlc, shipped_mlcs
from radpilot.delivery.mlc import mlc_from_dict
from radpilot.delivery.sequencing import (
    _quantised,
    decompose,
    fluence_of_segments,
    keep_goals,
    lloyd_max_levels,
    open_fractions,
    reducing_levels,
    segments_from_json,
    sequence_beam,
    threshold_apertures,
    unidirectional_sweep,
)
from radpilot.dicom.rtplan import read_rtplan
from radpilot.errors import DeliveryError, ProtocolError
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import check_protocol
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.loop.core import SequencingOptimizer
from radpilot.loop.inprocess import LibraryOptimizer, MemoryArtefacts, plan_loop, protocol_optimizer
from radpilot.loop.record import ArtefactRef
from radpilot.protocol import load_protocol, load_protocol_text
from tests.paths import REPO_ROOT

HARDER = REPO_ROOT / "protocols" / "tg119_cshape_harder.yaml"


def _rebuilt(apertures: list[tuple[int, dict[int, tuple[int, int]]]], shape) -> np.ndarray:
    m = np.zeros(shape, dtype=np.int64)
    for level, rows in apertures:
        for r, (a, b) in rows.items():
            m[r, a:b] += level
    return m


def _overlap_ok(rows: dict[int, tuple[int, int]]) -> bool:
    """Consecutive open rows overlap: no leaf passes its neighbour's opposing leaf."""
    ordered = [rows[r] for r in sorted(rows)]
    return all(a < d and c < b for (a, b), (c, d) in itertools.pairwise(ordered))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decompositions_rebuild_the_map_exactly(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = rng.integers(0, 11, size=(7, 9))
    m[:, 0] = 0
    for method in (reducing_levels, unidirectional_sweep):
        assert np.array_equal(_rebuilt(method(m), m.shape), m)
    for inter in (True, False):
        chosen = decompose(m, inter)
        assert np.array_equal(_rebuilt(chosen, m.shape), m)
        if not inter:
            assert all(_overlap_ok(rows) for _, rows in chosen)
    # the sweep gives each row exactly its total rise in units: the fewest MU for that row
    rise = np.clip(np.diff(np.concatenate([np.zeros((7, 1), int), m], axis=1), axis=1), 0, None)
    assert sum(lv for lv, _ in unidirectional_sweep(m)) == rise.sum(axis=1).max()


def test_interdigitation_splits_disjoint_rows() -> None:
    m = np.array([[1, 1, 0, 0], [0, 0, 1, 1]])
    with_inter = decompose(m, True)
    without = decompose(m, False)
    assert len(with_inter) == 1 and len(without) == 2
    assert np.array_equal(_rebuilt(without, m.shape), m)


def test_shipped_mlc_models_and_errors() -> None:
    assert {"uniform-5mm", "mlc60-5-10mm", "micro-3mm"} <= set(shipped_mlcs())
    u = load_mlc("uniform-5mm")
    assert u.num_pairs == 81 and u.boundaries_mm[0] == -202.5 and u.boundaries_mm[-1] == 202.5
    m60 = load_mlc("mlc60-5-10mm")
    widths = np.diff(m60.boundaries_mm)
    assert m60.num_pairs == 60 and widths[:10].tolist() == [10.0] * 10 and widths[10] == 5.0
    with pytest.raises(DeliveryError, match=r"unknown MLC model 'nope'.*uniform-5mm"):
        load_mlc("nope")
    good = {
        "name": "x",
        "leaf_pairs": {"first_boundary_mm": -10, "widths_mm": [{"count": 4, "width_mm": 5}]},
        "leaf_travel_mm": [-50, 50],
        "jaws": {"x_mm": [-50, 50], "y_mm": [-10, 10]},
    }
    assert mlc_from_dict(good).num_pairs == 4
    with pytest.raises(DeliveryError, match="unknown field"):
        mlc_from_dict({**good, "leaves": 3})
    with pytest.raises(DeliveryError, match=r"widths_mm\[0\].width_mm must be above 0"):
        mlc_from_dict(
            {
                **good,
                "leaf_pairs": {"first_boundary_mm": 0, "widths_mm": [{"count": 2, "width_mm": 0}]},
            }
        )
    with pytest.raises(DeliveryError, match="leaf_travel_mm: low"):
        mlc_from_dict({**good, "leaf_travel_mm": [5, -5]})


def test_beamlet_positions_are_kept_with_the_case(analytic_case: Case, tmp_path: Path) -> None:
    store = CaseStore(tmp_path / "store")
    store.save(analytic_case, "kept")
    loaded = store.load("kept")
    for a, b in zip(analytic_case.beams, loaded.beams, strict=True):
        assert b.bixel_mm == a.bixel_mm == 5.0
        assert b.beamlets_mm is not None and np.allclose(a.beamlets_mm, b.beamlets_mm)
    # pyRadPlan's convention: beamlet centres on multiples of the bixel width
    xy = analytic_case.beams[0].beamlets_mm
    assert np.allclose(xy / 5.0, np.rint(xy / 5.0))
    with pytest.raises(CaseError, match="3 beamlet positions for 2 beamlets"):
        Beam(0.0, 0.0, 2, 5.0, np.zeros((3, 2)))


def test_beam_grid_maps_rows_onto_leaf_pairs_or_says_why(analytic_case: Case) -> None:
    beam = analytic_case.beams[0]
    grid = BeamGrid.of(beam, load_mlc("uniform-5mm"))
    assert np.all(grid.pair_hi - grid.pair_lo == 1)  # one 5 mm pair per 5 mm beamlet row
    fluence = np.arange(beam.num_beamlets, dtype=float)
    assert np.array_equal(grid.from_map(grid.to_map(fluence)), fluence)
    with pytest.raises(DeliveryError, match=r"beamlet row centred at z = .* no leaf boundary"):
        BeamGrid.of(beam, load_mlc("mlc60-5-10mm"))  # its boundaries fall on the row centres
    with pytest.raises(DeliveryError, match=r"keeps no beamlet positions.*rebuild"):
        BeamGrid.of(Beam(0.0, 0.0, 3), load_mlc())
    wide = replace(load_mlc(), leaf_travel_mm=(-20.0, 20.0))
    with pytest.raises(DeliveryError, match="beyond the leaf travel"):
        BeamGrid.of(beam, wide)


def test_the_micro_mlc_tiles_3mm_beamlet_rows_and_refuses_5mm_ones(analytic_case: Case) -> None:
    micro = load_mlc("micro-3mm")
    assert micro.num_pairs == 41 and micro.boundaries_mm[0] == -61.5
    assert np.allclose(np.diff(micro.boundaries_mm), 3.0)
    # 3 mm beamlets centred on multiples of 3 mm (pyRadPlan's rays), rows z = -9 .. +9 mm
    xz = np.array([(x, z) for z in range(-9, 10, 3) for x in range(-12, 13, 3)], dtype=float)
    fine = Beam(0.0, 0.0, len(xz), 3.0, xz)
    grid = BeamGrid.of(fine, micro)
    assert grid.shape == (7, 9)
    assert np.all(grid.pair_hi - grid.pair_lo == 1)  # one 3 mm pair per 3 mm row
    assert grid.pair_lo[0] == 17  # the row centred at -9 mm lies on the pair from -10.5 mm
    # a model that does not fit names the shipped ones that do
    with pytest.raises(DeliveryError, match=r"no leaf boundary.*\(shipped: uniform-5mm\)"):
        BeamGrid.of(analytic_case.beams[0], micro)  # 5 mm rows straddle the 3 mm leaves
    with pytest.raises(DeliveryError) as refused:
        BeamGrid.of(fine, load_mlc("uniform-5mm"))
    assert "row centred at z = -9 mm spans -10.5 to -7.5 mm" in str(refused.value)
    assert "no leaf boundary at -10.5 mm" in str(refused.value)
    assert "(shipped: micro-3mm)" in str(refused.value)


@pytest.fixture(scope="module")
def optimum(analytic_case: Case) -> tuple[np.ndarray, np.ndarray]:
    p = load_protocol(HARDER)
    # the protocol's terms include one on its ring helper, which the optimizer builds
    r = protocol_optimizer(analytic_case, p).solve(list(p.objectives), settings=p.fmo_settings())
    return r.fluence, r.dose_rows


def test_deliverable_plan_is_close_to_its_optimum(analytic_case: Case, optimum) -> None:
    p = load_protocol(HARDER)
    fluence, dose = optimum
    d = deliver(
        analytic_case,
        fluence,
        SequencingSettings(),
        fractions=25,
        target="PTV",
        prescription_gy=50.0,
    )
    # the delivered fluence is what the segments' apertures and weights give
    mlc = load_mlc()
    again = fluence_of_segments(analytic_case, mlc, [b.segments for b in d.beams])
    assert np.allclose(again, d.fluence, rtol=1e-4, atol=1e-6)
    assert np.allclose(analytic_case.dose_influence @ d.fluence, d.dose_rows, rtol=1e-3, atol=1e-3)
    # normalised like the plan, and every goal within a gray of the fluence optimum
    assert PlanDose(analytic_case, d.dose_rows).metric("PTV", "D95") == pytest.approx(
        50.0, abs=0.01
    )
    before = check_protocol(PlanDose(analytic_case, dose), p)
    after = check_protocol(PlanDose(analytic_case, d.dose_rows), p)
    for a, b in zip(before.results, after.results, strict=True):
        assert abs(a.achieved - b.achieved) < 1.0, (a.goal.label, a.achieved, b.achieved)
    s = d.summary(50.0)
    assert s["segments"] == sum(s["segments_per_beam"]) > len(analytic_case.beams)
    assert s["total_mu"] > 0 and s["mu_per_gy"] == pytest.approx(s["total_mu"] / 2.0, rel=1e-3)
    assert min(min(d.mu(b)) for b in d.beams) >= 0.9 * 2.0  # minimum segment MU (after scaling)
    assert s["refit"]["rms_error_after_gy"] <= s["refit"]["rms_error_before_gy"]
    # every closed leaf pair keeps the minimum gap; no pair is reversed
    for b in d.beams:
        for sg in b.segments:
            assert np.all(sg.right_mm - sg.left_mm >= mlc.min_leaf_gap_mm - 1e-6)


def test_fewer_levels_give_fewer_segments_and_a_larger_error(analytic_case: Case, optimum) -> None:
    fluence, _ = optimum
    runs = {
        lv: deliver(
            analytic_case,
            fluence,
            SequencingSettings(levels=lv, refit=False, max_segments_per_beam=0),
            fractions=25,
            target="PTV",
            prescription_gy=50.0,
        ).summary(50.0)
        for lv in (3, 20)
    }
    assert runs[3]["segments"] < runs[20]["segments"]
    assert runs[3]["max_dose_difference_gy"] > runs[20]["max_dose_difference_gy"]


def test_lloyd_max_levels_beat_equal_steps_and_stack_exactly() -> None:
    rng = np.random.default_rng(3)
    m = np.clip(rng.gamma(2.0, 1.0, size=(9, 12)) - 0.5, 0, None)
    m[:, :2] = 0
    for k in (2, 4, 6):
        lm = lloyd_max_levels(m.ravel(), k)
        assert lm.size <= k and np.all(lm > 0) and np.all(np.diff(lm) > 0)
        idx = _quantised(m, lm)
        lloyd = np.concatenate([[0.0], lm])[idx]
        step = m.max() / k
        uniform = np.rint(m / step) * step
        assert np.sum((lloyd - m) ** 2) < np.sum((uniform - m) ** 2)
        # every beamlet goes to its nearest level (0 included)
        choices = np.abs(m[..., None] - np.concatenate([[0.0], lm]))
        assert np.array_equal(idx, np.argmin(choices, axis=-1))
        # the stacked isointensity apertures rebuild the quantised map
        rebuilt = np.zeros_like(m)
        for w, rows in threshold_apertures(idx, lm):
            for r, (a, b) in rows.items():
                rebuilt[r, a:b] += w
        assert np.allclose(rebuilt, lloyd)


def test_segment_limit_per_beam(analytic_case: Case, optimum) -> None:
    fluence, _ = optimum
    mlc = load_mlc()
    beam = analytic_case.beams[0]
    grid = BeamGrid.of(beam, mlc)
    f = fluence[: beam.num_beamlets]
    free, levels_free = sequence_beam(grid, mlc, f, 20)
    assert levels_free == 20 and len(free) > 6
    capped, levels_capped = sequence_beam(grid, mlc, f, 20, max_segments=6)
    assert len(capped) <= 6 and levels_capped < 20
    single, _ = sequence_beam(grid, mlc, f, 20, max_segments=1)
    assert len(single) == 1
    d = deliver(
        analytic_case,
        fluence,
        SequencingSettings(levels=20, max_segments_per_beam=5),
        fractions=25,
        target="PTV",
        prescription_gy=50.0,
    )
    s = d.summary(50.0)
    assert max(s["segments_per_beam"]) <= 5
    assert all(1 <= lv <= 20 for lv in s["levels_per_beam"])
    assert s["settings"]["max_segments_per_beam"] == 5


def test_open_fractions_follow_leaves_and_jaws(analytic_case: Case) -> None:
    mlc = load_mlc()
    grid = BeamGrid.of(analytic_case.beams[0], mlc)
    x0 = grid.x0_mm
    left = np.full(mlc.num_pairs, x0 + 5.0)
    right = np.full(mlc.num_pairs, x0 + 12.5)  # half way into column 2
    seg = replace(
        segments_from_json(
            {
                "segments": [
                    {
                        "weight": 1.0,
                        "left_mm": left.tolist(),
                        "right_mm": right.tolist(),
                        "jaw_x_mm": [-300, 300],
                        "jaw_y_mm": [-300, 300],
                    }
                ]
            }
        )[0]
    )
    f = grid.to_map(open_fractions(grid, mlc, seg))
    occupied = grid.to_map(np.ones(grid.rows.size)) > 0
    assert np.allclose(f[:, 1][occupied[:, 1]], 1.0) and np.allclose(f[:, 2][occupied[:, 2]], 0.5)
    assert np.allclose(f[:, 0], 0.0) and np.allclose(f[:, 3:], 0.0)
    seg.jaw_x_mm = (x0 + 5.0, x0 + 7.5)  # the X jaw closes half of column 1
    f = grid.to_map(open_fractions(grid, mlc, seg))
    assert np.allclose(f[:, 1][occupied[:, 1]], 0.5) and np.allclose(f[:, 2], 0.0)


def test_sequencing_reads_a_case_matrix_once_per_case(analytic_case: Case, optimum) -> None:
    """The open fields' doses and the fit's rows of A are the same for every plan of a case:
    computed by the first deliver and reused (recomputed for a case with another matrix)."""
    fluence, _ = optimum
    case = replace(analytic_case)  # a fresh case object: nothing derived yet
    kept = {}

    def again(c: Case) -> None:
        pytest.fail("computed again")

    for _ in range(2):
        deliver(case, fluence, SequencingSettings(), fractions=25, target="PTV", prescription_gy=50)
        for key in ("open_fields", "fit_rows"):
            held = case.derived(key, again)
            assert kept.setdefault(key, held) is held
    rows, _, A = case.derived("fit_rows", again)
    assert (analytic_case.dose_influence[rows] != A).nnz == 0
    other = replace(case, dose_influence=case.dose_influence * 2)
    assert other.derived("open_fields", lambda c: "again") == "again"


def test_protocol_delivery_settings() -> None:
    text = HARDER.read_text()
    p = load_protocol_text(text)
    assert p.delivery == SequencingSettings() and p.num_fractions == 25
    off = load_protocol_text(text + "\ndelivery: off\n")
    assert off.delivery is None and off.to_dict()["delivery"] == "off"
    custom = load_protocol_text(text + "\ndelivery: {levels: 5, min_segment_mu: 1, refit: false}\n")
    assert custom.delivery == SequencingSettings(levels=5, min_segment_mu=1.0, refit=False)
    assert load_protocol_text(json.dumps(custom.to_dict())).delivery == custom.delivery
    with pytest.raises(ProtocolError, match="unknown MLC model 'x'"):
        load_protocol_text(text + "\ndelivery: {mlc: x}\n")
    with pytest.raises(ProtocolError, match=r"levels must be within 1..255"):
        load_protocol_text(text + "\ndelivery: {levels: 0}\n")
    with pytest.raises(ProtocolError, match="unknown delivery field"):
        load_protocol_text(text + "\ndelivery: {speed: 3}\n")
    assert p.delivery.max_segments_per_beam == 12
    free = load_protocol_text(text + "\ndelivery: {max_segments_per_beam: 0}\n")
    assert free.delivery.max_segments_per_beam == 0 and not free.delivery.every_iteration
    every = load_protocol_text(text + EVERY)
    assert every.delivery.every_iteration
    assert load_protocol_text(json.dumps(every.to_dict())).delivery == every.delivery
    with pytest.raises(ProtocolError, match=r"every_iteration and delivery\.apertures are true"):
        load_protocol_text(text + "\ndelivery: {every_iteration: 3}\n")
    assert p.delivery.apertures
    fixed = load_protocol_text(text + "\ndelivery: {apertures: false}\n")
    assert not fixed.delivery.apertures
    assert load_protocol_text(json.dumps(fixed.to_dict())).delivery == fixed.delivery
    with pytest.raises(ProtocolError, match=r"delivery\.apertures are true or false"):
        load_protocol_text(text + "\ndelivery: {apertures: maybe}\n")
    with pytest.raises(ProtocolError, match="max_segments_per_beam must be an integer"):
        load_protocol_text(text + "\ndelivery: {max_segments_per_beam: 2.5}\n")
    # the smoothness term penalises the fluence: its dose must be 0
    prostate = (REPO_ROOT / "protocols" / "tg119_prostate.yaml").read_text()
    assert any(t.kind == "fluence_smoothness" for t in load_protocol_text(prostate).objectives)
    bad = prostate.replace("fluence_smoothness, dose_gy: 0.0", "fluence_smoothness, dose_gy: 5")
    with pytest.raises(ProtocolError, match="dose_gy must be 0 for fluence_smoothness"):
        load_protocol_text(bad)
    raw = p.to_dict()
    raw["prescription"]["fractions"] = 28
    assert load_protocol_text(json.dumps(raw)).num_fractions == 28
    raw["prescription"]["fractions"] = 0
    with pytest.raises(ProtocolError, match="fractions must be an integer"):
        load_protocol_text(json.dumps(raw))


@pytest.fixture(scope="module")
def report_dir(analytic_case: Case, tmp_path_factory: pytest.TempPathFactory) -> Path:
    report = plan_loop(analytic_case, load_protocol(HARDER), max_iterations=1)
    out = tmp_path_factory.mktemp("deliverable-report")
    report.write(out)
    return out


def test_report_judges_the_deliverable_dose(report_dir: Path) -> None:
    s = json.loads((report_dir / "summary.json").read_text())
    assert s["dose_basis"] == "deliverable" and s["delivery_error"] == ""
    d = s["deliverable"]
    assert len(d["segments_per_beam"]) == 9 and d["total_mu"] > 0
    achieved = {g["structure"] + " " + g["metric"]: g["achieved"] for g in s["goals"]}
    for g in d["goals"]:  # the goals table is the deliverable one
        key = " ".join(g["goal"].split()[:2])
        assert achieved[key] == pytest.approx(g["deliverable"], abs=1e-3)
    assert s["all_goals_met"] == d["all_goals_met"]
    html = (report_dir / "report.html").read_text()
    assert "Deliverable plan" in html and "MU/Gy" in html and "dvh_deliverable.png" in html
    assert (report_dir / "dvh_deliverable.png").stat().st_size > 1000
    assert "RTPLAN.dcm" in s["dicom"]


def test_rtplan_round_trip_and_references(analytic_case: Case, report_dir: Path) -> None:
    dicom = report_dir / "dicom"
    plan = pydicom.dcmread(dicom / "RTPLAN.dcm")
    dose = pydicom.dcmread(dicom / "RTDOSE.dcm")
    struct = pydicom.dcmread(dicom / "RTSTRUCT.dcm")
    ct = pydicom.dcmread(sorted((dicom / "CT").iterdir())[0])
    assert dose.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID == plan.SOPInstanceUID
    assert plan.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == struct.SOPInstanceUID
    assert {plan.StudyInstanceUID, dose.StudyInstanceUID, struct.StudyInstanceUID} == {
        ct.StudyInstanceUID
    }
    assert plan.FrameOfReferenceUID == ct.FrameOfReferenceUID
    assert plan.FractionGroupSequence[0].NumberOfFractionsPlanned == 25
    assert plan.DoseReferenceSequence[0].TargetPrescriptionDose == 50
    mlc_item = plan.BeamSequence[0].BeamLimitingDeviceSequence[2]
    assert mlc_item.RTBeamLimitingDeviceType == "MLCX" and mlc_item.NumberOfLeafJawPairs == 81
    delivered = json.loads((report_dir / "delivery.json").read_text())
    gantries, beams = read_rtplan(dicom / "RTPLAN.dcm")
    assert gantries == [b.gantry_deg % 360 for b in analytic_case.beams]
    fractions = delivered["summary"]["fractions"]
    segments = []
    for stored, read in zip(delivered["beams"], beams, strict=True):
        assert len(read) == len(stored["segments"])
        for mu, seg in read:
            seg.weight = mu * fractions / stored["mu_per_unit"]
        segments.append([seg for _, seg in read])
        meterset = plan.FractionGroupSequence[0].ReferencedBeamSequence[len(segments) - 1]
        assert float(meterset.BeamMeterset) == pytest.approx(sum(mu for mu, _ in read), rel=1e-4)
    rebuilt = fluence_of_segments(analytic_case, load_mlc(), segments)
    stored_fluence = fluence_of_segments(
        analytic_case, load_mlc(), [segments_from_json(b) for b in delivered["beams"]]
    )
    assert np.allclose(rebuilt, stored_fluence, rtol=2e-3, atol=1e-3 * stored_fluence.max())


@pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) missing"
)
def test_every_exported_object_passes_dciodvfy(report_dir: Path) -> None:
    dicom = report_dir / "dicom"
    files = [dicom / "RTPLAN.dcm", dicom / "RTDOSE.dcm", dicom / "RTSTRUCT.dcm"]
    files += sorted((dicom / "CT").iterdir())[:3]
    for f in files:
        out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, check=False)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, (f.name, errors)
        assert "Assertion" not in out.stderr, (f.name, out.stderr[-300:])


EVERY = "\ndelivery: {every_iteration: true}\n"


def test_every_iteration_port_judges_the_deliverable_dose(analytic_case: Case) -> None:
    p = load_protocol_text(HARDER.read_text() + EVERY)
    assert p.delivery is not None and p.delivery.every_iteration
    arrays = MemoryArtefacts()
    inner = LibraryOptimizer(analytic_case, p, "numpy", arrays)
    calls: list[int] = []

    def sequence(fluence: ArtefactRef) -> tuple[dict, ArtefactRef]:
        calls.append(1)
        d = deliver(
            analytic_case,
            arrays.get(fluence),
            p.delivery,
            fractions=p.num_fractions,
            target=p.target,
            prescription_gy=p.prescription_gy,
        )
        return d.to_json(p.prescription_gy), arrays.put("deliverable", d.dose_rows)

    port = SequencingOptimizer(inner, sequence, (DeliveryError,))
    out = port.optimize(list(p.objectives), None)
    assert out.optimal_dose is not None and out.dose != out.optimal_dose
    optimum, delivered = arrays.get(out.optimal_dose), arrays.get(out.dose)
    assert not np.allclose(optimum, delivered)  # the evaluator sees the segments' dose
    assert np.allclose(analytic_case.dose_influence @ arrays.get(out.fluence), optimum, rtol=1e-3)
    assert out.delivery["segments"] == sum(out.delivery["segments_per_beam"]) > 0
    assert max(out.delivery["segments_per_beam"]) <= 12

    def refuse(fluence: ArtefactRef) -> tuple[dict, ArtefactRef]:
        calls.append(1)
        raise DeliveryError("the MLC cannot deliver this grid")

    calls.clear()
    port = SequencingOptimizer(inner, refuse, (DeliveryError,))
    first = port.optimize(list(p.objectives), None)
    second = port.optimize(list(p.objectives), first.fluence)
    # judged on the optimum, the reason kept; not tried again for later plans
    assert first.optimal_dose is None and first.delivery == {"error": port.error}
    assert second.delivery["error"] == "the MLC cannot deliver this grid" and len(calls) == 1


def test_every_iteration_loop_ranks_plans_as_delivered(analytic_case: Case, tmp_path: Path) -> None:
    events: list[dict] = []
    report = plan_loop(
        analytic_case,
        load_protocol_text(HARDER.read_text() + EVERY),
        max_iterations=2,
        on_event=events.append,
    )
    assert all(
        it.optimal_dose is not None and it.delivery["segments"] > 0 for it in report.iterations
    )
    assert all(it.seconds["sequence"] > 0 for it in report.iterations)
    done = [e["message"] for e in events if e["kind"] == "fmo_done"]
    assert done and all("judged as delivered" in m for m in done)
    # the best record's check is its deliverable dose's; the report's fluence-optimal side is
    # its optimum, and its final check the (re)sequenced plan's
    best = next(it for it in report.iterations if it.iteration == report.best_iteration)
    assert report.optimal_check is not None and report.deliverable is not None
    first_try = report.deliverable["summary"]["tries"][0]
    assert first_try["segments"] == best.delivery["segments"]
    if len(report.deliverable["summary"]["tries"]) == 1:  # no retry: the very same plan
        assert [r.achieved for r in report.check.results] == pytest.approx(
            [r.achieved for r in best.check.results], abs=1e-3
        )
    report.write(tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert {it["dose_basis"] for it in s["per_iteration"]} == {"deliverable"}
    assert "as delivered:" in (tmp_path / "report.html").read_text()


def test_when_every_try_loses_goals_the_best_ranked_try_is_kept() -> None:
    # four tries that each lose the same two goals: by count they tie (the first would be
    # kept); by the protocol's ranking the one that misses them by least wins
    misses = {(10, True): 3.6, (10, False): 3.1, (20, True): 2.0, (40, True): 0.9}

    def sequence(settings: SequencingSettings, extra: list) -> tuple[dict, tuple[int, bool]]:
        summary = {"segments": settings.levels, "total_mu": 1.0}
        return {"summary": summary}, (settings.levels, settings.apertures)

    def lost(dose: tuple[int, bool]) -> list[str]:
        return ["PTV D10 <= 55 Gy", "Core D10 <= 10 Gy"]

    settings = SequencingSettings(levels=10)
    plan, kept = keep_goals(sequence, lost, settings, rank=lambda d: (-misses[d],))
    assert kept == (40, True)
    # the first try's fit alone comes second, before more levels
    tries = [(t["levels"], t["apertures"]) for t in plan["summary"]["tries"]]
    assert tries == [(10, True), (10, False), (20, True), (40, True)]
    _, by_count = keep_goals(sequence, lost, settings)
    assert by_count == (10, True)  # without a ranking: the fewest lost goals, the earliest
    # a fit alone that keeps every goal ends the search there
    _, alone = keep_goals(sequence, lambda d: [] if not d[1] else ["Core D10 <= 10 Gy"], settings)
    assert alone == (10, False)
    # both ways keep every goal: the ranking (which then prefers the plan that spares more)
    # chooses, and no retry follows; on a tie the moved leaves stay
    sparing = {(10, True): 1.0, (10, False): 2.0}
    plan, spared = keep_goals(sequence, lambda d: [], settings, rank=lambda d: (sparing[d],))
    assert spared == (10, False) and len(plan["summary"]["tries"]) == 2
    _, tie = keep_goals(sequence, lambda d: [], settings, rank=lambda d: (0.0,))
    assert tie == (10, True)
    # keeping every goal comes before the ranking: the moved leaves keep them, the fit alone
    # ranks higher (it misses another goal by less) but loses one
    _, keeps = keep_goals(
        sequence,
        lambda d: [] if d[1] else ["PTV D10 <= 55 Gy"],
        settings,
        rank=lambda d: (sparing[d],),
    )
    assert keeps == (10, True)
    _, fixed = keep_goals(sequence, lost, SequencingSettings(levels=10, apertures=False))
    assert fixed == (10, False)


def test_a_retry_is_fitted_alone_before_its_goal_terms() -> None:
    # the first try loses a hot-spot goal; the retry's finer steps fitted to the optimum alone
    # keep it, so the objective refit with the lost goal's term (which moves dose where no term
    # looks) is never run; when they lose it too, the refit follows on the same steps
    term = ObjectiveTerm("PTV", "smooth_max", 54.0, 1.0, 1.0)
    calls: list[tuple[int, bool, int]] = []

    def sequence(settings: SequencingSettings, terms: list) -> tuple[dict, tuple[int, int]]:
        calls.append((settings.levels, settings.apertures, len(terms)))
        return {"summary": {"segments": settings.levels, "total_mu": 1.0}}, (
            settings.levels,
            len(terms),
        )

    def terms_for(labels: list[str], factor: float) -> list[ObjectiveTerm]:
        assert labels == ["PTV max <= 57.5 Gy"]
        return [term]

    settings = SequencingSettings(levels=10)
    plan, kept = keep_goals(
        sequence, lambda d: [] if d[0] > 10 else ["PTV max <= 57.5 Gy"], settings, terms_for
    )
    assert kept == (20, 0) and calls == [(10, True, 0), (10, False, 0), (20, True, 0)]
    assert [t["goal_terms"] for t in plan["summary"]["tries"]] == [[], [], []]
    calls.clear()
    plan, kept = keep_goals(
        sequence, lambda d: [] if d[1] else ["PTV max <= 57.5 Gy"], settings, terms_for
    )
    assert kept == (20, 1)
    assert calls == [(10, True, 0), (10, False, 0), (20, True, 0), (20, True, 1)]
    assert plan["summary"]["tries"][-1]["goal_terms"] == [term.label()]
