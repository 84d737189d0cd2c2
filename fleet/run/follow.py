"""Following runs' events until they end: one rule for every reader.

The sync client (``FleetClient.events`` and ``wait``) and the asyncio client (and through it
the gateway's server-sent events) follow runs with :class:`Follow`. (A batch job of thousands
of runs reads their statuses in pipelined chunks instead, :mod:`fleet.surfaces.batch`: one
stream per run would cost a read per run.) The rule, for any number of runs on one connection:

- each run's events are read after its cursor (``XREAD``, blocking up to a second; the
  first read after a run is added does not block);
- a terminal status event ends a run only if the run's status is still terminal when read:
  a replay reopens a finished run, so its history may hold an earlier end;
- when nothing arrives (and every ``sweep_s`` in any case) each run's status is read: a run
  without a record is gone (a batch run still in the backlog has no events yet, but its
  compact record says ``queued``), and a run whose status is terminal has its last events drained
  without blocking and ends. A reader resuming after the end, or one whose stream was
  trimmed or expired under it, would otherwise wait forever.

:class:`Follow` does no I/O: its generators yield the Redis operations they need
(:class:`Read`, :class:`Statuses`) and what they find (:class:`Event`, :class:`Ended`,
:class:`Gone`); :func:`drive` and :func:`adrive` run them on a sync or asyncio client.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio as aioredis

from fleet.keys import Keys
from fleet.run.codec import status_commands, status_reply
from fleet.run.records import TERMINAL

_BLOCK_MS = 1000
_COUNT = 500


@dataclass(frozen=True)
class Read:
    """Operation: ``XREAD`` these streams after these ids (``block_ms`` None: do not block)."""

    streams: dict[str, str]
    block_ms: int | None


@dataclass(frozen=True)
class Statuses:
    """Operation: the current status of these runs (None without a record)."""

    run_ids: list[str]


@dataclass(frozen=True)
class Event:
    """Found: one event of a run."""

    run_id: str
    event_id: str
    fields: dict[str, str]


@dataclass(frozen=True)
class Ended:
    """Found: the run ended (every event up to its end was found before)."""

    run_id: str


@dataclass(frozen=True)
class Gone:
    """Found: the run has no record (unknown id, or its record expired)."""

    run_id: str


Found = Event | Ended | Gone
Protocol = Generator[Read | Statuses | Found, Any, None]


def is_end(fields: dict[str, str]) -> bool:
    """Whether an event is a terminal status event (an end, if the status still says so)."""
    return fields.get("type") == "status" and fields.get("status") in TERMINAL


class Follow:
    """Follows the events of a set of runs (see the module docstring)."""

    def __init__(self, keys: Keys, sweep_s: float = 15.0) -> None:
        self.keys = keys
        self.sweep_s = sweep_s
        self.cursors: dict[str, str] = {}
        self._fresh: set[str] = set()
        self._swept = time.monotonic()

    def add(self, run_id: str, after: str = "0") -> None:
        """Follow ``run_id`` from the event after ``after`` ("0": from its first event)."""
        self.cursors[run_id] = after
        self._fresh.add(run_id)

    def remove(self, run_id: str) -> None:
        self.cursors.pop(run_id, None)
        self._fresh.discard(run_id)

    def _take(self, batch: list | None) -> tuple[list[Event], list[str]]:
        events: list[Event] = []
        ends: list[str] = []
        by_key = {self.keys.events(r): r for r in self.cursors}
        for key, entries in batch or []:
            run_id = by_key[key]
            for event_id, fields in entries:
                self.cursors[run_id] = event_id
                events.append(Event(run_id, event_id, fields))
                if is_end(fields) and run_id not in ends:
                    ends.append(run_id)
        return events, ends

    def round(self, block_ms: int = _BLOCK_MS) -> Protocol:
        """One read of every followed run, and what it found."""
        if not self.cursors:
            return
        block = None if self._fresh else block_ms
        self._fresh.clear()
        batch = yield Read({self.keys.events(r): c for r, c in self.cursors.items()}, block)
        events, candidates = self._take(batch)
        yield from events
        quiet = not batch or time.monotonic() - self._swept > self.sweep_s
        if quiet:
            self._swept = time.monotonic()
            candidates = list(self.cursors)
        if not candidates:
            return
        statuses = yield Statuses(candidates)
        ended = [r for r, s in zip(candidates, statuses) if s in TERMINAL]
        for run_id, status in zip(candidates, statuses):
            if status is None:
                self.remove(run_id)
                yield Gone(run_id)
        if quiet and ended:
            # Events appended since the read above (a terminal status and its event are
            # written together, so the end is among them).
            rest = yield Read({self.keys.events(r): self.cursors[r] for r in ended}, None)
            yield from self._take(rest)[0]
        for run_id in ended:
            self.remove(run_id)
            yield Ended(run_id)

    def until_end(self, run_id: str, after: str = "0", timeout_s: float | None = None) -> Protocol:
        """Every event of one run after ``after`` until it ends, is gone, or ``timeout_s`` passes."""
        self.add(run_id, after)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while run_id in self.cursors:
            block_ms = _BLOCK_MS
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.remove(run_id)
                    return
                block_ms = max(1, min(block_ms, int(left * 1000)))
            yield from self.round(block_ms)


def _statuses(pipe: Any, keys: Keys, op: Statuses) -> Any:
    for run_id in op.run_ids:
        status_commands(pipe, keys, run_id)
    return pipe.execute()


def _pairs(replies: list[Any]) -> list[str | None]:
    return [status_reply(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]


def drive(client: redis.Redis, keys: Keys, protocol: Protocol) -> Iterator[Found]:
    """Run a :class:`Follow` protocol on a sync client; yields what it finds."""
    reply: Any = None
    for item in iter(lambda: protocol.send(reply), None):  # pragma: no branch - ends by StopIteration
        if isinstance(item, Read):
            reply = client.xread(item.streams, block=item.block_ms, count=_COUNT)
        elif isinstance(item, Statuses):
            reply = _pairs(_statuses(client.pipeline(transaction=False), keys, item))
        else:
            reply = None
            yield item


async def adrive(client: aioredis.Redis, keys: Keys, protocol: Protocol) -> AsyncIterator[Found]:
    """Run a :class:`Follow` protocol on an asyncio client; yields what it finds."""
    reply: Any = None
    while True:
        try:
            item = protocol.send(reply)
        except StopIteration:
            return
        if isinstance(item, Read):
            reply = await client.xread(item.streams, block=item.block_ms, count=_COUNT)
        elif isinstance(item, Statuses):
            reply = _pairs(await _statuses(client.pipeline(transaction=False), keys, item))
        else:
            reply = None
            yield item
