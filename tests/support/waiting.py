"""The one way tests wait for something that announces nothing: read it again until it holds.

Where an event can be waited on (a pub/sub message, a stream entry, a condition variable), tests
wait on it instead; these are for what can only be read (a counter on a metrics page, a file).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def poll(read: Callable[[], T], until: Callable[[T], bool], timeout_s: float, interval_s: float = 0.05) -> T:
    """Read again every ``interval_s`` until ``until(value)`` holds or ``timeout_s`` passes; the
    last value read (the caller asserts on it, so a failure shows what was seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = read()
        if until(value) or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)  # nothing announces the change: read again shortly


def wait_until(check: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.05) -> T:
    """Call ``check`` until it returns something true and return it; fail naming ``what`` after
    ``timeout_s``."""
    value = poll(check, bool, timeout_s, interval_s)
    assert value, f"{what}: not within {timeout_s:g}s"
    return value
