"""A run and its steps as everyone sees them: the records, their statuses and step keys.

A run's fields live in one Redis hash (written and read by :mod:`fleet.run.store` through
:mod:`fleet.run.codec`); these are the typed records clients, the gateway and the CLI show.
A step key is the step name, with ``#<iteration>`` inside a loop (:func:`step_key`).
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field

from fleet.settings import PriorityClass
from fleet.tenants import DEFAULT_TENANT

RunStatus = Literal[
    "queued", "running", "waiting", "succeeded", "failed", "dead_lettered", "cancelled", "expired", "budget_exceeded"
]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "dead_lettered", "cancelled", "expired",
                                      "budget_exceeded"})


def step_key(name: str, iteration: int) -> str:
    """The key of a step's output and record: its name, with ``#<iteration>`` inside a loop."""
    return f"{name}#{iteration}" if iteration else name


def parse_step_key(key: str) -> tuple[str, int]:
    """``name#3`` -> ``("name", 3)``; ``name`` -> ``("name", 0)``."""
    name, _, iteration = key.partition("#")
    return name, int(iteration or 0)


def new_run_id() -> str:
    """A fresh run id."""
    return uuid.uuid4().hex


class StepRecord(BaseModel):
    """What happened to one step of a run."""

    key: str
    name: str
    iteration: int = 0
    kind: Literal["llm", "tool", "parallel", "wait"] | None = None
    status: Literal["running", "done", "skipped", "failed"] = "running"
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    model_s: float | None = Field(None, description="Duration of the step's model call (time at the model).")
    cost: float = Field(0.0, description="Estimated cost of the step's model call (FLEET_PRICE_*).")
    tokens_in: int = 0
    tokens_out: int = 0
    prompt_bytes: int = Field(0, description="Size of the model call's prompt (budgets estimate prompts by it).")
    worker: str | None = None
    model: str | None = Field(None, description="The model that served the step's model call.")
    fallback: bool = Field(False, description="Whether the model call ran on the step's fallback model.")
    replica: str | None = None  # the Triton replica of its model call
    preemptions: int = 0  # times an interactive request took its model call's slot
    failovers: int = 0  # times its model call lost its replica and was sent again
    error: str | None = None

    @property
    def finished(self) -> bool:
        """Committed: done, or skipped (a loop step after the final answer)."""
        return self.status in ("done", "skipped")



class RunRecord(BaseModel):
    """A run as clients see it."""

    id: str
    agent: str
    priority: PriorityClass
    tenant: str = Field(DEFAULT_TENANT, description="The tenant that submitted it.")
    status: RunStatus
    created_at: float
    deadline_at: float
    input: dict[str, Any]
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    idempotency_key: str | None = None
    batch: str | None = Field(None, description="The batch job that submitted it, if any.")
    session_id: str | None = None
    session: list[dict[str, Any]] = Field(default_factory=list, description="Turns seen by this run.")
    stream: bool = False
    dead_letter_id: str | None = None
    budget_tokens: int | None = Field(None, description="Most tokens (in + out) the run's model calls may use.")
    budget_cost: float | None = Field(None, description="Most estimated cost the run's model calls may use.")
    traceparent: str | None = Field(None, description="The run's root span (W3C traceparent), when traced.")
    waiting_for: str | None = Field(None, description="The signal a waiting run is parked on.")
    wait_until: float | None = Field(None, description="When a waiting run's wait times out.")
    outputs: dict[str, Any] = Field(default_factory=dict)
    steps: list[StepRecord] = Field(default_factory=list)

    @property
    def latency_s(self) -> float | None:
        """Submission to finish, once finished."""
        return None if self.finished_at is None else self.finished_at - self.created_at

    @property
    def tokens_in(self) -> int:
        return sum(s.tokens_in for s in self.steps)

    @property
    def tokens_out(self) -> int:
        return sum(s.tokens_out for s in self.steps)

    @property
    def cost(self) -> float:
        """Estimated cost of the run's model calls."""
        return sum(s.cost for s in self.steps)

    @property
    def trace_id(self) -> str | None:
        """The id of the run's trace, when it was traced."""
        parts = (self.traceparent or "").split("-")
        return parts[1] if len(parts) == 4 else None


class RunSummary(BaseModel):
    """A run as a listing shows it (``fleet runs list``, ``GET /v1/runs``, the console): its
    own fields, without its input, outputs and steps."""

    id: str
    agent: str
    priority: PriorityClass
    tenant: str = DEFAULT_TENANT
    status: RunStatus
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, Any] | None = None
    batch: str | None = None
    traceparent: str | None = None

    @property
    def latency_s(self) -> float | None:
        """Submission to finish, once finished."""
        return None if self.finished_at is None else self.finished_at - self.created_at

    @property
    def trace_id(self) -> str | None:
        parts = (self.traceparent or "").split("-")
        return parts[1] if len(parts) == 4 else None

    @property
    def error_text(self) -> str:
        """``<type>: <message>`` of its error ('' without one)."""
        if not self.error:
            return ""
        return f"{self.error.get('type', '')}: {self.error.get('message', '')}"
