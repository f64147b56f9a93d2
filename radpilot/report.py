"""Plan reports: an HTML page with DVH and dose images, the PNGs beside it, and summary.json."""

from __future__ import annotations

import html
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from radpilot.agents.rules_planner import goal_term
from radpilot.case import Case
from radpilot.delivery.sequencing import SequencingSettings, keep_goals, merged_terms
from radpilot.dicom.write import PlanExport, export_dicom
from radpilot.dosimetry import dvh_levels
from radpilot.evaluation.images import (
    ISODOSE_PCT,
    ct_window_text,
    dvh_compare_plot,
    dvh_overlay_plot,
    dvh_plot,
    goal_trend_plot,
    isodose_images,
)
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import ProtocolCheck, check_protocol, sparing_gains
from radpilot.evaluation.rules import describe_hot_spot
from radpilot.fmo.objectives import MAX_WEIGHT, ObjectiveTerm
from radpilot.llm.client import count_outcomes
from radpilot.loop.record import ArtefactRef, IterationRecord
from radpilot.protocol import Protocol

T = TypeVar("T")


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
    # the sequenced plan (Deliverable.to_json) once the best plan was leaf-sequenced; then
    # ``plan`` and ``check`` are the deliverable dose's and the fluence optimum's are kept here
    deliverable: dict[str, Any] | None = None
    optimal_plan: PlanDose | None = None
    optimal_check: ProtocolCheck | None = None
    delivery_error: str = ""  # why the plan could not be sequenced (then it is fluence-optimal)
    # reads a record's stored dose (from_records): the DVH overlay loads the first and last
    # iterations' doses only when the report is written
    dose_of: Callable[[ArtefactRef], np.ndarray] | None = None

    def delivered_check(self, dose_rows: np.ndarray) -> ProtocolCheck:
        """The protocol check of another dose of the report's case (a sequencing try's)."""
        return check_protocol(PlanDose(self.plan.case, np.asarray(dose_rows)), self.protocol)

    def goals_lost_by(self, dose_rows: np.ndarray) -> list[str]:
        """Goals the report's (fluence-optimal) plan meets that a dose would fail."""
        after = self.delivered_check(dose_rows)
        optimum = self.optimal_check or self.check
        met = {r.goal.label for r in optimum.results if r.passed}
        return [r.goal.label for r in after.results if not r.passed and r.goal.label in met]

    def goal_terms(
        self, labels: list[str], factor: float, terms: list[ObjectiveTerm]
    ) -> list[ObjectiveTerm]:
        """A term shaped like each named upper-limit goal, weighted ``factor`` x the heaviest of
        ``terms`` on that structure (or overall): what the segment-weight refit is given besides
        the plan's terms when sequencing lost those goals."""
        out = []
        heaviest = max((t.weight for t in terms), default=1.0)
        for goal in self.protocol.goals:
            if goal.label not in labels or goal.comparator != "<=":
                continue
            on_site = [t.weight for t in terms if t.structure == goal.structure]
            weight = min(factor * max(on_site, default=heaviest), MAX_WEIGHT)
            term = goal_term(self.protocol, goal, 1.0, weight)
            if term is not None:
                out.append(term)
        return out

    def sequence_keeping_goals(
        self,
        sequence: Callable[[SequencingSettings, list[ObjectiveTerm]], tuple[dict[str, Any], T]],
        dose_of: Callable[[T], np.ndarray],
        settings: SequencingSettings,
        objectives: list[ObjectiveTerm],
    ) -> tuple[dict[str, Any], T]:
        """Sequence the report's plan with ``keep_goals`` and judge it on the kept deliverable
        dose. ``sequence(settings, terms)`` sequences once: ``terms`` is empty on the first try
        (a least-squares fit only), and on a retry the plan's ``objectives`` with the lost goals'
        terms, on which the segment weights are then optimised; ``dose_of`` reads the dose it
        returned (in memory, or from the case store)."""
        plan, dose = keep_goals(
            lambda s, extra: sequence(s, merged_terms(objectives, extra) if extra else []),
            lambda d: self.goals_lost_by(dose_of(d)),
            settings,
            lambda labels, factor: self.goal_terms(labels, factor, objectives),
            lambda d: self.delivered_check(dose_of(d)).rank(),
        )
        self.use_deliverable(plan, dose_of(dose))
        return plan, dose

    def use_deliverable(self, delivered: dict[str, Any], dose_rows: np.ndarray) -> None:
        """Judge the report's plan by the dose of its leaf-sequenced delivery."""
        self.optimal_plan, self.optimal_check = self.plan, self.check
        self.plan = PlanDose(self.plan.case, np.asarray(dose_rows, dtype=np.float32))
        self.check = check_protocol(self.plan, self.protocol)
        self.deliverable = delivered

    def deliverable_summary(self) -> dict[str, Any] | None:
        """Fluence-optimal vs deliverable goal values, segments, MU and the largest difference."""
        if self.deliverable is None or self.optimal_check is None:
            return None
        optimal = {r.goal.label: r for r in self.optimal_check.results}
        return {
            **self.deliverable["summary"],
            "all_goals_met_fluence_optimal": self.optimal_check.all_passed,
            # on the deliverable dose once the plan was sequenced ("dose_basis")
            "dose_basis": "deliverable" if self.deliverable is not None else "fluence-optimal",
            "all_goals_met": self.check.all_passed,
            "goals": [
                {
                    "goal": r.goal.label,
                    "fluence_optimal": round(optimal[r.goal.label].achieved, 4),
                    "deliverable": round(r.achieved, 4),
                    "passed_fluence_optimal": optimal[r.goal.label].passed,
                    "passed": r.passed,
                }
                for r in self.check.results
            ],
        }

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
        if best.optimal_dose is not None:
            # sequenced every iteration: the report starts from the best plan's fluence optimum
            # and is judged on its deliverable dose once the plan is sequenced (again) at the end
            plan = PlanDose(case, dose_of(best.optimal_dose))
            check = check_protocol(plan, protocol)
        else:
            plan = PlanDose(case, dose_of(best.dose))
            plan.reuse_stats(best.stats)
            check = best.check
        return cls(
            case.name, protocol, agent, plan, check, records, best_iteration, dose_of=dose_of
        )

    def compared(self) -> dict[str, PlanDose]:
        """The first and last iterations' plans, where they are not the best and their doses
        are stored: what the DVH overlay draws beside the best plan."""
        out: dict[str, PlanDose] = {}
        if self.dose_of is None or not self.iterations:
            return out
        for label, r in (("first", self.iterations[0]), ("last", self.iterations[-1])):
            if r.iteration != self.best_iteration and r.dose is not None:
                out[f"{label} (iteration {r.iteration})"] = PlanDose(
                    self.plan.case, self.dose_of(r.dose)
                )
        return out

    def improvement(self) -> dict[str, Any]:
        """When the protocol was first met and what each organ-at-risk goal gained after it
        (the best plan against the first plan that met every goal)."""
        first = next((it for it in self.iterations if it.meets), None)
        if first is None:
            return {"met_at_iteration": 0, "gains": []}
        # compare alike: iterations are judged on their fluence optima, unless every iteration
        # was sequenced (then on their deliverable doses)
        every = any(it.optimal_dose is not None for it in self.iterations)
        best = self.check if every else (self.optimal_check or self.check)
        was = {r.goal.label: r.achieved for r in first.check.sparing_results()}
        gains = sparing_gains(first.check, best)
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
                for r in best.sparing_results()
                if r.goal.label in gains
            ],
        }

    def hot_spots(self) -> dict[str, Any]:
        """Where the reported plan is hottest: its global maximum and its hottest point outside
        the targets (Gy, % of the prescription, x/y/z mm, the structures there)."""
        out = {}
        rx = self.protocol.prescription_gy
        for key, spot in (
            ("global", self.plan.hottest_point()),
            ("outside_targets", self.plan.hottest_outside_targets()),
        ):
            if spot is not None:
                gy, (x, y, z), where = spot
                out[key] = {
                    "dose_gy": round(gy, 3),
                    "pct_of_prescription": round(100.0 * gy / rx, 1),
                    "xyz_mm": [round(x, 1), round(y, 1), round(z, 1)],
                    "in": where,
                    "text": describe_hot_spot(spot, rx),
                }
        return out

    def summary(self) -> dict[str, Any]:
        last = self.iterations[-1] if self.iterations else None
        implicit = self.protocol.implicit_goals
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
            # on the deliverable dose once the plan was sequenced ("dose_basis")
            "dose_basis": "deliverable" if self.deliverable is not None else "fluence-optimal",
            "all_goals_met": self.check.all_passed,
            "all_hard_goals_met": self.check.all_hard_passed,
            "after_goals_met": self.protocol.after_goals_met,
            "improvement": self.improvement(),
            "deliverable": self.deliverable_summary(),
            "delivery_error": self.delivery_error,
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
                    # added by the protocol's safety settings (the hot-spot limits)
                    "implicit": r.goal in implicit,
                }
                for r in self.check.results
            ],
            "safety": self.protocol.safety.to_dict() if self.protocol.safety else "off",
            "hot_spots": self.hot_spots(),
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
                    # delivery.every_iteration: judged on this plan's deliverable dose
                    "dose_basis": it.dose_basis,
                    "delivery": dict(it.delivery),
                    # why this FMO started from zero fluence ("" = from the previous plan)
                    "cold_start": it.cold_start,
                }
                for it in self.iterations
            ],
        }

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rx = self.protocol.prescription_gy
        # isodose lines over the CT (not a colour wash): the planes through the isocentre keep
        # the names dose_<plane>.png; then through the global maximum and each organ's centroid
        figures = {
            (f"dose_{k[4:]}.png" if k.startswith("iso_") else f"dose_{k}.png"): v
            for k, v in isodose_images(self.plan, rx).items()
        }
        captions = {name: caption for name, (caption, _) in figures.items()}
        images = {name: png for name, (_, png) in figures.items()}
        levels = dvh_levels(float(max(self.plan.dose_rows.max(), 1e-6)), 0.25)
        images["dvh.png"] = dvh_plot(levels, self.plan.dvh_curves(levels))
        trend = self.goal_trends()
        if trend["goals"]:
            images["goal_trends.png"] = goal_trend_plot(
                trend["iterations"], trend["goals"], self.best_iteration
            )
        compared = self.compared()
        if compared:
            # the best plan against the first and last iterations (their stored doses)
            best = self.optimal_plan or self.plan
            curves = {
                f"best (iteration {self.best_iteration})": best.dvh_curves(levels),
                **{k: p.dvh_curves(levels) for k, p in compared.items()},
            }
            images["dvh_iterations.png"] = dvh_overlay_plot(levels, curves)
        if self.optimal_plan is not None:
            images["dvh_deliverable.png"] = dvh_compare_plot(
                levels,
                self.optimal_plan.dvh_curves(levels),
                self.plan.dvh_curves(levels),
                ("fluence-optimal", "deliverable"),
            )
        captions.update(
            {
                "dvh.png": "DVH of the reported plan",
                "dvh_iterations.png": "DVH: the reported (best) plan against the first and last "
                "iterations",
                "dvh_deliverable.png": "DVH: the fluence-optimal plan and its leaf-sequenced "
                "(deliverable) dose",
                "goal_trends.png": "every goal across the iterations",
            }
        )
        for name, data in images.items():
            (out / name).write_bytes(data)
        summary = self.summary()
        case = self.plan.case
        label = f"RadPilot {self.protocol.name} iteration {self.best_iteration}"
        if self.deliverable is not None:
            (out / "delivery.json").write_text(json.dumps(self.deliverable, indent=1))
        summary["dicom"] = export_dicom(
            case,
            self.plan.dose_rows,
            out / "dicom",
            with_images=case.metadata.get("builder") != "dicom",
            description=label,
            plan=PlanExport(
                self.deliverable, self.protocol.target, self.protocol.prescription_gy, label
            )
            if self.deliverable is not None
            else None,
        )["files"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_jsonable))
        (out / "report.html").write_text(self._html(summary, list(images), captions))
        return out / "report.html"

    def goal_trends(self) -> dict[str, Any]:
        """Each goal's value per iteration (None where an iteration did not check it): what
        the report's trend plot draws."""
        iterations = [it.iteration for it in self.iterations]
        goals = []
        for r in self.check.results:
            by_it = [
                next((x for x in it.check.results if x.goal.label == r.goal.label), None)
                for it in self.iterations
            ]
            goals.append(
                {
                    "label": r.goal.label,
                    "unit": r.goal.unit,
                    "limit": r.goal.limit,
                    "values": [x.achieved if x else None for x in by_it],
                    "passed": [x.passed if x else None for x in by_it],
                }
            )
        return {"iterations": iterations, "goals": goals}

    def _deliverable_html(self, summary: dict[str, Any]) -> tuple[str, str]:
        """The report's deliverable-plan section and the sentence saying which dose is judged."""
        norm = (
            f"normalised to {html.escape(self.protocol.target)} D{self.protocol.coverage_pct:g} = "
            f"{self.protocol.prescription_gy:g} Gy"
        )
        d = summary.get("deliverable")
        if not d:
            why = summary.get("delivery_error", "")
            return (
                f"<h2>Deliverable plan</h2><p>Not sequenced: {html.escape(why)}</p>" if why else ""
            ), f"Plans are fluence-map optima {norm} (not leaf-sequenced)."
        mlc = d["mlc"]
        per_beam = ", ".join(
            f"{n} ({mu:.0f} MU)"
            for n, mu in zip(d["segments_per_beam"], d["mu_per_beam"], strict=True)
        )
        refit = d.get("refit") or {}
        refit_text = (
            f" Segment weights were re-optimised on the dose influence matrix (RMS dose error "
            f"{refit['rms_error_before_gy']:.2f} &rarr; {refit['rms_error_after_gy']:.2f} Gy)."
            if refit.get("segments")
            else ""
        )
        section = (
            "<h2>Deliverable plan</h2>"
            f"<p>Step-and-shoot on the MLC model <b>{html.escape(mlc['name'])}</b> "
            f"({html.escape(mlc['description'])}), {d['settings']['levels']} intensity levels per "
            f"beam, segments of at least {d['settings']['min_segment_mu']:g} MU; "
            f"{d['fractions']} fractions. Segments per beam (MU per fraction): {per_beam}; "
            f"{d['segments']} segments, {d['total_mu']:.0f} MU per fraction, {d['mu_per_gy']:.0f} "
            f"MU/Gy. Largest dose difference from the fluence optimum: "
            f"{d['max_dose_difference_gy']:.2f} Gy. {d['dropped_segments']} segment(s) below the "
            f"minimum MU were dropped.{refit_text} MU calibration: "
            f"{mlc['mu_per_gy_at_dmax']:g} MU per Gy at the maximum of each beam's open field "
            "(1 cGy/MU at dmax). Sequencing took "
            f"{d['seconds']:.1f} s.</p>"
            "<table><tr><th>goal</th><th>fluence-optimal</th><th>deliverable</th><th>result</th>"
            f"</tr>{_deliverable_rows(d)}</table>"
        )
        basis = (
            f"Goals, statistics, images and the exported dose are those of the leaf-sequenced "
            f"(deliverable) plan, {norm}; the fluence optimum "
            + ("also meets" if d["all_goals_met_fluence_optimal"] else "does not meet")
            + " every goal."
        )
        return section, basis

    def _html(
        self, summary: dict[str, Any], images: list[str], captions: dict[str, str] | None = None
    ) -> str:
        e = html.escape
        goal_rows = "".join(
            f"<tr class={'pass' if g['passed'] else 'fail'}><td>{e(g['structure'])}"
            f"{' &dagger;' if g.get('implicit') else ''}</td>"
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
            restart = f"<br>started from zero fluence: {e(it.cold_start)}" if it.cold_start else ""
            if "segments" in it.delivery:
                metrics += "<br>" + e(
                    f"(as delivered: {it.delivery['segments']} segments, "
                    f"{it.delivery['total_mu']:.0f} MU)"
                )
            iter_rows += (
                f"<tr><td>{it.iteration}{where}</td><td>{weights}</td><td>{metrics}</td>"
                f"<td>{it.fmo.iterations} it, {it.fmo.seconds:.2f} s, {e(it.fmo.backend)}, "
                f"{'converged' if it.fmo.converged else 'not converged'} ({e(it.fmo.stop_reason)})"
                f"{restart}"
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
        captions = captions or {}
        rx = self.protocol.prescription_gy

        def figure(n: str) -> str:
            wide = " class=wide" if n == "goal_trends.png" else ""
            text = captions.get(n, n)
            return (
                f'<figure><img src="{e(n)}" alt="{e(text)}"{wide}>'
                f"<figcaption>{e(text)}</figcaption></figure>"
            )

        dose_figs = "".join(figure(n) for n in images if n.startswith("dose_"))
        other_figs = "".join(
            figure(n) for n in images if not n.startswith("dose_") and n != "goal_trends.png"
        )
        imgs = (
            f"<h3>Dose distribution</h3><p>Isodose lines at "
            f"{', '.join(f'{p} %' for p in ISODOSE_PCT)} of the prescription ({rx:g} Gy) over "
            f"the CT, {e(ct_window_text())}; structure outlines dashed; images cropped to the "
            "body, the patient's sides at the edges (R/L, A/P, S/I; axial images seen from the "
            "feet). Planes through the isocentre, through the global maximum (marked &times;) "
            f"and through each organ's centroid.</p>{dose_figs}"
            + (
                "<h3>Goals across the iterations</h3><p>Each goal's value per iteration "
                "(green met, red missed; the limit dashed; the reported plan ringed). Iterations "
                "are judged on their fluence optimum unless the protocol sequences every "
                f"iteration.</p>{figure('goal_trends.png')}"
                if "goal_trends.png" in images
                else ""
            )
            + f"<h3>Dose-volume histograms</h3>{other_figs}"
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
        deliverable_section, basis = self._deliverable_html(summary)
        hot = summary.get("hot_spots", {})
        safety = summary.get("safety")
        hot_section = (
            "<h2>Hot spots</h2><ul>"
            + "".join(
                f"<li>{label}: {e(hot[key]['text'])}</li>"
                for key, label in (
                    ("global", "Global maximum"),
                    ("outside_targets", "Hottest point outside the targets"),
                )
                if key in hot
            )
            + "</ul><p>"
            + (
                "The protocol's safety goals (marked &dagger; above) limit the hottest point "
                f"outside the targets to {safety['outside_targets_max_pct']} % and the target "
                f"maximum to {safety['target_max_pct']} % of the prescription (None: no limit)."
                if isinstance(safety, dict)
                else "The protocol switches the implicit hot-spot goals off "
                "(<code>safety: off</code>)."
            )
            + " Coordinates are voxel centres in the case's patient frame (DICOM LPS, mm).</p>"
        )
        files = summary.get("dicom", [])
        dicom_text = (
            "In <code>dicom/</code>: the plan dose as RTDOSE"
            + (
                ", and the CT series (<code>dicom/CT/</code>) and RTSTRUCT it was planned on"
                if any(f.startswith("CT/") for f in files)
                else ", in the frame of reference of the imported CT"
            )
            + (
                "; the leaf-sequenced plan as RTPLAN (<code>dicom/RTPLAN.dcm</code>), which the "
                "RTDOSE references"
                if "RTPLAN.dcm" in files
                else ""
            )
            + ". Any DICOM viewer or TPS opens them."
        )
        return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>RadPilot plan report: {e(summary["case"])}, {e(summary["protocol"])}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #bbb;padding:4px 8px;text-align:left;vertical-align:top}}tr.pass td{{background:#e8f6e8}}
tr.fail td{{background:#fbe3e3}}figure{{display:inline-block;margin:4px}}img{{max-width:380px}}img.wide{{max-width:1100px}}</style></head>
<body><h1>Plan report: {e(summary["case"])}, protocol {e(summary["protocol"])}</h1>
<p>Protocol <b>{e(summary["protocol"])}</b>, agent <b>{e(summary["agent"])}</b>. Best plan from iteration
{summary["best_iteration"]} of {summary["iterations"]}{rounds_text}: it <b>{verdict}</b>.
{basis}</p>
{met_text}
{deliverable_section}
<h2>Clinical goals</h2><table><tr><th>structure</th><th>goal</th><th>achieved</th><th>margin</th><th>result</th><th></th></tr>{goal_rows}</table>
{hot_section}
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


def _deliverable_rows(d: dict[str, Any]) -> str:
    e = html.escape
    return "".join(
        f"<tr class={'pass' if g['passed'] else 'fail'}><td>{e(g['goal'])}</td>"
        f"<td>{g['fluence_optimal']:.2f}{'' if g['passed_fluence_optimal'] else ' (fail)'}</td>"
        f"<td>{g['deliverable']:.2f}</td><td>{'pass' if g['passed'] else 'FAIL'}</td></tr>"
        for g in d["goals"]
    )


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
