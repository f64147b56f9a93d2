"""Where the repository's files are, for tests in any tier folder."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = REPO_ROOT / "protocols"


def with_safety(protocol_yaml: str, safety: str) -> str:
    """A protocol's text with its ``safety:`` line (if any) replaced by ``safety: <safety>``."""
    kept = [line for line in protocol_yaml.splitlines() if not line.startswith("safety:")]
    return "\n".join([*kept, f"safety: {safety}", ""])


def without_ring(name: str) -> str:
    """A shipped C-shape protocol's text without its ring term and helper (as before version
    3): for tests of a planner's steps from a class solution that leaves the tissue beside the
    target free, or that add a ring of their own."""
    lines = (PROTOCOLS / name).read_text().splitlines(keepends=True)
    cut = next(i for i, line in enumerate(lines) if line.startswith("# the ring:"))
    return "".join(line for line in lines[:cut] if "PTV_ring" not in line)
