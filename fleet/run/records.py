"""Run records, run state and run events in Redis: the one module that knows a run's fields.

One hash per run (:meth:`fleet.keys.Keys.run`) holds the run's fields, each step's output
(``out:<step key>``) and each step's record (``step:<step key>``: timing, tokens,
attempts). A step key is the step name, with ``#<iteration>`` inside a loop
(:func:`step_key`). Step results are committed by a Lua script that refuses a second commit
of the same step, which is what makes a redelivered step complete once.

Readers get the hash typed: :class:`RunState` (what a step works from: outputs by step and
iteration, ``is_done``, the view its templates render) and :class:`RunRecord` (what clients,
the gateway and the CLI show). Events (status changes, step changes, model tokens) go to a
capped stream per run that :mod:`fleet.run.follow` reads.

A batch run waiting in the backlog (:mod:`fleet.scheduling.backlog`) has no hash and no events yet,
only a compact record (:func:`compact`, a short JSON list under
:meth:`fleet.keys.Keys.queued_run`). Every read here finds it as a run with status
``queued``; dispatching it (:meth:`RunStore.promote`) replaces it with the run hash and the
first event in one atomic step, so a reader sees one or the other, never neither.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

import redis
from pydantic import BaseModel, Field

from fleet.errors import RunNotFound
from fleet.run.sessions import transcript
from fleet.settings import PriorityClass, Settings
from fleet.run.template import as_text
from fleet.tenants import DEFAULT_TENANT

if TYPE_CHECKING:  # pragma: no cover
    from fleet.run.agent import LoopStep

RunStatus = Literal[
    "queued", "running", "succeeded", "failed", "dead_lettered", "cancelled", "expired", "budget_exceeded"
]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "dead_lettered", "cancelled", "expired",
                                      "budget_exceeded"})
EVENTS_MAXLEN = 2000
_JSON_FIELDS = frozenset({"input", "result", "error", "session"})
_OUT, _STEP = "out:", "step:"
# Fields a replay clears besides the re-run steps: the previous ending.
_ENDING_FIELDS = ("started_at", "finished_at", "error", "result", "dead_letter_id")

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
# also sets the record's TTL, drops the run from the active index, from admission's ledger
# of admitted interactive runs (fleet.scheduling.admitted) and from the dispatched backlog runs, and
# gives its tenant's place back (fleet.scheduling.quotas), in the same step.
# KEYS: run hash, events stream, active index, admitted runs, their steps, dispatched backlog
# runs, tenants' active counts.
# ARGV: status, run id, TTL (0: not terminal),
# events maxlen, n = number of field/value pairs, the pairs, then the event's extra pairs.
_TRANSITION = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if TERMINAL[status] then return 0 end
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
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('HDEL', KEYS[5], ARGV[2])
  redis.call('HDEL', KEYS[6], ARGV[2])
  local owner = redis.call('HMGET', KEYS[1], 'tenant', 'priority')
  redis.call('HINCRBY', KEYS[7], (owner[1] or 'default') .. '|' .. (owner[2] or 'batch'), -1)
end
return 1
"""

# Turn a backlog run's compact record into its run hash, once: with its status event, in
# the active index unless the status is terminal (a run cancelled in the backlog), out of the
# dispatching set; a terminal one gives its tenant's place back (fleet.scheduling.quotas). Returns 0 when the
# compact record is gone (dispatched or ended already).
# KEYS: compact record, run hash, events stream, active index, dispatching set, dispatched hash,
# tenants' active counts.
# ARGV: run id, status, TTL, events maxlen, now, n = number of field/value pairs, the pairs,
# then the event's extra pairs.
_PROMOTE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[6])
local fields = {}
for i = 7, 6 + 2 * n do table.insert(fields, ARGV[i]) end
redis.call('HSET', KEYS[2], unpack(fields))
local event = {'type', 'status', 'status', ARGV[2]}
for i = 7 + 2 * n, #ARGV do table.insert(event, ARGV[i]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZREM', KEYS[5], ARGV[1])
if TERMINAL[ARGV[2]] then
  redis.call('HDEL', KEYS[6], ARGV[1])
  local owner = redis.call('HMGET', KEYS[2], 'tenant', 'priority')
  redis.call('HINCRBY', KEYS[7], (owner[1] or 'default') .. '|' .. (owner[2] or 'batch'), -1)
else
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
end
return 1
"""

_LUA_TERMINAL = "local TERMINAL = {" + ", ".join(f"{s} = true" for s in sorted(TERMINAL)) + "}\n"
_TRANSITION = _LUA_TERMINAL + _TRANSITION
_PROMOTE = _LUA_TERMINAL + _PROMOTE

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




def step_key(name: str, iteration: int) -> str:
    """The key of a step's output and record: its name, with ``#<iteration>`` inside a loop."""
    return f"{name}#{iteration}" if iteration else name


def step_field(key: str) -> str:
    """The run hash's field holding a step's record (for scripts that run beside its commit)."""
    return _STEP + key


def parse_step_key(key: str) -> tuple[str, int]:
    """``name#3`` -> ``("name", 3)``; ``name`` -> ``("name", 0)``."""
    name, _, iteration = key.partition("#")
    return name, int(iteration or 0)


class StepRecord(BaseModel):
    """What happened to one step of a run."""

    key: str
    name: str
    iteration: int = 0
    kind: Literal["llm", "tool"] | None = None
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


class RunState:
    """A run as a step works from it: the run hash, typed.

    Attributes:
        fields: the run's own fields, decoded (input, status, deadline_at as a float, ...).
        outputs: step name -> iteration -> output.
        records: step key -> its record.
    """

    def __init__(self, raw: dict[str, str]) -> None:
        fields: dict[str, Any] = {}
        self.outputs: dict[str, dict[int, Any]] = {}
        self.records: dict[str, StepRecord] = {}
        for name, value in raw.items():
            if name.startswith(_OUT):
                step, iteration = parse_step_key(name[len(_OUT):])
                self.outputs.setdefault(step, {})[iteration] = json.loads(value)
            elif name.startswith(_STEP):
                self.records[name[len(_STEP):]] = StepRecord.model_validate_json(value)
            else:
                fields[name] = value
        for name in _JSON_FIELDS:
            if name in fields:
                fields[name] = json.loads(fields[name])
        for name in ("created_at", "deadline_at", "started_at", "finished_at", "budget_cost"):
            if name in fields:
                fields[name] = float(fields[name])
        if "budget_tokens" in fields:
            fields["budget_tokens"] = int(fields["budget_tokens"])
        fields["stream"] = fields.get("stream") == "1"
        self.fields = fields

    # --- the run's own fields ---------------------------------------------------------
    @property
    def id(self) -> str:
        return self.fields["id"]

    @property
    def agent(self) -> str:
        return self.fields["agent"]

    @property
    def priority(self) -> PriorityClass:
        return self.fields["priority"]

    @property
    def status(self) -> str:
        return self.fields["status"]

    @property
    def tenant(self) -> str:
        return self.fields.get("tenant", DEFAULT_TENANT)

    @property
    def deadline_at(self) -> float:
        return self.fields["deadline_at"]

    @property
    def input(self) -> dict[str, Any]:
        return self.fields.get("input", {})

    @property
    def session_id(self) -> str | None:
        return self.fields.get("session_id")

    @property
    def stream(self) -> bool:
        """Whether the run's model tokens are published as events."""
        return self.fields["stream"]

    @property
    def ended(self) -> bool:
        return self.status in TERMINAL

    @property
    def budget_tokens(self) -> int | None:
        return self.fields.get("budget_tokens")

    @property
    def budget_cost(self) -> float | None:
        return self.fields.get("budget_cost")

    @property
    def traceparent(self) -> str | None:
        return self.fields.get("traceparent")

    # --- steps ------------------------------------------------------------------------
    def record(self, key: str) -> StepRecord | None:
        return self.records.get(key)

    def is_done(self, key: str) -> bool:
        """Whether the step's output is committed (done, or skipped)."""
        rec = self.records.get(key)
        return rec is not None and rec.finished

    def output(self, name: str, iteration: int = 0) -> Any:
        """A committed output, or None."""
        return self.outputs.get(name, {}).get(iteration)

    def iterations(self, names: set[str]) -> list[int]:
        """Iterations (above 0) in which any of these steps has a record, ascending."""
        found = {parse_step_key(k)[1] for k in self.records if parse_step_key(k)[0] in names}
        return sorted(i for i in found if i > 0)

    def committed(self, record: StepRecord, output: Any) -> None:
        """Apply a commit of this step to the state in hand."""
        self.records[record.key] = record
        self.outputs.setdefault(record.name, {})[record.iteration] = output

    # --- what templates see -----------------------------------------------------------
    def view(self, iteration: int = 0, loop: "LoopStep | None" = None) -> dict[str, Any]:
        """What a step's templates see: ``input``, ``steps`` (latest outputs up to this
        iteration), ``session`` and, inside a loop, ``loop`` (iteration and transcript)."""
        latest: dict[str, Any] = {}
        for name, by_iteration in self.outputs.items():
            usable = [i for i in by_iteration if iteration == 0 or i <= iteration]
            if usable:
                latest[name] = by_iteration[max(usable)]
        view: dict[str, Any] = {
            "input": self.input,
            "steps": latest,
            "session": {"id": self.session_id or "", "transcript": transcript(self.fields.get("session", []))},
        }
        if loop is not None:
            lines: list[str] = []
            for it in range(1, iteration):
                for body_step in loop.body:
                    label = body_step.transcript_label
                    if label and it in self.outputs.get(body_step.name, {}):
                        lines.append(f"{label}: {as_text(self.outputs[body_step.name][it])}")
            view["loop"] = {"iteration": iteration, "transcript": "\n".join(lines)}
        return view

    def to_record(self) -> RunRecord:
        """The run as clients see it."""
        outputs = {step_key(name, it): value for name, by_it in self.outputs.items() for it, value in by_it.items()}
        steps = sorted(self.records.values(), key=lambda s: (s.started_at or 0.0, s.key))
        return RunRecord(**self.fields, outputs=outputs, steps=steps)


def decode_record(raw: dict[str, str]) -> RunRecord:
    """A run record from its Redis hash, as HGETALL returns it."""
    return RunState(raw).to_record()


# The compact record of a backlog run: these fields' values as one JSON list, in this order,
# trailing nulls left out. No names and no defaults: it is what a queued run costs in Redis.
_COMPACT = ("agent", "tenant", "created_at", "deadline_at", "input", "batch", "idempotency_key",
            "stream", "budget_tokens", "budget_cost", "session_id", "traceparent")


def compact(record: RunRecord) -> str:
    """The compact record of a batch run for the backlog (its session turns are read when
    it is dispatched)."""
    values: list[Any] = [record.agent, record.tenant, round(record.created_at, 3), round(record.deadline_at, 3),
                         record.input, record.batch, record.idempotency_key, 1 if record.stream else 0,
                         record.budget_tokens, record.budget_cost, record.session_id, record.traceparent]
    while values and values[-1] is None:
        values.pop()
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


def from_compact(run_id: str, text: str) -> dict[str, str]:
    """The run hash's fields of a backlog run (status queued) from its compact record."""
    raw = {"id": run_id, "status": "queued", "priority": "batch"}
    for name, value in zip(_COMPACT, json.loads(text)):
        if value is None:
            continue
        if name == "input":
            raw[name] = json.dumps(value)
        elif name == "stream":
            raw[name] = "1" if value else "0"
        elif isinstance(value, float):
            raw[name] = repr(value)
        else:
            raw[name] = str(value)
    return raw


def hash_fields(record: RunRecord) -> dict[str, str]:
    """The run hash's fields of a new run (what :meth:`RunStore.create` stores)."""
    fields = {
        "id": record.id,
        "agent": record.agent,
        "priority": record.priority,
        "tenant": record.tenant,
        "status": record.status,
        "created_at": repr(record.created_at),
        "deadline_at": repr(record.deadline_at),
        "input": json.dumps(record.input),
        "stream": "1" if record.stream else "0",
    }
    if record.idempotency_key:
        fields["idempotency_key"] = record.idempotency_key
    if record.batch:
        fields["batch"] = record.batch
    if record.session_id:
        fields["session_id"] = record.session_id
        fields["session"] = json.dumps(record.session)
    if record.budget_tokens is not None:
        fields["budget_tokens"] = str(record.budget_tokens)
    if record.budget_cost is not None:
        fields["budget_cost"] = repr(record.budget_cost)
    if record.traceparent:
        fields["traceparent"] = record.traceparent
    return fields


def read_commands(pipe: Any, keys: Any, run_id: str) -> None:
    """Queue the reads of a run (compact record first, then hash) on a sync or asyncio pipeline;
    :func:`read_reply` makes their two replies the run's hash fields."""
    pipe.get(keys.queued_run(run_id))
    pipe.hgetall(keys.run(run_id))


def read_reply(run_id: str, queued: str | None, raw: dict[str, str]) -> dict[str, str] | None:
    """The run's hash fields from :func:`read_commands`' replies, or None without a run.

    The compact record is read first: dispatching deletes it and writes the hash in one
    step, so a run that was in the backlog at the first read has its hash at the second."""
    if queued is not None:
        return from_compact(run_id, queued)
    return raw or None


def status_commands(pipe: Any, keys: Any, run_id: str) -> None:
    """Queue the reads of a run's status (see :func:`status_reply`)."""
    pipe.exists(keys.queued_run(run_id))
    pipe.hget(keys.run(run_id), "status")


def status_reply(queued: int, status: str | None) -> str | None:
    """The run's status from :func:`status_commands`' replies (None without a run)."""
    return "queued" if queued else status


def new_run_id() -> str:
    """A fresh run id."""
    return uuid.uuid4().hex


class RunStore:
    """Reads and writes run records and events for one fleet namespace."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = client or settings.redis()
        self._commit = self.redis.register_script(_COMMIT_STEP)
        self._transition = self.redis.register_script(_TRANSITION)
        self._reopen = self.redis.register_script(_REOPEN)
        self._promote = self.redis.register_script(_PROMOTE)

    # --- keys -----------------------------------------------------------------------
    def run_key(self, run_id: str) -> str:
        return self.keys.run(run_id)

    def events_key(self, run_id: str) -> str:
        return self.keys.events(run_id)

    # --- records --------------------------------------------------------------------
    def create(self, record: RunRecord) -> None:
        """Store a new run record (status queued) and its first event."""
        fields = hash_fields(record)
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
        pipe.zadd(self.keys.active_runs, {record.id: record.created_at})
        pipe.execute()

    def delete(self, run_id: str) -> None:
        """Forget a run that was never queued (its publish failed)."""
        self.redis.delete(self.run_key(run_id), self.events_key(run_id))
        self.forget(run_id)

    def touch(self, run_id: str) -> None:
        """The run made progress (or is known to wait in a queue)."""
        self.redis.zadd(self.keys.active_runs, {run_id: time.time()}, xx=True)

    def forget(self, run_id: str) -> None:
        """Drop a run from the index of unfinished runs."""
        self.redis.zrem(self.keys.active_runs, run_id)

    def stalled(self, before: float, limit: int = 1000) -> list[str]:
        """Unfinished runs whose last progress is older than ``before``."""
        return self.redis.zrangebyscore(self.keys.active_runs, "-inf", before, start=0, num=limit)

    def get(self, run_id: str) -> RunRecord:
        """The run's record; :class:`RunNotFound` when there is none."""
        return self.load(run_id).to_record()

    def load(self, run_id: str) -> RunState:
        """The run's state (a backlog run's too); :class:`RunNotFound` when there is none."""
        pipe = self.redis.pipeline(transaction=False)
        read_commands(pipe, self.keys, run_id)
        raw = read_reply(run_id, *pipe.execute())
        if raw is None:
            raise RunNotFound(f"no run '{run_id}'")
        return RunState(raw)

    def get_many(self, run_ids: list[str]) -> list[RunRecord | None]:
        """The records of several runs (None for those without one), one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            read_commands(pipe, self.keys, run_id)
        replies = pipe.execute()
        out: list[RunRecord | None] = []
        for i, run_id in enumerate(run_ids):
            raw = read_reply(run_id, replies[2 * i], replies[2 * i + 1])
            out.append(None if raw is None else decode_record(raw))
        return out

    def status(self, run_id: str) -> str | None:
        """The run's status, or None without a record."""
        return self.statuses([run_id])[0]

    def statuses(self, run_ids: list[str]) -> list[str | None]:
        """The statuses of several runs (None for those without a record), one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            status_commands(pipe, self.keys, run_id)
        replies = pipe.execute()
        return [status_reply(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]

    def exists(self, run_id: str) -> bool:
        return self.status(run_id) is not None

    def tenant(self, run_id: str) -> str | None:
        """The tenant a run belongs to, or None without a record."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.queued_run(run_id))
        pipe.hmget(self.run_key(run_id), ["status", "tenant"])
        queued, (status, tenant) = pipe.execute()
        if queued is not None:
            return from_compact(run_id, queued).get("tenant", DEFAULT_TENANT)
        return None if status is None else tenant or DEFAULT_TENANT

    # --- the backlog ------------------------------------------------------------------
    def queue_compact(self, pipe: Any, record: RunRecord) -> None:
        """Queue the write of a batch run's compact record on ``pipe`` (it joins a backlog
        in the same round trip, see :class:`fleet.scheduling.backlog.Backlog`)."""
        pipe.set(self.keys.queued_run(record.id), compact(record), ex=self.settings.run_ttl_s)

    def compact_records(self, run_ids: list[str]) -> list[RunRecord | None]:
        """The records of backlog runs from their compact records (None where it is gone)."""
        texts = self.redis.mget([self.keys.queued_run(r) for r in run_ids]) if run_ids else []
        return [None if t is None else decode_record(from_compact(r, t)) for r, t in zip(run_ids, texts)]

    def promote(self, records: list[RunRecord], now: float | None = None) -> list[bool]:
        """Make backlog runs full runs, each at its record's status (queued: dispatched, in the
        active index; terminal: ended in the backlog), in one round trip. False for a run
        whose compact record was gone (dispatched or ended already): it is left alone."""
        now = time.time() if now is None else now
        pipe = self.redis.pipeline(transaction=False)
        for record in records:
            fields = hash_fields(record)
            event: list[str] = []
            if record.status in TERMINAL:
                fields["finished_at"] = repr(record.finished_at or now)
                if record.error is not None:
                    fields["error"] = json.dumps(record.error)
                    event = ["error", fields["error"]]
            ttl = self.settings.result_ttl_s if record.status in TERMINAL else self.settings.run_ttl_s
            pairs = [x for kv in fields.items() for x in kv]
            self._promote(
                keys=[self.keys.queued_run(record.id), self.run_key(record.id), self.events_key(record.id),
                      self.keys.active_runs, self.keys.dispatching, self.keys.dispatched,
                      self.keys.tenant_active],
                args=[record.id, record.status, ttl, EVENTS_MAXLEN, now, len(pairs) // 2, *pairs, *event],
                client=pipe,
            )
        return [bool(x) for x in pipe.execute()]

    def _end_queued(self, run_id: str, status: RunStatus, fields: dict[str, Any]) -> bool | None:
        """End a run still in the backlog; None when it is not there (anymore)."""
        [record] = self.compact_records([run_id])
        if record is None:
            return None
        record.status = status
        record.error = fields.get("error")
        if self.promote([record])[0]:
            return True
        return None  # dispatched meanwhile: it ends the usual way

    # --- steps ----------------------------------------------------------------------
    def put_step(self, run_id: str, step: StepRecord) -> None:
        """Record a step's progress (not its output)."""
        pipe = self.redis.pipeline()
        pipe.hset(self.run_key(run_id), _STEP + step.key, step.model_dump_json())
        pipe.zadd(self.keys.active_runs, {run_id: time.time()}, xx=True)
        pipe.execute()

    def start_step(self, run_id: str, step: StepRecord, deliveries_key: str, count: bool = True) -> int:
        """Record a step as running, count this delivery (unless ``count`` is False: the
        same delivery once more), emit the event: one round trip.

        Returns the number of unfinished deliveries of this message, this one included.
        """
        key = self.run_key(run_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.incrby(deliveries_key, 1 if count else 0)
        pipe.expire(deliveries_key, self.settings.run_ttl_s)
        pipe.hsetnx(key, "started_at", repr(step.started_at))
        pipe.hset(key, _STEP + step.key, step.model_dump_json())
        pipe.zadd(self.keys.active_runs, {run_id: time.time()}, xx=True)
        pipe.xadd(self.events_key(run_id), {"type": "step", "step": step.key, "status": "running",
                                            "attempt": str(step.attempts)},
                  maxlen=EVENTS_MAXLEN, approximate=True)
        deliveries, _, first, *_ = pipe.execute()
        if first:
            self.transition(run_id, "running")
        return int(deliveries)

    def finish_step(self, run_id: str, step: StepRecord, output: Any, *extra: tuple[str, tuple]) -> bool:
        """Commit a finished step once (output, record, "done" event) plus ``extra`` commands
        (``(method, args)`` on the same pipeline): one round trip. False if already committed.
        """
        if step.status != "skipped":
            step.status = "done"
        pipe = self.redis.pipeline(transaction=False)
        self._commit(
            keys=[self.run_key(run_id), self.events_key(run_id), self.keys.active_runs],
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
        for _ in range(3):  # a backlog run may be dispatched between the two tries
            moved = self._transition(
                keys=[self.run_key(run_id), self.events_key(run_id), self.keys.active_runs,
                      self.keys.admitted("interactive"), self.keys.admitted_steps("interactive"),
                      self.keys.dispatched, self.keys.tenant_active],
                args=[status, run_id, ttl, EVENTS_MAXLEN, len(pairs) // 2, *pairs, *event],
            )
            if moved != -1:
                return moved == 1
            if status not in TERMINAL:
                break
            ended = self._end_queued(run_id, status, fields)
            if ended is not None:
                return ended
        raise RunNotFound(f"no run '{run_id}'")

    def end(self, run_id: str, status: RunStatus, **fields: Any) -> bool:
        """Move the run to a terminal ``status`` now (``finished_at`` set); True if moved."""
        return self.transition(run_id, status, finished_at=repr(time.time()), **fields)

    def reopen(self, run_id: str, rerun: dict[str, int], fields: dict[str, Any],
               outputs: dict[str, Any] | None = None) -> bool:
        """Put a finished run back to ``queued`` for a replay.

        Clears the outputs and records of the steps in ``rerun`` (step name -> the first
        iteration to clear), the previous ending and the step messages' delivery counts;
        sets ``fields`` and replaces earlier step ``outputs`` (by step name). False when the
        run has not finished: a replay must not race a live run.
        """
        run = self.load(run_id)

        def cleared(name: str, iteration: int) -> bool:
            return name in rerun and iteration >= rerun[name]

        drop = [_OUT + step_key(name, it) for name, by_it in run.outputs.items() for it in by_it if cleared(name, it)]
        drop += [_STEP + key for key in run.records if cleared(*parse_step_key(key))]
        drop += list(_ENDING_FIELDS)
        values = {k: v if isinstance(v, str) and k not in _JSON_FIELDS else json.dumps(v) for k, v in fields.items()}
        values.update({_OUT + name: json.dumps(v) for name, v in (outputs or {}).items()})
        values["status"] = "queued"
        moved = self._reopen(keys=[self.run_key(run_id)],
                             args=[len(drop), *drop, *[x for kv in values.items() for x in kv]])
        if moved == -1:
            raise RunNotFound(f"no run '{run_id}'")
        if moved != 1:
            return False
        pipe = self.redis.pipeline()
        pipe.expire(self.run_key(run_id), self.settings.run_ttl_s)
        pipe.expire(self.events_key(run_id), self.settings.run_ttl_s)
        pipe.zadd(self.keys.active_runs, {run_id: time.time()})
        pipe.hincrby(self.keys.tenant_active, f"{run.tenant}|{run.priority}", 1)  # active again (fleet.scheduling.quotas)
        pipe.execute()
        self._clear_deliveries(run_id)
        self.emit(run_id, {"type": "status", "status": "queued", "replay": "1"})
        return True

    def restore(self, record: RunRecord, outputs: dict[str, Any], done: list[str]) -> None:
        """Make a run whose record expired again (for a replay): its earlier ``outputs`` and
        the ``done`` steps, by step key."""
        self.create(record)
        self.redis.hincrby(self.keys.tenant_active, f"{record.tenant}|{record.priority}", 1)  # (fleet.scheduling.quotas)
        now = time.time()
        fields = {_OUT + key: json.dumps(value) for key, value in outputs.items()}
        for key in done:
            name, iteration = parse_step_key(key)
            fields[_STEP + key] = StepRecord(key=key, name=name, iteration=iteration, status="done",
                                             started_at=now, finished_at=now).model_dump_json()
        if fields:
            self.redis.hset(self.run_key(record.id), mapping=fields)
        self._clear_deliveries(record.id)

    def _clear_deliveries(self, run_id: str) -> None:
        for key in self.redis.scan_iter(self.keys.deliveries_pattern(run_id)):
            self.redis.delete(key)

    # --- events ---------------------------------------------------------------------
    def emit(self, run_id: str, event: dict[str, Any]) -> str:
        """Append an event to the run's stream."""
        return self.redis.xadd(
            self.events_key(run_id),
            {k: v if isinstance(v, str) else json.dumps(v) for k, v in event.items()},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )

    def newest_event_id(self, run_id: str) -> str:
        """The id of the run's newest event ("0" when none): a reader starting after it sees
        only what happens from now on."""
        newest = self.redis.xrevrange(self.events_key(run_id), count=1)
        return newest[0][0] if newest else "0"
