"""How a run is kept in Redis: its hash's fields, the compact record of a backlog run, and the
reads that find either. Only this module (and :mod:`fleet.run.state`, which types what it
reads) knows a run hash's fields.

One hash per run (:meth:`fleet.keys.Keys.run`) holds the run's fields, each step's output
(``out:<step key>``) and each step's record (``step:<step key>``: timing, tokens, attempts).
A batch run waiting in the backlog (:mod:`fleet.scheduling.backlog`) has no hash and no events
yet, only a compact record (:func:`compact`, a short JSON list under
:meth:`fleet.keys.Keys.queued_run`); every read here finds it as a run with status ``queued``.
"""

from __future__ import annotations

import json
from typing import Any

from fleet.keys import Keys
from fleet.run.records import RunRecord

#: Fields holding JSON values (the others are text).
JSON_FIELDS = frozenset({"input", "result", "error", "session"})
#: Prefixes of a step's output and record fields.
OUT, STEP = "out:", "step:"
#: Prefixes of a parallel step's count of committed branches, and of a signal's payload.
JOINED, SIGNAL = "joined:", "signal:"
#: Fields a replay clears besides the re-run steps: the previous ending.
ENDING_FIELDS = ("started_at", "finished_at", "error", "result", "dead_letter_id")


def step_field(key: str) -> str:
    """The run hash's field holding a step's record (for scripts that run beside its commit)."""
    return STEP + key


def output_field(key: str) -> str:
    """The run hash's field holding a step's output."""
    return OUT + key


def encode_fields(fields: dict[str, Any]) -> dict[str, str]:
    """Field values as the hash stores them: JSON for the JSON fields and non-text values."""
    return {k: v if isinstance(v, str) and k not in JSON_FIELDS else json.dumps(v) for k, v in fields.items()}


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


def read_commands(pipe: Any, keys: Keys, run_id: str) -> None:
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


def status_commands(pipe: Any, keys: Keys, run_id: str) -> None:
    """Queue the reads of a run's status (see :func:`status_reply`)."""
    pipe.exists(keys.queued_run(run_id))
    pipe.hget(keys.run(run_id), "status")


def status_reply(queued: int, status: str | None) -> str | None:
    """The run's status from :func:`status_commands`' replies (None without a run)."""
    return "queued" if queued else status


#: The fields of a run hash that a listing shows (:class:`fleet.run.records.RunSummary`).
SUMMARY_FIELDS = ("agent", "priority", "tenant", "status", "created_at", "started_at", "finished_at", "error",
                  "batch", "traceparent")


def summary_commands(pipe: Any, keys: Keys, run_id: str) -> None:
    """Queue the read of a run's listed fields (see :func:`summary_reply`)."""
    pipe.hmget(keys.run(run_id), SUMMARY_FIELDS)


def summary_reply(run_id: str, values: list[str | None]) -> dict[str, Any] | None:
    """A run's listed fields from :func:`summary_commands`' reply, or None without a record."""
    raw = dict(zip(SUMMARY_FIELDS, values))
    if raw["status"] is None or raw["agent"] is None:
        return None
    out: dict[str, Any] = {"id": run_id, **{k: v for k, v in raw.items() if v is not None}}
    for name in ("created_at", "started_at", "finished_at"):
        if name in out:
            out[name] = float(out[name])
    if "error" in out:
        out["error"] = json.loads(out["error"])
    return out
