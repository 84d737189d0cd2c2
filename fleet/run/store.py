"""The run store: run records, step commits and run events in Redis, for one fleet namespace.

Step results are committed by a Lua script that refuses a second commit of the same step
(``commit_step-3.lua``), which is what makes a redelivered step complete once. A run moves
between statuses by another (``transition-7.lua``): a terminal status ends the run once, and in
the same step drops it from every index of unfinished work and gives its tenant's place back.
Every one of these writes keeps the runs index (:mod:`fleet.run.index`) in step.
Events (status changes, step changes, model tokens) go to a capped stream per run that
:mod:`fleet.run.follow` reads.

Dispatching a backlog run (:meth:`RunStore.promote`) replaces its compact record with the run
hash and the first event in one atomic step, so a reader sees one or the other, never neither.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fleet.connections import redis_client
from fleet.core import lua
from fleet.core.replication import ReplicaWait
from fleet.errors import AmbiguousRunId, InvalidSubmission, RunNotFound
from fleet.keys import active_field
from fleet.run.codec import (
    ENDING_FIELDS,
    JSON_FIELDS,
    OUT,
    STEP,
    compact,
    encode_fields,
    from_compact,
    hash_fields,
    read_commands,
    read_reply,
    status_commands,
    status_reply,
)
from fleet.run.index import MIN_PREFIX, RUN_REF_PATTERN, RunIndex, is_run_id
from fleet.run.records import TERMINAL, RunRecord, RunStatus, StepRecord, parse_step_key, step_key
from fleet.run.state import RunState, decode_record
from fleet.settings import Settings
from fleet.tenants import DEFAULT_TENANT

EVENTS_MAXLEN = 2000
#: A command that queues itself on a pipeline (a step's commit carries its hooks' commands).
PipeCommand = Callable[[Any], Any]

_TERMINAL_TABLE = "local TERMINAL = {" + ", ".join(f"{s} = true" for s in sorted(TERMINAL)) + "}\n"
_COMMIT_STEP = lua.load(__file__, "commit_step-3.lua")
_TRANSITION = lua.load(__file__, "transition-7.lua", prelude=_TERMINAL_TABLE)
_PROMOTE = lua.load(__file__, "promote-8.lua", prelude=_TERMINAL_TABLE)
_REOPEN = lua.load(__file__, "reopen-1.lua")
_PARK = lua.load(__file__, "park-7.lua", prelude=_TERMINAL_TABLE)
_RESUME = lua.load(__file__, "resume-4.lua", prelude=_TERMINAL_TABLE)
_REF = re.compile(RUN_REF_PATTERN)


@dataclass(frozen=True)
class Join:
    """What the commit of a parallel step's branch needs to join them: the step, its number of
    branches and, for fixed branches, their names (the keys of its output)."""

    step: str
    total: int
    names: list[str] | None = None
    started_at: float | None = None  # when its first branch started


class RunStore:
    """Reads and writes run records and events for one fleet namespace."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = client or redis_client(settings)
        self.index = RunIndex(settings, self.redis)
        self.wait = ReplicaWait.from_settings(settings)

    def epoch(self) -> tuple[str, int] | None:
        """The primary this store writes to now: taken before writes that :meth:`replicated`
        then confirms."""
        return self.wait.epoch(self.redis)

    def replicated(self, what: str, since: tuple[str, int] | None = None) -> bool:
        """Wait until the replicas hold everything written before now (see
        :mod:`fleet.core.replication`): before the fleet acts on a write that must survive a
        failover. Whether they do (a shortfall is logged, and the fleet goes on).

        Raises:
            PrimaryChanged: the primary is no longer ``since`` (:meth:`epoch`, taken before the
                writes): they may be lost.
        """
        return self.wait.confirm(self.redis, what, since)

    # --- keys -----------------------------------------------------------------------
    def run_key(self, run_id: str) -> str:
        return self.keys.run(run_id)

    def events_key(self, run_id: str) -> str:
        return self.keys.events(run_id)

    # --- records --------------------------------------------------------------------
    def create(self, record: RunRecord, *extra: PipeCommand) -> None:
        """Store a new run record (status queued), its first event and its entries in the runs
        index, with ``extra`` commands (each queues itself on the same transaction)."""
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
        self.index.add_commands(pipe, record)
        for command in extra:
            command(pipe)
        pipe.execute()

    def delete(self, run_id: str) -> None:
        """Forget a run that was never queued (its publish failed), and its index entries."""
        tenant, priority, agent = self.redis.hmget(self.run_key(run_id), ["tenant", "priority", "agent"])
        pipe = self.redis.pipeline()
        pipe.delete(self.run_key(run_id), self.events_key(run_id))
        pipe.zrem(self.keys.active_runs, run_id)
        if agent is not None:
            self.index.remove_commands(pipe, run_id, tenant or DEFAULT_TENANT, priority or "batch", agent)
        pipe.execute()

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

    def resolve(self, ref: str, sees: Callable[[str], bool]) -> str:
        """The id of the run ``ref`` names: a full id as it is, or a prefix of at least
        :data:`~fleet.run.index.MIN_PREFIX` hex digits that starts the id of exactly one indexed
        run that ``sees`` (the caller's test of a tenant) lets the caller see; other tenants'
        runs are not candidates.

        Raises:
            InvalidSubmission: ``ref`` is not hex, or too short.
            AmbiguousRunId: several such runs (listed).
            RunNotFound: none.
        """
        if is_run_id(ref):
            return ref
        if not _REF.match(ref):
            raise InvalidSubmission(
                f"run_id: '{ref[:40]}' is neither a run id (32 hex digits) nor the start of one "
                f"({MIN_PREFIX} hex digits or more)", "run_id")
        ids = self.index.matches(ref)
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.hmget(self.run_key(run_id), ["status", "tenant"])
        seen = [run_id for run_id, (status, tenant) in zip(ids, pipe.execute() if ids else [])
                if status is not None and sees(tenant or DEFAULT_TENANT)]
        if not seen:
            raise RunNotFound(f"no run '{ref}'")
        if len(seen) > 1:
            raise AmbiguousRunId(ref, seen)
        return seen[0]

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
            _PROMOTE(
                pipe, keys=[self.keys.queued_run(record.id), self.run_key(record.id), self.events_key(record.id),
                      self.keys.active_runs, self.keys.dispatching, self.keys.dispatched,
                      self.keys.tenant_active, self.keys.backlog_runs],
                args=[record.id, record.status, ttl, EVENTS_MAXLEN, now, self.keys.runs_index_base, len(pairs) // 2,
                      *pairs, *event],
            )
        # Their chains are sent next: the records must be on a replica first, or a publish that
        # retries its way to a promoted replica would name runs that are not there.
        return [bool(x) for x in lua.execute(pipe, wait=self.wait, what=f"{len(records)} dispatched runs")]

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
        pipe.hset(self.run_key(run_id), STEP + step.key, step.model_dump_json())
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
        pipe.hset(key, STEP + step.key, step.model_dump_json())
        pipe.zadd(self.keys.active_runs, {run_id: time.time()}, xx=True)
        pipe.xadd(self.events_key(run_id), {"type": "step", "step": step.key, "status": "running",
                                            "attempt": str(step.attempts)},
                  maxlen=EVENTS_MAXLEN, approximate=True)
        deliveries, _, first, *_ = pipe.execute()
        if first:
            self.transition(run_id, "running")
        return int(deliveries)

    def finish_step(self, run_id: str, step: StepRecord, output: Any, *extra: PipeCommand,
                    join: Join | None = None) -> int:
        """Commit a finished step once (output, record, "done" event) plus ``extra`` commands
        (each queues itself on the same pipeline): one round trip. 0 if already committed;
        for a branch of a parallel step (``join``), the number of its branches committed, this
        one included (the one that completes them writes the join, see ``commit_step-3.lua``).
        """
        if step.status != "skipped":
            step.status = "done"
        pipe = self.redis.pipeline(transaction=False)
        branch: list[Any] = []
        if join is not None:
            now = time.time()
            record = StepRecord(key=join.step, name=join.step, kind="parallel", status="done", finished_at=now,
                                started_at=join.started_at,
                                duration_s=now - join.started_at if join.started_at is not None else None)
            branch = [join.step, join.total, record.model_dump_json(), ",".join(join.names or [])]
        _COMMIT_STEP(
            pipe, keys=[self.run_key(run_id), self.events_key(run_id), self.keys.active_runs],
            args=[step.key, json.dumps(output), step.model_dump_json(), f"{step.duration_s or 0:.4f}",
                  EVENTS_MAXLEN, time.time(), run_id, *branch],
        )
        for command in extra:
            command(pipe)
        # The next step is published once this returns: the commit must be on a replica first.
        done = lua.execute(pipe, wait=self.wait, what=f"run {run_id}: step {step.key}'s commit")[0]
        if done == -1:
            raise RunNotFound(f"no run '{run_id}'")
        return int(done)

    # --- waits ----------------------------------------------------------------------
    def _wait_keys(self, run_id: str) -> list[str]:
        return [self.run_key(run_id), self.events_key(run_id), self.keys.active_runs, self.keys.waits]

    def park(self, run_id: str, step: StepRecord, signal: str, timeout_at: float) -> int:
        """Park the run at a wait step until ``signal`` or ``timeout_at`` (``park-7.lua``): 1 when
        parked, 2 when the step committed at once (the signal came first), 0 when the run ended."""
        parked = step.model_copy(update={"status": "running"})
        step.status, step.finished_at, step.duration_s = "done", step.started_at, 0.0
        done = _PARK(self.redis, keys=[*self._wait_keys(run_id), self.keys.admitted("interactive"),
                                       self.keys.admitted_steps("interactive"), self.keys.dispatched],
                     args=[step.key, signal, repr(timeout_at), run_id, EVENTS_MAXLEN, step.model_dump_json(),
                           self.keys.runs_index_base, parked.model_dump_json()])
        if done == -1:
            raise RunNotFound(f"no run '{run_id}'")
        return int(done)

    def signal(self, run_id: str, name: str, payload: Any) -> int:
        """Deliver a signal (``resume-4.lua``): 1 when the run resumed (its next step is to be
        sent), 0 when the signal is kept for a wait to come, -2 when the run ended."""
        return self._resume(run_id, name, payload)

    def time_out(self, run_id: str) -> int:
        """Time out a run's due wait: 1 when it resumed with ``{"timed_out": true}``."""
        return self._resume(run_id, "", None)

    def _resume(self, run_id: str, name: str, payload: Any) -> int:
        now = time.time()
        record = StepRecord(key="", name="", kind="wait", status="done", finished_at=now)
        raw = self.redis.hget(self.run_key(run_id), "waiting_step")
        if raw:
            parked = self.redis.hget(self.run_key(run_id), STEP + raw)
            if parked:  # the record the wait started with: it says since when
                record = StepRecord.model_validate_json(parked)
                record.status, record.finished_at = "done", now
                record.duration_s = now - record.started_at if record.started_at is not None else None
            record.key = record.name = raw
        done = _RESUME(self.redis, keys=self._wait_keys(run_id),
                       args=[name, json.dumps(payload), run_id, EVENTS_MAXLEN, record.model_dump_json(),
                             self.keys.runs_index_base, repr(now)])
        if done == -1:
            raise RunNotFound(f"no run '{run_id}'")
        return int(done)

    def due_waits(self, now: float, limit: int = 1000) -> list[str]:
        """Parked runs whose wait timed out by ``now``."""
        return self.redis.zrangebyscore(self.keys.waits, "-inf", now, start=0, num=limit)

    def parked(self) -> int:
        """How many runs are parked."""
        return int(self.redis.zcard(self.keys.waits))

    # --- status ---------------------------------------------------------------------
    def transition(self, run_id: str, status: RunStatus, **fields: Any) -> bool:
        """Move the run to ``status`` unless it already ended; emit the event. True if moved.

        A finished run is kept for ``result_ttl_s``, then Redis forgets it.
        """
        pairs: list[str] = []
        for name, value in fields.items():
            raw = name not in JSON_FIELDS and isinstance(value, str)
            pairs += [name, value if raw else json.dumps(value)]
        event = ["error", json.dumps(fields["error"])] if "error" in fields else []
        ttl = self.settings.result_ttl_s if status in TERMINAL else 0
        for _ in range(3):  # a backlog run may be dispatched between the two tries
            moved = _TRANSITION(
                self.redis,
                keys=[self.run_key(run_id), self.events_key(run_id), self.keys.active_runs,
                      self.keys.admitted("interactive"), self.keys.admitted_steps("interactive"),
                      self.keys.dispatched, self.keys.tenant_active],
                args=[status, run_id, ttl, EVENTS_MAXLEN, self.keys.runs_index_base, len(pairs) // 2, *pairs,
                      *event],
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

        drop = [OUT + step_key(name, it) for name, by_it in run.outputs.items() for it in by_it if cleared(name, it)]
        drop += [STEP + key for key in run.records if cleared(*parse_step_key(key))]
        drop += list(ENDING_FIELDS)
        values = encode_fields(fields)
        values.update({OUT + name: json.dumps(v) for name, v in (outputs or {}).items()})
        values["status"] = "queued"
        moved = _REOPEN(self.redis, keys=[self.run_key(run_id)],
                        args=[self.keys.runs_index_base, run_id, len(drop), *drop,
                              *[x for kv in values.items() for x in kv]])
        if moved == -1:
            raise RunNotFound(f"no run '{run_id}'")
        if moved != 1:
            return False
        pipe = self.redis.pipeline()
        pipe.expire(self.run_key(run_id), self.settings.run_ttl_s)
        pipe.expire(self.events_key(run_id), self.settings.run_ttl_s)
        pipe.zadd(self.keys.active_runs, {run_id: time.time()})
        pipe.hincrby(self.keys.tenant_active, active_field(run.tenant, run.priority), 1)  # active again
        pipe.execute()
        self._clear_deliveries(run_id)
        self.emit(run_id, {"type": "status", "status": "queued", "replay": "1"})
        return True

    def restore(self, record: RunRecord, outputs: dict[str, Any], done: list[str]) -> None:
        """Make a run whose record expired again (for a replay): its earlier ``outputs`` and
        the ``done`` steps, by step key."""
        # Entries the expired record left in the index (not trimmed yet) would name an old status.
        pipe = self.redis.pipeline()
        self.index.remove_commands(pipe, record.id, record.tenant, record.priority, record.agent)
        pipe.execute()
        self.create(record)
        self.redis.hincrby(self.keys.tenant_active, active_field(record.tenant, record.priority), 1)
        now = time.time()
        fields = {OUT + key: json.dumps(value) for key, value in outputs.items()}
        for key in done:
            name, iteration = parse_step_key(key)
            fields[STEP + key] = StepRecord(key=key, name=name, iteration=iteration, status="done",
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
