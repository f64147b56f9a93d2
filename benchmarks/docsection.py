"""Rewrite one marked section of a Markdown file (the benchmark tables in docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: str | Path, begin: str, end: str, section: str) -> None:
    """Replace the text between ``begin`` and ``end`` (markers included) with ``section``, which
    must start with ``begin`` and end with ``end``; append it when the markers are absent."""
    path = Path(doc)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)
