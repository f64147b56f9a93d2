"""The shipped TG-119 protocols with organ limits tighter than any protocol in the repository
(``make bench-tightened``; rewrites its section of docs/benchmarks.md).

Issue 12 asks the rules agent to meet protocols it was not tuned on within 8 iterations without
giving up a priority-1 goal, and the BO agent to improve the failing metric. Each variant below
takes a shipped protocol and lowers some organ-at-risk limits, or adds one on a metric it has
no goal for (``after_goals_met: stop``: the
question is whether and when the protocol is met); both agents get 8 FMO calls. Every number is
of the plan the loop judged (its fluence optimum, or its leaf-sequenced dose where the protocol
judges every iteration as delivered: the TG-119 prostate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap
import time
from pathlib import Path

from benchmarks.docsection import publish
from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.evaluation.protocol_check import GoalResult
from radpilot.loop.inprocess import plan_loop
from radpilot.protocol import Protocol, load_protocol

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 8
AGENTS = ("rules", "bo")
BEGIN, END = "<!-- bench-tightened:begin -->", "<!-- bench-tightened:end -->"
# the section of a run with K > 1 candidates per round (--candidates K)
BEGIN_K, END_K = (
    "<!-- bench-tightened-candidates:begin -->",
    "<!-- bench-tightened-candidates:end -->",
)
HOT_SPOT_BAR_PCT = 115.0  # issue 10: no reported best plan hotter than this (% of prescription)
# (protocol file under the repository, {(structure, metric): tighter limit})
VARIANTS: list[tuple[str, dict[tuple[str, str], float]]] = [
    ("protocols/tg119_prostate.yaml", {("Rectum", "D30"): 30.0, ("Bladder", "D30"): 20.0}),
    ("protocols/tg119_prostate.yaml", {("Rectum", "D30"): 35.0, ("Bladder", "D30"): 15.0}),
    ("protocols/tg119_prostate.yaml", {("Rectum", "D10"): 65.0, ("Bladder", "D10"): 60.0}),
    (
        "benchmarks/protocols/tg119_prostate_tight.yaml",
        {("Rectum", "D30"): 35.0, ("Bladder", "D30"): 12.0},
    ),
    (
        "protocols/tg119_headneck.yaml",
        {("ParotidL", "D50"): 12.0, ("ParotidR", "D50"): 12.0, ("Cord", "max"): 30.0},
    ),
    ("protocols/tg119_headneck.yaml", {("ParotidL", "D50"): 10.0, ("ParotidR", "D50"): 10.0}),
    ("protocols/tg119_headneck.yaml", {("Cord", "max"): 25.0}),
    # the two protocols issue 12 names (the C-shape's core mean is a goal the protocol lacks)
    ("protocols/tg119_prostate.yaml", {("Rectum", "D30"): 45.0, ("Bladder", "D30"): 15.0}),
    ("protocols/tg119_cshape_easier.yaml", {("Core", "mean"): 6.0, ("PTV", "D10"): 54.0}),
]


def tightened(protocol: Protocol, limits: dict[tuple[str, str], float]) -> Protocol:
    """``protocol`` with the given upper limits lowered, stopping once it is met. A limit on a
    metric the protocol has no goal for is added as a hard goal of the priority the
    structure's other upper limits have."""
    goals = []
    found = set()
    for g in protocol.goals:
        key = (g.structure, g.metric)
        if key in limits:
            if g.comparator != "<=" or limits[key] >= g.limit:
                raise ValueError(f"{g.label}: {limits[key]} is not a tighter upper limit")
            g = dataclasses.replace(g, limit=limits[key])
            found.add(key)
        goals.append(g)
    for s, m in sorted(set(limits) - found):
        like = [g for g in protocol.goals if g.structure == s and g.comparator == "<="]
        if not like:
            raise ValueError(f"{protocol.name} has no upper limit on {s} to add {m} beside")
        goals.append(dataclasses.replace(like[0], metric=m, limit=limits[(s, m)]))
    return dataclasses.replace(protocol, goals=goals, after_goals_met="stop")


def _label(limits: dict[tuple[str, str], float]) -> str:
    return ", ".join(f"{s} {m} <= {v:g}" for (s, m), v in limits.items())


def run(
    path: str,
    limits: dict[tuple[str, str], float],
    agent: str,
    store: CaseStore,
    candidates: int = 1,
) -> dict:
    """One variant planned by ``agent`` in ``BUDGET`` rounds of ``candidates`` FMO calls (the
    services optimise a round's candidates side by side on as many optimizer replicas; here
    one after the other)."""
    protocol = tightened(load_protocol(ROOT / path), limits)
    case = load_builtin(protocol.case, store)
    t0 = time.perf_counter()
    report = plan_loop(case, protocol, max_iterations=BUDGET, agent=agent, candidates=candidates)
    seconds = time.perf_counter() - t0
    first = report.iterations[0].check  # the protocol's own objectives
    best = next(it for it in report.iterations if it.iteration == report.best_iteration).check

    def value(results: list[GoalResult], s: str, m: str) -> float:
        return next(r.achieved for r in results if (r.goal.structure, r.goal.metric) == (s, m))

    # (a goal the best plan was not judged on is the loop's hot-spot bound of the plans before
    # the protocol was met: one that meets is judged by the protocol's goals alone)
    kept = all(
        (b := best.result(r.goal)) is None or b.passed
        for r in first.results
        if r.passed and r.goal.priority == 1
    )
    met = next((it for it in report.iterations if it.meets), None)
    return {
        "protocol": Path(path).stem,
        "tightened": _label(limits),
        "agent": agent,
        "candidates": candidates,
        "fmo_calls": len(report.iterations),
        "met_at": met.iteration if met else None,  # the FMO call
        "met_round": met.round if met else None,
        "goals_met": f"{len(best.results) - len(best.failed)}/{len(best.results)}",
        "priority1_kept": kept,
        "metrics": {
            f"{s} {m}": [round(value(first.results, s, m), 2), round(value(best.results, s, m), 2)]
            for (s, m) in limits
        },
        "limits": {f"{s} {m}": v for (s, m), v in limits.items()},
        # the reported plan's global maximum (its deliverable dose where it was sequenced)
        "hottest_pct": report.hot_spots()["global"]["pct_of_prescription"],
        "seconds": round(seconds, 1),
    }


def markers(candidates: int) -> tuple[str, str]:
    """The begin and end markers of the docs section a run with ``candidates`` per round writes."""
    return (BEGIN, END) if candidates == 1 else (BEGIN_K, END_K)


def section(rows: list[dict], candidates: int = 1) -> str:
    about = (
        "Shipped protocols with organ-at-risk limits lowered below anything in the repository, "
        "or added (the C-shape's core mean; the last two rows are the protocols issue 12 names) "
        "(`benchmarks/tightened.py`), each planned in process by the rules and the BO agent with "
        f"{BUDGET} FMO calls, `after_goals_met: stop`. "
        if candidates == 1
        else f"The variants of the section above, each planned in process with {BUDGET} rounds "
        f"of {candidates} candidates (`python -m benchmarks.tightened --candidates {candidates}`"
        "; the services optimise a round's candidates side by side on as many optimizer "
        'replicas, here they ran one after the other), `after_goals_met: stop`. "met at": '
        "the round whose plan first met every goal, and that plan's FMO call. "
    ) + (
        '"class solution -> best" are the '
        "tightened goals' values on the first plan (the protocol's own objectives) and on the "
        'plan reported; "priority 1 kept": every priority-1 goal the first plan met is met by '
        'the best plan. "goals met" counts, on the prostate and C-shape rows whose plan does '
        "not meet the protocol, the loop's hot-spot ceiling (`Global max`, priority 1; "
        "docs/architecture.md) among the goals. Values as the loop judged them (the TG-119 "
        "prostate protocol judges every "
        'iteration leaf-sequenced; the others their fluence optimum). "Hottest": the reported '
        "plan's global maximum in % of the prescription, on its deliverable dose (every row's "
        "reported plan is leaf-sequenced at the end, so on the head & neck and C-shape rows it "
        "may be hotter than the optimum the goal values are from; issue 10 asks that none exceed "
        f"{HOT_SPOT_BAR_PCT:g} %). One run, this machine."
    )
    begin, end = markers(candidates)
    title = (
        "## Protocols tighter than the repository's (`make bench-tightened`)"
        if candidates == 1
        else f"### The same with {candidates} candidates per round"
    )
    lines = [
        begin,
        title,
        "",
        *textwrap.wrap(about, 100),
        "",
        "| protocol | tightened goals | agent | met at (of calls) | goals met | priority 1 kept "
        "| class solution -> best (Gy) | hottest | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        moved = "; ".join(
            f"{k} {a:.2f} -> {b:.2f}{'' if b <= r['limits'][k] + 1e-9 else ' (missed)'}"
            for k, (a, b) in r["metrics"].items()
        )
        if not r["met_at"]:
            met = f"- ({r['fmo_calls']})"
        elif candidates == 1:
            met = f"{r['met_at']} ({r['fmo_calls']})"
        else:
            met = f"round {r['met_round']}, call {r['met_at']} ({r['fmo_calls']})"
        lines.append(
            f"| {r['protocol']} | {r['tightened']} | {r['agent']} | {met} | {r['goals_met']} | "
            f"{'yes' if r['priority1_kept'] else 'NO'} | {moved} | {r['hottest_pct']:.0f} % | "
            f"{r['seconds']} |"
        )
    met_n = sum(1 for r in rows if r["agent"] == "rules" and r["met_at"])
    variants = sum(1 for r in rows if r["agent"] == "rules")
    hot = sum(1 for r in rows if r["hottest_pct"] > HOT_SPOT_BAR_PCT)
    lost = sum(1 for r in rows if not r["priority1_kept"])
    who = " and ".join(dict.fromkeys(r["agent"] for r in rows))
    unit = "iterations" if candidates == 1 else f"rounds of {candidates} candidates"
    lines += [
        "",
        f"Rules agent: {met_n} of {variants} variants met within {BUDGET} {unit}. Best plans "
        f"({who}) that gave up a priority-1 goal the first plan met: {lost} of {len(rows)}; "
        f"with a hot spot above {HOT_SPOT_BAR_PCT:g} % of the prescription: {hot} of {len(rows)}.",
        end,
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--doc", default=None)
    ap.add_argument("--out", default="out/bench/tightened.json")
    ap.add_argument("--agents", default=",".join(AGENTS))
    ap.add_argument(
        "--candidates",
        type=int,
        default=1,
        help="parameter sets per round (K > 1 writes its own section, after the K = 1 one)",
    )
    ap.add_argument(
        "--variants",
        default="",
        help="comma-separated indices into VARIANTS (default: all; the section then lists these)",
    )
    args = ap.parse_args()
    store = CaseStore()
    rows = []
    chosen = {int(i) for i in args.variants.split(",") if i.strip()} or set(range(len(VARIANTS)))
    for index, (path, limits) in enumerate(VARIANTS):
        if index not in chosen:
            continue
        for agent in args.agents.split(","):
            row = run(path, limits, agent, store, args.candidates)
            print(json.dumps(row), flush=True)
            rows.append(row)
    publish(rows, args.out, section(rows, args.candidates), args.doc, *markers(args.candidates))


if __name__ == "__main__":
    main()
