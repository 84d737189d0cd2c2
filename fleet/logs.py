"""Logging setup of fleet processes: one line per event, each about a run naming its run id.

Two formats: plain text (the default), or one JSON object per line (``FLEET_LOG_FORMAT=json``)
for log collectors. Lines about a run pass its fields with ``extra=`` (see :data:`FIELDS`),
and the JSON format lifts them to top-level keys, so a collector can filter on ``run_id``.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime, timezone

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"

# Fields a log call may pass with extra=; the JSON format writes them when present.
FIELDS = ("run_id", "agent", "step", "priority", "status", "duration_s", "tokens_in", "tokens_out")


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, process, message, the run's fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        out.update({k: getattr(record, k) for k in FIELDS if hasattr(record, k)})
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send fleet's logs to stderr at ``level``, as ``fmt`` ("text" or "json"); idempotent."""
    root = logging.getLogger("fleet")
    root.setLevel(level.upper())
    if not any(getattr(h, "_fleet", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler._fleet = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.propagate = False
    for handler in root.handlers:
        if getattr(handler, "_fleet", False):
            handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(FORMAT))
