"""The 3 mm C-shape trade-off probe: its objective sets and its table (no FMO here)."""

from __future__ import annotations

from benchmarks.cshape_frontier import (
    AGENT_RUNS,
    BEGIN,
    END,
    MLC_FOR_BIXEL,
    PROTOCOL,
    _goals,
    _met,
    agent_protocol,
    markers,
    objective_sets,
    section,
)
from radpilot.evaluation.protocol_check import GLOBAL, GoalResult, ProtocolCheck
from radpilot.protocol import ClinicalGoal, load_protocol


def test_the_sets_start_from_the_protocol_and_add_the_goals_shapes() -> None:
    protocol = load_protocol(PROTOCOL)
    sets = dict(objective_sets(protocol))
    assert sets["the protocol's objectives"] == list(protocol.objectives)
    shaped = {t.key(): t for t in sets["the same, DVH terms aimed 0.5-1 Gy lower"]}
    # each goal issue 12 names gets its own shape: PTV D95 (min-DVH at 95 %), PTV D10 and
    # core D10 (max-DVH at 10 %), aimed inside their limits; the hot spots their smooth maxima
    assert (shaped["PTV:min_dvh"].dose_gy, shaped["PTV:min_dvh"].parameter) == (50.0, 95.0)
    assert (shaped["PTV:max_dvh"].dose_gy, shaped["PTV:max_dvh"].parameter) == (54.0, 10.0)
    assert (shaped["Core:max_dvh"].dose_gy, shaped["Core:max_dvh"].parameter) == (9.0, 10.0)
    assert {"OutsideTargets:smooth_max", "PTV:smooth_max"} <= set(shaped)
    assert "OutsideTargets:smooth_max" not in {
        t.key() for t in sets["DVH terms on PTV D95/D10 and core D10"]
    }


def test_the_table_marks_each_missed_goal() -> None:
    row = {
        "objectives": "the protocol's objectives",
        "goals": {"PTV D10 <= 55 Gy": [54.34, True], "Core D10 <= 10 Gy": [11.34, False]},
        "met": "1/2",
        "scale": 1.059,
        "converged": True,
        "seconds": 7.3,
    }
    text = section([row])
    assert text.startswith(BEGIN) and text.endswith(END)
    assert "| PTV D10 <= 55 Gy | Core D10 <= 10 Gy | met | normalised x | converged | s |" in text
    assert "| the protocol's objectives | 54.34 | 11.34 ! | 1/2 | 1.059 | yes | 7.3 |" in text
    # another bixel size: its own section, named in the heading
    other = section([row], bixel_mm=3.0)
    begin, end = markers(3.0)
    assert (begin, end) != (BEGIN, END)
    assert other.startswith(begin) and other.endswith(end)
    assert "(3 mm bixels)" in other and "`--bixel-mm 3`" in other


def test_the_agent_runs_get_the_protocol_with_smoothness_and_an_mlc_that_fits() -> None:
    plain = agent_protocol(0.0, "micro-3mm")
    assert plain.objectives == load_protocol(PROTOCOL).objectives
    assert plain.delivery is not None and plain.delivery.mlc == "micro-3mm"
    smooth = agent_protocol(10.0, None)
    extra = {t.key(): t for t in smooth.objectives}["AllBeams:fluence_smoothness"]
    assert (extra.weight, extra.dose_gy) == (10.0, 0.0)
    assert smooth.delivery is None
    assert MLC_FOR_BIXEL[3.0] == "micro-3mm" and MLC_FOR_BIXEL[5.0] == "uniform-5mm"


def test_the_agent_table_shows_the_optimum_and_the_delivered_plan() -> None:
    fmo_row = {
        "objectives": "the protocol's objectives",
        "goals": {"PTV D10 <= 55 Gy": [54.34, True]},
        "met": "1/1",
        "scale": 1.059,
        "converged": True,
        "seconds": 7.3,
    }
    run = {
        "agent": "rules",
        "objectives": "the protocol's objectives + fluence smoothness w=10",
        "fmo_calls": 8,
        "first_met_call": 8,
        "best_call": 8,
        "goals": {"PTV D10 <= 55 Gy": [54.26, True]},
        "met": "1/1",
        "mlc": "micro-3mm",
        "delivery_error": "",
        "delivered_goals": {"PTV D10 <= 55 Gy": [55.06, False]},
        "delivered_met": "0/1",
        "segments": 94,
        "mu_per_gy": 2015.98,
        "seconds": 155.0,
    }
    text = section([fmo_row, run], bixel_mm=3.0)
    assert "| the protocol's objectives | 54.34 | 1/1 | 1.059 | yes | 7.3 |" in text
    assert (
        "| the protocol's objectives + fluence smoothness w=10 (met at call 8, best 8 of 8) | "
        "optimum | 54.26 | 1/1 | | | 155.0 |"
    ) in text
    assert "| | as delivered (micro-3mm) | 55.06 ! | 0/1 | 94 | 2016 | |" in text
    never = {**run, "first_met_call": 0, "delivered_goals": None, "delivery_error": "no leaves"}
    text = section([fmo_row, never], bixel_mm=3.0)
    assert "never met" in text and "| | not sequenced: no leaves | |" in text


def test_the_last_agent_run_judges_every_call_as_delivered() -> None:
    assert AGENT_RUNS[-1][1] and not any(every for _, every in AGENT_RUNS[:-1])
    every = agent_protocol(10.0, "micro-3mm", every_call=True)
    assert every.delivery is not None and every.delivery.every_iteration


def test_the_tables_judge_the_protocols_goals_not_the_loops_hot_spot_bound() -> None:
    """The loop's ``Global max`` has a limit of its own in every run (a column per run broke the
    table): the frontier's columns and "met" are the protocol's goals."""
    d10 = ClinicalGoal("PTV", "D10", "<=", 55.0, 2, True)
    bound = ClinicalGoal(GLOBAL, "max", "<=", 58.65, 1, True)
    check = ProtocolCheck([GoalResult(d10, 55.2, False, -0.2), GoalResult(bound, 57.9, True, 0.75)])
    assert _goals(check) == {"PTV D10 <= 55 Gy": [55.2, False]}
    assert _met(check) == "0/1"
