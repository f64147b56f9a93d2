"""Routing rules: which protocol, agent, limits and destination a study arriving by DICOM gets.

A YAML file (``--rules``) with a list of rules, tried in order; the first whose conditions all
hold wins. Conditions (each optional): the calling AE title, a regular expression on the
RTSTRUCT's Structure Set Label, and ROI names that must all be in the structure set::

    destination: {ae_title: PACS, host: pacs.hospital.local, port: 104}   # default for all
    rules:
      - name: pelvis
        calling_aes: [CONTOURING]
        structure_set_label: "(?i)pelvis|prostate"
        roi_names: [PTV, Rectum]
        protocol: pelvis.yaml          # relative to this file
        agent: rules                   # rules (default), llm, bo, fixed
        max_iterations: 8
        destination: {ae_title: TPS, host: 10.0.0.5, port: 104}

A study no rule matches is recorded as ``unrouted`` and not planned.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from radpilot.protocol import ProtocolError, load_protocol_text
from services.dicomnode.config import ae_title

AGENTS = ("rules", "llm", "bo", "fixed")
RULE_KEYS = {
    "name",
    "calling_aes",
    "structure_set_label",
    "roi_names",
    "protocol",
    "agent",
    "max_iterations",
    "destination",
}


class RulesError(ValueError):
    """The rules file cannot be used; the message names the file, the rule and what to fix."""


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def describe(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class Rule:
    name: str
    protocol_path: Path
    protocol_yaml: str
    destination: Destination
    agent: str = "rules"
    max_iterations: int = 0  # 0: the orchestrator's default
    calling_aes: tuple[str, ...] = ()
    structure_set_label: re.Pattern[str] | None = None
    roi_names: tuple[str, ...] = ()

    def matches(self, calling_ae: str, label: str, roi_names: set[str]) -> bool:
        if self.calling_aes and calling_ae not in self.calling_aes:
            return False
        if self.structure_set_label is not None and not self.structure_set_label.search(label):
            return False
        return all(name in roi_names for name in self.roi_names)


@dataclass(frozen=True)
class RoutingRules:
    rules: tuple[Rule, ...]
    source: str

    def route(self, calling_ae: str, label: str, roi_names: set[str]) -> Rule | None:
        return next((r for r in self.rules if r.matches(calling_ae, label, roi_names)), None)


def _destination(value: Any, where: str) -> Destination:
    if not isinstance(value, dict) or set(value) != {"ae_title", "host", "port"}:
        raise RulesError(f"{where}: destination needs exactly ae_title, host and port")
    port = value["port"]
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise RulesError(f"{where}: destination port must be an integer within 1..65535")
    if not isinstance(value["host"], str) or not value["host"].strip():
        raise RulesError(f"{where}: destination host must be a host name or address")
    try:
        title = ae_title(str(value["ae_title"]), f"{where}: destination ae_title")
    except ValueError as exc:
        raise RulesError(str(exc)) from None
    return Destination(title, value["host"].strip(), port)


def _strings(value: Any, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise RulesError(f"{where}: {key} must be a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _rule(raw: Any, k: int, base: Path, default: Destination | None, source: str) -> Rule:
    where = f"{source}, rule {k + 1}"
    if not isinstance(raw, dict):
        raise RulesError(f"{where}: each rule is a mapping (name, protocol, ...)")
    unknown = sorted(set(raw) - RULE_KEYS)
    if unknown:
        raise RulesError(f"{where}: unknown keys {unknown}; known: {sorted(RULE_KEYS)}")
    name = str(raw.get("name") or f"rule-{k + 1}")
    where = f"{source}, rule {name!r}"
    if not raw.get("protocol"):
        raise RulesError(f"{where}: 'protocol' (a protocol YAML file) is required")
    path = Path(str(raw["protocol"]))
    path = path if path.is_absolute() else base / path
    try:
        text = path.read_text()
        load_protocol_text(text, str(path))
    except OSError as exc:
        raise RulesError(f"{where}: cannot read protocol {path}: {exc.strerror}") from None
    except ProtocolError as exc:
        raise RulesError(f"{where}: protocol {path} is not valid: {exc}") from None
    agent = str(raw.get("agent", "rules"))
    if agent not in AGENTS:
        raise RulesError(f"{where}: agent {agent!r} is not one of {', '.join(AGENTS)}")
    max_iterations = raw.get("max_iterations", 0)
    if not isinstance(max_iterations, int) or not 0 <= max_iterations <= 100:
        raise RulesError(f"{where}: max_iterations must be an integer within 0..100")
    pattern = raw.get("structure_set_label")
    try:
        label = re.compile(str(pattern)) if pattern is not None else None
    except re.error as exc:
        raise RulesError(
            f"{where}: structure_set_label is not a regular expression: {exc}"
        ) from None
    if "destination" in raw:
        destination = _destination(raw["destination"], where)
    elif default is not None:
        destination = default
    else:
        raise RulesError(f"{where}: no destination (give one here or at the top of the file)")
    try:
        callers = tuple(
            ae_title(t, f"{where}: calling_aes entry")
            for t in _strings(raw.get("calling_aes"), where, "calling_aes")
        )
    except ValueError as exc:
        raise RulesError(str(exc)) from None
    return Rule(
        name=name,
        protocol_path=path,
        protocol_yaml=text,
        destination=destination,
        agent=agent,
        max_iterations=max_iterations,
        calling_aes=callers,
        structure_set_label=label,
        roi_names=_strings(raw.get("roi_names"), where, "roi_names"),
    )


def load_rules(path: str | Path) -> RoutingRules:
    """The rules in ``path``, every protocol they name read and checked; RulesError otherwise."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise RulesError(f"cannot read routing rules {p}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise RulesError(f"routing rules {p} are not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list) or not doc["rules"]:
        raise RulesError(f"routing rules {p}: expected a mapping with a non-empty 'rules' list")
    unknown = sorted(set(doc) - {"rules", "destination"})
    if unknown:
        raise RulesError(f"routing rules {p}: unknown top-level keys {unknown}")
    default = _destination(doc["destination"], str(p)) if "destination" in doc else None
    rules = tuple(_rule(r, k, p.parent, default, str(p)) for k, r in enumerate(doc["rules"]))
    names = [r.name for r in rules]
    if len(set(names)) != len(names):
        raise RulesError(f"routing rules {p}: rule names must be unique ({names})")
    return RoutingRules(rules, str(p))
