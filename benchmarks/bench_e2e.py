"""The whole loop through the services (``make bench-e2e``): ``radpilot plan --local`` on the 3 mm
TG-119 C-shape with the harder protocol, the case already in the store, timed from the command's
start to its exit, with the breakdown the services record.

Rows: ``wall`` (the process, as a user waits for it), ``services up`` (launching the four
services), ``case`` (CreateCase), then the job (``loop``: StartPlanning to the finished event)
split into ``fmo`` (the solver), ``case_load`` (the optimizer replica loading the case),
``transport`` (Optimize calls less solve and load), ``evaluate``, ``propose``, ``sequence``
(leaf-sequencing the best plan, every try) and ``store`` (the rest: job records and events), then ``export`` (report, images, DICOM, the zip) and the
remainder (interpreter start, stopping the services). Rewrites its section of
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.docsection import write_section
from radpilot.case_store import CaseStore
from radpilot.cases import builtin_case_id, load_builtin
from services.client import LOOP_PARTS

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench-e2e:begin -->", "<!-- bench-e2e:end -->"
BAR_S = 60.0


def ensure_case(dose_grid_mm: float) -> str:
    """The case id, building and storing the case first if it is not there (not timed)."""
    store = CaseStore()
    case_id = builtin_case_id("tg119-cshape", dose_grid_mm=dose_grid_mm)
    if case_id not in store:
        load_builtin("tg119-cshape", store, dose_grid_mm=dose_grid_mm)
    return case_id


def plan_local(options: list[str], out: Path) -> tuple[float, str, dict[str, Any]]:
    """Run ``radpilot plan --local`` with ``options`` as a user would; (wall s, stdout,
    summary.json). Exits with the command's output when it fails."""
    cmd = [sys.executable, "-m", "services", "plan", "--local", *options]
    cmd += ["--out", str(out), "--print-summary"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"plan --local failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("SUMMARY "))
    return wall, proc.stdout, json.loads(line.removeprefix("SUMMARY "))


def run_once(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    wall, stdout, summary = plan_local(
        [
            "--case",
            "tg119-cshape",
            "--param",
            f"dose_grid_mm={args.dose_grid_mm:g}",
            "--protocol",
            str(ROOT / "protocols" / f"tg119_cshape_{args.protocol}.yaml"),
            "--max-iterations",
            str(args.max_iterations),
            "--optimizer-replicas",
            str(args.replicas),
        ],
        out,
    )
    up = re.search(r"services up: .* in ([0-9.]+) s", stdout)
    seconds = summary["seconds"]
    startup = float(up.group(1)) if up else 0.0
    return {
        "wall": wall,
        "startup": startup,
        "seconds": seconds,
        "other": wall - startup - seconds["total"],
        "iterations": summary["iterations"],
        "fmo_iterations": [it["fmo"]["iterations"] for it in summary["per_iteration"]],
        "goals": summary["goals"],
        "best_iteration": summary["best_iteration"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dose-grid-mm", type=float, default=3.0)
    ap.add_argument("--protocol", choices=("easier", "harder"), default="harder")
    ap.add_argument("--max-iterations", type=int, default=6, help="the CLI's default")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--doc", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--out", default=str(ROOT / "out" / "bench" / "e2e.json"))
    args = ap.parse_args()
    case_id = ensure_case(args.dose_grid_mm)
    runs = []
    with tempfile.TemporaryDirectory(prefix="radpilot-e2e-") as tmp:
        for k in range(args.runs):
            r = run_once(args, Path(tmp) / f"run{k}")
            runs.append(r)
            print(json.dumps({"run": k + 1, "wall": round(r["wall"], 2), **r["seconds"]}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(runs, indent=1))

    def cells(get: Any) -> str:
        return " | ".join(f"{get(r):.2f}" for r in runs)

    head = " | ".join(f"run {k + 1}" for k in range(len(runs)))
    rows = [
        f"| wall (command start to exit) | {cells(lambda r: r['wall'])} |",
        f"| services up | {cells(lambda r: r['startup'])} |",
        f"| case (CreateCase) | {cells(lambda r: r['seconds']['case'])} |",
        f"| job loop (StartPlanning to finished) | {cells(lambda r: r['seconds']['loop'])} |",
    ]
    rows += [f"| - {p} | {cells(lambda r, p=p: r['seconds'][p])} |" for p in LOOP_PARTS]
    rows += [
        f"| export (report, images, DICOM, zip) | {cells(lambda r: r['seconds']['export'])} |",
        f"| interpreter start, services stop | {cells(lambda r: r['other'])} |",
    ]
    worst = max(r["wall"] for r in runs)
    goals = "; ".join(
        f"{g['structure']} {g['metric']} {g['achieved']:.2f} ({'met' if g['passed'] else 'missed'})"
        for g in runs[-1]["goals"]
    )
    verdict = "meets" if worst < BAR_S else "misses"
    section = f"""{BEGIN}
## The whole loop through the services (`make bench-e2e`)

`radpilot plan --local --case tg119-cshape --param dose_grid_mm={args.dose_grid_mm:g} --protocol
protocols/tg119_cshape_{args.protocol}.yaml` ({args.max_iterations} iterations, rules agent,
{args.replicas} optimizer replica(s)), case `{case_id}` already in the store, this machine
({platform.machine()}, Python {platform.python_version()}), {len(runs)} runs one after the other.
Seconds; the job's parts come from its records (`summary.json` `seconds`).

| part | {head} |
|---|{"---|" * len(runs)}
{chr(10).join(rows)}

FMO iterations per outer iteration (last run): {runs[-1]["fmo_iterations"]}; best plan: iteration
{runs[-1]["best_iteration"]} of {runs[-1]["iterations"]}: {goals}.
The slowest run took {worst:.1f} s: it {verdict} the {BAR_S:.0f} s bar.
{END}"""
    write_section(args.doc, BEGIN, END, section)
    return 0 if worst < BAR_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
