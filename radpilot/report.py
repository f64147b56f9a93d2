"""Plan reports: an HTML page with DVH and dose images, the PNGs beside it, and summary.json."""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from radpilot.case import Case
from radpilot.dicom.write import export_dicom
from radpilot.evaluation.images import dose_images
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import ProtocolCheck, sparing_gains
from radpilot.fmo.objectives import ObjectiveTerm
from radpilot.llm.client import count_outcomes
from radpilot.loop.record import ArtefactRef, IterationRecord
from radpilot.protocol import Protocol


@dataclass
class PlanReport:
    case_name: str
    protocol: Protocol
    agent: str
    plan: PlanDose
    check: ProtocolCheck
    iterations: list[IterationRecord]
    best_iteration: int
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def rounds(self) -> tuple[int, int]:
        """(outer rounds, the most candidates one round optimised): a round may optimise several
        parameter sets side by side, each an iteration (an FMO call) of its own."""
        per_round = Counter(it.round for it in self.iterations)
        return len(per_round), max(per_round.values(), default=0)

    @classmethod
    def from_records(
        cls,
        case: Case,
        protocol: Protocol,
        agent: str,
        records: list[IterationRecord],
        best_iteration: int,
        dose_of: Callable[[ArtefactRef], np.ndarray],
    ) -> PlanReport:
        """The report of a run from its records; ``case`` needs no dose influence matrix."""
        best = next(r for r in records if r.iteration == best_iteration)
        if best.dose is None:
            raise ValueError(f"iteration {best_iteration} has no stored dose")
        plan = PlanDose(case, dose_of(best.dose))
        plan.reuse_stats(best.stats)
        return cls(case.name, protocol, agent, plan, best.check, records, best_iteration)

    def improvement(self) -> dict[str, Any]:
        """When the protocol was first met and what each organ-at-risk goal gained after it
        (the best plan against the first plan that met every goal)."""
        first = next((it for it in self.iterations if it.meets), None)
        if first is None:
            return {"met_at_iteration": 0, "gains": []}
        was = {r.goal.label: r.achieved for r in first.check.sparing_results()}
        gains = sparing_gains(first.check, self.check)
        return {
            "met_at_iteration": first.iteration,
            "best_iteration": self.best_iteration,
            "gains": [
                {
                    "goal": r.goal.label,
                    "unit": r.goal.unit,
                    "at_first_met": round(was[r.goal.label], 4),
                    "best": round(r.achieved, 4),
                    "gained": round(gains[r.goal.label], 4),
                }
                for r in self.check.sparing_results()
                if r.goal.label in gains
            ],
        }

    def summary(self) -> dict[str, Any]:
        last = self.iterations[-1] if self.iterations else None
        return {
            "case": self.case_name,
            "protocol": self.protocol.name,
            "agent": self.agent,
            "iterations": len(self.iterations),
            "rounds": self.rounds[0],
            "fmo_calls": len(self.iterations),
            "candidates_per_round": self.rounds[1],
            "best_iteration": self.best_iteration,
            "helpers": [{**h.to_dict(), "what": h.describe()} for h in self.protocol.helpers],
            "all_goals_met": self.check.all_passed,
            "all_hard_goals_met": self.check.all_hard_passed,
            "after_goals_met": self.protocol.after_goals_met,
            "improvement": self.improvement(),
            "loop_ended": last.rationale if last is not None and not last.proposal else "",
            "goals": [
                {
                    "structure": r.goal.structure,
                    "metric": r.goal.metric,
                    "comparator": r.goal.comparator,
                    "limit": r.goal.limit,
                    "achieved": round(r.achieved, 4),
                    "passed": r.passed,
                    "hard": r.goal.hard,
                    "margin": round(r.margin, 4),
                }
                for r in self.check.results
            ],
            "structures": [s.to_dict() for s in self.plan.stats()],
            "target_indices": self.plan.target_indices(),
            "dosimetry": dosimetry_note(self.plan.case),
            "import_notes": list(self.plan.case.metadata.get("import_notes", [])),
            "structure_volumes": self.plan.case.metadata.get("structure_volumes", {}),
            "seconds": self.seconds,
            # the whole audit trail: role, model, endpoint, parameters (in the request),
            # attempts, outcome, validation, error, tokens, seconds, request and answer text
            "llm_calls": [
                {**c, "iteration": it.iteration} for it in self.iterations for c in it.llm_calls
            ],
            "llm_outcomes": count_outcomes([c for it in self.iterations for c in it.llm_calls]),
            "per_iteration": [
                {
                    "iteration": it.iteration,
                    "round": it.round,
                    "candidate": it.candidate,
                    "objectives": [o.to_dict() for o in it.objectives],
                    "fmo": it.fmo.to_json(),
                    "goals_met": it.check.all_passed,
                    "decision": it.decision,
                    "findings": list(it.findings),
                    "rationale": it.rationale,
                    "physician_feedback": it.physician_feedback,
                    "proposal": [o.to_dict() for o in it.proposal],
                    # terms the planner added or retired for the next plan (why: rationale)
                    "term_changes": term_changes(it.objectives, it.proposal),
                    "alternatives": [[o.to_dict() for o in a] for a in it.alternatives],
                    "seconds": dict(it.seconds),
                }
                for it in self.iterations
            ],
        }

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        images = {
            f"{'' if k.startswith('crop_') or k == 'dvh' else 'dose_'}{k}.png": v
            for k, v in dose_images(self.plan, with_dvh=True).items()
        }
        for name, data in images.items():
            (out / name).write_bytes(data)
        summary = self.summary()
        case = self.plan.case
        summary["dicom"] = export_dicom(
            case,
            self.plan.dose_rows,
            out / "dicom",
            with_images=case.metadata.get("builder") != "dicom",
            description=f"RadPilot {self.protocol.name} iteration {self.best_iteration}",
        )["files"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
        (out / "report.html").write_text(self._html(summary, list(images)))
        return out / "report.html"

    def _html(self, summary: dict[str, Any], images: list[str]) -> str:
        e = html.escape
        goal_rows = "".join(
            f"<tr class={'pass' if g['passed'] else 'fail'}><td>{e(g['structure'])}</td>"
            f"<td>{e(g['metric'])} {e(g['comparator'])} {g['limit']:g}</td><td>{g['achieved']:.2f}</td>"
            f"<td>{g['margin']:+.2f}</td><td>{'pass' if g['passed'] else 'FAIL'}</td>"
            f"<td>{'hard' if g['hard'] else 'soft'}</td></tr>"
            for g in summary["goals"]
        )
        stat_rows = "".join(
            f"<tr><td>{e(s['name'])}</td><td>{s['volume_cc']:.1f}</td><td>{s['min_gy']:.2f}</td>"
            f"<td>{s['mean_gy']:.2f}</td><td>{s['max_gy']:.2f}</td><td>{s['d95_gy']:.2f}</td>"
            f"<td>{s['d5_gy']:.2f}</td></tr>"
            for s in summary["structures"]
        )
        iter_rows = ""
        parallel_rounds = summary["candidates_per_round"] > 1
        for it in self.iterations:
            weights = "<br>".join(e(o.label()) for o in it.objectives)
            metrics = "<br>".join(
                e(f"{r.goal.structure} {r.goal.metric} {r.achieved:.2f}") for r in it.check.results
            )
            where = f"<br>round {it.round}, candidate {it.candidate + 1}" if parallel_rounds else ""
            iter_rows += (
                f"<tr><td>{it.iteration}{where}</td><td>{weights}</td><td>{metrics}</td>"
                f"<td>{it.fmo.iterations} it, {it.fmo.seconds:.2f} s, {e(it.fmo.backend)}, "
                f"{'converged' if it.fmo.converged else 'not converged'} ({e(it.fmo.stop_reason)})"
                f"</td><td>{e(it.summary_line())}</td></tr>"
            )
        llm_rows = "".join(
            f"<tr><td>{c['iteration']}</td><td>{e(c['role'])}</td><td>{e(c['model'])}</td>"
            f"<td>{c['images']}</td><td>{e(c['outcome'])}</td><td>{e(c.get('validation', ''))}"
            f"{e(' ' + c['error']) if c.get('error') else ''}</td><td>{c['seconds']:.2f}</td>"
            f"<td>{c.get('prompt_tokens', 0)}/{c.get('completion_tokens', 0)}</td>"
            f"<td><details><summary>request/response</summary><pre>"
            f"{e(json.dumps(c.get('request', {}), indent=1)[:20000])}</pre><hr><pre>"
            f"{e(c.get('response_text', ''))}</pre></details></td></tr>"
            for it in self.iterations
            for c in it.llm_calls
        )
        llm_section = (
            "<h2>LLM audit trail</h2><p>Every call to the model: image bytes are replaced by "
            "their SHA-256 in the recorded request.</p><table><tr><th>#</th><th>role</th>"
            "<th>model</th><th>images</th><th>outcome</th><th>validation</th><th>s</th>"
            f"<th>tokens in/out</th><th></th></tr>{llm_rows}</table>"
            if llm_rows
            else ""
        )
        imgs = "".join(
            f'<figure><img src="{e(n)}" alt="{e(n)}"{" class=wide" if n.startswith("crop_") else ""}>'
            f"<figcaption>{e(n)}</figcaption></figure>"
            for n in images
        )
        ti = "".join(
            f"<li>{e(k)}: HI {v['HI']:.2f}, CI {v['CI']:.3f}</li>"
            for k, v in summary["target_indices"].items()
        )
        notes_section = (
            "<h2>Import notes</h2><ul>"
            + "".join(f"<li>{e(n)}</li>" for n in summary["import_notes"])
            + "</ul>"
            if summary["import_notes"]
            else ""
        )
        verdict = "meets every goal" if summary["all_goals_met"] else "does not meet every goal"
        rounds_text = (
            f" ({summary['rounds']} rounds of up to {summary['candidates_per_round']} candidate "
            "plans optimised side by side)"
            if parallel_rounds
            else ""
        )
        imp = summary["improvement"]
        if imp["met_at_iteration"]:
            lowered = [g for g in imp["gains"] if g["gained"] > 0]
            gained = (
                "after it, the best plan lowered "
                + "; ".join(
                    f"{e(g['goal'])} by {g['gained']:.2f} {g['unit']} "
                    f"({g['at_first_met']:.2f} &rarr; {g['best']:.2f})"
                    for g in lowered
                )
                if lowered and imp["best_iteration"] != imp["met_at_iteration"]
                else "no later plan lowered an organ-at-risk metric"
            )
            met_text = (
                f"<p>The protocol was first met at iteration {imp['met_at_iteration']}; "
                f"{gained}. After the goals are met the loop "
                + (
                    "goes on sparing the organs at risk, and every later plan must keep its "
                    "hottest point within 2 % of that plan's (the goal Global max)"
                    if summary["after_goals_met"] == "improve"
                    else "stops (after_goals_met: stop)"
                )
                + (f". {e(summary['loop_ended'].rstrip('.'))}" if summary["loop_ended"] else "")
                + ".</p>"
            )
        else:
            met_text = "<p>No iteration met every goal.</p>"
        files = summary.get("dicom", [])
        dicom_text = (
            "In <code>dicom/</code>: the plan dose as RTDOSE"
            + (
                ", and the CT series (<code>dicom/CT/</code>) and RTSTRUCT it was planned on"
                if any(f.startswith("CT/") for f in files)
                else ", in the frame of reference of the imported CT"
            )
            + ". Any DICOM viewer or TPS opens them."
        )
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>RadPilot plan report: {e(summary["case"])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top}}tr.pass td{{background:#e8f6e8}}
tr.fail td{{background:#fbe3e3}}figure{{display:inline-block;margin:4px}}img{{max-width:380px}}img.wide{{max-width:1100px}}</style></head>
<body><h1>Plan report: {e(summary["case"])}</h1>
<p>Protocol <b>{e(summary["protocol"])}</b>, agent <b>{e(summary["agent"])}</b>. Best plan from iteration
{summary["best_iteration"]} of {summary["iterations"]}{rounds_text}: it <b>{verdict}</b>.
Plans are fluence-map optima normalised to PTV D{self.protocol.coverage_pct:g} = {self.protocol.prescription_gy:g} Gy
(not leaf-sequenced).</p>
{met_text}
<h2>Clinical goals</h2><table><tr><th>structure</th><th>goal</th><th>achieved</th><th>margin</th><th>result</th><th></th></tr>{goal_rows}</table>
<h2>Target indices</h2><ul>{ti}</ul>
<p>HI = (D5 &minus; D95) / prescription &times; 100, in % of the prescription (0 is uniform).
CI = TV95,target&sup2; / (TV &times; TV95,body), dimensionless (1 is ideal): TV is the target volume,
TV95 the volume receiving at least 95 % of the prescription. {e(summary["dosimetry"])}</p>
{notes_section}
<h2>Structure statistics (Gy)</h2><table><tr><th>structure</th><th>cc</th><th>min</th><th>mean</th><th>max</th><th>D95</th><th>D5</th></tr>{stat_rows}</table>
<h2>Iterations</h2><table><tr><th>#</th><th>objectives</th><th>metrics</th><th>FMO</th><th>findings | planner rationale</th></tr>{iter_rows}</table>
{llm_section}
<h2>Images</h2>{imgs}
<h2>DICOM</h2><p>{dicom_text}</p>
<h2>Physician intent</h2><pre>{e(self.protocol.intent)}</pre>
</body></html>
"""


def dosimetry_note(case: Case) -> str:
    """How the case's dose-volume figures are read, for the report."""
    if any(s.samples is not None for s in case.structures):
        return (
            "Dose-volume figures are read on the structures' contours: points at most 1.25 mm "
            "apart, each weighted by its share of the volume, dose interpolated between dose "
            "voxels (as an independent check of the exported RTDOSE reads it)."
        )
    return (
        "Dose-volume figures are read on whole dose-grid voxels (the structures are defined on "
        "voxels), each voxel weighted by its volume in the structure."
    )


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def term_changes(
    current: list[ObjectiveTerm], proposal: list[ObjectiveTerm]
) -> dict[str, list[str]]:
    """The terms a proposal adds to and retires from the current ones (by structure and kind);
    empty lists when it only changes weights and doses, or proposes nothing."""
    if not proposal:
        return {"added": [], "retired": []}
    now, then = {t.key(): t for t in current}, {t.key(): t for t in proposal}
    return {
        "added": [t.label() for k, t in then.items() if k not in now],
        "retired": [t.label() for k, t in now.items() if k not in then],
    }
