"""Run records and run events in Redis.

One hash per run (``<prefix>:run:<id>``) holds the run's fields, each step's output
(``out:<step key>``) and each step's record (``step:<step key>``: timing, tokens,
attempts). A step key is the step name, with ``#<iteration>`` inside a loop. Step results
are committed by a Lua script that refuses a second commit of the same step, which is what
makes a redelivered step complete once.

Events (status changes, step changes, model tokens) go to a capped stream per run
(``<prefix>:run:<id>:events``) that waiters and streaming clients read.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

import redis
from pydantic import BaseModel, Field

from fleet.errors import RunNotFound
from fleet.settings import PriorityClass, Settings

RunStatus = Literal[
    "queued", "running", "succeeded", "failed", "dead_lettered", "cancelled", "expired"
]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "dead_lettered", "cancelled", "expired"})
EVENTS_MAXLEN = 2000
_JSON_FIELDS = frozenset({"input", "result", "error", "session"})

# Commit a step once, with its "done" event. KEYS: run hash, events stream, active index.
# ARGV: step key, output JSON, step record JSON, duration, events maxlen, now, run id.
# Returns 1 when committed, 0 when the step was already committed, -1 without a run.
_COMMIT_STEP = """
local rec = redis.call('HGET', KEYS[1], 'step:' .. ARGV[1])
if rec then
  local st = cjson.decode(rec)['status']
  if st == 'done' or st == 'skipped' then return 0 end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'out:' .. ARGV[1], ARGV[2], 'step:' .. ARGV[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
           'type', 'step', 'step', ARGV[1], 'status', 'done', 'duration_s', ARGV[4])
redis.call('ZADD', KEYS[3], 'XX', ARGV[6], ARGV[7])
return 1
"""

# Move a run to a status unless it already ended, with its status event; a terminal status
# also sets the record's TTL and drops the run from the active index.
# KEYS: run hash, events stream, active index. ARGV: status, run id, TTL (0: not terminal),
# events maxlen, n = number of field/value pairs, the pairs, then the event's extra pairs.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'succeeded' or status == 'failed' or status == 'dead_lettered'
   or status == 'cancelled' or status == 'expired' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
local n = tonumber(ARGV[5])
for i = 6, 5 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local event = {'type', 'status', 'status', ARGV[1]}
for i = 6 + 2 * n, #ARGV do table.insert(event, ARGV[i]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('ZREM', KEYS[3], ARGV[2])
end
return 1
"""

# Reopen a finished run for a replay. KEYS[1] run hash; ARGV[1] = number of fields to
# delete, then those fields, then field/value pairs to set. Returns 0 if it had not ended.
_REOPEN = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'queued' or status == 'running' then return 0 end
local n = tonumber(ARGV[1])
for i = 2, n + 1 do redis.call('HDEL', KEYS[1], ARGV[i]) end
for i = n + 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


class StepRecord(BaseModel):
    """What happened to one step of a run."""

    key: str
    name: str
    iteration: int = 0
    status: Literal["running", "done", "skipped", "failed"] = "running"
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    duration_s: float | None = None
    queue_wait_s: float | None = None
    ttft_s: float | None = None
    tokens_in: int = 0
    tokens_out: int = 0
    worker: str | None = None
    error: str | None = None


class RunRecord(BaseModel):
    """A run as stored in Redis."""

    id: str
    agent: str
    priority: PriorityClass
    status: RunStatus
    created_at: float
    deadline_at: float
    input: dict[str, Any]
    started_at: float | None = None
    finished_at: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    idempotency_key: str | None = None
    session_id: str | None = None
    session: list[dict[str, Any]] = Field(default_factory=list, description="Turns seen by this run.")
    stream: bool = False
    dead_letter_id: str | None = None
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


def new_run_id() -> str:
    """A fresh run id."""
    return uuid.uuid4().hex


class RunStore:
    """Reads and writes run records and events for one fleet namespace."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.redis = client or settings.redis()
        self._commit = self.redis.register_script(_COMMIT_STEP)
        self._transition = self.redis.register_script(_TRANSITION)
        self._reopen = self.redis.register_script(_REOPEN)

    # --- keys -----------------------------------------------------------------------
    def run_key(self, run_id: str) -> str:
        return self.settings.key("run", run_id)

    @property
    def active_key(self) -> str:
        """Unfinished runs, scored by the time of their last progress (see fleet.reconcile)."""
        return self.settings.key("runs", "active")

    def events_key(self, run_id: str) -> str:
        return self.settings.key("run", run_id, "events")

    # --- records --------------------------------------------------------------------
    def create(self, record: RunRecord) -> None:
        """Store a new run record (status queued) and its first event."""
        fields = {
            "id": record.id,
            "agent": record.agent,
            "priority": record.priority,
            "status": record.status,
            "created_at": repr(record.created_at),
            "deadline_at": repr(record.deadline_at),
            "input": json.dumps(record.input),
            "stream": "1" if record.stream else "0",
        }
        if record.idempotency_key:
            fields["idempotency_key"] = record.idempotency_key
        if record.session_id:
            fields["session_id"] = record.session_id
            fields["session"] = json.dumps(record.session)
        key = self.run_key(record.id)
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.settings.run_ttl_s)
        pipe.xadd(
            self.events_key(record.id),
            {"type": "status", "status": record.status},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )
        pipe.expire(self.events_key(record.id), self.settings.run_ttl_s)
        pipe.zadd(self.active_key, {record.id: record.created_at})
        pipe.execute()

    def touch(self, run_id: str) -> None:
        """The run made progress (or is known to wait in a queue)."""
        self.redis.zadd(self.active_key, {run_id: time.time()}, xx=True)

    def forget(self, run_id: str) -> None:
        """Drop a run from the index of unfinished runs."""
        self.redis.zrem(self.active_key, run_id)

    def stalled(self, before: float, limit: int = 1000) -> list[str]:
        """Unfinished runs whose last progress is older than ``before``."""
        return self.redis.zrangebyscore(self.active_key, "-inf", before, start=0, num=limit)

    def get(self, run_id: str) -> RunRecord:
        """The run's record; :class:`RunNotFound` when there is none."""
        raw = self.redis.hgetall(self.run_key(run_id))
        if not raw:
            raise RunNotFound(f"no run '{run_id}'")
        return decode_record(raw)

    def raw_state(self, run_id: str) -> dict[str, str]:
        """The run hash as stored: what a step reads before it works."""
        raw = self.redis.hgetall(self.run_key(run_id))
        if not raw:
            raise RunNotFound(f"no run '{run_id}'")
        return raw

    def exists(self, run_id: str) -> bool:
        return bool(self.redis.exists(self.run_key(run_id)))

    # --- steps ----------------------------------------------------------------------
    def put_step(self, run_id: str, step: StepRecord) -> None:
        """Record a step's progress (not its output)."""
        pipe = self.redis.pipeline()
        pipe.hset(self.run_key(run_id), f"step:{step.key}", step.model_dump_json())
        pipe.zadd(self.active_key, {run_id: time.time()}, xx=True)
        pipe.execute()

    def start_step(self, run_id: str, step: StepRecord, delivery_key: str) -> tuple[int, bool]:
        """Record a step as running, count this delivery, emit the event: one round trip.

        Returns the number of unfinished deliveries of this message (this one included)
        and whether this is the run's first step to start.
        """
        key = self.run_key(run_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.incr(delivery_key)
        pipe.expire(delivery_key, self.settings.run_ttl_s)
        pipe.hsetnx(key, "started_at", repr(step.started_at))
        pipe.hset(key, f"step:{step.key}", step.model_dump_json())
        pipe.zadd(self.active_key, {run_id: time.time()}, xx=True)
        pipe.xadd(self.events_key(run_id), {"type": "step", "step": step.key, "status": "running",
                                            "attempt": str(step.attempts)},
                  maxlen=EVENTS_MAXLEN, approximate=True)
        deliveries, _, first, *_ = pipe.execute()
        if first:
            self.transition(run_id, "running")
        return int(deliveries), bool(first)

    def finish_step(self, run_id: str, step: StepRecord, output: Any, *extra: tuple[str, tuple]) -> bool:
        """Commit a finished step once (output, record, "done" event) plus ``extra`` commands
        (``(method, args)`` on the same pipeline): one round trip. False if already committed.
        """
        if step.status != "skipped":
            step.status = "done"
        pipe = self.redis.pipeline(transaction=False)
        self._commit(
            keys=[self.run_key(run_id), self.events_key(run_id), self.active_key],
            args=[step.key, json.dumps(output), step.model_dump_json(), f"{step.duration_s or 0:.4f}",
                  EVENTS_MAXLEN, time.time(), run_id],
            client=pipe,
        )
        for method, args in extra:
            getattr(pipe, method)(*args)
        done = pipe.execute()[0]
        if done == -1:
            raise RunNotFound(f"no run '{run_id}'")
        return bool(done)

    # --- status ---------------------------------------------------------------------
    def transition(self, run_id: str, status: RunStatus, **fields: Any) -> bool:
        """Move the run to ``status`` unless it already ended; emit the event. True if moved.

        A finished run is kept for ``result_ttl_s``, then Redis forgets it.
        """
        pairs: list[str] = []
        for name, value in fields.items():
            raw = name not in _JSON_FIELDS and isinstance(value, str)
            pairs += [name, value if raw else json.dumps(value)]
        event = ["error", json.dumps(fields["error"])] if "error" in fields else []
        ttl = self.settings.result_ttl_s if status in TERMINAL else 0
        moved = self._transition(
            keys=[self.run_key(run_id), self.events_key(run_id), self.active_key],
            args=[status, run_id, ttl, EVENTS_MAXLEN, len(pairs) // 2, *pairs, *event],
        )
        if moved == -1:
            raise RunNotFound(f"no run '{run_id}'")
        return moved == 1

    def reopen(self, run_id: str, drop: list[str], fields: dict[str, str]) -> bool:
        """Put a finished run back to ``queued`` (for a replay): delete ``drop``, set ``fields``.

        False when the run has not finished (a replay must not race a live run).
        """
        moved = self._reopen(keys=[self.run_key(run_id)],
                             args=[len(drop), *drop, *[x for kv in fields.items() for x in kv]])
        if moved == -1:
            raise RunNotFound(f"no run '{run_id}'")
        if moved != 1:
            return False
        pipe = self.redis.pipeline()
        pipe.expire(self.run_key(run_id), self.settings.run_ttl_s)
        pipe.expire(self.events_key(run_id), self.settings.run_ttl_s)
        pipe.zadd(self.active_key, {run_id: time.time()})
        pipe.execute()
        self.emit(run_id, {"type": "status", "status": "queued", "replay": "1"})
        return True

    # --- events ---------------------------------------------------------------------
    def emit(self, run_id: str, event: dict[str, Any]) -> str:
        """Append an event to the run's stream."""
        return self.redis.xadd(
            self.events_key(run_id),
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in event.items()},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )

    def events(
        self, run_id: str, after: str = "0", timeout_s: float | None = None
    ) -> Iterator[tuple[str, dict[str, str]]]:
        """Events of a run from ``after`` on, blocking for new ones until the run ends.

        Stops after the terminal status event, or when ``timeout_s`` passes with nothing new.
        """
        key = self.events_key(run_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = after
        while True:
            block_ms = 1000
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                block_ms = max(1, min(block_ms, int(left * 1000)))
            batch = self.redis.xread({key: last}, block=block_ms, count=500)
            if not batch:
                if not self.redis.exists(self.run_key(run_id)):
                    raise RunNotFound(f"no run '{run_id}'")
                continue
            for event_id, fields in batch[0][1]:
                last = event_id
                yield event_id, fields
                if fields.get("type") == "status" and fields.get("status") in TERMINAL:
                    # A replay reopens a finished run: history may hold an earlier end.
                    if self.redis.hget(self.run_key(run_id), "status") in TERMINAL:
                        return

    def wait(self, run_id: str, timeout_s: float) -> RunRecord:
        """Block until the run ends or ``timeout_s`` passes; return the record either way."""
        newest = self.redis.xrevrange(self.events_key(run_id), count=1)
        record = self.get(run_id)
        if record.status in TERMINAL:
            return record
        # Only events after the newest one seen before reading the record can end the wait.
        for _ in self.events(run_id, after=newest[0][0] if newest else "0", timeout_s=timeout_s):
            pass
        return self.get(run_id)


def decode_record(raw: dict[str, str]) -> RunRecord:
    """A run record from its Redis hash, as HGETALL returns it."""
    outputs: dict[str, Any] = {}
    steps: list[StepRecord] = []
    fields: dict[str, Any] = {}
    for name, value in raw.items():
        if name.startswith("out:"):
            outputs[name[4:]] = json.loads(value)
        elif name.startswith("step:"):
            steps.append(StepRecord.model_validate_json(value))
        else:
            fields[name] = value
    steps.sort(key=lambda s: (s.started_at or 0.0, s.key))
    for name in ("input", "result", "error", "session"):
        if name in fields:
            fields[name] = json.loads(fields[name])
    fields["stream"] = fields.get("stream") == "1"
    return RunRecord(**fields, outputs=outputs, steps=steps)
