"""Clinical protocols: prescription, clinical goals, initial objectives and the physician's intent.

A protocol is a human-edited YAML file (see ``protocols/``), validated once here with errors that
name the field to fix; the rest of RadPilot works with the typed objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from radpilot.case import OUTSIDE_TARGETS, Case
from radpilot.cases.helpers import Helper, check_helpers
from radpilot.delivery.mlc import load_mlc
from radpilot.delivery.sequencing import SequencingSettings, protocol_fractions
from radpilot.dosimetry import parse_metric
from radpilot.errors import DeliveryError, HelperError, MetricError, ProtocolError
from radpilot.fmo.objectives import (
    ALL_BEAMS,
    ObjectiveError,
    ObjectiveTerm,
    is_fluence_kind,
    validate_terms,
)
from radpilot.fmo.solver import FMOSettings

COMPARATORS = ("<=", ">=")

# physical ranges, checked when a protocol is read (a value outside says what is allowed)
MAX_PRESCRIPTION_GY = 150.0
GRID_MM = (1.0, 20.0)  # dose grid spacing and bixel size
MAX_BEAMS = 72
MAX_PRIORITY = 100
MAX_PROTOCOL_BYTES = 1 << 20
MAX_YAML_DEPTH = 32  # a protocol is three levels deep; deeper nesting is refused, not recursed
TOP_LEVEL = (
    "name",
    "version",
    "case",
    "prescription",
    "intent",
    "goals",
    "objectives",
    "structures",
    "beams",
    "after_goals_met",
    "improve_min_gain",
    "helpers",
    "delivery",
    "safety",
)
AFTER_GOALS_MET = ("improve", "stop")
DEFAULT_MIN_GAIN = 0.5  # Gy (or % for a Vx goal): a round that gains less ends the improvement
PRESCRIPTION_FIELDS = ("target", "dose_gy", "coverage_pct", "fractions")
SAFETY_FIELDS = ("outside_targets_max_pct", "target_max_pct", "priority", "hard")
# the implicit hot-spot goal's region, for the FMO: every voxel outside the targets within this
# distance of the prescription target (hot spots outside a target sit next to it; a term on a
# larger region would be diluted by its volume)
OUTSIDE_TARGETS_REACH_MM = 30.0


@dataclass(frozen=True)
class ClinicalGoal:
    structure: str
    metric: str  # D95, D10, V30, mean, max, min
    comparator: str  # "<=" or ">="
    limit: float  # Gy, or % for Vx
    priority: int = 1  # 1 is most important
    hard: bool = True

    @property
    def unit(self) -> str:
        return "%" if parse_metric(self.metric)[0] == "V" else "Gy"

    @property
    def label(self) -> str:
        return f"{self.structure} {self.metric} {self.comparator} {self.limit:g} {self.unit}"

    def margin(self, achieved: float) -> float:
        """Positive when the goal is met with room to spare, negative by how much it is missed."""
        return self.limit - achieved if self.comparator == "<=" else achieved - self.limit

    def to_dict(self) -> dict[str, Any]:
        return {
            "structure": self.structure,
            "metric": self.metric,
            "comparator": self.comparator,
            "limit": self.limit,
            "priority": self.priority,
            "hard": self.hard,
        }


@dataclass(frozen=True)
class SafetyLimits:
    """The implicit hot-spot goals every protocol has unless it says ``safety: off`` (a mapping
    overrides them): the hottest point outside every target at most ``outside_targets_max_pct`` %
    of the prescription, the prescription target's maximum at most ``target_max_pct`` %. None
    switches one off. Leaf sequencing adds a few per cent to a maximum, so a shipped protocol
    whose deliverable plan cannot keep 107 % widens or switches them off, saying why
    (docs/agents.md)."""

    outside_targets_max_pct: float | None = 107.0
    target_max_pct: float | None = 115.0
    priority: int = 2
    hard: bool = True

    def goals(
        self, target: str, prescription_gy: float, explicit: list[ClinicalGoal]
    ) -> list[ClinicalGoal]:
        """The implicit goals (a target maximum the protocol already limits is left alone)."""
        out = []
        limited = {(g.structure, g.metric) for g in explicit if g.comparator == "<="}
        if self.outside_targets_max_pct is not None and (OUTSIDE_TARGETS, "max") not in limited:
            limit = round(prescription_gy * self.outside_targets_max_pct / 100.0, 2)
            out.append(ClinicalGoal(OUTSIDE_TARGETS, "max", "<=", limit, self.priority, self.hard))
        if self.target_max_pct is not None and (target, "max") not in limited:
            limit = round(prescription_gy * self.target_max_pct / 100.0, 2)
            out.append(ClinicalGoal(target, "max", "<=", limit, self.priority, self.hard))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "outside_targets_max_pct": self.outside_targets_max_pct,
            "target_max_pct": self.target_max_pct,
            "priority": self.priority,
            "hard": self.hard,
        }


@dataclass(frozen=True)
class Protocol:
    name: str
    target: str
    prescription_gy: float
    goals: list[ClinicalGoal]
    objectives: list[ObjectiveTerm]
    intent: str = ""
    coverage_pct: float = 95.0
    case: str | None = None
    version: str = "1"
    # For imported patients: ROI name -> {name, kind} (rename and/or set the structure kind), and
    # the fields: gantry (and couch) angles, bixel size, dose grid, isocentre (x, y, z mm).
    structure_map: dict[str, StructureMapping] = field(default_factory=dict)
    beams: BeamSpec | None = None
    # Once every goal is met: "improve" goes on lowering the organ-at-risk metrics while every
    # goal stays met, until a round gains less than improve_min_gain; "stop" ends the loop.
    after_goals_met: str = "improve"
    improve_min_gain: float = DEFAULT_MIN_GAIN
    # helper structures (rings, OAR minus PTV, target minus OAR) that objective terms may name
    helpers: tuple[Helper, ...] = ()
    # the final plan is leaf-sequenced with these settings and judged on its deliverable dose;
    # None (``delivery: off``) keeps the fluence-optimal plan
    delivery: SequencingSettings | None = field(default_factory=SequencingSettings)
    fractions: int | None = None  # None: 2 Gy per fraction
    # the implicit hot-spot goals (already among ``goals``, after the protocol's own); None: none
    safety: SafetyLimits | None = None
    source: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def num_fractions(self) -> int:
        return protocol_fractions(self.prescription_gy, self.fractions)

    def fmo_settings(self) -> FMOSettings:
        """FMO settings that normalise plans the way this protocol prescribes."""
        return FMOSettings(
            normalize_to=self.target,
            coverage_pct=self.coverage_pct,
            prescription_gy=self.prescription_gy,
        )

    def improvement_settings(self) -> dict[str, Any]:
        """The outer loop's settings for what follows a plan that meets every goal."""
        # the loop's own "never hotter while sparing" bound stands in for hot-spot limits the
        # protocol lacks; one that limits both the target's and the outside maximum needs none
        limited = {(g.structure, g.metric) for g in self.goals if g.comparator == "<=" and g.hard}
        # before the protocol is met, the implicit hot-spot goals (the ``safety`` defaults,
        # below priority 1) are also a priority-1 ceiling: no organ goal is traded for a point
        # hotter than they allow (+2 %); a protocol that writes its own decides the trade
        # (among the goals wherever they stand: a goal appended after parsing hides them from
        # ``implicit_goals``)
        safety = self.safety.goals(self.target, self.prescription_gy, []) if self.safety else []
        implied = [g.limit for g in safety if g in self.goals and g.hard and g.priority > 1]
        return {
            "improve": self.after_goals_met == "improve",
            "min_gain": self.improve_min_gain,
            "bound_hot_spot": not {(OUTSIDE_TARGETS, "max"), (self.target, "max")} <= limited,
            "hot_spot_ceiling_gy": max(implied) if implied else None,
        }

    @property
    def implicit_goals(self) -> list[ClinicalGoal]:
        """The goals the protocol's ``safety`` adds (they are among ``goals``)."""
        if self.safety is None:
            return []
        # parsing appends them after the protocol's own: the trailing goals that are implied
        # (one the protocol wrote identically would be implied again on parsing: same goals)
        implied = self.safety.goals(self.target, self.prescription_gy, [])
        out: list[ClinicalGoal] = []
        for g in reversed(self.goals):
            if g not in implied or g in out:
                break
            out.insert(0, g)
        return out

    @property
    def all_helpers(self) -> tuple[Helper, ...]:
        """The protocol's helpers and, when a goal limits the hot spot outside the targets,
        the region a term on that goal acts on (``OutsideTargets``: every voxel outside the
        targets within ``OUTSIDE_TARGETS_REACH_MM`` of the prescription target)."""
        if not any(g.structure == OUTSIDE_TARGETS for g in self.goals):
            return self.helpers
        reach = OUTSIDE_TARGETS_REACH_MM
        return (*self.helpers, Helper(OUTSIDE_TARGETS, "ring", self.target, outer_mm=reach))

    @property
    def helper_names(self) -> set[str]:
        return {h.name for h in self.all_helpers}

    def helper(self, name: str) -> Helper | None:
        return next((h for h in self.all_helpers if h.name == name), None)

    @property
    def used_structures(self) -> set[str]:
        """Every structure of the case the protocol names: its target, goals, objectives (on
        case structures) and what its helpers are built from."""
        return (
            {self.target}
            | {g.structure for g in self.goals if g.structure != OUTSIDE_TARGETS}
            | {
                o.structure
                for o in self.objectives
                if o.structure not in self.helper_names and o.structure != ALL_BEAMS
            }
            | {s for h in self.helpers for s in h.sources}
        )

    def check_case(self, case: Case) -> None:
        """Raise ProtocolError unless every structure the protocol names exists in the case."""
        names = set(case.structure_names)
        missing = sorted(self.used_structures - names)
        if missing:
            raise ProtocolError(
                f"protocol {self.name!r} names structure(s) {missing} that case {case.name!r} "
                f"lacks; the case has {sorted(names)}"
            )
        try:
            check_helpers(list(self.all_helpers), names)
        except HelperError as exc:
            raise ProtocolError(f"protocol {self.name!r}: {exc}") from None
        if self.target not in {t.name for t in case.targets}:
            raise ProtocolError(
                f"protocol target {self.target!r} is not a target structure in the case"
            )

    def to_dict(self) -> dict[str, Any]:
        implicit = self.implicit_goals
        return {
            "name": self.name,
            "version": self.version,
            "case": self.case,
            "prescription": {
                "target": self.target,
                "dose_gy": self.prescription_gy,
                "coverage_pct": self.coverage_pct,
                **({"fractions": self.fractions} if self.fractions else {}),
            },
            "intent": self.intent,
            "goals": [g.to_dict() for g in self.goals if g not in implicit],
            "objectives": [o.to_dict() for o in self.objectives],
            "after_goals_met": self.after_goals_met,
            "improve_min_gain": self.improve_min_gain,
            **({"helpers": [h.to_dict() for h in self.helpers]} if self.helpers else {}),
            "delivery": self.delivery.to_dict() if self.delivery is not None else "off",
            "safety": self.safety.to_dict() if self.safety is not None else "off",
        }


KINDS = ("target", "oar", "external")


@dataclass(frozen=True)
class StructureMapping:
    name: str | None = None
    kind: str | None = None  # target | oar | external


@dataclass(frozen=True)
class BeamSpec:
    gantry_deg: tuple[float, ...]
    couch_deg: tuple[float, ...] = ()
    bixel_mm: float = 5.0
    dose_grid_mm: float = 5.0
    isocenter_mm: tuple[float, float, float] | None = None  # (x, y, z) patient coordinates


def _structure_map(raw: Any) -> dict[str, StructureMapping]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ProtocolError("structures must map ROI names to {name: ..., kind: ...}")
    out = {}
    for roi, spec in raw.items():
        where = f"structures[{roi!r}]"
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or not set(spec) <= {"name", "kind"}:
            raise ProtocolError(f"{where} must be a name, or a mapping with name and/or kind")
        kind = spec.get("kind")
        if kind is not None and str(kind).lower() not in KINDS:
            raise ProtocolError(f"{where}.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        name = spec.get("name")
        out[str(roi)] = StructureMapping(
            str(name) if name is not None else None, str(kind).lower() if kind else None
        )
    return out


def _beams(raw: Any) -> BeamSpec | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ProtocolError("beams must be a mapping: gantry_deg, couch_deg, bixel_mm, ...")
    unknown = set(raw) - {"gantry_deg", "couch_deg", "bixel_mm", "dose_grid_mm", "isocenter_mm"}
    if unknown:
        raise ProtocolError(f"beams has unknown field(s) {sorted(unknown)}")
    gantry = raw.get("gantry_deg")
    if not isinstance(gantry, list) or not gantry:
        raise ProtocolError("beams.gantry_deg must be a non-empty list of angles in degrees")
    couch = raw.get("couch_deg") or []
    if not isinstance(couch, list) or (couch and len(couch) != len(gantry)):
        raise ProtocolError("beams.couch_deg must list one angle per gantry angle")
    iso = raw.get("isocenter_mm")
    if iso is not None and (not isinstance(iso, list) or len(iso) != 3):
        raise ProtocolError("beams.isocenter_mm must be [x, y, z] in patient millimetres")
    if len(gantry) > MAX_BEAMS:
        raise ProtocolError(f"beams.gantry_deg lists {len(gantry)} beams; at most {MAX_BEAMS}")
    bixel = _num(raw.get("bixel_mm", 5.0), "beams.bixel_mm", *GRID_MM)
    grid = _num(raw.get("dose_grid_mm", 5.0), "beams.dose_grid_mm", *GRID_MM)
    return BeamSpec(
        tuple(_num(g, "beams.gantry_deg[]", -360.0, 360.0) for g in gantry),
        tuple(_num(c, "beams.couch_deg[]", -360.0, 360.0) for c in couch),
        bixel,
        grid,
        (
            _num(iso[0], "beams.isocenter_mm[0]", -5000.0, 5000.0),
            _num(iso[1], "beams.isocenter_mm[1]", -5000.0, 5000.0),
            _num(iso[2], "beams.isocenter_mm[2]", -5000.0, 5000.0),
        )
        if iso is not None
        else None,
    )


def _num(
    value: Any, where: str, low: float = -math.inf, high: float = math.inf, open_low: bool = False
) -> float:
    """A finite number within [low, high] (or (low, high] with ``open_low``)."""
    if isinstance(value, bool):
        raise ProtocolError(f"{where} must be a number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ProtocolError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ProtocolError(f"{where} must be finite, got {value!r}")
    if v > high or v < low or (open_low and v == low):
        lo = f"({low:g}" if open_low else f"[{low:g}"
        raise ProtocolError(f"{where} is {v:g}; the allowed range is {lo}, {high:g}]")
    return v


def _goal(raw: Any, i: int, prescription_gy: float) -> ClinicalGoal:
    where = f"goals[{i}]"
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where} must be a mapping with structure, metric, comparator, limit")
    missing = {"structure", "metric", "comparator", "limit"} - set(raw)
    if missing:
        raise ProtocolError(f"{where} lacks {sorted(missing)}")
    unknown = set(raw) - {"structure", "metric", "comparator", "limit", "priority", "hard", "note"}
    if unknown:
        raise ProtocolError(f"{where} has unknown field(s) {sorted(unknown)}")
    metric = str(raw["metric"])
    try:
        kind, _ = parse_metric(metric)
    except MetricError as exc:
        raise ProtocolError(f"{where}.metric: {exc}") from None
    comparator = str(raw["comparator"]).strip()
    if str(raw["structure"]) == OUTSIDE_TARGETS and (metric, comparator) != ("max", "<="):
        raise ProtocolError(
            f"{where}: {OUTSIDE_TARGETS} (the body outside every target) takes 'max <=' only"
        )
    if comparator not in COMPARATORS:
        raise ProtocolError(f"{where}.comparator must be '<=' or '>=', got {comparator!r}")
    # a volume in %, or a dose up to twice the prescription
    high = 100.0 if kind == "V" else 2 * prescription_gy
    limit = _num(raw["limit"], f"{where}.limit ({metric})", 0.0, high)
    priority = raw.get("priority", 1)
    if (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not 1 <= priority <= MAX_PRIORITY
    ):
        raise ProtocolError(
            f"{where}.priority must be an integer within 1..{MAX_PRIORITY} (1 = most important)"
        )
    hard = raw.get("hard", True)
    if not isinstance(hard, bool):
        raise ProtocolError(f"{where}.hard must be true or false")
    return ClinicalGoal(str(raw["structure"]), metric, comparator, limit, priority, hard)


def _objective(raw: Any, i: int, prescription_gy: float) -> ObjectiveTerm:
    where = f"objectives[{i}]"
    if not isinstance(raw, dict):
        raise ProtocolError(f"{where} must be a mapping with structure, kind, dose_gy, weight")
    try:
        term = ObjectiveTerm.from_dict(raw)
    except ObjectiveError as exc:
        raise ProtocolError(f"{where}: {exc}") from None
    # the weight's range is the term's own (ObjectiveTerm); the dose's depends on the protocol
    if is_fluence_kind(term.kind):
        if term.dose_gy != 0:
            raise ProtocolError(
                f"{where}.dose_gy must be 0 for {term.kind} (it penalises the fluence, not a dose)"
            )
        return term
    _num(term.dose_gy, f"{where}.dose_gy", 0.0, 2 * prescription_gy, open_low=True)
    return term


def parse_protocol(data: Any, source: str = "<protocol>") -> Protocol:
    if not isinstance(data, dict):
        raise ProtocolError(f"{source}: a protocol must be a YAML mapping")
    for key in ("name", "prescription", "goals", "objectives"):
        if key not in data:
            raise ProtocolError(f"{source}: missing required field {key!r}")
    unknown = sorted(map(str, set(data) - set(TOP_LEVEL)))
    if unknown:
        raise ProtocolError(
            f"{source}: unknown field(s) {unknown}; a protocol has {', '.join(TOP_LEVEL)}"
        )
    rx = data["prescription"]
    if not isinstance(rx, dict) or "target" not in rx or "dose_gy" not in rx:
        raise ProtocolError(f"{source}: prescription needs target and dose_gy")
    unknown = sorted(map(str, set(rx) - set(PRESCRIPTION_FIELDS)))
    if unknown:
        raise ProtocolError(
            f"prescription has unknown field(s) {unknown}; it has {', '.join(PRESCRIPTION_FIELDS)}"
        )
    dose = _num(rx["dose_gy"], "prescription.dose_gy", 0.0, MAX_PRESCRIPTION_GY, open_low=True)
    coverage = _num(rx.get("coverage_pct", 95.0), "prescription.coverage_pct", 0.0, 100.0)
    if not 0 < coverage < 100:
        raise ProtocolError("prescription.coverage_pct must be within (0, 100)")
    goals_raw = data["goals"]
    if not isinstance(goals_raw, list) or not goals_raw:
        raise ProtocolError(f"{source}: goals must be a non-empty list")
    goals = [_goal(g, i, dose) for i, g in enumerate(goals_raw)]
    _check_contradictions(goals)
    obj_raw = data["objectives"]
    if not isinstance(obj_raw, list) or not obj_raw:
        raise ProtocolError(f"{source}: objectives must be a non-empty list")
    objectives = [_objective(o, i, dose) for i, o in enumerate(obj_raw)]
    try:
        validate_terms(objectives)
    except ObjectiveError as exc:
        raise ProtocolError(f"{source}: objectives: {exc}") from None
    after = str(data.get("after_goals_met", "improve")).strip().lower()
    if after not in AFTER_GOALS_MET:
        raise ProtocolError(
            f"{source}: after_goals_met must be one of {', '.join(AFTER_GOALS_MET)}, "
            f"got {data.get('after_goals_met')!r}"
        )
    min_gain = _num(
        data.get("improve_min_gain", DEFAULT_MIN_GAIN), "improve_min_gain", 0.0, 50.0, True
    )
    helpers = _helpers(data.get("helpers"), goals, str(rx["target"]))
    safety = _safety(data.get("safety"), source, dose)
    if safety is not None:
        goals += safety.goals(str(rx["target"]), dose, goals)
    fractions = rx.get("fractions")
    if fractions is not None and (
        isinstance(fractions, bool) or not isinstance(fractions, int) or not 1 <= fractions <= 100
    ):
        raise ProtocolError(f"prescription.fractions must be an integer 1..100, got {fractions!r}")
    return Protocol(
        name=str(data["name"]),
        version=str(data.get("version", "1")),
        case=data.get("case"),
        target=str(rx["target"]),
        prescription_gy=dose,
        coverage_pct=coverage,
        goals=goals,
        objectives=objectives,
        intent=str(data.get("intent", "")).strip(),
        structure_map=_structure_map(data.get("structures")),
        beams=_beams(data.get("beams")),
        after_goals_met=after,
        improve_min_gain=min_gain,
        helpers=helpers,
        delivery=_delivery(data.get("delivery", {}), source),
        fractions=fractions,
        safety=safety,
        source={"origin": source},
    )


def _safety(raw: Any, source: str, prescription_gy: float) -> SafetyLimits | None:
    """``safety:`` -- ``off``: no implicit goals; absent, empty or ``on``: the defaults
    (``SafetyLimits``); a mapping: the defaults with its overrides (% of the prescription, null
    switches one off; priority; hardness). Only an explicit ``off`` (or false) switches them off:
    an empty ``safety:`` is read as the safer of the two."""
    if raw is False or (isinstance(raw, str) and raw.strip().lower() == "off"):
        return None
    if raw is None or raw is True or (isinstance(raw, str) and raw.strip().lower() == "on"):
        raw = {}
    if not isinstance(raw, dict):
        raise ProtocolError(
            f"{source}: safety must be 'on', 'off' or a mapping with {', '.join(SAFETY_FIELDS)}"
        )
    unknown = sorted(map(str, set(raw) - set(SAFETY_FIELDS)))
    if unknown:
        raise ProtocolError(
            f"{source}: safety has unknown field(s) {unknown}; it has {', '.join(SAFETY_FIELDS)}"
        )
    base = SafetyLimits()

    def pct(key: str) -> float | None:
        if key in raw and raw[key] is None:
            return None
        v = raw.get(key, getattr(base, key))
        return _num(v, f"safety.{key}", 100.0, 200.0)

    priority = raw.get("priority", base.priority)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ProtocolError(f"safety.priority must be an integer within 1..{MAX_PRIORITY}")
    if not 1 <= priority <= MAX_PRIORITY:
        raise ProtocolError(f"safety.priority must be an integer within 1..{MAX_PRIORITY}")
    hard = raw.get("hard", base.hard)
    if not isinstance(hard, bool):
        raise ProtocolError("safety.hard must be true or false")
    return SafetyLimits(pct("outside_targets_max_pct"), pct("target_max_pct"), priority, hard)


def _helpers(raw: Any, goals: list[ClinicalGoal], target: str) -> tuple[Helper, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ProtocolError("helpers must be a list of {name, kind: ring | minus, of, ...}")
    out = []
    for i, h in enumerate(raw):
        try:
            out.append(Helper.from_dict(h))
        except HelperError as exc:
            raise ProtocolError(f"helpers[{i}]: {exc}") from None
    names = [h.name for h in out]
    if len(set(names)) != len(names):
        raise ProtocolError(f"helpers: names must be unique, got {names}")
    for h in out:
        if h.name == OUTSIDE_TARGETS:
            raise ProtocolError(
                f"helper name {OUTSIDE_TARGETS!r} is reserved (the implicit hot-spot goal's "
                "region); choose another"
            )
        if h.name in h.sources or any(s in names for s in h.sources):
            raise ProtocolError(
                f"helper {h.name!r} is built from another helper; build it from case structures"
            )
        if h.name == target or any(g.structure == h.name for g in goals):
            raise ProtocolError(
                f"helper {h.name!r} is named by a goal or the prescription: helpers steer the "
                f"optimiser only; goals are set on the delineated structures"
            )
    return tuple(out)


def _check_contradictions(goals: list[ClinicalGoal]) -> None:
    for a in goals:
        for b in goals:
            if (
                a.structure == b.structure
                and a.metric == b.metric
                and a.comparator == ">="
                and b.comparator == "<="
                and a.limit > b.limit
            ):
                raise ProtocolError(
                    f"contradictory goals: {a.label} and {b.label} cannot both hold"
                )


class _PlainYamlLoader(yaml.SafeLoader):
    """Safe YAML without anchors or aliases (no 'billion laughs'), with bounded nesting (no
    recursion the interpreter cannot take) and unique keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ProtocolError(
                f"YAML aliases (*{event.anchor}) are not allowed in a protocol "
                f"(line {event.start_mark.line + 1}): write the value out"
            )
        event = self.peek_event()
        if getattr(event, "anchor", None):
            raise ProtocolError(
                f"YAML anchors (&{event.anchor}) are not allowed in a protocol "
                f"(line {event.start_mark.line + 1}): write the value out"
            )
        self._depth += 1
        if self._depth > MAX_YAML_DEPTH:
            raise ProtocolError(
                f"the protocol nests deeper than {MAX_YAML_DEPTH} levels "
                f"(line {event.start_mark.line + 1})"
            )
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        """A mapping whose keys are unique: YAML would keep the last of two equal keys, so a
        protocol that says ``safety:`` twice would silently mean the second."""
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            line = key_node.start_mark.line + 1
            if key_node.value in first:
                raise ProtocolError(
                    f"{key_node.value!r} appears twice in one mapping (lines "
                    f"{first[key_node.value]} and {line}): keep one"
                )
            first[key_node.value] = line
        return super().construct_mapping(node, deep)


def _delivery(raw: Any, source: str) -> SequencingSettings | None:
    """``delivery:`` off/false, or a mapping of sequencing settings (defaults when absent)."""
    if raw is False or (isinstance(raw, str) and raw.strip().lower() == "off"):
        return None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ProtocolError(
            f"{source}: delivery must be 'off' or a mapping (mlc, levels, min_segment_mu, refit, "
            "max_segments_per_beam)"
        )
    try:
        settings = SequencingSettings.from_dict(raw)
        load_mlc(settings.mlc)  # an unknown model is refused now, not after the loop
        return settings
    except DeliveryError as exc:
        raise ProtocolError(f"{source}: delivery: {exc}") from None


def load_protocol_text(text: str, source: str = "<protocol>") -> Protocol:
    size = len(text.encode())
    if size > MAX_PROTOCOL_BYTES:
        raise ProtocolError(
            f"{source} is {size} bytes; protocols are limited to {MAX_PROTOCOL_BYTES} bytes"
        )
    loader = _PlainYamlLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ProtocolError(f"{source}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()
    return parse_protocol(data, source)


def load_protocol(path: str | Path) -> Protocol:
    p = Path(path)
    if not p.is_file():
        raise ProtocolError(f"protocol file {p} does not exist")
    return load_protocol_text(p.read_text(), str(p))
