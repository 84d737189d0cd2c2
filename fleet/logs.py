"""Logging setup of fleet processes: one line per event, each about a run naming its run id."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup_logging(level: str = "INFO") -> None:
    """Send fleet's logs to stderr at ``level`` (idempotent)."""
    root = logging.getLogger("fleet")
    root.setLevel(level.upper())
    if not any(getattr(h, "_fleet", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._fleet = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
