"""Make the reference plans that ship in protocols/references/ (``make references``).

For each TG-119 C-shape protocol, RadPilot plans a few phantoms of different anatomy — the
pyRadPlan TG-119 phantom (5 mm grid, 7 fields as well as 9) and the analytic C-shape in cylinders
of different radius — with the rule-based agent, or with the BO baseline where rules do not meet
every hard goal within its budget. A plan becomes a reference only when it meets every hard goal.
Each reference keeps the objective terms, goal results, structure statistics and anatomy features;
no case id. The output is deterministic for a given RadPilot version (rerun after FMO changes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from radpilot.agents.references import ReferencePlan, reference_dvh
from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.loop.inprocess import case_anatomy_features, plan_loop
from radpilot.protocol import load_protocol

ROOT = Path(__file__).resolve().parent.parent
PHANTOMS = [
    ("tg119-cshape", {}, "TG-119 C-shape phantom (pyRadPlan), 5 mm grid, 9 fields"),
    ("tg119-cshape", {"num_beams": "7"}, "TG-119 C-shape phantom (pyRadPlan), 5 mm grid, 7 fields"),
    ("analytic-cshape", {}, "analytic C-shape in a 100 mm radius water cylinder, 9 fields"),
    (
        "analytic-cshape",
        {"body_radius_mm": "85"},
        "analytic C-shape in an 85 mm radius water cylinder, 9 fields",
    ),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(ROOT / "protocols" / "references"))
    ap.add_argument("--store", default=None)
    args = ap.parse_args()
    store = CaseStore(args.store) if args.store else CaseStore()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for variant in ("easier", "harder"):
        protocol = load_protocol(ROOT / "protocols" / f"tg119_cshape_{variant}.yaml")
        refs = []
        for name, params, description in PHANTOMS:
            case = load_builtin(name, store, **params)
            for agent, budget in (("rules", 8), ("bo", 20)):
                report = plan_loop(case, protocol, max_iterations=budget, agent=agent)
                if report.check.all_hard_passed:
                    break
            status = "meets" if report.check.all_hard_passed else "MISSES"
            print(f"{protocol.name} {description}: {agent} {status} in {len(report.iterations)}")
            if not report.check.all_hard_passed:
                continue
            best = report.iterations[report.best_iteration - 1]
            refs.append(
                ReferencePlan(
                    protocol=protocol.name,
                    description=f"{description}; planned by RadPilot ({agent} agent, "
                    f"iteration {best.iteration})",
                    features=case_anatomy_features(case),
                    objectives=best.objectives,
                    goals=[r.to_dict() for r in report.check.results],
                    stats=[s.to_dict() for s in report.plan.stats()],
                    dvh=reference_dvh(report.plan, protocol.prescription_gy),
                ).to_dict()
            )
        path = out / f"{protocol.name}.json"
        path.write_text(json.dumps({"references": refs}, indent=1) + "\n")
        print(f"wrote {len(refs)} reference plan(s) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
