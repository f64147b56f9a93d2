"""Evaluator core (no gRPC): load a plan's dose from the store, evaluate it, store its images."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from radpilot.case import Case
from radpilot.case_store import CaseStore
from radpilot.evaluation.dvh import dvh_levels
from radpilot.evaluation.images import dvh_plot, plane_images, structure_crops
from radpilot.evaluation.metrics import DVHTable, PlanDose, StructureStats
from radpilot.evaluation.rules import Evaluation, evaluate_rules
from radpilot.protocol import load_protocol_text
from services.common.errors import FailedPreconditionError

AGENTS = ("rules", "llm")


@dataclass
class EvaluatorResult:
    evaluation: Evaluation
    stats: list[StructureStats]
    dvh: DVHTable
    images: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (path, sha256)


class EvaluatorCore:
    def __init__(self, store: CaseStore, max_cases: int = 4) -> None:
        self.store = store
        self.max_cases = max_cases
        self._cases: OrderedDict[str, Case] = OrderedDict()
        self._lock = threading.Lock()

    def case(self, case_id: str) -> Case:
        with self._lock:
            if case_id in self._cases:
                self._cases.move_to_end(case_id)
                return self._cases[case_id]
        case = self.store.load(case_id)
        with self._lock:
            self._cases[case_id] = case
            while len(self._cases) > self.max_cases:
                self._cases.popitem(last=False)
        return case

    def evaluate(
        self,
        case_id: str,
        dose_path: str,
        dose_sha256: str,
        protocol_yaml: str,
        agent: str = "rules",
        include_images: bool = False,
    ) -> EvaluatorResult:
        agent = agent or "rules"
        if agent not in AGENTS:
            raise ValueError(f"unknown evaluator agent {agent!r}; use one of {', '.join(AGENTS)}")
        if agent == "llm":
            raise FailedPreconditionError(
                "the LLM evaluator is not configured on this evaluator; use agent 'rules'"
            )
        protocol = load_protocol_text(protocol_yaml, "protocol_yaml")
        case = self.case(case_id)
        protocol.check_case(case)
        dose = self.store.get_artefact(dose_path, dose_sha256)
        plan = PlanDose(case, dose)
        result = EvaluatorResult(evaluate_rules(plan, protocol), plan.stats(), plan.dvh_table())
        if include_images:
            cube = plan.cube()
            pngs = {**plane_images(case, cube)}
            pngs.update({f"crop_{k}": v for k, v in structure_crops(case, cube).items()})
            levels = dvh_levels(float(dose.max()), 0.25)
            pngs["dvh"] = dvh_plot(levels, plan.dvh_curves(levels))
            result.images = {
                name: self.store.put_bytes(case_id, f"image-{name}", data, "png")
                for name, data in pngs.items()
            }
        return result
