"""Tolerant readers for model answers: JSON (bare, fenced or embedded) and tagged text blocks.

Models asked for JSON still wrap it in prose or code fences; endpoints without structured output
get a tagged-block format instead (``<DECISION>…</DECISION>``). These readers find the answer or
say precisely why there is none, so the caller can quote that back to the model once.
"""

from __future__ import annotations

import json
import re
from typing import Any


class ParseError(ValueError):
    """The answer holds no readable result; the message says what was expected."""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)


def find_json_object(text: str) -> dict[str, Any]:
    """The answer's JSON object: the whole text, a fenced block, or the last balanced {...}."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    candidates += list(reversed(_balanced_objects(text)))
    for c in candidates:
        if not c.startswith("{"):
            continue
        try:
            value = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    raise ParseError("no JSON object found in the answer; reply with one JSON object only")


def _balanced_objects(text: str) -> list[str]:
    """Top-level {...} spans, string-aware, in order of appearance."""
    spans, depth, start, in_str, esc = [], 0, -1, False, False
    for i, ch in enumerate(text):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"' and depth > 0:
            in_str = True
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append(text[start : i + 1])
    return spans


def tagged_block(text: str, tag: str) -> str | None:
    """The content of the last ``<TAG>…</TAG>`` (case-insensitive; a missing close tag is forgiven
    at the end of the text)."""
    pattern = re.compile(rf"<{tag}>(.*?)(?:</{tag}>|$)", re.S | re.I)
    found = pattern.findall(text)
    return found[-1].strip() if found else None


def bullet_lines(block: str) -> list[str]:
    lines = []
    for raw in block.splitlines():
        line = raw.strip().lstrip("-*•").strip()
        line = re.sub(r"^\d+[.)]\s*", "", line)
        if line and line.lower() not in ("none", "n/a", "-"):
            lines.append(line)
    return lines
