"""Prompt and tool-input templates: ``{input.X}``, ``{steps.NAME[.FIELD]}``, ``{loop.transcript}``.

Only dotted lookups into the run state are substituted; nothing in a template is
evaluated, so a run's input can never reach code through it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fleet.errors import PermanentError

PLACEHOLDER = re.compile(r"\{([a-zA-Z_][\w.]*)\}")


def lookup(context: dict[str, Any], path: str) -> Any:
    """The value at a dotted path; :class:`KeyError` naming the path when absent."""
    value: Any = context
    for part in path.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise KeyError(path)
    return value


def as_text(value: Any) -> str:
    """How a value reads inside a prompt."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True)


def render(template: str, context: dict[str, Any]) -> str:
    """Substitute every placeholder; a missing value is a permanent error of the step."""

    def substitute(match: re.Match[str]) -> str:
        try:
            return as_text(lookup(context, match.group(1)))
        except KeyError:
            raise PermanentError(f"template value '{{{match.group(1)}}}' is missing") from None

    return PLACEHOLDER.sub(substitute, template)
