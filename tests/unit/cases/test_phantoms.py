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
        # the bladder sits on the superior aspect of the prostate and overlaps the PTV, not CTV
        bladder, z = d["Bladder"], g.z.ravel()
        in_ptv = (bladder & d["PTV"]).sum() / bladder.sum()
        assert 0.05 <= in_ptv <= 0.2 and not (bladder & d["CTV"]).any()
        ctv_top = z[d["CTV"].any(axis=(1, 2))].max()
        bladder_z = z[bladder.any(axis=(1, 2))]
        assert abs(bladder_z.mean() - ctv_top) <= 10.0  # centred on the prostate's top
        assert 40 <= cc["Bladder"] <= 60
    if name == "tg119-headneck":
        d = {s.name: s.mask for s in structures}
        z = g.z.ravel()
        ptv_z = z[d["PTV"].any(axis=(1, 2))]
        for side in ("ParotidL", "ParotidR"):
            parotid = d[side]
            # beside the superior part of the PTV, about a third of it inside
            assert 0.2 <= (parotid & d["PTV"]).sum() / parotid.sum() <= 0.45
            pz = z[parotid.any(axis=(1, 2))]
            assert ptv_z.max() - 20 <= pz.mean() <= ptv_z.max()
        # the cord stays 1.5 cm from the PTV
        assert not (g.expand(d["Cord"], 14.0) & d["PTV"]).any()
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
        # at most 12 segments per beam at the default settings on the prostate; the head & neck,
        # whose parotids overlap its PTV as TG-119's do, loses goals with 12 (PTV D20, the hot
        # spots) and keeps them with a retry: the first's 18 on the machines this was written
        # on, the second's 24 on one whose FMO differs in the last digits (18 lost the outside
        # maximum there). The sequencer's ladder puts goals before segment count
        # (``delivery.sequencing.keep_goals``): 12, 18, 24, and a retry only after a loss
        cap = 12 if case == "tg119-prostate" else 24
        assert max(delivered["segments_per_beam"]) <= cap, delivered["segments_per_beam"]


# issue 10's calibration bar: the organ metrics TG-119 compares, on the class solution
CALIBRATED = {
    "tg119-prostate": ("tg119_prostate.yaml", [("Rectum", "D30"), ("Bladder", "D30")]),
    "tg119-headneck": (
        "tg119_headneck.yaml",
        [("Cord", "max"), ("ParotidL", "D50"), ("ParotidR", "D50")],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CALIBRATED))
def test_class_solutions_land_within_the_institutions_mean_2sd(store: CaseStore, case: str) -> None:
    """One FMO with the protocol's own objectives, leaf-sequenced (``--agent fixed``): the organ
    doses TG-119 reports fall within the institutions' mean +- 2 SD (the phantoms were placed,
    and the class solutions aimed, for this; bench-phantoms' class-solution column)."""
    from benchmarks.tg119_phantoms import INSTITUTIONS, within

    protocol_file, metrics = CALIBRATED[case]
    report = plan_loop(
        load_builtin(case, store), load_protocol(PROTOCOLS / protocol_file), 1, agent="fixed"
    )
    assert report.deliverable_summary() is not None  # judged as delivered
    for structure, metric in metrics:
        value = next(
            r.achieved
            for r in report.check.results
            if (r.goal.structure, r.goal.metric) == (structure, metric)
        )
        verdict = within(value, INSTITUTIONS[(case, structure, metric)])
        assert verdict.startswith("yes"), f"{structure} {metric} {value:.2f} Gy: {verdict}"
