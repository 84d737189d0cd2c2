"""Which events go to Sentry: dead letters and real errors, never an expected retry."""

from __future__ import annotations

from celery.exceptions import Retry

from fleet.errors import PermanentError, TransientError
from fleet.ops.sentry import _before_send


def _hint(exc: BaseException) -> dict:
    return {"exc_info": (type(exc), exc, None)}


def test_retries_are_dropped():
    assert _before_send({"tags": {}}, _hint(Retry("again"))) is None
    assert _before_send({"tags": {"run_id": "r1"}}, _hint(TransientError("unavailable"))) is None


def test_a_transient_error_that_was_dead_lettered_is_sent():
    event = {"tags": {"run_id": "r1", "dead_letter": "1-0"}}
    assert _before_send(event, _hint(TransientError("unavailable"))) is event


def test_other_errors_and_log_events_are_sent():
    event = {"tags": {}}
    assert _before_send(event, _hint(PermanentError("no"))) is event
    assert _before_send(event, _hint(KeyError("bug"))) is event
    assert _before_send(event, {}) is event  # a log message without an exception
