"""The tightened-protocol benchmark's variants: limits lowered, never loosened, met or not."""

from __future__ import annotations

import pytest

from benchmarks.tightened import VARIANTS, section, tightened
from radpilot.protocol import load_protocol
from tests.paths import REPO_ROOT


def test_every_variant_lowers_or_adds_upper_limits_and_stops_once_met() -> None:
    for path, limits in VARIANTS:
        base = load_protocol(REPO_ROOT / path)
        tight = tightened(base, limits)
        assert tight.after_goals_met == "stop"
        for old, new in zip(base.goals, tight.goals[: len(base.goals)], strict=True):
            key = (old.structure, old.metric)
            assert new.limit == limits.get(key, old.limit)
            assert new.limit <= old.limit
        for new in tight.goals[len(base.goals) :]:  # limits on metrics the protocol lacked
            assert new.comparator == "<=" and new.limit == limits[(new.structure, new.metric)]


def test_a_limit_on_a_new_metric_is_added_beside_the_structures_own() -> None:
    base = load_protocol(REPO_ROOT / "protocols/tg119_cshape_easier.yaml")
    tight = tightened(base, {("Core", "mean"): 6.0})
    (added,) = [g for g in tight.goals if g.metric == "mean"]
    core_d10 = next(g for g in base.goals if (g.structure, g.metric) == ("Core", "D10"))
    assert (added.structure, added.limit, added.priority, added.hard) == (
        "Core",
        6.0,
        core_d10.priority,
        core_d10.hard,
    )


def test_a_looser_or_unknown_limit_is_refused() -> None:
    base = load_protocol(REPO_ROOT / "protocols/tg119_prostate.yaml")
    with pytest.raises(ValueError, match="not a tighter upper limit"):
        tightened(base, {("Rectum", "D30"): 80.0})
    with pytest.raises(ValueError, match="not a tighter upper limit"):
        tightened(base, {("PTV", "D95"): 70.0})  # a lower limit
    with pytest.raises(ValueError, match="no upper limit on Urethra"):
        tightened(base, {("Urethra", "D50"): 30.0})


def _row(agent: str, met_at: int | None, kept: bool, hottest: float) -> dict:
    return {
        "protocol": "tg119_prostate",
        "tightened": "Rectum D30 <= 30",
        "agent": agent,
        "fmo_calls": 8,
        "met_at": met_at,
        "met_round": met_at and (met_at + 1) // 2,
        "goals_met": "7/8",
        "priority1_kept": kept,
        "metrics": {"Rectum D30": [67.5, 31.0]},
        "limits": {"Rectum D30": 30.0},
        "hottest_pct": hottest,
        "seconds": 12.0,
    }


def test_the_section_counts_met_variants_lost_priority_1_goals_and_hot_spots() -> None:
    text = section([_row("rules", 5, True, 111.2), _row("bo", None, False, 117.4)])
    assert "| Rectum D30 67.50 -> 31.00 (missed) | 111 % |" in text
    assert "| 111 % |" in text and "| 117 % |" in text
    assert "Rules agent: 1 of 1 variants met" in text
    assert "priority-1 goal the first plan met: 1 of 2" in text
    assert "above 115 % of the prescription: 1 of 2" in text


def test_a_run_with_several_candidates_per_round_has_its_own_section_and_says_the_round() -> None:
    one = section([_row("rules", 5, True, 111.2)])
    three = section([_row("rules", 5, True, 111.2), _row("bo", None, True, 110.0)], candidates=3)
    assert one.startswith("<!-- bench-tightened:begin -->")
    assert three.startswith("<!-- bench-tightened-candidates:begin -->")
    assert three.endswith("<!-- bench-tightened-candidates:end -->")
    assert "| round 3, call 5 (8) |" in three and "| - (8) |" in three
    assert "Rules agent: 1 of 1 variants met within 8 rounds of 3 candidates" in three
