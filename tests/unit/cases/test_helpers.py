"""Helper structures: geometry of rings and differences, definitions, caching, use in the FMO."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import distance_transform_edt

from radpilot.case import Case, CaseError, Structure, StructureKind
from radpilot.case_store import HELPERS, CaseStore
from radpilot.cases.helpers import Helper, build_helper, check_helpers
from radpilot.errors import HelperError
from radpilot.fmo import FluenceOptimizer, ObjectiveTerm

RING = Helper("PTV_ring", "ring", "PTV", inner_mm=3.0, outer_mm=15.0)
CORE_MINUS = Helper("Core-PTV", "minus", "Core", subtract="PTV", margin_mm=11.0)
TERMS = [
    ObjectiveTerm("PTV", "squared_deviation", 50.0, 100.0),
    ObjectiveTerm("PTV", "squared_overdose", 52.5, 300.0),
    ObjectiveTerm("Core", "squared_overdose", 8.0, 60.0),
    ObjectiveTerm("NormalTissue", "squared_overdose", 25.0, 5.0),
]


def _distance_from(case: Case, name: str) -> np.ndarray:
    mask = case.structure(name).mask(case.grid)
    return distance_transform_edt(~mask, sampling=case.grid.spacing_mm).ravel()


def test_a_ring_holds_the_voxels_between_its_margins_outside_every_target(
    analytic_case: Case,
) -> None:
    ring = build_helper(analytic_case, RING)
    d = _distance_from(analytic_case, "PTV")
    assert ring.kind is StructureKind.OAR and ring.weights is None
    assert np.all(d[ring.voxel_indices] > 3.0) and np.all(d[ring.voxel_indices] <= 15.0)
    # every body voxel in that shell is in it (the body has rows; the ring is the whole shell)
    body = analytic_case.structure("BODY").voxel_indices
    shell = body[(d[body] > 3.0) & (d[body] <= 15.0)]
    assert np.array_equal(np.sort(shell), ring.voxel_indices)
    assert not np.isin(ring.voxel_indices, analytic_case.structure("PTV").voxel_indices).any()
    assert np.isin(ring.voxel_indices, analytic_case.row_voxels).all()


def test_minus_keeps_the_voxels_away_from_the_other_structure(analytic_case: Case) -> None:
    core = analytic_case.structure("Core")
    helper = build_helper(analytic_case, CORE_MINUS)
    d = _distance_from(analytic_case, "PTV")
    assert helper.kind is StructureKind.OAR
    assert np.all(d[helper.voxel_indices] > 11.0)
    dropped = np.setdiff1d(core.voxel_indices, helper.voxel_indices)
    assert dropped.size and np.all(d[dropped] <= 11.0)  # the core hugs the C: some go
    # the target minus the organ is a target-kind helper of the target's voxels
    ptv_minus = build_helper(analytic_case, Helper("PTV-Core", "minus", "PTV", "Core", 0, 0, 11))
    assert ptv_minus.kind is StructureKind.TARGET
    assert ptv_minus.num_voxels < analytic_case.structure("PTV").num_voxels


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "r", "kind": "ring", "of": "PTV", "inner_mm": 10, "outer_mm": 5}, "must exceed"),
        ({"name": "r", "kind": "donut", "of": "PTV"}, "ring, minus"),
        ({"name": "r", "kind": "ring", "of": "PTV", "outer_mm": -1}, r"allowed range is \[0"),
        ({"name": "r", "kind": "ring", "of": "PTV", "outer_mm": 5, "subtract": "x"}, "unknown"),
        ({"name": "m", "kind": "minus", "of": "Core"}, "needs 'subtract'"),
        ({"name": "m", "kind": "minus", "of": "Core", "subtract": "Core"}, "same structure"),
        ({"name": "", "kind": "ring", "of": "PTV", "outer_mm": 5}, "needs a name"),
        ({"name": "r", "kind": "ring", "of": "PTV", "outer_mm": "far"}, "must be a number"),
    ],
)
def test_bad_definitions_name_what_to_fix(raw: dict, message: str) -> None:
    with pytest.raises(HelperError, match=message):
        Helper.from_dict(raw)


def test_definitions_against_a_case(analytic_case: Case) -> None:
    names = set(analytic_case.structure_names)
    check_helpers([RING, CORE_MINUS], names)
    with pytest.raises(HelperError, match="lacks"):
        check_helpers([Helper("x", "minus", "Rectum", "PTV")], names)
    with pytest.raises(HelperError, match="name of a structure"):
        check_helpers([Helper("Core", "ring", "PTV", outer_mm=5.0)], names)
    with pytest.raises(HelperError, match="two helpers"):
        check_helpers([RING, RING], names)
    with pytest.raises(CaseError, match="empty on the dose grid"):
        build_helper(analytic_case, Helper("far", "ring", "PTV", inner_mm=95, outer_mm=100))
    assert Helper.from_dict(RING.to_dict()) == RING and RING.key() != CORE_MINUS.key()


def test_the_store_keeps_a_built_helper_with_the_case(analytic_case: Case, tmp_path) -> None:
    store = CaseStore(tmp_path / "store")
    store.save(analytic_case, analytic_case.case_id)
    first = store.helper(analytic_case.case_id, analytic_case, CORE_MINUS)
    files = list((store.path(analytic_case.case_id) / HELPERS).iterdir())
    assert [f.name for f in files] == [f"{CORE_MINUS.key()}.npz"]
    again = store.helper(analytic_case.case_id, analytic_case, CORE_MINUS)
    assert np.array_equal(first.voxel_indices, again.voxel_indices)
    assert again.kind is first.kind and again.name == "Core-PTV"
    # another definition under the same name is another file, not the cached voxels
    wider = Helper("Core-PTV", "minus", "Core", subtract="PTV", margin_mm=15.0)
    assert store.helper(analytic_case.case_id, analytic_case, wider).num_voxels < first.num_voxels


def test_a_term_on_a_ring_lowers_the_dose_there(analytic_case: Case) -> None:
    opt = FluenceOptimizer(analytic_case)
    ring = build_helper(analytic_case, RING)
    rows = np.searchsorted(analytic_case.row_voxels, ring.voxel_indices)
    plain = opt.solve(TERMS).dose_rows[rows]
    with pytest.raises(CaseError, match="needs its definition"):
        opt.solve([*TERMS, ObjectiveTerm("PTV_ring", "squared_overdose", 25.0, 50.0)])
    opt.use_helpers([ring])
    ringed = opt.solve([*TERMS, ObjectiveTerm("PTV_ring", "squared_overdose", 25.0, 50.0)])
    assert ringed.dose_rows[rows].mean() < plain.mean() - 3.0
    assert np.percentile(ringed.dose_rows[rows], 90) < np.percentile(plain, 90)
    with pytest.raises(CaseError, match="name of a structure"):
        opt.use_helpers([Structure("Core", StructureKind.OAR, ring.voxel_indices)])


def test_the_in_process_loop_builds_the_protocol_s_helpers(analytic_case: Case) -> None:
    from radpilot.loop.inprocess import plan_loop
    from radpilot.protocol import load_protocol_text
    from tests.paths import REPO_ROOT

    # the shipped C-shape protocols carry a ring; this one is moved to 3-15 mm
    text = (REPO_ROOT / "protocols" / "tg119_cshape_harder.yaml").read_text()
    assert "inner_mm: 0, outer_mm: 10}" in text
    text = text.replace("inner_mm: 0, outer_mm: 10}", "inner_mm: 3, outer_mm: 15}")
    report = plan_loop(analytic_case, load_protocol_text(text), max_iterations=1, agent="fixed")
    assert any(t.structure == "PTV_ring" for t in report.iterations[0].objectives)
    summary = report.summary()
    assert summary["helpers"][0]["what"] == "ring 3-15 mm around PTV"
    assert summary["per_iteration"][0]["term_changes"] == {"added": [], "retired": []}


def test_term_changes_name_what_a_proposal_adds_and_retires() -> None:
    from radpilot.report import term_changes

    ring = ObjectiveTerm("PTV_ring", "squared_overdose", 25.0, 50.0)
    changes = term_changes(TERMS, [*TERMS[:3], ring])
    assert changes == {
        "added": ["PTV_ring squared_overdose 25 Gy w=50"],
        "retired": ["NormalTissue squared_overdose 25 Gy w=5"],
    }
    assert term_changes(TERMS, []) == {"added": [], "retired": []}
