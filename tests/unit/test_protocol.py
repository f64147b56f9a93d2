"""Protocol YAML: the shipped files, validation errors, and the protocol check."""

from __future__ import annotations

import numpy as np
import pytest

from radpilot.case import Case
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import check_protocol
from radpilot.protocol import ProtocolError, load_protocol, load_protocol_text
from tests.paths import REPO_ROOT

PROTOCOLS = REPO_ROOT / "protocols"

BASE = """
name: t
prescription: {target: PTV, dose_gy: 50}
goals:
  - {structure: PTV, metric: D95, comparator: ">=", limit: 50}
  - {structure: Core, metric: max, comparator: "<=", limit: 20, priority: 2, hard: false}
objectives:
  - {structure: PTV, kind: squared_deviation, dose_gy: 50, weight: 1}
"""


@pytest.mark.parametrize("name", ["tg119_cshape_easier.yaml", "tg119_cshape_harder.yaml"])
def test_shipped_protocols_load(name: str) -> None:
    p = load_protocol(PROTOCOLS / name)
    assert p.target == "PTV" and p.prescription_gy == 50.0
    assert {(g.structure, g.metric) for g in p.goals} == {
        ("PTV", "D95"),
        ("PTV", "D10"),
        ("Core", "D10"),
    }
    assert p.intent
    core = next(g for g in p.goals if g.structure == "Core")
    assert core.limit == (25.0 if "easier" in name else 10.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "mapping"),
        (BASE.replace("metric: D95", "metric: Dfoo"), "unknown metric"),
        (BASE.replace('comparator: ">="', 'comparator: "=="'), "comparator"),
        (BASE.replace("limit: 50}", "limit: .nan}"), "finite"),
        (BASE.replace("priority: 2", "priority: 0"), "priority"),
        (BASE.replace("weight: 1}", "weight: -2}"), ">= 0"),
        (BASE.replace("dose_gy: 50}", "dose_gy: 0}"), "positive"),
        (BASE.replace("goals:\n", "goals: []\nx:\n"), "non-empty"),
        (
            BASE + "  - {structure: PTV, kind: squared_deviation, dose_gy: 50, weight: 2}\n",
            "repeat",
        ),
        (
            BASE.replace(
                "goals:\n",
                'goals:\n  - {structure: PTV, metric: D95, comparator: "<=", limit: 40}\n',
            ),
            "contradictory",
        ),
    ],
)
def test_malformed_protocols_name_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        load_protocol_text(text)


def test_protocol_against_case_structures(analytic_case: Case) -> None:
    p = load_protocol_text(BASE.replace("structure: Core", "structure: Rectum"))
    with pytest.raises(ProtocolError, match="Rectum"):
        p.check_case(analytic_case)


def test_check_pass_fail_and_margins(analytic_case: Case) -> None:
    p = load_protocol_text(BASE)
    dose = np.zeros(analytic_case.row_voxels.size, dtype=np.float32)
    dose[analytic_case.rows_of("PTV")] = 50.0
    core = analytic_case.rows_of("Core")
    dose[core] = 10.0
    dose[core[0]] = 23.5  # Core max 23.5 > 20
    check = check_protocol(PlanDose(analytic_case, dose), p)
    ptv, core_r = check.results
    assert ptv.passed and ptv.achieved == 50.0 and ptv.margin == 0.0
    assert not core_r.passed and core_r.margin == pytest.approx(-3.5)
    assert check.all_hard_passed and not check.all_passed
    assert "misses" in core_r.finding() and "3.50 Gy" in core_r.finding()
    dose[analytic_case.rows_of("PTV")] = 49.0
    check2 = check_protocol(PlanDose(analytic_case, dose), p)
    assert not check2.all_hard_passed
    assert check2.score() < check.score()
