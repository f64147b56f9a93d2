"""The live progress table says whether each FMO converged, and why one stopped when not."""

from __future__ import annotations

from radpilot.loop.record import FmoStats
from services.client import LOOP_PARTS, loop_breakdown, progress_line


def test_a_converged_fmo_is_one_row() -> None:
    line = progress_line(2, FmoStats(iterations=66, seconds=1.5, converged=True), "opt-1", ["a"])
    assert "\n" not in line and " yes " in line and " 66 " in line and "opt-1" in line


def test_an_fmo_stopped_at_its_limit_is_flagged_with_the_reason() -> None:
    stats = FmoStats(iterations=1000, seconds=9.0, converged=False, stop_reason="max_iter")
    row, note = progress_line(1, stats, "", ["PTV D95 50.00 (ok)"]).split("\n")
    assert " NO " in row and "PTV D95" in row
    assert "did not converge: max_iter after 1000 iterations" in note


def test_a_missing_fmo_prints_dashes() -> None:
    assert progress_line(3, None, "", []).split()[:4] == ["3", "-", "-", "-"]


def test_sequencing_every_iteration_counts_as_sequence_not_store() -> None:
    """With ``delivery.every_iteration`` each Optimize call also sequences its plan on the
    replica; the iteration records that apart from the solve, and the breakdown puts it under
    ``sequence`` with the final sequencing (it used to fall into ``store``, the remainder)."""
    iterations = [
        {
            "fmo": {"seconds": 10.0, "case_load_seconds": 1.0},
            "seconds": {"optimize": 11.5, "sequence": 14.0, "evaluate": 0.2, "propose": 0.1},
        },
        {
            "fmo": {"seconds": 6.0},
            "seconds": {"optimize": 6.5, "sequence": 13.0, "evaluate": 0.2},
        },
    ]
    parts = loop_breakdown(iterations, loop_s=60.0, sequence_s=5.0)
    assert parts["sequence"] == 14.0 + 13.0 + 5.0
    assert parts["fmo"] == 16.0 and parts["case_load"] == 1.0
    assert parts["transport"] == 11.5 + 6.5 - 16.0 - 1.0
    assert parts["store"] == 60.0 - (18.0 + 27.0 + 0.4 + 0.1) - 5.0
    assert sum(parts[p] for p in LOOP_PARTS) == 60.0
    # only the best plan sequenced at the end: as before
    plain = [{"fmo": {"seconds": 4.0}, "seconds": {"optimize": 4.5, "evaluate": 0.5}}]
    parts = loop_breakdown(plain, loop_s=10.0, sequence_s=2.0)
    assert parts["sequence"] == 2.0 and parts["store"] == 10.0 - 5.0 - 2.0
