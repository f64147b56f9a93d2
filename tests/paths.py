"""Where the repository's files are, for tests in any tier folder."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = REPO_ROOT / "protocols"


def with_safety(protocol_yaml: str, safety: str) -> str:
    """A protocol's text with its ``safety:`` line (if any) replaced by ``safety: <safety>``."""
    kept = [line for line in protocol_yaml.splitlines() if not line.startswith("safety:")]
    return "\n".join([*kept, f"safety: {safety}", ""])
