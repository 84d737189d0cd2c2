"""Tools that fail on purpose, for reliability tests (loaded through FLEET_TOOL_MODULES)."""

from __future__ import annotations

import os

from fleet.errors import PermanentError
from fleet.run.tools import tool


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


@tool("gate")
def gate(path: str) -> str:
    """Holds its step until the file ``path`` exists (at most 60 s): a step kept in flight
    while a test changes the world around it. Another process opens the gate, so a short
    poll is the only way to see it."""
    import time
    from pathlib import Path

    give_up = time.monotonic() + 60
    while not Path(path).exists():
        if time.monotonic() > give_up:
            raise PermanentError(f"gate {path} never opened")
        time.sleep(0.02)
    return "open"


@tool("needs_file")
def needs_file(path: str) -> str:
    """Fails for good while the file ``path`` is missing: a dead letter that a plain replay
    brings to success once it exists (the world was fixed, not the input)."""
    from pathlib import Path

    if not Path(path).exists():
        raise PermanentError(f"needs_file: {path} is missing")
    return "found"
