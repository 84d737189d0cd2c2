"""Error mapping: Triton statuses and stream errors onto the fleet's errors, in one place."""

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
