"""The JSON log format: one object per line, with the run's fields lifted to keys."""

from __future__ import annotations

import json
import logging

from fleet.logs import FORMAT, JsonFormatter, setup_logging


def _record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("fleet.steps.tasks", logging.INFO, __file__, 1, "run %s: step %s done", ("r1", "plan"), None)
    record.__dict__.update(extra)
    return record


def test_a_line_about_a_step_carries_its_run_fields():
    line = JsonFormatter().format(_record(run_id="r1", agent="calculator", step="plan", status="done"))
    assert "\n" not in line
    out = json.loads(line)
    assert out["message"] == "run r1: step plan done"
    assert (out["level"], out["logger"]) == ("INFO", "fleet.steps.tasks")
    assert (out["run_id"], out["agent"], out["step"], out["status"]) == ("r1", "calculator", "plan", "done")
    assert out["ts"].endswith("+00:00")


def test_fields_not_given_are_left_out_and_errors_keep_their_traceback():
    try:
        raise ValueError("bad")
    except ValueError:
        import sys

        record = _record()
        record.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(record))
    assert "run_id" not in out and "agent" not in out
    assert "ValueError: bad" in out["exc_info"]


def test_setup_switches_the_format_of_fleets_handler():
    root = logging.getLogger("fleet")
    saved = list(root.handlers)
    try:
        root.handlers = [h for h in root.handlers if not getattr(h, "_fleet", False)]
        setup_logging("INFO", "json")
        [handler] = [h for h in root.handlers if getattr(h, "_fleet", False)]
        assert isinstance(handler.formatter, JsonFormatter)
        setup_logging("INFO", "text")
        [handler] = [h for h in root.handlers if getattr(h, "_fleet", False)]
        assert handler.formatter._fmt == FORMAT
    finally:
        root.handlers = saved
