"""TG-119 phantoms planned by the rule-based loop, next to the TG-119 institutions' mean
(``make bench-phantoms``; rewrites its section of docs/benchmarks.md).

Each case at its default grids (CT 2.5 mm, dose 5 mm, 5 mm bixels), pyRadPlan photon pencil beams,
TG-119 field arrangements; the in-process loop with the rule-based agents, at most 8 iterations.
TG-119 results are deliverable clinical plans; these are judged on their leaf-sequenced dose too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.docsection import write_section
from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.loop.inprocess import plan_loop
from radpilot.protocol import load_protocol

ROOT = Path(__file__).resolve().parent.parent
MAX_ITERATIONS = 8
BEGIN, END = "<!-- bench-phantoms:begin -->", "<!-- bench-phantoms:end -->"
RUNS = [
    ("tg119-prostate", "tg119_prostate.yaml"),
    ("tg119-headneck", "tg119_headneck.yaml"),
    ("tg119-multitarget", "tg119_multitarget.yaml"),
    ("tg119-prostate", "paper_prostate.yaml"),
    ("paper-headneck", "paper_headneck.yaml"),
    # RadPilot's own, tighter than the class solution meets (benchmarks/protocols/)
    ("tg119-prostate", "../benchmarks/protocols/tg119_prostate_tight.yaml"),
]
INSTITUTIONS = {  # TG-119 Table VI (Ezzell et al. 2009): mean (SD), Gy
    ("tg119-multitarget", "Center", "D99"): "49.55 (1.62)",
    ("tg119-multitarget", "Center", "D10"): "54.55 (1.73)",
    ("tg119-multitarget", "Superior", "D99"): "25.16 (0.85)",
    ("tg119-multitarget", "Superior", "D10"): "34.12 (3.04)",
    ("tg119-multitarget", "Inferior", "D99"): "14.07 (1.85)",
    ("tg119-multitarget", "Inferior", "D10"): "24.18 (2.72)",
    ("tg119-prostate", "PTV", "D95"): "75.66 (0.21)",
    ("tg119-prostate", "PTV", "D5"): "81.43 (1.56)",
    ("tg119-prostate", "Rectum", "D30"): "65.36 (2.97)",
    ("tg119-prostate", "Rectum", "D10"): "73.03 (1.50)",
    ("tg119-prostate", "Bladder", "D30"): "43.94 (8.78)",
    ("tg119-prostate", "Bladder", "D10"): "62.69 (8.15)",
    ("tg119-headneck", "PTV", "D90"): "50.28 (0.58)",
    ("tg119-headneck", "PTV", "D99"): "47.04 (0.52)",
    ("tg119-headneck", "PTV", "D20"): "52.99 (0.93)",
    ("tg119-headneck", "Cord", "max"): "37.41 (2.50)",
    ("tg119-headneck", "ParotidL", "D50"): "17.98 (1.84)",
    ("tg119-headneck", "ParotidR", "D50"): "17.98 (1.84)",
}


def _tries(d: dict) -> str:
    """The levels of every sequencing try; "fit alone" where the leaves were not moved."""
    return ", ".join(
        f"{t['levels']}{'' if t.get('apertures', True) else ' (fit alone)'}"
        for t in d.get("tries", [])
    )


def within(value: float, institutions: str) -> str:
    """Whether a value lies within the institutions' mean +- 2 SD ("" when none is published)."""
    if not institutions:
        return ""
    mean, sd = (float(v.strip("()")) for v in institutions.split())
    lo, hi = mean - 2 * sd, mean + 2 * sd
    where = "yes" if lo <= value <= hi else ("below" if value < lo else "above")
    return f"{where} ({lo:.1f}-{hi:.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    store = CaseStore()
    rows = []
    for case_name, proto_file in RUNS:
        case = load_builtin(case_name, store)
        protocol = load_protocol(ROOT / "protocols" / proto_file)
        # the class solution alone (the protocol's objectives, one FMO): what TG-119 calibrates
        fixed = plan_loop(case, protocol, max_iterations=1, agent="fixed")
        at_fixed = {r.goal.label: r.achieved for r in fixed.check.results}
        t_rules = time.perf_counter()
        report = plan_loop(case, protocol, max_iterations=MAX_ITERATIONS)
        wall = time.perf_counter() - t_rules
        first = next((it for it in report.iterations if it.meets), None)
        at_first = {r.goal.label: r.achieved for r in first.check.results} if first else {}
        optimum = {r.goal.label: r.achieved for r in (report.optimal_check or report.check).results}
        for r in report.check.results:
            g = r.goal
            tg = (
                INSTITUTIONS.get((case_name, g.structure, g.metric), "")
                if protocol.name.startswith("tg119")
                else ""
            )
            diff = f"{r.achieved - float(tg.split()[0]):+.2f}" if tg else ""
            was = f"{at_first[g.label]:.2f}" if g.label in at_first else "-"
            rows.append(
                f"| {case_name} | {protocol.name} | {g.label}{'' if g.hard else ' (soft)'} | "
                f"{at_fixed[g.label]:.2f} | {within(at_fixed[g.label], tg)} | "
                f"{was} | {optimum[g.label]:.2f} | {r.achieved:.2f} | "
                f"{'pass' if r.passed else 'FAIL'} | {tg} | {diff} |"
            )
        spot = report.hot_spots().get("global")
        if spot is not None:
            rows.append(
                f"| {case_name} | {protocol.name} | global maximum (deliverable) | | | | | "
                f"{spot['dose_gy']:.2f} | {spot['pct_of_prescription']:.0f} % of Rx at "
                f"{', '.join(f'{a} {v:.0f}' for a, v in zip('xyz', spot['xyz_mm'], strict=True))}"
                f" mm, in {', '.join(spot['in']) or 'no named organ'} | | |"
            )
        met = sum(r.passed for r in report.check.results)
        met_at = f"first met at iteration {first.iteration}, " if first else "never met, "
        d = report.deliverable_summary()
        delivery = (
            f"deliverable: {d['segments']} segments "
            f"({'/'.join(map(str, d['segments_per_beam']))} per beam), {d['total_mu']:.0f} MU "
            f"per fraction, {d['mu_per_gy']:.0f} MU/Gy, levels tried "
            f"{_tries(d)}; "
            if d
            else f"not sequenced: {report.delivery_error}; "
        )
        rows.append(
            f"| {case_name} | {protocol.name} | *{met}/{len(report.check.results)} goals met, "
            f"{met_at}best plan: iteration {report.best_iteration} of {len(report.iterations)}, "
            f"{case.dose_influence.shape[1]} beamlets; {delivery}plan {wall:.1f} s* | | | | | | | | |"
        )
        print(f"{case_name} / {protocol.name}: {met}/{len(report.check.results)} goals met")
    section = f"""{BEGIN}
## TG-119 phantoms (`make bench-phantoms`)

Built-in water phantoms from the TG-119 geometry (CT 2.5 mm, dose grid 5 mm, 5 mm bixels, pyRadPlan
photon pencil beams, TG-119 field arrangements). "Class solution" is one FMO with the
protocol's own objectives (`--agent fixed`), leaf-sequenced: the phantoms' bladder and parotids
overlap the PTV as TG-119's do, and were placed so that this plan's organ doses fall within the
institutions' mean ± 2 SD (the column after it; rectum and bladder D30, cord maximum and parotid
D50 are checked by `make test`: tests/unit/cases/test_phantoms.py). Then the rule-based loop (at most
{MAX_ITERATIONS} iterations; after the protocol is met it goes on sparing the organs at risk,
protocol default `after_goals_met: improve`). "First met" is the first plan that met every goal,
"best" the plan reported, judged (and compared with the institutions) on its deliverable dose:
leaf-sequenced with the defaults of `docs/delivery.md` (MLC `uniform-5mm`, 10 levels, at most
12 segments per beam (18, then 24 on the retries that keep goals, each fitted to the optimum before
any objective refit), 2 MU minimum, segment weights refitted and leaves moved (aperture
refinement)), its fluence optimum alongside. The shipped protocols but the tight one carry
`fluence_smoothness` (weight 3). TG-119 institutions' mean (SD)
from Ezzell et al. 2009, Table VI — deliverable clinical plans, on their own CT; these phantoms
are built from the report's description, and the pencil-beam dose of our segments leaves out
leaf transmission and small-field output: compare with care. The row "global maximum" says
where the reported plan is hottest. Every protocol has the implicit hot-spot goals unless it
switches them off (docs/agents.md: `OutsideTargets max` at 107 % and `PTV max` at 115 % of the
prescription): `paper_headneck.yaml` widens the outside limit to 110 % (the file says why);
`tg119_headneck.yaml` keeps the defaults since 2026-12-06 (it had a 140 % backstop);
`tg119_prostate.yaml` also judges
every iteration on its leaf-sequenced dose (`delivery: {{every_iteration: true}}`). Where a
protocol does not limit both hot spots, the loop's own goal `Global max` keeps every plan's
hottest point, while sparing, within 2 % of the first plan that met (rows "Global max"), so the
improvement never makes the plan hotter.

| case | protocol | goal | class solution: deliverable | within institutions' mean ± 2 SD | rules: first met (Gy or %) | rules best: fluence optimum | rules best: deliverable | | TG-119 institutions | rules deliverable - institutions' mean |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{END}"""
    write_section(args.doc, BEGIN, END, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
