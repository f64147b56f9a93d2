"""The rule-based evaluator's findings on doses set by hand on the analytic C-shape."""

from __future__ import annotations

import numpy as np

from radpilot.case import Case
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.rules import evaluate_rules
from radpilot.protocol import load_protocol
from tests.conftest import PROTOCOLS


def test_the_hottest_point_outside_the_targets_is_found_and_located(analytic_case: Case) -> None:
    protocol = load_protocol(PROTOCOLS / "tg119_cshape_easier.yaml")
    rx = protocol.prescription_gy
    dose = np.full(analytic_case.row_voxels.size, 0.3 * rx, dtype=np.float32)
    dose[analytic_case.rows_of("PTV")] = rx
    # the hottest voxel of the whole plan lies in a target: it must not be the one reported
    dose[analytic_case.rows_of("PTV")[0]] = 1.3 * rx
    core = analytic_case.structure("Core")
    dose[analytic_case.rows_of("Core")[5]] = 1.2 * rx
    ev = evaluate_rules(PlanDose(analytic_case, dose), protocol)
    assert ev.measures["max_outside_targets_gy"] == np.float32(1.2 * rx)
    assert round(ev.measures["max_outside_targets_pct"]) == 120
    z, y, x = analytic_case.grid.centre_of(int(core.voxel_indices[5]))
    finding = next(f for f in ev.findings if f.startswith("hottest point outside the targets"))
    assert f"at x {x:.0f}, y {y:.0f}, z {z:.0f} mm, in Core" in finding, finding
    assert "(120 % of the prescription)" in finding
