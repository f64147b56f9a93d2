"""The LLM evaluator: a DVH expert, a vision expert and an aggregator (paper §2.2).

The deterministic protocol check stays the guardrail: the combined decision is "meets protocol"
only when the numbers pass, whatever the model says; when the model and the numbers disagree,
the disagreement is recorded. When the endpoint fails or the aggregator's answer cannot be read
after one retry, the rule-based evaluation stands and the fallback is recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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


class LLMEvaluator:
    def __init__(self, client: LLMClient) -> None:
        self.client = client

    def judge(
        self,
        plan: PlanDose,
        protocol: Protocol,
        rules: Evaluation,
        images: dict[str, bytes] | None,
    ) -> LLMJudgement:
        out = LLMJudgement(None)
        stats = plan.stats()
        dvh = plan.dvh_table()
        try:
            dvh_report, call = self.client.chat(
                "dvh_expert", prompts.dvh_expert_messages(protocol, dvh, stats, rules.check)
            )
            call.validation = "ok"
            out.calls.append(call)
        except LLMError as exc:
            exc.call.outcome = "fallback"
            out.calls.append(exc.call)
            log.warning("DVH expert failed (%s); the rule-based evaluation stands", exc)
            return out
        vision_report: str | None = None
        if not self.client.vision or not images:
            why = "text-only model configured" if not self.client.vision else "no images"
            out.calls.append(
                LLMCall(
                    "vision_expert",
                    self.client.settings.model,
                    {},
                    outcome="skipped",
                    validation=why,
                )
            )
        else:
            try:
                vision_report, call = self.client.chat(
                    "vision_expert",
                    prompts.vision_expert_messages(protocol, images, image_part),
                )
                call.validation = "ok"
                out.calls.append(call)
            except LLMError as exc:
                # a text-only model rejects images (HTTP 400): go on with the DVH review alone
                exc.call.outcome = "skipped" if exc.status == 400 else "error"
                out.calls.append(exc.call)
        structured = self.client.json_mode != "text"
        messages = prompts.aggregator_messages(protocol, dvh_report, vision_report, structured)
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
    meets = llm_meets and numbers_pass
    decision = Decision.MEETS_PROTOCOL if meets else Decision.NEEDS_IMPROVEMENT
    return Evaluation(decision, rules.check, findings, rules.measures), disagreement
