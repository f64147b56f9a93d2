"""Does the first FMO of every shipped case converge with the default settings? (``make
bench-convergence``). For each case and its protocol: the cold-start FMO with the protocol's
initial objectives, solved with the defaults and again without an iteration limit that matters
(10,000): iterations, whether the solver's own criterion stopped it, time, and the objective's
relative difference between the two. Rewrites its section of docs/benchmarks.md."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from benchmarks.docsection import write_section
from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.fmo import FMOSettings
from radpilot.loop.inprocess import protocol_optimizer
from radpilot.protocol import load_protocol

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [
    ("analytic-cshape", "tg119_cshape_harder.yaml"),
    ("tg119-cshape", "tg119_cshape_harder.yaml"),
    ("tg119-cshape", "tg119_cshape_easier.yaml"),
    ("tg119-prostate", "tg119_prostate.yaml"),
    ("tg119-prostate", "paper_prostate.yaml"),
    ("tg119-headneck", "tg119_headneck.yaml"),
    ("paper-headneck", "paper_headneck.yaml"),
    ("tg119-multitarget", "tg119_multitarget.yaml"),
]
BEGIN, END = "<!-- bench-convergence:begin -->", "<!-- bench-convergence:end -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--doc", default=None)
    ap.add_argument("--out", default="out/bench/convergence.json")
    args = ap.parse_args()
    store = CaseStore()
    rows = []
    for case_name, proto in PAIRS:
        case = load_builtin(case_name, store)
        protocol = load_protocol(ROOT / "protocols" / proto)
        opt = protocol_optimizer(case, protocol)
        default = opt.solve(protocol.objectives, settings=protocol.fmo_settings())
        unlimited = opt.solve(
            protocol.objectives,
            settings=dataclasses.replace(protocol.fmo_settings(), max_iter=10_000),
        )
        row = {
            "case": case_name,
            "protocol": proto,
            "iterations": default.iterations,
            "converged": default.converged,
            "stop_reason": default.stop_reason,
            "seconds": round(default.seconds, 2),
            "objective_gap": (default.objective - unlimited.objective) / unlimited.objective,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.doc:
        lines = [
            BEGIN,
            "## First FMO: convergence with the default settings",
            "",
            f"`make bench-convergence` (this machine, 2 cores; max_iter {FMOSettings.max_iter}, "
            f"stop when the relative decrease stays below {FMOSettings.rel_tol:g} for "
            f"{FMOSettings.patience} iterations). Objective gap: the default solve's objective "
            "relative to a solve allowed 10,000 iterations.",
            "",
            "| case | protocol | iterations | converged | stop | seconds | objective gap |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['case']} | {r['protocol']} | {r['iterations']} | "
            f"{'yes' if r['converged'] else 'NO'} | {r['stop_reason']} | {r['seconds']} | "
            f"{r['objective_gap']:.1e} |"
            for r in rows
        ]
        lines += ["", END]
        write_section(args.doc, BEGIN, END, "\n".join(lines))


if __name__ == "__main__":
    main()
