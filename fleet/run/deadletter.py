"""The dead-letter store: a capped Redis Stream of steps that failed for good.

Celery's Redis transport deletes a rejected message, so the fleet keeps its own store.
Each entry holds what an operator needs to understand the failure and replay the run
from the failed step: the run, the agent, the step, the class, the state the step
received, the error with its traceback, attempts, failure times and the worker.
The stream is trimmed to ``FLEET_DEAD_LETTER_MAXLEN`` entries, oldest first.
"""

from __future__ import annotations

import json
from typing import Any

import redis
from pydantic import BaseModel, Field

from fleet.connections import redis_client
from fleet.settings import PriorityClass, Settings
from fleet.tenants import DEFAULT_TENANT


class DeadLetter(BaseModel):
    """One dead-lettered step."""

    id: str = ""
    run_id: str
    agent: str
    step: str
    step_key: str
    iteration: int = 0
    step_index: int
    priority: PriorityClass
    tenant: str = Field(DEFAULT_TENANT, description="The tenant whose run it is.")
    state: dict[str, Any] = Field(description="The run state the step received.")
    error_type: str
    error_message: str
    traceback: str = ""
    attempts: int
    first_failure_at: float
    last_failure_at: float
    worker: str = ""
    replays: list[dict[str, Any]] = Field(default_factory=list)


class DeadLetters:
    """Read and write the dead-letter stream of one fleet namespace."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = client or redis_client(settings)
        self.stream = settings.keys.dead_letters

    def add(self, entry: DeadLetter) -> str:
        """Append an entry; returns its id."""
        fields = entry.model_dump(exclude={"id"})
        encoded = {k: json.dumps(v) for k, v in fields.items()}
        return self.redis.xadd(
            self.stream, encoded, maxlen=self.settings.dead_letter_maxlen, approximate=True
        )

    def get(self, entry_id: str) -> DeadLetter | None:
        """The entry with that id, or None (also for what is not a stream id)."""
        ms, _, seq = entry_id.partition("-")
        if not (ms.isdigit() and (not seq or seq.isdigit()) and int(ms) < 2**64 and int(seq or 0) < 2**64):
            return None
        rows = self.redis.xrange(self.stream, entry_id, entry_id)
        return _decode(*rows[0]) if rows else None

    def list(self, count: int = 100, agent: str | None = None, step: str | None = None,
             tenant: str | None = None) -> list[DeadLetter]:
        """Newest entries first, optionally filtered by agent, step and tenant."""
        out: list[DeadLetter] = []
        upper = "+"
        while len(out) < count:
            rows = self.redis.xrevrange(self.stream, upper, "-", count=500)
            for entry_id, fields in rows:
                entry = _decode(entry_id, fields)
                if ((agent is None or entry.agent == agent) and (step is None or entry.step == step)
                        and (tenant is None or entry.tenant == tenant)):
                    out.append(entry)
                    if len(out) >= count:
                        break
            if len(rows) < 500:
                break
            upper = "(" + rows[-1][0]  # exclusive: continue below the last id read
        return out

    def count(self) -> int:
        return self.redis.xlen(self.stream)

    def delete(self, entry_ids: list[str]) -> int:
        """Remove entries by id; returns how many were there."""
        return self.redis.xdel(self.stream, *entry_ids) if entry_ids else 0


def _decode(entry_id: str, fields: dict[str, str]) -> DeadLetter:
    return DeadLetter(id=entry_id, **{k: json.loads(v) for k, v in fields.items()})
