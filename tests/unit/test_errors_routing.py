"""Error mapping, routing and settings: the one-place rules."""

from __future__ import annotations

import pytest
import redis

from fleet.errors import (
    DeadlineExceeded,
    PermanentError,
    RunCancelled,
    TransientError,
    from_triton_message,
    from_triton_status,
    is_retryable,
)
from fleet.broker.queues import all_queues, queue_name, worker_queues
from fleet.settings import Settings


@pytest.mark.parametrize("code", ["UNAVAILABLE", "StatusCode.UNAVAILABLE", "RESOURCE_EXHAUSTED", "INTERNAL", "SOMETHING_NEW"])
def test_transient_triton_codes(code):
    assert isinstance(from_triton_status(code, "x"), TransientError)


@pytest.mark.parametrize("code", ["INVALID_ARGUMENT", "StatusCode.NOT_FOUND", "UNIMPLEMENTED", "PERMISSION_DENIED"])
def test_permanent_triton_codes(code):
    assert isinstance(from_triton_status(code, "x"), PermanentError)


def test_cancelled_and_retryable():
    assert isinstance(from_triton_status("CANCELLED", "x"), RunCancelled)
    assert is_retryable(TransientError("x"))
    assert is_retryable(redis.exceptions.ConnectionError("gone"))
    assert is_retryable(ConnectionResetError())
    assert not is_retryable(PermanentError("x"))
    assert not is_retryable(DeadlineExceeded("x"))
    assert not is_retryable(ValueError("bug"))


@pytest.mark.parametrize(
    "message",
    ["unexpected inference input 'foo'", "sampling parameter 'max_tokens' must be an integer, got 'x'",
     "simulated invalid request (sim_fault=invalid)", "Request for unknown model: 'x' is not found"],
)
def test_in_band_stream_errors_that_are_permanent(message):
    assert isinstance(from_triton_message(message), PermanentError)


@pytest.mark.parametrize("message", ["simulated transient failure", "engine overloaded, try later", "model not ready"])
def test_in_band_stream_errors_that_are_transient(message):
    assert isinstance(from_triton_message(message), TransientError)


def test_queue_names_and_worker_order():
    s = Settings(_env_file=None, queue_prefix="p.")
    assert queue_name(s, "llm", "interactive") == "p.llm.interactive"
    assert all_queues(s) == ["p.llm.interactive", "p.llm.batch", "p.tool.interactive", "p.tool.batch"]
    assert worker_queues(s, "llm") == ["p.llm.interactive", "p.llm.batch"]
    assert worker_queues(s, "llm", ("batch", "interactive")) == ["p.llm.interactive", "p.llm.batch"]
    assert worker_queues(s, "tool", ("interactive",)) == ["p.tool.interactive"]


def test_settings_refuse_a_visibility_timeout_shorter_than_a_step():
    with pytest.raises(ValueError, match="must exceed FLEET_STEP_TIME_LIMIT_S"):
        Settings(_env_file=None, step_time_limit_s=600, visibility_timeout_s=300)


def test_settings_from_environment(monkeypatch):
    monkeypatch.setenv("FLEET_INTERACTIVE_DEADLINE_S", "12.5")
    monkeypatch.setenv("FLEET_TOOL_MODULES", '["a.b"]')
    s = Settings(_env_file=None)
    assert s.deadline_s("interactive") == 12.5
    assert s.tool_modules == ["a.b"]
    assert s.triton_priority("interactive") < s.triton_priority("batch")
