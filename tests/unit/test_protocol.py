"""Protocol YAML: the shipped files, validation errors, and the protocol check."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from radpilot.case import Case
from radpilot.cases.helpers import referenced
from radpilot.evaluation.metrics import PlanDose
from radpilot.evaluation.protocol_check import check_protocol
from radpilot.evaluation.rules import evaluate_rules
from radpilot.protocol import ProtocolError, load_protocol, load_protocol_text, parse_protocol
from tests.paths import REPO_ROOT

PROTOCOLS = REPO_ROOT / "protocols"

BASE = """
name: t
prescription: {target: PTV, dose_gy: 50}
goals:
  - {structure: PTV, metric: D95, comparator: ">=", limit: 50}
  - {structure: Core, metric: max, comparator: "<=", limit: 20, priority: 2, hard: false}
objectives:
  - {structure: PTV, kind: squared_deviation, dose_gy: 50, weight: 1}
"""


@pytest.mark.parametrize("name", ["tg119_cshape_easier.yaml", "tg119_cshape_harder.yaml"])
def test_shipped_protocols_load(name: str) -> None:
    p = load_protocol(PROTOCOLS / name)
    assert p.target == "PTV" and p.prescription_gy == 50.0
    assert {(g.structure, g.metric) for g in p.goals} == {
        ("PTV", "D95"),
        ("PTV", "D10"),
        ("Core", "D10"),
        ("OutsideTargets", "max"),
        ("PTV", "max"),
    }
    # the implicit hot-spot goals, the outside limit at the target's 115 %
    assert [g.label for g in p.implicit_goals] == [
        "OutsideTargets max <= 57.5 Gy",
        "PTV max <= 57.5 Gy",
    ]
    # the ring that keeps the class solution's spill beside the PTV under it
    assert [h.describe() for h in p.helpers] == ["ring 0-10 mm around PTV"]
    assert any(t.structure == "PTV_ring" for t in p.objectives)
    assert p.intent
    core = next(g for g in p.goals if g.structure == "Core")
    assert core.limit == (25.0 if "easier" in name else 10.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: [unclosed", "not valid YAML"),
        ("- a list", "mapping"),
        (BASE.replace("metric: D95", "metric: Dfoo"), "unknown metric"),
        (BASE.replace('comparator: ">="', 'comparator: "=="'), "comparator"),
        (BASE.replace("limit: 50}", "limit: .nan}"), "finite"),
        (BASE.replace("priority: 2", "priority: 0"), "priority"),
        (BASE.replace("weight: 1}", "weight: -2}"), r"within 0\.\.1e\+06"),
        (BASE.replace("dose_gy: 50}", "dose_gy: 0}"), r"allowed range is \(0, 150\]"),
        (BASE.replace("goals:\n", "goals: []\nx:\n"), r"unknown field\(s\) \['x'\]"),
        (BASE.replace("goals:\n", "goals: []\n") + "\n", "non-empty|mapping"),
        (
            BASE + "  - {structure: PTV, kind: squared_deviation, dose_gy: 50, weight: 2}\n",
            "repeat",
        ),
        (
            BASE + "  - {structure: PTV, kind: min_dvh, dose_gy: 49, weight: 2}\n",
            r"objectives\[1\].*needs a parameter: volume_pct",
        ),
        (
            BASE
            + "  - {structure: Core, kind: smooth_max, dose_gy: 20, weight: 2, parameter: 0}\n",
            r"softness_gy must be within \[0.05, 20\]",
        ),
        (
            BASE.replace(
                "goals:\n",
                'goals:\n  - {structure: PTV, metric: D95, comparator: "<=", limit: 40}\n',
            ),
            "contradictory",
        ),
    ],
)
def test_malformed_protocols_name_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        load_protocol_text(text)


def test_objective_kinds_with_parameters_load_and_round_trip() -> None:
    text = BASE + (
        "  - {structure: Core, kind: max_dvh, dose_gy: 15, weight: 2, parameter: 30}\n"
        "  - {structure: Core, kind: geud, dose_gy: 12, weight: 1, parameter: 8}\n"
        "  - {structure: Core, kind: smooth_max, dose_gy: 20, weight: 1}\n"
    )
    p = load_protocol_text(text)
    by_kind = {t.kind: t for t in p.objectives}
    assert by_kind["max_dvh"].parameter == 30.0 and by_kind["geud"].parameter == 8.0
    assert by_kind["smooth_max"].parameter == 1.0  # the kind's default, written out
    assert load_protocol_text(yaml.safe_dump(p.to_dict())).objectives == p.objectives


HELPERS = """
helpers:
  - {name: PTV_ring, kind: ring, of: PTV, inner_mm: 3, outer_mm: 15}
  - {name: Core_opt, kind: minus, of: Core, subtract: PTV, margin_mm: 5}
"""


def test_helpers_load_round_trip_and_are_checked_against_the_case(analytic_case: Case) -> None:
    text = BASE + "  - {structure: PTV_ring, kind: squared_overdose, dose_gy: 30, weight: 5}\n"
    p = load_protocol_text(text + HELPERS)
    assert [h.name for h in p.helpers] == ["PTV_ring", "Core_opt"]
    assert p.helper("PTV_ring").outer_mm == 15.0 and p.helper("nope") is None
    named = {t.structure for t in p.objectives}
    assert [h.name for h in referenced(list(p.helpers), named)] == ["PTV_ring"]
    assert "PTV_ring" not in p.used_structures and "Core" in p.used_structures
    p.check_case(analytic_case)
    again = load_protocol_text(yaml.safe_dump(p.to_dict()))
    assert again.helpers == p.helpers and again.objectives == p.objectives
    clash = load_protocol_text(text + HELPERS.replace("name: Core_opt", "name: BODY"))
    with pytest.raises(ProtocolError, match="name of a structure"):
        clash.check_case(analytic_case)
    other = load_protocol_text(BASE + HELPERS.replace("of: Core", "of: Rectum"))
    with pytest.raises(ProtocolError, match="Rectum"):
        other.check_case(analytic_case)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("helpers: {a: 1}", "must be a list"),
        ("helpers:\n  - {name: r, kind: ring, of: PTV, outer_mm: 0}", r"helpers\[0\].*exceed"),
        ("helpers:\n  - {name: r, kind: ring, of: PTV, outer_mm: 5, colour: red}", "unknown"),
        (HELPERS + "  - {name: PTV_ring, kind: ring, of: PTV, outer_mm: 5}", "unique"),
        (HELPERS + "  - {name: x, kind: minus, of: PTV_ring, subtract: Core}", "another helper"),
        ("helpers:\n  - {name: Core, kind: ring, of: PTV, outer_mm: 5}", "goal"),
    ],
)
def test_bad_helpers_name_what_to_fix(extra: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        load_protocol_text(BASE + extra)


def test_protocol_against_case_structures(analytic_case: Case) -> None:
    p = load_protocol_text(BASE.replace("structure: Core", "structure: Rectum"))
    with pytest.raises(ProtocolError, match="Rectum"):
        p.check_case(analytic_case)


def test_check_pass_fail_and_margins(analytic_case: Case) -> None:
    p = load_protocol_text(BASE + "safety: off\n")
    dose = np.zeros(analytic_case.row_voxels.size, dtype=np.float32)
    dose[analytic_case.rows_of("PTV")] = 50.0
    core = analytic_case.rows_of("Core")
    dose[core] = 10.0
    dose[core[0]] = 23.5  # Core max 23.5 > 20
    check = check_protocol(PlanDose(analytic_case, dose), p)
    ptv, core_r = check.results
    assert ptv.passed and ptv.achieved == 50.0 and ptv.margin == 0.0
    assert not core_r.passed and core_r.margin == pytest.approx(-3.5)
    assert check.all_hard_passed and not check.all_passed
    assert "misses" in core_r.finding() and "3.50 Gy" in core_r.finding()
    dose[analytic_case.rows_of("PTV")] = 49.0
    check2 = check_protocol(PlanDose(analytic_case, dose), p)
    assert not check2.all_hard_passed
    assert check2.score() < check.score()


# every value with a physical range, and every field name, is checked when the protocol is read
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (("dose_gy: 50}", "dose_gy: 1e308}"), r"prescription.dose_gy is 1e\+308.*\(0, 150\]"),
        (
            ("dose_gy: 50, weight", "dose_gy: 0, weight"),
            r"objectives\[0\].dose_gy is 0.*\(0, 100\]",
        ),
        (("dose_gy: 50, weight", "dose_gy: 1e308, weight"), r"objectives\[0\]: objective dose"),
        (("dose_gy: 50, weight", "dose_gy: 120, weight"), r"objectives\[0\].dose_gy is 120"),
        (("weight: 1}", "weight: 1e308}"), r"weight .* within 0\.\.1e\+06"),
        (("weight: 1}", "weight: 1, shape: 3}"), r"unknown field\(s\) \['shape'\]"),
        (("weight: 1}", "weight: true}"), "must be numbers"),
        (("limit: 50}", "limit: 1e308}"), r"goals\[0\].limit \(D95\) is 1e\+308.*\[0, 100\]"),
        (("dose_gy: 50}", "dose_gy: 50, boost: 2}"), r"prescription has unknown field"),
        (("priority: 2", "priority: 1000"), r"within 1\.\.100"),
        (("name: t", "name: t\nafter_goals_met: maybe"), "after_goals_met must be one of improve"),
        (("name: t", "name: t\nimprove_min_gain: 0"), r"improve_min_gain is 0.*\(0, 50\]"),
        (
            ("name: t", "name: t\nbeams: {gantry_deg: [0], bixel_mm: 0}"),
            r"bixel_mm is 0.*\[1, 20\]",
        ),
        (("name: t", "name: t\nbeams: {gantry_deg: [0], dose_grid_mm: .inf}"), "finite"),
        (
            ("name: t", "name: t\nbeams: {gantry_deg: [" + ", ".join(["0"] * 73) + "]}"),
            "at most 72",
        ),
    ],
)
def test_values_outside_their_physical_range_are_refused_with_the_range(
    edit: tuple[str, str], message: str
) -> None:
    assert edit[0] in BASE or edit[0] == "name: t"
    with pytest.raises(ProtocolError, match=message):
        load_protocol_text(BASE.replace(*edit, 1))


def test_after_goals_met_defaults_to_improve_and_can_stop() -> None:
    p = load_protocol_text(BASE)
    assert p.after_goals_met == "improve" and p.improve_min_gain == 0.5
    # the implicit hot-spot goals limit the target's and the outside hot spot: no loop-made bound
    # ... and before any plan meets, the highest of them (115 % of 50 Gy) is a priority-1 ceiling
    assert p.improvement_settings() == {
        "improve": True,
        "min_gain": 0.5,
        "bound_hot_spot": False,
        "hot_spot_ceiling_gy": 57.5,
    }
    q = load_protocol_text(
        BASE.replace(
            "name: t", "name: t\nafter_goals_met: stop\nimprove_min_gain: 1.5\nsafety: off", 1
        )
    )
    assert q.improvement_settings() == {
        "improve": False,
        "min_gain": 1.5,
        "bound_hot_spot": True,
        "hot_spot_ceiling_gy": None,
    }
    safe = load_protocol_text(BASE.replace("name: t", "name: t\nsafety: on", 1))
    assert safe.improvement_settings()["bound_hot_spot"] is False
    no_outside = load_protocol_text(
        BASE.replace("name: t", "name: t\nsafety: {outside_targets_max_pct: null}", 1)
    )
    assert no_outside.improvement_settings()["bound_hot_spot"] is True
    # hot-spot goals that are priority 1 already need no ceiling beside them
    first = load_protocol_text(BASE.replace("name: t", "name: t\nsafety: {priority: 1}", 1))
    assert first.improvement_settings()["hot_spot_ceiling_gy"] is None
    assert load_protocol_text(yaml.safe_dump(q.to_dict())) == q  # it survives a round trip


def test_yaml_aliases_anchors_and_deep_nesting_are_refused_before_they_cost_anything() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdef", "bcdefg", strict=True)
    )
    with pytest.raises(ProtocolError, match="anchors"):
        load_protocol_text(BASE + "intent: " + "\n" + bomb)
    with pytest.raises(ProtocolError, match="aliases"):
        load_protocol_text(BASE.replace("name: t", "name: *n"))
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ProtocolError, match="nests deeper than 32"):
        load_protocol_text(BASE + "intent: " + deep + "\n")
    with pytest.raises(ProtocolError, match="limited to"):
        load_protocol_text(BASE + "intent: '" + "x" * (1 << 20) + "'\n")


def test_a_key_written_twice_is_refused_with_both_lines() -> None:
    # YAML keeps the last of two equal keys: "safety: off" then "safety: on" would mean on
    with pytest.raises(ProtocolError, match=r"'safety' appears twice .*lines 9 and 10"):
        load_protocol_text(BASE + "safety: off\nsafety: on\n")
    with pytest.raises(ProtocolError, match=r"'dose_gy' appears twice"):
        load_protocol_text(BASE.replace("dose_gy: 50}", "dose_gy: 50, dose_gy: 60}", 1))


def test_the_benchmark_s_own_protocols_load_with_their_helpers() -> None:
    p = load_protocol(REPO_ROOT / "benchmarks" / "protocols" / "tg119_prostate_tight.yaml")
    assert {h.name for h in p.helpers} == {"Rectum_opt", "Bladder_opt", "PTV_core", "PTV_ring"}
    assert p.used_structures == {"PTV", "Rectum", "Bladder", "NormalTissue"}


def test_implicit_safety_goals_limit_hot_spots_and_can_be_overridden(analytic_case: Case) -> None:
    p = load_protocol_text(BASE)  # on by default
    assert p == load_protocol_text(BASE + "safety: on\n")
    assert p.goals == load_protocol_text(BASE + "safety:\n").goals  # empty: on, not off
    assert [g.label for g in p.implicit_goals] == [
        "OutsideTargets max <= 53.5 Gy",
        "PTV max <= 57.5 Gy",
    ]
    assert all(g.hard and g.priority == 2 for g in p.implicit_goals)
    # written out without them, read back with them: the same protocol
    assert "OutsideTargets" not in str(p.to_dict()["goals"])
    assert parse_protocol(p.to_dict()).goals == p.goals
    # a term on the hot-spot goal's region has rows to act on: a helper outside every target
    region = p.helper("OutsideTargets")
    assert region is not None and region.kind == "ring" and region.of == "PTV"
    assert not p.helpers  # the protocol's own helpers: none
    dose = np.zeros(analytic_case.row_voxels.size, dtype=np.float32)
    dose[analytic_case.rows_of("PTV")] = 50.0
    body = analytic_case.rows_of("BODY")
    outside = np.setdiff1d(body, analytic_case.rows_of("PTV"))
    dose[outside[len(outside) // 2]] = 60.0  # 120 % of Rx outside the target
    dose[analytic_case.rows_of("PTV")[0]] = 58.0  # 116 % in it
    plan = PlanDose(analytic_case, dose)
    check = check_protocol(plan, p)
    hot = {r.goal.label: r for r in check.results}
    assert not hot["OutsideTargets max <= 53.5 Gy"].passed
    assert hot["OutsideTargets max <= 53.5 Gy"].achieved == pytest.approx(60.0)
    assert not hot["PTV max <= 57.5 Gy"].passed
    # the evaluator says where the global maximum and the hottest point outside the targets are
    findings = evaluate_rules(plan, p).findings
    spot = next(f for f in findings if f.startswith("global maximum: 60.0 Gy (120 %"))
    assert " at x " in spot
    assert any(f.startswith("hottest point outside the targets: 60.0 Gy") for f in findings)
    # overridden: other limits, a lower priority, soft; one switched off; or all off
    q = load_protocol_text(
        BASE + "safety: {outside_targets_max_pct: 110, target_max_pct: null, priority: 3,"
        " hard: false}\n"
    )
    assert parse_protocol(p.to_dict()).safety == p.safety
    assert [(g.label, g.priority, g.hard) for g in q.implicit_goals] == [
        ("OutsideTargets max <= 55 Gy", 3, False)
    ]
    assert parse_protocol(q.to_dict()).goals == q.goals
    off = load_protocol_text(BASE + "safety: off\n")  # none when switched off
    assert off.implicit_goals == [] and off.helper("OutsideTargets") is None
    assert len(off.goals) == 2 and parse_protocol(off.to_dict()).goals == off.goals
    assert off.to_dict()["safety"] == "off"  # and it stays off when written out and read back
    # a protocol's own limit on the target maximum replaces the implicit one
    own = load_protocol_text(
        BASE.replace(
            "objectives:",
            '  - {structure: PTV, metric: max, comparator: "<=", limit: 55, priority: 1}\n'
            "objectives:",
        )
        + "safety: on\n"
    )
    assert [g.label for g in own.implicit_goals] == ["OutsideTargets max <= 53.5 Gy"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("safety: {target_max_pct: 90}\n", r"safety.target_max_pct is 90.*\[100, 200\]"),
        ("safety: {outside_max: 107}\n", r"safety has unknown field\(s\) \['outside_max'\]"),
        ("safety: {priority: 0}\n", r"safety.priority must be an integer within 1..100"),
        ("safety: {hard: 1}\n", r"safety.hard must be true or false"),
        ("safety: [1]\n", r"safety must be 'on', 'off' or a mapping"),
        (
            "helpers:\n  - {name: OutsideTargets, kind: ring, of: PTV, outer_mm: 20}\n",
            r"helper name 'OutsideTargets' is reserved",
        ),
    ],
)
def test_bad_safety_settings_are_refused_by_name(extra: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        load_protocol_text(BASE + extra)


def test_outside_targets_takes_a_maximum_only_and_brings_its_region() -> None:
    own = load_protocol_text(
        BASE.replace(
            "objectives:",
            '  - {structure: OutsideTargets, metric: max, comparator: "<=", limit: 54}\n'
            "objectives:",
        )
        + "safety: off\n"
    )  # a protocol may set the goal itself; a term on it then has its region
    assert own.helper("OutsideTargets") is not None and own.implicit_goals == []
    bad = BASE.replace(
        "objectives:",
        '  - {structure: OutsideTargets, metric: D2, comparator: "<=", limit: 52}\nobjectives:',
    )
    with pytest.raises(ProtocolError, match=r"OutsideTargets .* takes 'max <=' only"):
        load_protocol_text(bad)
