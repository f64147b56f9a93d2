"""The LLM evaluator: a DVH expert, a vision expert and an aggregator (paper §2.2).

The DVH expert sees the plan's DVH and statistics next to the approved reference plans' results
and the physician's comments; the aggregator sees the experts' reviews only as fenced, untrusted
text. An expert's review that names none of the protocol's structures is recorded as ``invalid``
and not passed on. The deterministic protocol check stays the guardrail: the combined decision is
"meets protocol" only when the numbers pass, whatever the model says; an overruled "meets" is
recorded as ``overridden``, and the disagreement is recorded. When the endpoint fails or the
aggregator's answer cannot be read after one retry, the rule-based evaluation stands and the
fallback is recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.rules import Decision, Evaluation
from radpilot.llm import prompts
from radpilot.llm.client import LLMCall, LLMClient, LLMError, LLMSettings, image_part
from radpilot.llm.parse import ParseError, bullet_lines, find_json_object, tagged_block
from radpilot.protocol import Protocol

log = logging.getLogger(__name__)
AGGREGATOR_ATTEMPTS = 2  # the aggregator is asked again once when its answer cannot be read
CALLS_PER_STEP = 2 + AGGREGATOR_ATTEMPTS  # DVH expert, vision expert, aggregator


def step_budget_s(settings: LLMSettings) -> float:
    """The longest one evaluation's LLM calls may take."""
    return CALLS_PER_STEP * settings.worst_call_s()


@dataclass
class LLMJudgement:
    """What the LLM evaluator concluded (``decision`` None when it fell back to the rules)."""

    decision: Decision | None
    unmet: list[str] = field(default_factory=list)
    suggestions: str = ""
    calls: list[LLMCall] = field(default_factory=list)

    @property
    def fell_back(self) -> bool:
        return self.decision is None


def parse_evaluation(text: str) -> tuple[Decision, list[str], str]:
    """The aggregator's answer as (decision, unmet factors, suggestions); ParseError if none."""
    try:
        data = find_json_object(text)
    except ParseError:
        data = None
    if data is not None:
        raw = str(data.get("decision", "")).strip().lower().replace(" ", "_")
        if raw not in ("meets_protocol", "needs_improvement"):
            raise ParseError(
                f'"decision" must be "meets_protocol" or "needs_improvement", got {raw!r}'
            )
        unmet_raw = data.get("unmet", [])
        if not isinstance(unmet_raw, list):
            raise ParseError('"unmet" must be a list of {factor, structure, reason} objects')
        unmet = []
        for u in unmet_raw:
            if isinstance(u, dict):
                unmet.append(
                    f"{u.get('structure', '?')}: {u.get('factor', '?')} - {u.get('reason', '')}"
                )
            else:
                unmet.append(str(u))
        return Decision(raw), unmet, str(data.get("suggestions", ""))
    block = tagged_block(text, "DECISION")
    if block is None:
        raise ParseError(
            'no decision found: give a JSON object with a "decision" field, or a '
            "<DECISION>meets_protocol|needs_improvement</DECISION> block"
        )
    word = block.strip().lower().replace(" ", "_")
    if "needs" in word or "improv" in word or "not" in word:
        decision = Decision.NEEDS_IMPROVEMENT
    elif "meets" in word:
        decision = Decision.MEETS_PROTOCOL
    else:
        raise ParseError(f"<DECISION> must say meets_protocol or needs_improvement, got {block!r}")
    unmet = bullet_lines(tagged_block(text, "UNMET") or "")
    return decision, unmet, tagged_block(text, "SUGGESTIONS") or ""


def sanity_problem(report: str, protocol: Protocol) -> str:
    """Why an expert's review cannot be passed on ("" when it can): it must talk about the plan,
    i.e. name at least one structure of the protocol's goals."""
    names = {g.structure for g in protocol.goals} | {protocol.target}
    text = report.lower()
    if not any(n.lower() in text for n in names):
        listed = ", ".join(sorted(names))
        return f"invalid: the review names none of the protocol's structures ({listed})"
    return ""


class LLMEvaluator:
    def __init__(self, client: LLMClient) -> None:
        self.client = client

    def _expert(
        self, out: LLMJudgement, role: str, messages: list[dict[str, Any]], protocol: Protocol
    ) -> str | None:
        """One expert's review, or None when it failed (LLMError propagates) or is not usable."""
        report, call = self.client.chat(role, messages)
        out.calls.append(call)
        problem = sanity_problem(report, protocol)
        if problem:
            call.outcome, call.validation = "invalid", problem
            log.warning("%s answer not used: %s", role, problem)
            return None
        call.validation = "ok"
        return report

    def judge(
        self,
        plan: PlanDose,
        protocol: Protocol,
        rules: Evaluation,
        images: dict[str, bytes] | None,
        references: list[dict[str, Any]] | None = None,
        physician: str = "",
    ) -> LLMJudgement:
        out = LLMJudgement(None)
        try:
            dvh_report = self._expert(
                out,
                "dvh_expert",
                prompts.dvh_expert_messages(
                    protocol, plan.dvh_table(), plan.stats(), rules.check, references, physician
                ),
                protocol,
            )
        except LLMError as exc:
            exc.call.outcome = "fallback"
            out.calls.append(exc.call)
            log.warning("DVH expert failed (%s); the rule-based evaluation stands", exc)
            return out
        vision_report = self._vision(out, protocol, images)
        structured = self.client.json_mode != "text"
        messages = prompts.aggregator_messages(
            protocol, dvh_report, vision_report, structured, physician
        )
        for attempt in range(1, AGGREGATOR_ATTEMPTS + 1):
            try:
                text, call = self.client.chat(
                    "evaluator",
                    messages,
                    schema=prompts.EVALUATION_SCHEMA if structured else None,
                    schema_name="plan_evaluation",
                )
            except LLMError as exc:
                exc.call.outcome = "fallback"
                out.calls.append(exc.call)
                return out
            out.calls.append(call)
            try:
                out.decision, out.unmet, out.suggestions = parse_evaluation(text)
                call.validation = "ok"
                return out
            except ParseError as exc:
                call.validation = str(exc)
                call.outcome = "retried" if attempt == 1 else "fallback"
                messages = [
                    *messages,
                    {"role": "assistant", "content": text},
                    {
                        "role": "user",
                        "content": f"Your answer could not be read: {exc}. Give the final "
                        "answer again in the required format only.",
                    },
                ]
        return out

    def _vision(
        self, out: LLMJudgement, protocol: Protocol, images: dict[str, bytes] | None
    ) -> str | None:
        """The dose-image review, or None (skipped, refused, failed or not usable)."""
        if not self.client.vision or not images:
            if self.client.images_refused:
                why = f"switched off: the endpoint refused images ({self.client.images_refused})"
            elif not self.client.settings.vision:
                why = "text-only model configured"
            else:
                why = "no images"
            out.calls.append(
                LLMCall(
                    "vision_expert",
                    self.client.settings.model,
                    {},
                    outcome="skipped",
                    validation=why,
                    endpoint=self.client.endpoint,
                )
            )
            return None
        try:
            return self._expert(
                out,
                "vision_expert",
                prompts.vision_expert_messages(protocol, images, image_part),
                protocol,
            )
        except LLMError as exc:
            # a text-only model rejects images (HTTP 400): go on with the DVH review alone; the
            # client sends no more images to this endpoint
            exc.call.outcome = "skipped" if exc.status == 400 else "error"
            if self.client.images_refused:
                exc.call.validation = "the endpoint refused images: vision expert switched off"
            out.calls.append(exc.call)
            return None


def combine(rules: Evaluation, judgement: LLMJudgement) -> tuple[Evaluation, bool]:
    """The guarded decision and whether model and numbers disagreed."""
    if judgement.fell_back:
        return rules, False
    numbers_pass = rules.check.all_passed
    llm_meets = judgement.decision is Decision.MEETS_PROTOCOL
    disagreement = llm_meets != numbers_pass
    findings = list(rules.findings)
    findings += [f"LLM evaluator: {u}" for u in judgement.unmet]
    if judgement.suggestions:
        findings.append(f"LLM suggestions: {judgement.suggestions}")
    if disagreement:
        findings.append(
            "LLM evaluator and protocol check disagree: the model says "
            f"{judgement.decision}, the numbers say "
            f"{'every goal is met' if numbers_pass else 'goals are missed'}"
            + ("; the protocol check decides" if llm_meets else "")
        )
    if llm_meets and not numbers_pass:
        # the audit says which answer the protocol check reversed
        for call in reversed(judgement.calls):
            if call.role == "evaluator" and call.outcome == "used":
                call.outcome = "overridden"
                call.validation = "overridden: goals are missed, the protocol check decides"
                break
    meets = llm_meets and numbers_pass
    decision = Decision.MEETS_PROTOCOL if meets else Decision.NEEDS_IMPROVEMENT
    return Evaluation(decision, rules.check, findings, rules.measures), disagreement
