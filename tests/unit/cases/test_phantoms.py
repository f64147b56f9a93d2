"""The built-in TG-119 phantoms: geometry as the report describes it, and the rule-based loop
meeting the TG-119 goals (the issue's bar) on the pyRadPlan dose engine."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_fill_holes

from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.cases.phantoms import PHANTOMS, phantom_structures
from radpilot.loop.inprocess import plan_loop
from radpilot.protocol import load_protocol
from tests.paths import REPO_ROOT

PROTOCOLS = REPO_ROOT / "protocols"


@pytest.mark.parametrize("name", sorted(PHANTOMS))
def test_geometry(name: str) -> None:
    g, structures = phantom_structures(name)
    assert g.spacing[0] <= 2.5
    cc = {s.name: s.mask.sum() * np.prod(g.spacing) / 1000 for s in structures}
    for s in structures:
        assert s.mask.any(), s.name
        holes = sum(int((binary_fill_holes(m) & ~m).sum()) for m in s.mask)
        assert holes == 0, f"{s.name} has holes: its contours would nest"
    if name == "tg119-prostate":
        d = {s.name: s.mask for s in structures}
        inside = (d["Rectum"] & d["PTV"]).sum(axis=(1, 2)) / np.maximum(
            d["Rectum"].sum(axis=(1, 2)), 1
        )
        assert 0.25 <= inside.max() <= 0.45  # about a third of the rectum on the widest slice
        assert 60 <= cc["PTV"] <= 90
    if name == "tg119-multitarget":
        assert all(45 <= cc[n] <= 55 for n in ("Center", "Superior", "Inferior"))  # pi 2^2 4 cc


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "protocol", "soft_misses_allowed"),
    [
        ("tg119-prostate", "tg119_prostate.yaml", 0),
        ("tg119-headneck", "tg119_headneck.yaml", 0),
        ("tg119-multitarget", "tg119_multitarget.yaml", 1),
        ("tg119-prostate", "paper_prostate.yaml", 1),
        ("paper-headneck", "paper_headneck.yaml", 1),
    ],
)
def test_rules_meet_the_goals(
    store: CaseStore, case: str, protocol: str, soft_misses_allowed: int
) -> None:
    c = load_builtin(case, store)
    report = plan_loop(c, load_protocol(PROTOCOLS / protocol), max_iterations=6)
    first = report.iterations[0].fmo  # the default settings let the first FMO converge
    assert first.converged, (first.stop_reason, first.iterations)
    failed = report.check.failed  # judged on the deliverable (leaf-sequenced) dose
    assert not [r for r in failed if r.goal.hard], [r.finding() for r in failed]
    assert len(failed) <= soft_misses_allowed, [r.finding() for r in failed]
    delivered = report.deliverable_summary()
    assert delivered is not None and delivered["dose_basis"] == "deliverable"
    if case in ("tg119-prostate", "tg119-headneck") and protocol.startswith("tg119_"):
        # the bar: at most 12 segments per beam at the default settings
        assert max(delivered["segments_per_beam"]) <= 12, delivered["segments_per_beam"]
