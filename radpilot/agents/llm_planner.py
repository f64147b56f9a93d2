"""The LLM planner: reference plans + recent iterations + feedback -> new weights and doses.

The answer must be strict JSON over exactly the current objective terms. It is validated — known
keys only, every key present, finite numbers, positive weights, non-negative doses, a bounded
change per iteration and a bounded total change from the protocol's initial terms — before anything
is used. It may also add terms (at most two per answer, on the structures the protocol names or
its helper structures, each with its reason) and retire terms (never the target's coverage
terms), each with its reason; the reasons go into the rationale the iteration records. An
invalid answer, or one that changes nothing while goals fail, gets one retry that says
what was wrong; a second such answer, or an endpoint that fails, falls back to one step of the
rule-based planner. Every call and every fallback is recorded.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from radpilot.agents.rules_planner import propose_rules
from radpilot.agents.types import MemoryEntry, PlannerOutcome
from radpilot.evaluation.metrics import DVHTable
from radpilot.fmo.objectives import MAX_WEIGHT, ObjectiveTerm, kind_of
from radpilot.llm import prompts
from radpilot.llm.client import LLMCall, LLMClient, LLMError, LLMSettings
from radpilot.llm.parse import ParseError, find_json_object
from radpilot.protocol import Protocol

log = logging.getLogger(__name__)

PLANNER_ATTEMPTS = 2  # asked again once when its answer is invalid


def step_budget_s(settings: LLMSettings) -> float:
    """The longest one proposal's LLM calls may take."""
    return PLANNER_ATTEMPTS * settings.worst_call_s()


MAX_WEIGHT_FACTOR = 5.0  # a weight may change by at most this factor per iteration
MAX_DOSE_STEP_FRACTION = 0.2  # an objective dose may move by at most this x prescription
# over the whole job: a weight stays within this factor of the protocol's initial weight, and an
# objective dose within 0..2 x prescription (a drifting model cannot walk anywhere step by step)
MAX_TOTAL_WEIGHT_FACTOR = 100.0
STEP_TOLERANCE = 1e-6  # relative: a step of exactly the bound is not refused by rounding


class ProposalError(ValueError):
    """The planner's answer is not a valid set of parameters; the message says what to fix."""


def validate_proposal(
    data: dict[str, Any],
    current: list[ObjectiveTerm],
    prescription_gy: float,
    initial: list[ObjectiveTerm] | None = None,
) -> tuple[list[ObjectiveTerm], str]:
    """Check a parsed answer against the current terms (the step) and the protocol's initial
    ones (the total range); raise ProposalError naming the fault."""
    start = {t.key(): t for t in (initial or [])}
    tol = 1 + STEP_TOLERANCE
    terms = data.get("terms")
    if not isinstance(terms, dict):
        raise ProposalError('the answer needs a "terms" object keyed by "<structure>:<kind>"')
    known = {t.key(): t for t in current}
    unknown = sorted(set(terms) - set(known))
    if unknown:
        raise ProposalError(f"unknown term(s) {unknown}; use exactly {sorted(known)}")
    missing = sorted(set(known) - set(terms))
    if missing:
        raise ProposalError(f"term(s) {missing} are missing; give every one of {sorted(known)}")
    max_step = MAX_DOSE_STEP_FRACTION * prescription_gy
    out = []
    for key, old in known.items():
        entry = terms[key]
        if not isinstance(entry, dict):
            raise ProposalError(f'{key}: expected {{"weight": <number>, "dose_gy": <number>}}')
        try:
            weight = float(entry["weight"])
            dose = float(entry.get("dose_gy", old.dose_gy))
        except (KeyError, TypeError, ValueError):
            raise ProposalError(f"{key}: weight and dose_gy must be numbers") from None
        if isinstance(entry.get("weight"), bool):
            raise ProposalError(f"{key}: weight must be a number, not a boolean")
        if not (math.isfinite(weight) and math.isfinite(dose)):
            raise ProposalError(f"{key}: weight and dose_gy must be finite numbers")
        if not 0 < weight <= MAX_WEIGHT:
            raise ProposalError(
                f"{key}: weight must be positive and at most {MAX_WEIGHT:g}, got {weight:g}"
            )
        if dose < 0:
            raise ProposalError(f"{key}: dose_gy must not be negative, got {dose:g}")
        ratio = weight / old.weight if old.weight > 0 else MAX_WEIGHT_FACTOR
        if not 1 / (MAX_WEIGHT_FACTOR * tol) <= ratio <= MAX_WEIGHT_FACTOR * tol:
            raise ProposalError(
                f"{key}: weight {weight:g} is {ratio:.3g} x the current {old.weight:g}; "
                f"keep it within 1/{MAX_WEIGHT_FACTOR:g}..{MAX_WEIGHT_FACTOR:g} x"
            )
        if abs(dose - old.dose_gy) > max_step * tol + 1e-9:
            raise ProposalError(
                f"{key}: dose_gy {dose:g} moves {abs(dose - old.dose_gy):.3g} Gy from "
                f"{old.dose_gy:g}; at most {max_step:g} Gy per iteration"
            )
        first = start.get(key)
        if first is not None and first.weight > 0:
            total = weight / first.weight
            if not 1 / (MAX_TOTAL_WEIGHT_FACTOR * tol) <= total <= MAX_TOTAL_WEIGHT_FACTOR * tol:
                raise ProposalError(
                    f"{key}: weight {weight:g} is {total:.3g} x the protocol's {first.weight:g}; "
                    f"over the whole plan keep it within 1/{MAX_TOTAL_WEIGHT_FACTOR:g}.."
                    f"{MAX_TOTAL_WEIGHT_FACTOR:g} x"
                )
        if dose > 2 * prescription_gy * tol:
            raise ProposalError(
                f"{key}: dose_gy {dose:g} is above twice the prescription "
                f"({2 * prescription_gy:g} Gy)"
            )
        out.append(old.with_values(dose, weight))
    rationale = data.get("rationale", "")
    return out, rationale if isinstance(rationale, str) else str(rationale)


MAX_TERMS = 24  # terms in one plan, after additions


def apply_changes(
    data: dict[str, Any], terms: list[ObjectiveTerm], protocol: Protocol
) -> tuple[list[ObjectiveTerm], list[str]]:
    """The answer's "add" and "remove" applied to the validated ``terms``, and one note per
    change with its reason; raise ProposalError naming the fault."""
    add, remove = data.get("add") or [], data.get("remove") or []
    if not isinstance(add, list) or not isinstance(remove, list):
        raise ProposalError('"add" and "remove" must be lists (empty when nothing changes)')
    if len(add) > prompts.MAX_ADDED_TERMS:
        raise ProposalError(f'"add" has {len(add)} terms; at most {prompts.MAX_ADDED_TERMS}')
    by_key = {t.key(): t for t in terms}
    notes: list[str] = []
    for i, entry in enumerate(remove):
        if not isinstance(entry, dict) or not isinstance(entry.get("reason"), str):
            raise ProposalError(f'remove[{i}]: expected {{"term": "<structure>:<kind>", "reason"}}')
        key, reason = str(entry.get("term")), entry["reason"].strip()
        old = by_key.get(key)
        if old is None:
            raise ProposalError(f"remove[{i}]: {key!r} is not a current term; see {sorted(by_key)}")
        if not reason:
            raise ProposalError(f"remove[{i}]: say why {key} is retired")
        if old.structure == protocol.target and kind_of(old).bound() <= 0:
            raise ProposalError(
                f"remove[{i}]: {key} holds the target's coverage; it stays (lower its weight)"
            )
        del by_key[key]
        notes.append(f"retired {old.label()}: {reason}")
    allowed = prompts.term_structures(protocol, terms)
    for i, entry in enumerate(add):
        if not isinstance(entry, dict) or not isinstance(entry.get("reason"), str):
            raise ProposalError(
                f"add[{i}]: expected structure, kind, dose_gy, weight, parameter, reason"
            )
        structure, reason = str(entry.get("structure")), entry["reason"].strip()
        if structure not in allowed:
            raise ProposalError(f"add[{i}]: structure {structure!r} is not one of {allowed}")
        if not reason:
            raise ProposalError(f"add[{i}]: say why the term is needed")
        try:
            raw_parameter = entry.get("parameter") or None
            term = ObjectiveTerm(
                structure,
                str(entry.get("kind")),
                float(entry["dose_gy"]),
                float(entry["weight"]),
                float(raw_parameter) if raw_parameter is not None else None,
            )
        except (KeyError, TypeError, ValueError) as exc:  # ObjectiveError is a ValueError
            raise ProposalError(f"add[{i}]: {exc}") from None
        if term.key() in by_key:
            raise ProposalError(f"add[{i}]: {term.key()} exists; change its weight and dose_gy")
        if not 0 < term.weight <= MAX_WEIGHT:
            raise ProposalError(f"add[{i}]: weight must be within (0, {MAX_WEIGHT:g}]")
        if not 0 <= term.dose_gy <= 2 * protocol.prescription_gy:
            raise ProposalError(
                f"add[{i}]: dose_gy must be within 0..{2 * protocol.prescription_gy:g} Gy"
            )
        by_key[term.key()] = term
        notes.append(f"added {term.label()}: {reason}")
    if len(by_key) > MAX_TERMS:
        raise ProposalError(f"{len(by_key)} terms; at most {MAX_TERMS} (retire some)")
    return list(by_key.values()), notes


NO_CHANGE_TOLERANCE = 1e-6  # relative: a proposal this close to the current terms is no change


def history_for_prompt(memory: list[MemoryEntry]) -> list[dict[str, Any]]:
    return [
        {
            "iteration": m.iteration,
            "objectives": m.objectives,
            "results": prompts.goals_text(m.check),
            "findings": list(m.findings),
            "stats": list(m.stats),
            "dvh": DVHTable.from_dict(m.dvh) if m.dvh else None,
        }
        for m in memory
    ]


def unchanged(proposed: list[ObjectiveTerm], current: list[ObjectiveTerm]) -> bool:
    """True when a proposal leaves every weight and objective dose where it is."""
    now = {t.key(): t for t in current}
    return all(
        math.isclose(t.weight, now[t.key()].weight, rel_tol=NO_CHANGE_TOLERANCE)
        and math.isclose(t.dose_gy, now[t.key()].dose_gy, rel_tol=NO_CHANGE_TOLERANCE, abs_tol=1e-9)
        for t in proposed
    )


class LLMPlanner:
    def __init__(self, client: LLMClient) -> None:
        self.client = client

    def propose(
        self,
        protocol: Protocol,
        current: list[ObjectiveTerm],
        memory: list[MemoryEntry],
        references: list[dict[str, Any]],
        findings: list[str] | None = None,
        physician: str = "",
        count: int = 1,
    ) -> PlannerOutcome:
        """The next terms; with ``count`` > 1 the model may add up to count - 1 alternatives in
        the same answer (each validated like the main set; an invalid one is dropped and
        recorded in the call's validation note)."""
        keys = [t.key() for t in current]
        structured = self.client.json_mode != "text"
        # a plan in memory already meets every goal: the loop asks for sparing now
        improving = any(m.check.all_passed for m in memory)
        messages = prompts.planner_messages(
            protocol,
            current,
            history_for_prompt(memory),
            references,
            list(findings or []),
            physician,
            MAX_WEIGHT_FACTOR,
            MAX_DOSE_STEP_FRACTION * protocol.prescription_gy,
            alternatives=count - 1,
            improving=improving,
        )
        calls: list[LLMCall] = []
        reason = ""
        goals_fail = bool(memory) and not improving and not memory[-1].check.all_passed
        for attempt in range(1, PLANNER_ATTEMPTS + 1):
            try:
                text, call = self.client.chat(
                    "planner",
                    messages,
                    schema=prompts.planning_schema(keys, count - 1) if structured else None,
                    schema_name="plan_parameters",
                )
            except LLMError as exc:
                exc.call.outcome = "error"
                calls.append(exc.call)
                reason = f"the endpoint failed ({exc})"
                break
            calls.append(call)
            try:
                data = find_json_object(text)
                terms, rationale = validate_proposal(
                    data, current, protocol.prescription_gy, protocol.objectives
                )
                terms, changes = apply_changes(data, terms, protocol)
                if goals_fail and not changes and unchanged(terms, current):
                    raise ProposalError(
                        "it changes nothing while goals are still missed; change at least one "
                        "weight or objective dose towards the missed goals"
                    )
            except (ParseError, ProposalError) as exc:
                call.validation = str(exc)
                call.outcome = "retried" if attempt == 1 else "fallback"
                reason = f"the answer was invalid twice ({exc})"
                messages = [
                    *messages,
                    {"role": "assistant", "content": text},
                    {
                        "role": "user",
                        "content": f"That answer cannot be used: {exc}. Answer again with the "
                        "JSON object only, following every rule.",
                    },
                ]
                continue
            alternatives, dropped = _alternatives(data, current, protocol, count - 1)
            call.validation = "ok" + "".join(f"; {d}" for d in dropped)
            why = f"LLM planner: {rationale}".strip() + "".join(f"; {c}" for c in changes)
            return PlannerOutcome(terms, why, calls, alternatives=alternatives)
        log.warning("LLM planner fell back to the rule-based step: %s", reason)
        last = memory[-1]
        terms, rules_rationale, alternatives = propose_rules(
            protocol, current, last.check, memory, count
        )
        return PlannerOutcome(
            terms,
            f"LLM planner fell back to a rule-based step: {reason}; {rules_rationale}",
            calls,
            fallback=True,
            alternatives=alternatives,
        )


def _alternatives(
    data: dict[str, Any], current: list[ObjectiveTerm], protocol: Protocol, limit: int
) -> tuple[list[list[ObjectiveTerm]], list[str]]:
    """The valid alternative parameter sets of an answer (at most ``limit``), and a note for
    each one dropped."""
    given = data.get("alternatives") or []
    if limit <= 0 or not isinstance(given, list):
        return [], ([] if limit <= 0 or not given else ['"alternatives" is not a list: ignored'])
    out: list[list[ObjectiveTerm]] = []
    notes: list[str] = []
    for i, entry in enumerate(given[:limit], 1):
        try:
            if not isinstance(entry, dict):
                raise ProposalError('expected {"terms": {...}}')
            terms, _ = validate_proposal(
                entry, current, protocol.prescription_gy, protocol.objectives
            )
        except ProposalError as exc:
            notes.append(f"alternative {i} dropped: {exc}")
            continue
        out.append(terms)
    if len(given) > limit:
        notes.append(f"{len(given) - limit} alternative(s) beyond the {limit} asked for ignored")
    return out, notes
