"""Fluence-optimal vs deliverable plans on every shipped case (``make bench-deliverable``;
rewrites its section of docs/benchmarks.md).

Per case and protocol: one FMO with the protocol's own objectives, then leaf sequencing with the
default settings (uniform-5mm MLC, 10 levels, at most 12 segments per beam, 2 MU minimum,
segment weights refitted to the fluence-optimal dose: the loop's first try), each plan sequenced
twice side by side (segment weights fitted alone, and leaves moved too: aperture refinement),
without and with
the ``fluence_smoothness`` term (most shipped protocols carry it at weight 3); goal values of the fluence optimum and of the
deliverable dose side by side, segments per beam, MU per fraction, MU/Gy, the largest dose
difference and the time sequencing took. No agent: the loop's own use of this is in
``make bench-phantoms`` and the demo.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.docsection import write_section
from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.delivery import SequencingSettings, deliver
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import check_protocol
from radpilot.fmo.objectives import ALL_BEAMS, ObjectiveTerm
from radpilot.loop.inprocess import protocol_optimizer
from radpilot.protocol import load_protocol

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench-deliverable:begin -->", "<!-- bench-deliverable:end -->"
RUNS = [  # (case, builder options, protocol)
    ("tg119-cshape", {}, "tg119_cshape_harder.yaml"),
    ("tg119-cshape", {"dose_grid_mm": 3.0}, "tg119_cshape_harder.yaml"),
    ("tg119-prostate", {}, "tg119_prostate.yaml"),
    ("tg119-headneck", {}, "tg119_headneck.yaml"),
    ("tg119-multitarget", {}, "tg119_multitarget.yaml"),
    ("paper-headneck", {}, "paper_headneck.yaml"),
]
SMOOTHNESS = (0.0, 3.0)  # weight of the fluence_smoothness term (0: none)


def _goals(case, protocol, dose) -> dict[str, tuple[float, bool]]:
    check = check_protocol(PlanDose(case, dose), protocol)
    return {r.goal.label: (r.achieved, r.passed) for r in check.results}


def _hot_spots(case, protocol, dose) -> str:
    """The hottest point outside the targets and the global maximum, % of the prescription."""
    plan = PlanDose(case, dose)
    out, top = plan.hottest_outside_targets(), plan.hottest_point()
    rx = protocol.prescription_gy
    return f"{100 * out[0] / rx:.0f} / {100 * top[0] / rx:.0f}" if out and top else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--only", default="", help="run only cases whose name contains this")
    args = ap.parse_args()
    store = CaseStore()
    goal_rows, summary_rows, hot_rows = [], [], []
    for case_name, options, proto_file in RUNS:
        if args.only and args.only not in case_name:
            continue
        case = load_builtin(case_name, store, **options)
        protocol = load_protocol(ROOT / "protocols" / proto_file)
        grid = f"{case.grid.spacing_mm[0]:g} mm"
        opt = protocol_optimizer(case, protocol)
        for w in SMOOTHNESS:
            # the shipped protocols carry the term: once without it, once at weight w
            terms = [t for t in protocol.objectives if t.kind != "fluence_smoothness"]
            if w > 0:
                terms.append(ObjectiveTerm(ALL_BEAMS, "fluence_smoothness", 0.0, w))
            t0 = time.perf_counter()
            plan = opt.solve(terms, settings=protocol.fmo_settings())
            t_fmo = time.perf_counter() - t0
            runs = {}
            for moved in (False, True):  # weights only, then leaves moved too (the default)
                settings = replace(protocol.delivery or SequencingSettings(), apertures=moved)
                t0 = time.perf_counter()
                d = deliver(
                    case,
                    plan.fluence,
                    settings,
                    fractions=protocol.num_fractions,
                    target=protocol.target,
                    prescription_gy=protocol.prescription_gy,
                    coverage_pct=protocol.coverage_pct,
                )
                runs[moved] = (d, time.perf_counter() - t0)
            (fixed, _), (d, t_seq) = runs[False], runs[True]
            s = d.summary(protocol.prescription_gy)
            before = _goals(case, protocol, plan.dose_rows)
            weights_only = _goals(case, protocol, fixed.dose_rows)
            after = _goals(case, protocol, d.dose_rows)
            label = f"{case_name} {grid}, {protocol.name}, smoothness {w:g}"
            for goal, (opt_value, opt_ok) in before.items():
                fix_value, fix_ok = weights_only[goal]
                del_value, del_ok = after[goal]
                goal_rows.append(
                    f"| {label} | {goal} | {opt_value:.2f} {'' if opt_ok else '(miss)'} | "
                    f"{fix_value:.2f} {'' if fix_ok else '(miss)'} | "
                    f"{del_value:.2f} {'' if del_ok else '(miss)'} | {del_value - opt_value:+.2f} |"
                )
            seg, lv = s["segments_per_beam"], s["levels_per_beam"]
            summary_rows.append(
                f"| {label} | {sum(ok for _, ok in before.values())}/{len(before)} | "
                f"{sum(ok for _, ok in weights_only.values())}/{len(before)} | "
                f"{sum(ok for _, ok in after.values())}/{len(after)} | {np.mean(seg):.1f} "
                f"({min(seg)}-{max(seg)}) | {np.mean(lv):.1f} ({min(lv)}-{max(lv)}) | "
                f"{s['total_mu']:.0f} | {s['mu_per_gy']:.0f} | "
                f"{fixed.max_dose_difference_gy:.2f} | {s['max_dose_difference_gy']:.2f} | "
                f"{s['dropped_segments']} | {t_fmo:.1f} | {runs[False][1]:.1f} | {t_seq:.1f} |"
            )
            hot_rows.append(
                f"| {label} | {_hot_spots(case, protocol, plan.dose_rows)} | "
                f"{_hot_spots(case, protocol, fixed.dose_rows)} | "
                f"{_hot_spots(case, protocol, d.dose_rows)} |"
            )
            print(summary_rows[-1], flush=True)
    section = f"""{BEGIN}
## Deliverable plans (`make bench-deliverable`)

Every shipped case with its TG-119 (or paper-style) protocol: one FMO with the protocol's own
objectives (no agent), then step-and-shoot leaf sequencing with the defaults (MLC `uniform-5mm`,
10 intensity levels per beam, at most 12 segments per beam (a beam that needs more gets fewer
levels: equal steps or Lloyd-Max levels), segments of at least 2 MU per fraction, segment
weights refitted on the dose influence matrix to the fluence-optimal dose, renormalised to the
prescription: the loop's first try, without its retries), without and with the
`fluence_smoothness` term (weight 3, on `AllBeams`; the shipped protocols but the C-shape ones
carry it). Each plan is sequenced twice from the same optimum, side by side: with the segment
weights fitted alone (`apertures: false`, the default before 2026-12-04) and with the leaves
moved too (aperture refinement, `docs/delivery.md` step 7, the default); the segment, MU and
level columns are the latter's. MU per fraction with 1 cGy/MU at the maximum of each beam's
open field (`docs/delivery.md`); MU/Gy per fraction dose. One run on this 2-core machine; times
are wall seconds.

| case, protocol, smoothness weight | goals met: fluence optimum | deliverable, weights only | deliverable, leaves moved | segments per beam: mean (range) | levels per beam: mean (range) | MU per fraction | MU/Gy | largest dose difference (Gy): weights only | leaves moved | segments dropped (< 2 MU) | FMO s | sequencing s: weights only | leaves moved |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(summary_rows)}

Hot spots, % of the prescription: the hottest point outside every target / the global maximum
(inside the body). Moving the leaves holds both near the optimum's (`docs/delivery.md` step 7:
the hot-spot hold); the weight fit alone does not.

| case, protocol, smoothness weight | fluence optimum | deliverable, weights only | deliverable, leaves moved |
|---|---|---|---|
{chr(10).join(hot_rows)}

| case, protocol, smoothness weight | goal | fluence optimum | deliverable, weights only | deliverable, leaves moved | leaves moved - optimum |
|---|---|---|---|---|---|
{chr(10).join(goal_rows)}
{END}"""
    write_section(args.doc, BEGIN, END, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
