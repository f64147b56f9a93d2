"""The layers point one way: the library never imports gRPC or the services, and the ground
floor (dosimetry, protocol, fmo) never imports the evaluation layer above it."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.paths import REPO_ROOT

PACKAGE = REPO_ROOT / "radpilot"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _library_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "v1" not in p.relative_to(PACKAGE).parts]


def test_the_library_knows_nothing_of_grpc_or_the_services() -> None:
    offenders = {
        str(p.relative_to(REPO_ROOT)): sorted(
            n for n in _imports(p) if n.split(".")[0] in ("grpc", "grpc_health", "services")
        )
        for p in _library_files()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_ground_floor_does_not_import_the_evaluation_layer() -> None:
    ground = [PACKAGE / "dosimetry.py", PACKAGE / "protocol.py", *(PACKAGE / "fmo").glob("*.py")]
    for p in ground:
        assert not [n for n in _imports(p) if n.startswith("radpilot.evaluation")], p


def test_exactly_one_module_defines_the_outer_loop() -> None:
    defining = [
        p.relative_to(REPO_ROOT).as_posix()
        for p in [*_library_files(), *(REPO_ROOT / "services").rglob("*.py")]
        if "def run_loop(" in p.read_text()
    ]
    assert defining == ["radpilot/loop/core.py"]
