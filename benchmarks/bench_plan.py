"""Outer-loop agents on the TG-119 C-shape protocols (``make bench-plan``).

Agents ``fixed`` (the protocol's class solution, one FMO), ``rules``, ``bo`` (Optuna TPE over the
weights, with a budget) and ``llm`` when an endpoint is configured (``OPENAI_BASE_URL`` or
``OPENAI_API_KEY``), each through the in-process loop on the same case and machine. Reported per
run: FMO calls, goals met, PTV D95/D10, core D10/mean, HI/CI, wall time, and the first FMO call
whose plan met every goal of the protocol ("-" if none did). Rewrites its section of
docs/benchmarks.md.

Then candidates in parallel: the harder protocol planned through the local services
(``radpilot plan --local``, 2 optimizer replicas) with K = 1 and K = 2 parameter sets per round,
rules and BO, the case already in the store: rounds, FMO calls, the round and FMO call that first
met the protocol, and wall time, side by side in one run (its own section of the doc).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_e2e import plan_local
from benchmarks.docsection import write_section
from radpilot.agents.bo_planner import plan_quality
from radpilot.agents.references import load_library, shipped_library_dir
from radpilot.case_store import CaseStore
from radpilot.cases import load_builtin
from radpilot.llm.client import LLMSettings, client_or_none
from radpilot.loop.inprocess import plan_loop
from radpilot.protocol import load_protocol

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench-plan:begin -->", "<!-- bench-plan:end -->"
K_BEGIN, K_END = "<!-- bench-candidates:begin -->", "<!-- bench-candidates:end -->"


def run(case: Any, protocol: Any, agent: str, budget: int, llm: Any) -> dict[str, Any]:
    t0 = time.perf_counter()
    report = plan_loop(
        case,
        protocol,
        max_iterations=budget,
        agent=agent,
        llm=llm,
        references=load_library(shipped_library_dir()) if agent == "llm" else None,
    )
    wall = time.perf_counter() - t0
    first_met = next((it.iteration for it in report.iterations if it.check.all_passed), None)
    quality = [plan_quality(it.check) for it in report.iterations]
    metric = {(r.goal.structure, r.goal.metric): r.achieved for r in report.check.results}
    ti = report.plan.target_indices()["PTV"]
    core_mean = next(s.mean_gy for s in report.plan.stats() if s.name == "Core")
    return {
        "agent": agent,
        "budget": budget,
        "fmo_calls": len(report.iterations),
        "first_met": first_met,
        "goals_met": sum(r.passed for r in report.check.results),
        "goals": len(report.check.results),
        "best_iteration": report.best_iteration,
        "ptv_d95": metric.get(("PTV", "D95"), float("nan")),
        "ptv_d10": metric.get(("PTV", "D10"), float("nan")),
        "core_d10": metric.get(("Core", "D10"), float("nan")),
        "core_mean": core_mean,
        "hi": ti["HI"],
        "ci": ti["CI"],
        "fmo_seconds": report.seconds["fmo"],
        "wall_seconds": wall,
        "llm_calls": len(report.summary()["llm_calls"]),
        "quality": quality,
        "best_quality": max(quality),
    }


def run_candidates(args: argparse.Namespace, agent: str, rounds: int, k: int) -> dict[str, Any]:
    """The harder protocol through the local services with ``k`` candidates per round."""
    with tempfile.TemporaryDirectory(prefix="radpilot-k-") as tmp:
        wall, _, summary = plan_local(
            [
                "--case",
                "tg119-cshape",
                "--param",
                f"dose_grid_mm={args.dose_grid_mm:g}",
                "--param",
                f"bixel_mm={args.bixel_mm:g}",
                "--protocol",
                str(ROOT / "protocols" / "tg119_cshape_harder.yaml"),
                "--agent",
                agent,
                "--max-iterations",
                str(rounds),
                "--candidates",
                str(k),
                "--optimizer-replicas",
                str(args.replicas),
            ],
            Path(tmp),
        )
    per = summary["per_iteration"]
    met = next((it for it in per if it["goals_met"]), None)
    metric = {(g["structure"], g["metric"]): g["achieved"] for g in summary["goals"]}
    return {
        "agent": agent,
        "k": k,
        "round_budget": rounds,
        "rounds": summary["rounds"],
        "fmo_calls": summary["fmo_calls"],
        "met_round": met["round"] if met else None,
        "met_call": met["iteration"] if met else None,
        "ptv_d10": metric.get(("PTV", "D10"), float("nan")),
        "core_d10": metric.get(("Core", "D10"), float("nan")),
        "fmo_seconds": sum(it["fmo"]["seconds"] for it in per),
        "loop_seconds": summary["seconds"]["loop"],
        "wall_seconds": wall,
    }


def candidates_section(args: argparse.Namespace) -> None:
    budgets = {"rules": args.budget, "bo": args.bo_budget}
    results = []
    for agent, calls in budgets.items():
        for k in (1, 2):
            rounds = calls if k == 1 else 1 + (calls - 1) // k  # about the same FMO calls
            r = run_candidates(args, agent, rounds, k)
            results.append(r)
            print(
                json.dumps({k_: round(v, 3) if isinstance(v, float) else v for k_, v in r.items()})
            )
    Path(args.out).with_name("candidates.json").write_text(json.dumps(results, indent=1))
    rows = "\n".join(
        f"| {r['agent']} | {r['k']} | {r['rounds']} / {r['round_budget']} | {r['fmo_calls']} | "
        f"{r['met_round'] or '-'} | {r['met_call'] or '-'} | {r['ptv_d10']:.2f} | "
        f"{r['core_d10']:.2f} | {r['fmo_seconds']:.1f} | {r['loop_seconds']:.1f} | "
        f"{r['wall_seconds']:.1f} |"
        for r in results
    )
    section = f"""{K_BEGIN}
## Candidates in parallel: K = 1 vs K = 2 (`make bench-plan`)

`radpilot plan --local --optimizer-replicas {args.replicas} --candidates K` on `tg119-cshape`
({args.dose_grid_mm:g} mm dose grid, {args.bixel_mm:g} mm bixels) with the harder protocol, the
case already in the store, this machine ({os.cpu_count()} cores), one run each, one after the
other. With K = 2 the planner proposes two parameter sets per round from round 2 on (rules: its
step and the step x2; BO: a constant-liar batch) and the orchestrator optimises them at the same
time on the two replicas; the loop goes on from the better plan. Budgets are in rounds, chosen so
that both runs may make about the same number of FMO calls. "met at" = the first round (and FMO
call) whose plan met every goal; "FMO s" sums the solves (overlapping ones counted twice), "loop
s" is StartPlanning to finished, "wall s" the whole command.

| agent | K | rounds / budget | FMO calls | met at round | met at FMO call | PTV D10 | core D10 | FMO s | loop s | wall s |
|---|---|---|---|---|---|---|---|---|---|---|
{rows}
{K_END}"""
    write_section(args.doc, K_BEGIN, K_END, section)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dose-grid-mm", type=float, default=5.0)
    ap.add_argument("--bixel-mm", type=float, default=5.0)
    ap.add_argument("--budget", type=int, default=12, help="iterations for rules and llm")
    ap.add_argument("--bo-budget", type=int, default=30)
    ap.add_argument("--replicas", type=int, default=2, help="optimizer replicas for K = 1 vs 2")
    ap.add_argument(
        "--only",
        choices=("agents", "candidates"),
        default=None,
        help="run one of the two parts (default: both)",
    )
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "plan.json"))
    args = ap.parse_args()
    case = load_builtin(
        "tg119-cshape", CaseStore(), dose_grid_mm=args.dose_grid_mm, bixel_mm=args.bixel_mm
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.only != "agents":
        candidates_section(args)
    if args.only == "candidates":
        return 0
    llm = client_or_none(LLMSettings.from_env())
    agents = [("fixed", 1), ("rules", args.budget), ("bo", args.bo_budget)]
    if llm is not None:
        agents.append(("llm", args.budget))
    results = []
    for variant in ("easier", "harder"):
        protocol = load_protocol(ROOT / "protocols" / f"tg119_cshape_{variant}.yaml")
        for agent, budget in agents:
            r = run(case, protocol, agent, budget, llm)
            r["protocol"] = variant
            results.append(r)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))
        rules = next(r for r in results if r["protocol"] == variant and r["agent"] == "rules")
        for r in results:
            if r["protocol"] == variant:
                r["reaches_rules_quality_at"] = next(
                    (
                        i + 1
                        for i, q in enumerate(r["quality"])
                        if q >= rules["best_quality"] - 1e-9
                    ),
                    None,
                )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    rows = "\n".join(
        f"| {r['protocol']} | {r['agent']} | {r['fmo_calls']} / {r['budget']} | "
        f"{r['first_met'] or '-'} | {r['goals_met']}/{r['goals']} | {r['ptv_d95']:.2f} | "
        f"{r['ptv_d10']:.2f} | {r['core_d10']:.2f} | {r['core_mean']:.2f} | "
        f"{r['hi']:.2f} / {r['ci']:.3f} | {r['best_quality']:.4f} | "
        f"{r['reaches_rules_quality_at'] or '-'} | {r['fmo_seconds']:.1f} | {r['wall_seconds']:.1f} |"
        for r in results
    )
    harder = {r["agent"]: r for r in results if r["protocol"] == "harder"}
    rules, bo = harder["rules"], harder["bo"]
    bar = rules["ptv_d10"] <= 55.0 + 1e-6 and rules["core_d10"] <= 12.0 and rules["first_met"]
    if bar and rules["goals_met"] == rules["goals"]:
        outcome = (
            "meets the bar (PTV D10 <= 55, core D10 <= 12, D95 = 50) and the protocol "
            f"(first at FMO call {rules['first_met']})"
        )
    elif rules["first_met"]:
        outcome = (
            f"meets the protocol on the fluence optimum (first at FMO call {rules['first_met']}), "
            f"its leaf-sequenced plan {rules['goals_met']}/{rules['goals']} goals"
        )
    else:
        outcome = "does NOT meet the protocol"
    if bo["reaches_rules_quality_at"] is None:
        verdict = (
            f"BO did not reach the rules plan's quality within its budget of {bo['budget']} FMO "
            f"calls (best {bo['best_quality']:.4f} vs {rules['best_quality']:.4f})"
        )
    else:
        verdict = (
            f"BO reached the rules plan's quality at FMO call {bo['reaches_rules_quality_at']} "
            f"(rules: {rules['fmo_calls']} calls)"
        )
    section = f"""{BEGIN}
## Outer-loop agents on the TG-119 C-shape (`make bench-plan`)

`tg119-cshape` at {args.dose_grid_mm:g} mm dose grid, {args.bixel_mm:g} mm bixels; every plan normalised to PTV D95 = 50 Gy;
in-process loop, warm-started FMO, this machine ({platform.machine()}, {platform.python_version()}), one run.
"FMO calls" = plans optimised / budget; "met at" = the first FMO call whose plan (its fluence optimum)
met every goal of the protocol; "goals met" and the metrics are of the best plan as delivered
(leaf-sequenced, docs/delivery.md); "quality" is the plan-quality score BO maximises (minus the
protocol shortfall plus a small credit for margin, `radpilot.agents.bo_planner.plan_quality`), and
"reaches rules' quality at" the first FMO call whose plan scored at least the rules agent's best. `fixed` = the protocol's class-solution weights, `bo` = Optuna TPE
over the weights (x10^±1 around the protocol's), `llm` only when an endpoint is configured
{"(it was: " + str(llm.settings.model) + ")" if llm is not None else "(none was for this run)"}.

| protocol | agent | FMO calls | met at | goals met | PTV D95 | PTV D10 | core D10 | core mean | PTV HI / CI | quality | reaches rules' quality at | FMO s | wall s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Harder protocol: rules {outcome}; {verdict}.
{END}"""
    write_section(args.doc, BEGIN, END, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
