"""Rewrite one marked section of a Markdown file (the benchmark tables in docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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


def publish(
    rows: list[Any], out: str | Path, text: str, doc: str | None, begin: str, end: str
) -> None:
    """A benchmark's results: ``rows`` as JSON at ``out``, ``text`` (its section) printed and,
    with ``doc``, written between ``begin`` and ``end`` there."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    print(text)
    if doc:
        write_section(doc, begin, end, text)
