"""Tools that fail on purpose, for reliability tests (loaded through FLEET_TOOL_MODULES)."""

from __future__ import annotations

import os

from fleet.errors import PermanentError
from fleet.tools import tool


@tool("always_fails")
def always_fails(text: str) -> str:
    """A step that can never succeed."""
    raise PermanentError(f"always_fails refuses {text!r}")


@tool("crash_worker")
def crash_worker(text: str) -> str:
    """Kills the process running it, as an OOM kill or a segfault would."""
    os._exit(137)


@tool("strict_int")
def strict_int(text: str) -> int:
    """Parses an integer; anything else is bad input (fixable by a replay with a patch)."""
    try:
        return int(text)
    except ValueError:
        raise PermanentError(f"strict_int: {text!r} is not an integer") from None
