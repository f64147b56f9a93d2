"""Evaluator core (no gRPC): load a plan's dose from the store, evaluate it, store its images."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from radpilot.agents.llm_evaluator import LLMEvaluator
from radpilot.agents.step import EVALUATOR_AGENTS, check_agent, evaluate_plan
from radpilot.case import Case
from radpilot.case_store import CaseStore
from radpilot.evaluation.images import dose_images
from radpilot.evaluation.metrics import DVHTable, PlanDose, StructureStats
from radpilot.evaluation.rules import Evaluation
from radpilot.llm.client import LLMCall, LLMClient
from radpilot.protocol import load_protocol_text


@dataclass
class EvaluatorResult:
    evaluation: Evaluation
    stats: list[StructureStats]
    dvh: DVHTable
    images: dict[str, tuple[str, str]] = field(default_factory=dict)  # name -> (path, sha256)
    llm_decision: str = ""
    disagreement: bool = False
    llm_calls: list[LLMCall] = field(default_factory=list)


class EvaluatorCore:
    def __init__(self, store: CaseStore, max_cases: int = 4, llm: LLMClient | None = None) -> None:
        self.store = store
        self.llm = LLMEvaluator(llm) if llm is not None else None
        self.max_cases = max_cases
        self._cases: OrderedDict[str, Case] = OrderedDict()
        self._lock = threading.Lock()

    def case(self, case_id: str) -> Case:
        with self._lock:
            if case_id in self._cases:
                self._cases.move_to_end(case_id)
                return self._cases[case_id]
        case = self.store.load(case_id, matrix=False)  # geometry and doses only
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
        references: list[dict[str, Any]] | None = None,
        physician: str = "",
    ) -> EvaluatorResult:
        agent = agent or "rules"
        check_agent(agent, EVALUATOR_AGENTS, "evaluator", self.llm is not None)
        protocol = load_protocol_text(protocol_yaml, "protocol_yaml")
        case = self.case(case_id)
        protocol.check_case(case)
        dose = self.store.get_artefact(dose_path, dose_sha256)
        plan = PlanDose(case, dose)
        pngs: dict[str, bytes] = {}
        if include_images or (agent == "llm" and self.llm is not None and self.llm.client.vision):
            pngs = dose_images(plan, with_dvh=include_images)  # rendered once for both uses
        for_model = {k: v for k, v in pngs.items() if k != "dvh"}
        outcome = evaluate_plan(
            agent, plan, protocol, self.llm, for_model or None, references, physician
        )
        result = EvaluatorResult(
            outcome.evaluation,
            plan.stats(),
            plan.dvh_table(),
            llm_decision=outcome.llm_decision,
            disagreement=outcome.disagreement,
            llm_calls=outcome.calls,
        )
        if include_images:
            result.images = {
                name: self.store.put_bytes(case_id, f"image-{name}", data, "png")
                for name, data in pngs.items()
            }
        return result
