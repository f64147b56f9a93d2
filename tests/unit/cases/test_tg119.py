"""The TG-119 C-shape built with pyRadPlan: case sanity, plan quality, and the in-process demo."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radpilot.case import Case, StructureKind
from radpilot.case_store import CaseStore
from radpilot.evaluation.metrics import PlanDose
from radpilot.loop.inprocess import plan_once
from radpilot.protocol import load_protocol
from services.cli import main
from tests.paths import PROTOCOLS

pytestmark = pytest.mark.slow


def test_case_geometry(tg119_case: Case) -> None:
    c = tg119_case
    assert {s.name: s.kind for s in c.structures} == {
        "PTV": StructureKind.TARGET,
        "Core": StructureKind.OAR,
        "BODY": StructureKind.EXTERNAL,
        "NormalTissue": StructureKind.OAR,
    }
    assert len(c.beams) == 9 and [b.gantry_deg for b in c.beams] == [40.0 * k for k in range(9)]
    assert c.dose_influence.dtype == np.float32 and c.dose_influence.format == "csr"
    # PTV and core do not overlap; normal tissue keeps clear of the PTV
    ptv = set(c.structure("PTV").voxel_indices.tolist())
    assert not ptv & set(c.structure("Core").voxel_indices.tolist())
    assert not ptv & set(c.structure("NormalTissue").voxel_indices.tolist())
    # every row of A lies in a structure and sees some beamlet
    assert c.row_voxels.size == c.dose_influence.shape[0]
    assert c.dose_influence[c.rows_of("PTV")].sum(axis=1).min() > 0


def test_hand_set_weights_meet_the_quality_bar(tg119_case: Case) -> None:
    protocol = load_protocol(PROTOCOLS / "tg119_cshape_harder.yaml")
    report = plan_once(tg119_case, protocol)
    plan: PlanDose = report.plan
    assert plan.metric("PTV", "D95") == pytest.approx(50.0, abs=1e-3)
    assert plan.metric("PTV", "D10") <= 56.0  # TG-119 institutions: 57.0 on average
    # TG-119 institutions: 16.3 on average. As delivered 11.1 Gy (version 3 of the protocol;
    # 12.45 with version 2, whose optimum had 10.9)
    assert plan.metric("Core", "D10") <= 12.5
    # the ring term keeps the tissue beside the PTV under the outside limit (115 %): 52.3 Gy as
    # delivered, where version 2's class solution, without it, put 64 Gy (128 %) there
    outside = next(r for r in report.check.results if r.goal.structure == "OutsideTargets")
    assert outside.goal.limit == pytest.approx(57.5) and outside.achieved <= 55.0, outside


def test_easier_protocol_is_met_with_its_initial_objectives(tg119_case: Case) -> None:
    protocol = load_protocol(PROTOCOLS / "tg119_cshape_easier.yaml")
    report = plan_once(tg119_case, protocol)
    assert report.check.all_passed, [r.finding() for r in report.check.results]
    fmo = report.iterations[0].fmo  # converges by its own criterion with the default settings
    assert fmo.converged and fmo.stop_reason.startswith("relative decrease"), fmo


def test_demo_writes_report_and_summary(tg119_case: Case, store: CaseStore, tmp_path) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--store", str(store.root)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["case"] == "tg119-cshape" and summary["protocol"] == "tg119-cshape-harder"
    # the rule-based loop meets the harder C-shape goals (TG-119 institutions: 57.0 / 16.3 Gy)
    assert summary["agent"] == "rules" and summary["iterations"] <= 6
    # the goals are judged on the leaf-sequenced dose; its fluence optimum meets every goal, and
    # sequencing moves no goal value by more than half a gray (it may tip one over its limit)
    assert summary["dose_basis"] == "deliverable", summary["delivery_error"]
    d = summary["deliverable"]
    assert d["all_goals_met_fluence_optimal"], d["goals"]
    assert summary["all_goals_met"] == d["all_goals_met"]
    # at most 12 segments per beam, raised to 18 and 24 on the retries that keep goals (a
    # maximum is one voxel's dose: the hot-spot goals may move further)
    dose_volume = [g for g in d["goals"] if " max " not in g["goal"]]
    assert all(abs(g["deliverable"] - g["fluence_optimal"]) < 1.5 for g in dose_volume), d
    assert max(d["segments_per_beam"]) <= 24, d["segments_per_beam"]
    # every level tried before giving up (the first try's fit alone beside it)
    levels = [t["levels"] for t in d["tries"]]
    assert levels[0] == 10 and (d["all_goals_met"] or sorted(set(levels)) == [10, 20, 40])
    assert (out / "dicom" / "RTPLAN.dcm").is_file()
    protocol_goals = [g for g in summary["goals"] if g["structure"] != "Global"]
    assert {g["metric"] for g in protocol_goals} == {"D95", "D10", "max"}
    # the implicit hot-spot goals (the protocol sets the outside limit to the target's 115 %)
    assert [(g["structure"], g["limit"]) for g in summary["goals"] if g["implicit"]] == [
        ("OutsideTargets", 57.5),
        ("PTV", 57.5),
    ]
    # where the plan is hottest, in the summary and the report
    hot = summary["hot_spots"]
    assert hot["global"]["dose_gy"] >= hot["outside_targets"]["dose_gy"] > 0
    assert len(hot["global"]["xyz_mm"]) == 3 and " at x " in hot["global"]["text"]
    # the loop went on sparing after the goals were met, within the hot-spot goals
    improvement = summary["improvement"]
    assert 1 <= improvement["met_at_iteration"] <= summary["best_iteration"]
    assert [g["goal"] for g in improvement["gains"]] == ["Core D10 <= 10 Gy"]
    assert all(g["gained"] >= 0 for g in improvement["gains"])
    # they limit both hot spots, so the loop adds no bound of its own ("Global max")
    assert "Global" not in [g["structure"] for g in summary["goals"]]
    for g in summary["goals"]:
        assert set(g) >= {
            "structure",
            "metric",
            "comparator",
            "limit",
            "achieved",
            "passed",
            "hard",
        }
    html = (out / "report.html").read_text()
    assert "dvh.png" in html and "dose_axial.png" in html and "<h2>Hot spots</h2>" in html
    for name in (
        "dvh.png",
        "dose_axial.png",
        "dose_sagittal.png",
        "dose_coronal.png",
        "dose_oar_Core.png",
        "goal_trends.png",
    ):
        assert (out / name).stat().st_size > 1000


def test_cli_reports_bad_protocol_clearly(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    assert main(["plan", "--protocol", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "missing required field" in capsys.readouterr().err
