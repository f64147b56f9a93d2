"""TG-119 C-shape plan quality: initial (hand-set) objectives, and the rule-based loop.

    make bench-quality        # rewrites its section of docs/benchmarks.md

One FMO per protocol (no outer loop), normalised to PTV D95 = 50 Gy, next to the TG-119
institutions' mean (Ezzell et al. 2009). Those were deliverable plans; these are leaf-sequenced too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.docsection import write_section
from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.loop.inprocess import plan_loop, plan_once
from radpilot.protocol import load_protocol

ROOT = Path(__file__).resolve().parent.parent
INSTITUTIONS = {  # TG-119 Table VI: mean (SD) over the participating institutions
    ("easier", "PTV", "D95"): "50.10 (0.17)",
    ("easier", "PTV", "D10"): "54.40 (0.52)",
    ("easier", "Core", "D10"): "22.00 (3.14)",
    ("harder", "PTV", "D95"): "50.11 (0.17)",
    ("harder", "PTV", "D10"): "57.02 (2.20)",
    ("harder", "Core", "D10"): "16.30 (3.07)",
}
BEGIN, END = "<!-- bench-quality:begin -->", "<!-- bench-quality:end -->"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dose-grid-mm", type=float, default=5.0)
    ap.add_argument("--bixel-mm", type=float, default=5.0)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    case = load_builtin(
        "tg119-cshape", CaseStore(), dose_grid_mm=args.dose_grid_mm, bixel_mm=args.bixel_mm
    )
    rows = []
    for variant in ("easier", "harder"):
        protocol = load_protocol(ROOT / "protocols" / f"tg119_cshape_{variant}.yaml")
        once = plan_once(case, protocol)
        loop = plan_loop(case, protocol, max_iterations=6)
        opt = {r.goal.label: r for r in (loop.optimal_check or loop.check).results}
        for a, b in zip(once.check.results, loop.check.results, strict=True):
            g = a.goal
            mean = INSTITUTIONS.get((variant, g.structure, g.metric), "")
            o = opt[g.label]
            rows.append(
                f"| {variant} | {g.label} | {a.achieved:.2f} {'pass' if a.passed else 'FAIL'} "
                f"| {b.achieved:.2f} {'pass' if b.passed else 'FAIL'} "
                f"| {o.achieved:.2f} {'pass' if o.passed else 'FAIL'} | {mean} |"
            )
        h1, h2 = once.plan.target_indices()["PTV"], loop.plan.target_indices()["PTV"]
        rows.append(
            f"| {variant} | PTV HI / CI | {h1['HI']:.2f} / {h1['CI']:.3f} "
            f"| {h2['HI']:.2f} / {h2['CI']:.3f} | | |"
        )
        rows.append(
            f"| {variant} | iterations (best) | 1 | {len(loop.iterations)} ({loop.best_iteration}) "
            f"| | |"
        )
        print(f"{variant}: " + "; ".join(r.finding() for r in loop.check.results))
    section = f"""{BEGIN}
## TG-119 C-shape: plan quality (`make bench-quality`)

`tg119-cshape` at {args.dose_grid_mm:g} mm dose grid and {args.bixel_mm:g} mm bixels, normalised to PTV D95 = 50 Gy.
"Initial" is one FMO with the protocol's hand-set objectives; "rules loop" is the rule-based outer loop
(at most 6 iterations, best plan reported). TG-119 institutions' mean (SD) from Ezzell et al. 2009,
Table VI (deliverable plans). Both our columns are judged on the leaf-sequenced (deliverable) dose
with the defaults of docs/delivery.md (at most 12 segments per beam, more on the retries that keep
goals); the rules loop's fluence optimum is alongside.

| protocol | goal | initial objectives (deliverable) | rules loop (deliverable) | rules loop (fluence optimum) | TG-119 institutions |
|---|---|---|---|---|---|
{chr(10).join(rows)}
{END}"""
    write_section(args.doc, BEGIN, END, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
