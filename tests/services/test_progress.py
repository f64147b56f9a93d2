"""The live progress table says whether each FMO converged, and why one stopped when not."""

from __future__ import annotations

from radpilot.loop.record import FmoStats
from services.client import progress_line


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
