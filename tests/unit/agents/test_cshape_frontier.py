"""The 3 mm C-shape trade-off probe: its objective sets and its table (no FMO here)."""

from __future__ import annotations

from benchmarks.cshape_frontier import BEGIN, END, PROTOCOL, markers, objective_sets, section
from radpilot.protocol import load_protocol


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
