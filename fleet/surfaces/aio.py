"""The client for asyncio apps: submit a run, read it, wait for it, follow its events.

::

    from fleet.surfaces.aio import AsyncFleetClient

    async with AsyncFleetClient() as client:         # settings from FLEET_* variables
        run_id = await client.submit("writer", {"topic": "queues"}, stream=True)
        async for event in client.events(run_id):    # status, step and token events
            ...
        run = await client.wait(run_id, timeout=60)

Reads (records, waits, event streams) go to Redis through ``redis.asyncio``, so one event
loop can follow thousands of runs. Submitting and cancelling run the synchronous
:class:`~fleet.surfaces.client.FleetClient` in a thread: admission is a handful of quick Redis
calls plus a broker publish, and keeping one implementation of the door keeps its rules
(validation, idempotency, load shedding) in one place.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from fleet.surfaces.client import FleetClient
from fleet.errors import RunNotFound
from fleet.run.follow import Event, Follow, Gone, adrive
from fleet.run.records import TERMINAL, RunRecord, decode_record, read_commands, read_reply
from fleet.settings import PriorityClass, Settings
from fleet.tenants import Caller


class AsyncFleetClient:
    """Submits and follows agent runs of one fleet from asyncio code."""

    def __init__(self, settings: Settings | None = None, *, sync: FleetClient | None = None) -> None:
        """Args:
            settings: the fleet's settings; built from ``FLEET_*`` variables when None.
            sync: a synchronous client to submit and cancel through (one is made when None;
                it is closed by :meth:`close` only if it was made here).
        """
        self.settings = settings or (sync.settings if sync is not None else Settings())
        self._own_sync = sync is None
        self.sync = sync or FleetClient(self.settings)
        self.keys = self.settings.keys
        self.redis: aioredis.Redis = self.settings.async_redis()

    @property
    def caller(self) -> Caller:
        """Who this client acts as: its synchronous client's tenant."""
        return self.sync.caller

    def scoped(self, caller: Caller) -> "AsyncFleetClient":
        """The same client (connections shared, not to be closed separately) acting for ``caller``."""
        view = copy.copy(self)
        view.sync = self.sync.scoped(caller)
        view._own_sync = False
        return view

    async def close(self) -> None:
        """Release connections."""
        await self.redis.aclose()
        if self._own_sync:
            self.sync.close()

    async def __aenter__(self) -> "AsyncFleetClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- writes (through the synchronous door) --------------------------------------
    async def submit(
        self,
        agent: str,
        input: dict[str, Any] | None = None,
        *,
        priority: PriorityClass = "interactive",
        deadline_s: float | None = None,
        idempotency_key: str | None = None,
        session_id: str | None = None,
        stream: bool = False,
        budget_tokens: int | None = None,
        budget_cost: float | None = None,
    ) -> str:
        """Submit a run; returns its id (the existing run's id for a repeated idempotency key).
        ``budget_tokens`` and ``budget_cost`` override the agent's budget.

        Raises:
            InvalidSubmission: the agent, the input or an option is invalid (nothing queued).
            Overloaded: the fleet sheds load; retry after ``retry_after_s``.
        """
        return await asyncio.to_thread(
            self.sync.submit, agent, input, priority=priority, deadline_s=deadline_s,
            idempotency_key=idempotency_key, session_id=session_id, stream=stream,
            budget_tokens=budget_tokens, budget_cost=budget_cost,
        )

    async def cancel(self, run_id: str) -> bool:
        """Cancel a run; False when it had already ended. Raises :class:`RunNotFound`."""
        return await asyncio.to_thread(self.sync.cancel, run_id)

    # --- reads ----------------------------------------------------------------------
    async def get(self, run_id: str) -> RunRecord:
        """The run's record. Raises :class:`RunNotFound`."""
        pipe = self.redis.pipeline(transaction=False)
        read_commands(pipe, self.keys, run_id)
        raw = read_reply(run_id, *await pipe.execute())
        if raw is None:
            raise RunNotFound(f"no run '{run_id}'")
        record = decode_record(raw)
        if not self.caller.sees(record.tenant):
            raise RunNotFound(f"no run '{run_id}'")
        return record

    async def exists(self, run_id: str) -> bool:
        """Whether the run has a record this client may see."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.queued_run(run_id))
        pipe.hmget(self.keys.run(run_id), ["status", "tenant"])
        queued, (status, tenant) = await pipe.execute()
        if queued is not None:
            return self.caller.sees(decode_record(read_reply(run_id, queued, {})).tenant)
        return status is not None and self.caller.sees(tenant)

    async def wait(self, run_id: str, timeout: float = 60.0) -> RunRecord:
        """Wait until the run ends (or ``timeout`` seconds pass) and return its record."""
        # Only events after the newest one seen before reading the record can end the wait:
        # an older terminal event belongs to an earlier life of a replayed run.
        newest = await self.redis.xrevrange(self.keys.events(run_id), count=1)
        record = await self.get(run_id)
        if record.status in TERMINAL:
            return record
        async for _ in self.entries(run_id, after=newest[0][0] if newest else "0", timeout=timeout):
            pass
        return await self.get(run_id)

    async def events(self, run_id: str, timeout: float | None = None) -> AsyncIterator[dict[str, str]]:
        """The run's events (status, steps, tokens when submitted with stream=True), until it ends."""
        async for _, event in self.entries(run_id, timeout=timeout):
            yield event

    async def entries(
        self, run_id: str, after: str = "0", timeout: float | None = None
    ) -> AsyncIterator[tuple[str, dict[str, str]]]:
        """``(stream id, event)`` pairs of the run after ``after``, until it ends (see
        :mod:`fleet.run.follow`) or ``timeout`` seconds pass with nothing new. Resuming from the
        id of the last pair seen continues exactly where a reader left off.

        Raises:
            RunNotFound: the run has no record (or is another tenant's).
        """
        if not await self.exists(run_id):
            raise RunNotFound(f"no run '{run_id}'")
        follow = Follow(self.keys)
        async for found in adrive(self.redis, self.keys, follow.until_end(run_id, after, timeout)):
            if isinstance(found, Gone):
                raise RunNotFound(f"no run '{run_id}'")
            if isinstance(found, Event):
                yield found.event_id, found.fields
