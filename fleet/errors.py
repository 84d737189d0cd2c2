"""Errors of the fleet, and the one place Triton and tool failures map onto them.

::

    FleetError
     ├── InvalidSubmission     rejected at the door; nothing was queued
     │    └── AmbiguousRunId   a short run id names several runs; lists them
     ├── RunNotFound           no run with that id (or its record expired)
     ├── IdempotencyConflict   an idempotency key repeated with a different submission
     ├── Overloaded            shed at admission; carries retry_after_s
     │    └── QuotaExceeded    over one of the tenant's quotas; names it
     ├── TransientError        a step attempt failed; retry with backoff within the deadline
     │    └── ReplicaUnavailable   a Triton replica cannot be reached: the request moves to
     │                             another replica of the pool (no attempt spent), or, with
     │                             none up, the attempt fails as transient
     ├── PermanentError        a step can never succeed as is; dead-letter it now
     ├── DeadlineExceeded      the run's deadline passed; the run expires, nothing more runs
     ├── BudgetExceeded        the run's token or cost budget is spent; it ends budget_exceeded
     │                         before its next model call
     ├── RunCancelled          the run was cancelled; its remaining steps are skipped
     └── HandedBack            a batch step on a thread borrowed from interactive work gave the
                               thread back: its call was cancelled at Triton and the step goes
                               back to its queue (no failure, no attempt spent)

A step body raises; the base task decides what happens (retry, dead letter, expire).
Any exception that is not a :class:`FleetError` is treated as permanent: retrying a bug
does not fix it, and the dead-letter entry keeps the traceback for the operator.
"""

from __future__ import annotations

import re


class FleetError(Exception):
    """Base of every error the fleet raises on purpose."""


class InvalidSubmission(FleetError):
    """A submission was rejected before anything was queued.

    Attributes:
        field: dotted path of the offending field, when one is to blame.
    """

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class AmbiguousRunId(InvalidSubmission):
    """A short run id (a prefix) starts the ids of several runs the caller may see.

    Attributes:
        candidates: the ids it starts (some of them, when there are many).
    """

    def __init__(self, prefix: str, candidates: list[str]) -> None:
        shown = ", ".join(candidates[:10]) + (", ..." if len(candidates) > 10 else "")
        super().__init__(f"run_id: '{prefix}' is the start of {len(candidates)} runs' ids ({shown}); "
                         "give more digits", "run_id")
        self.candidates = candidates


class RunNotFound(FleetError):
    """No run record with that id (unknown, or expired after its TTL)."""


class Overloaded(FleetError):
    """The fleet refused new work to protect what it already accepted.

    Attributes:
        retry_after_s: when a retry has a fair chance of being admitted.
    """

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class IdempotencyConflict(FleetError):
    """An idempotency key came again with a different submission: the run it names is not
    what this submission asks for."""


class QuotaExceeded(Overloaded):
    """A tenant is over one of its quotas; nothing was queued.

    Attributes:
        quota: the quota's name (``max_active_batch``, ``submissions_per_s``, ...).
    """

    def __init__(self, message: str, retry_after_s: float, quota: str) -> None:
        super().__init__(message, retry_after_s)
        self.quota = quota


class TransientError(FleetError):
    """A step attempt failed for a reason that may pass (model unavailable, timeout)."""


class ReplicaUnavailable(TransientError):
    """A replica of the inference pool cannot be reached (connection refused or lost)."""


class PermanentError(FleetError):
    """A step cannot succeed with this input (invalid argument, unknown tool, bad model output)."""


class DeadlineExceeded(FleetError):
    """The run's deadline has passed; its remaining steps are not executed."""


class BudgetExceeded(FleetError):
    """The run's token or cost budget leaves nothing for its next model call; the message
    names the budget."""


class RunCancelled(FleetError):
    """The run was cancelled while this step waited or ran."""


class HandedBack(FleetError):
    """A batch step ran on a thread borrowed from interactive work, and an interactive step now
    waits for it: its model call was cancelled and the step goes back to its queue."""


# gRPC status codes Triton returns, by what they mean for a retry. Triton's python backend
# maps TritonError codes onto these: UNAVAILABLE -> UNAVAILABLE, INVALID_ARG -> INVALID_ARGUMENT.
_TRANSIENT_CODES = frozenset(
    {"UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED", "INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED"}
)
_PERMANENT_CODES = frozenset(
    {
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "FAILED_PRECONDITION",
        "UNIMPLEMENTED",
        "OUT_OF_RANGE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "ALREADY_EXISTS",
    }
)


def from_triton_status(code: str, message: str) -> FleetError:
    """Map a Triton/gRPC status code name (``"UNAVAILABLE"``, ``"StatusCode.UNAVAILABLE"``) to a fleet error.

    Unknown codes are transient: the attempt limit and the deadline still bound them.
    """
    name = code.rsplit(".", 1)[-1].upper()
    text = f"triton {name}: {message}"
    if name == "CANCELLED":
        return RunCancelled(text)
    if name in _PERMANENT_CODES:
        return PermanentError(text)
    if name in _TRANSIENT_CODES:
        return TransientError(text)
    return TransientError(text)


# Errors inside a gRPC stream (every streaming llm call) arrive as text alone: Triton's
# ModelStreamInferResponse has no status code. Messages that say the request itself is
# wrong are permanent; everything else is transient, bounded by attempts and the deadline.
_PERMANENT_MESSAGE = re.compile(
    r"\binvalid\b|invalid_arg|must be (?:an?|one of|non-negative|positive)|unexpected inference"
    r"|unexpected (?:shape|datatype)|unknown model|is not found|not supported|unsupported",
    re.IGNORECASE,
)


def from_rpc_error(code: str, details: str, *, where: str, budget_s: float, cancelled: bool = False) -> FleetError:
    """Map a failed gRPC call to a Triton replica (``where``) onto a fleet error.

    A call past its deadline is :class:`DeadlineExceeded` (``budget_s`` was its budget); one
    cancelled because its run was cancelled is :class:`RunCancelled`; a replica that cannot be
    reached is :class:`ReplicaUnavailable` (another replica can serve the call); the rest as
    :func:`from_triton_status` says.
    """
    name = code.rsplit(".", 1)[-1].upper()
    if name == "DEADLINE_EXCEEDED":
        return DeadlineExceeded(f"model call exceeded its {budget_s:.1f}s budget")
    if name == "CANCELLED" and cancelled:
        return RunCancelled("run cancelled during generation")
    if name == "UNAVAILABLE":
        return ReplicaUnavailable(f"triton at {where}: {details or name}")
    return from_triton_status(name, details)


def from_triton_message(message: str) -> FleetError:
    """Map an in-band Triton stream error (text without a code) to a fleet error."""
    if _PERMANENT_MESSAGE.search(message):
        return PermanentError(f"triton: {message}")
    return TransientError(f"triton: {message}")


def is_retryable(exc: BaseException) -> bool:
    """Whether a step that raised ``exc`` should be attempted again."""
    if isinstance(exc, TransientError):
        return True
    if isinstance(exc, FleetError):
        return False
    # Losing the connection to Redis or Triton mid-step is worth another attempt.
    return isinstance(exc, (ConnectionError, TimeoutError)) or _is_redis_connection_error(exc)


def _is_redis_connection_error(exc: BaseException) -> bool:
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - redis is a hard dependency
        return False
    return isinstance(exc, (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError))
