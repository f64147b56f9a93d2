"""Where the repository's files are, for tests in any tier folder."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = REPO_ROOT / "protocols"
