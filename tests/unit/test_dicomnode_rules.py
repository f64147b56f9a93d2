"""The DICOM node's routing rules and configuration: what matches, and errors that say what to
fix (a node that starts with bad rules would plan studies with the wrong protocol)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.dicomnode.config import DicomNodeConfig
from services.dicomnode.rules import RulesError, load_rules
from tests.paths import REPO_ROOT

EXAMPLE = REPO_ROOT / "deploy" / "dicomnode" / "rules.example.yaml"
PROTOCOL = REPO_ROOT / "protocols" / "paper_prostate.yaml"


def test_the_shipped_example_loads_and_routes() -> None:
    rules = load_rules(EXAMPLE)
    assert [r.name for r in rules.rules] == ["prostate", "head-and-neck"]
    prostate = rules.route("CONTOURING", "Prostate v2", {"PTV", "Rectum", "Bladder", "BODY"})
    assert prostate is not None and prostate.name == "prostate"
    assert prostate.destination.describe() == "PACS@127.0.0.1:4242"  # the file's default
    assert prostate.protocol_yaml.startswith(PROTOCOL.read_text()[:40])
    assert rules.route("STRANGER", "Prostate", {"PTV", "Rectum", "Bladder"}) is None
    assert rules.route("PACS", "Lung", {"PTV", "Rectum", "Bladder"}) is None  # label
    assert rules.route("PACS", "Pelvis", {"PTV", "Rectum"}) is None  # a ROI is missing
    hn = rules.route("ANY", "", {"PTV70", "PTV56", "PTV52"})
    assert hn is not None and hn.destination.describe() == "TPS@127.0.0.1:11113"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: []", "non-empty 'rules' list"),
        ("rules: [{name: a}]", "'protocol' (a protocol YAML file) is required"),
        ("rules: [{protocol: missing.yaml}]", "cannot read protocol"),
        ("rules: [{protocol: P, colour: red}]", "unknown keys ['colour']"),
        ("rules: [{protocol: P, agent: magic}]", "agent 'magic' is not one of"),
        ("rules: [{protocol: P, structure_set_label: '('}]", "not a regular expression"),
        ("rules: [{protocol: P}]", "no destination"),
        ("rules: [{protocol: P, destination: {ae_title: A, host: h, port: 0}}]", "1..65535"),
        ("rules: [{protocol: P, destination: {ae_title: 'A\\\\B', host: h, port: 1}}]", "AE title"),
        ("destination: {ae_title: A, host: h, port: 1}\n"
         "rules: [{protocol: P, calling_aes: [WAY_TOO_LONG_AE_TITLE]}]", "not an AE title"),
        ("destination: {ae_title: A, host: h, port: 1}\n"
         "rules: [{name: a, protocol: P}, {name: a, protocol: P}]",
         "rule names must be unique"),
        ("rules: [{protocol: P, max_iterations: -1}]", "max_iterations"),
        ("rules: {", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_rules_say_what_to_fix(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "p.yaml").write_text(PROTOCOL.read_text())
    path = tmp_path / "rules.yaml"
    path.write_text(text.replace(": P", ": p.yaml"))
    with pytest.raises(RulesError) as err:
        load_rules(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_a_bad_protocol_is_caught_when_the_rules_load(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("name: broken\ngoals: 3\n")
    (tmp_path / "rules.yaml").write_text(
        "destination: {ae_title: A, host: h, port: 1}\nrules: [{protocol: p.yaml}]"
    )
    with pytest.raises(RulesError, match=r"protocol .*p\.yaml is not valid"):
        load_rules(tmp_path / "rules.yaml")


def test_the_node_must_name_its_peers_and_its_rules(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        DicomNodeConfig.from_env_and_args(["--rules", str(EXAMPLE)])
    assert "--calling-aes" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        DicomNodeConfig.from_env_and_args(["--calling-aes", "PACS"])
    assert "--rules" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        DicomNodeConfig.from_env_and_args(
            ["--calling-aes", "PACS", "--rules", "r", "--ae-title", ""]
        )
    assert "not an AE title" in capsys.readouterr().err
    c = DicomNodeConfig.from_env_and_args(
        ["--calling-aes", "PACS, CONTOURING", "--rules", str(EXAMPLE), "--quiet-s", "30"]
    )
    assert c.calling_aes == ("PACS", "CONTOURING") and c.quiet_s == 30 and c.ae_title == "RADPILOT"
