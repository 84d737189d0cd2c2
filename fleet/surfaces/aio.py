"""The client for asyncio apps: every method of :class:`~fleet.surfaces.client.FleetClient`,
awaitable (``events`` and ``entries`` are async iterators).

::

    from fleet import AsyncFleetClient

    async with AsyncFleetClient() as client:         # settings from FLEET_* variables
        run_id = await client.submit("writer", {"topic": "queues"}, stream=True)
        async for event in client.events(run_id):    # status, step and token events
            ...
        run = await client.wait(run_id, timeout=60)

Reads of runs (records, waits, event streams) go to Redis through ``redis.asyncio``, so one
event loop can follow thousands of runs. Everything else (submitting, cancelling, dead
letters, reports) runs the synchronous client in a thread: each is a handful of quick Redis
calls (plus a broker publish), and one implementation keeps their rules (validation,
idempotency, load shedding, tenancy) in one place. A unit test checks that the two clients
have the same public methods with the same parameters.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from fleet.connections import async_redis_client
from fleet.errors import RunNotFound
from fleet.run.codec import read_commands, read_reply
from fleet.run.deadletter import DeadLetter
from fleet.run.follow import Event, Follow, Gone, adrive
from fleet.run.index import is_run_id
from fleet.run.jobs import BatchStatus
from fleet.run.records import TERMINAL, RunRecord
from fleet.run.state import decode_record
from fleet.run.usage import UsageKey, UsageReport
from fleet.scheduling.submission import Admitted
from fleet.settings import Settings
from fleet.surfaces.client import FleetClient
from fleet.surfaces.views import RunList, TenantReport
from fleet.tenants import Caller


class AsyncFleetClient:
    """Submits and follows agent runs of one fleet from asyncio code, as one tenant."""

    def __init__(self, settings: Settings | None = None, *, tenant: str | None = None, admin: bool = False,
                 sync: FleetClient | None = None) -> None:
        """Args:
            settings: the fleet's settings; built from ``FLEET_*`` variables when None.
            tenant: the tenant it acts as; ``FLEET_TENANT`` when None.
            admin: an operator's client, which sees every tenant.
            sync: a synchronous client to act through (one is made when None, with ``tenant``
                and ``admin``; it is closed by :meth:`close` only if it was made here).
        """
        self.settings = settings or (sync.settings if sync is not None else Settings())
        self._own_sync = sync is None
        self.sync = sync or FleetClient(self.settings, tenant=tenant, admin=admin)
        self.keys = self.settings.keys
        self.redis: aioredis.Redis = async_redis_client(self.settings)

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

    # --- through the synchronous client ------------------------------------------------
    async def submit(self, agent: str, input: dict[str, Any] | None = None, **options: Any) -> str:
        """Submit a run (see :meth:`FleetClient.submit`); returns its id."""
        return await asyncio.to_thread(self.sync.submit, agent, input, **options)

    async def submit_many(self, subs: list[dict[str, Any]], batch_id: str | None = None) -> list[Admitted]:
        """Submit many runs at once (see :meth:`FleetClient.submit_many`)."""
        return await asyncio.to_thread(self.sync.submit_many, subs, batch_id)

    async def batch_status(self, batch_id: str) -> BatchStatus:
        """A batch job's runs counted by status. Raises :class:`RunNotFound`."""
        return await asyncio.to_thread(self.sync.batch_status, batch_id)

    async def resolve(self, run_id: str) -> str:
        """The whole id of the run a whole or short id names (see :meth:`FleetClient.resolve`)."""
        if is_run_id(run_id):
            return run_id
        return await asyncio.to_thread(self.sync.resolve, run_id)

    async def runs(self, status: str | list[str] | None = None, agent: str | None = None,
                   priority: str | None = None, tenant: str | None = None, since: float | None = None,
                   until: float | None = None, error: str | None = None, limit: int = 50,
                   cursor: str | None = None) -> RunList:
        """A page of the runs this client may see (see :meth:`FleetClient.runs`)."""
        return await asyncio.to_thread(self.sync.runs, status, agent, priority, tenant, since, until, error, limit,
                                       cursor)

    async def signal(self, run_id: str, name: str, payload: Any = None) -> str:
        """Deliver a signal to a run (see :meth:`fleet.surfaces.client.FleetClient.signal`)."""
        return await asyncio.to_thread(self.sync.signal, run_id, name, payload)

    async def cancel(self, run_id: str) -> bool:
        """Cancel a run; False when it had already ended. Raises :class:`RunNotFound`."""
        return await asyncio.to_thread(self.sync.cancel, run_id)

    async def usage(self, by: UsageKey = "agent", since_s: float = 86400.0) -> UsageReport:
        """Tokens, time and estimated cost (see :meth:`FleetClient.usage`)."""
        return await asyncio.to_thread(self.sync.usage, by, since_s)

    async def session(self, session_id: str) -> list[dict[str, Any]]:
        """The turns of one of this tenant's sessions. Raises :class:`RunNotFound`."""
        return await asyncio.to_thread(self.sync.session, session_id)

    async def tenants(self, window_s: float = 900.0) -> TenantReport:
        """The tenants' view (see :meth:`FleetClient.tenants`)."""
        return await asyncio.to_thread(self.sync.tenants, window_s)

    async def dlq_list(self, agent: str | None = None, step: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead-letter entries, newest first."""
        return await asyncio.to_thread(self.sync.dlq_list, agent, step, limit)

    async def dlq_get(self, entry_id: str) -> tuple[DeadLetter, list[dict[str, Any]]]:
        """One entry and its replays."""
        return await asyncio.to_thread(self.sync.dlq_get, entry_id)

    async def dlq_replay(self, entry_id: str, patch: dict[str, Any] | None = None) -> str:
        """Re-run the entry's run from its failed step."""
        return await asyncio.to_thread(self.sync.dlq_replay, entry_id, patch)

    async def dlq_replay_all(self, agent: str | None = None, step: str | None = None,
                             patch: dict[str, Any] | None = None, limit: int = 10_000) -> list[str]:
        """Replay every open entry matching the filter; returns the run ids."""
        return await asyncio.to_thread(self.sync.dlq_replay_all, agent, step, patch, limit)

    async def dlq_purge(self, older_than_s: float | None = None) -> int:
        """Delete entries older than ``older_than_s`` seconds (all when None)."""
        return await asyncio.to_thread(self.sync.dlq_purge, older_than_s)

    # --- reads of runs, on the event loop ------------------------------------------------
    async def get(self, run_id: str) -> RunRecord:
        """The run's record (a whole or a short id). Raises :class:`RunNotFound`."""
        full = await self.resolve(run_id)
        pipe = self.redis.pipeline(transaction=False)
        read_commands(pipe, self.keys, full)
        raw = read_reply(full, *await pipe.execute())
        if raw is None:
            raise RunNotFound(f"no run '{run_id}'")
        record = decode_record(raw)
        if not self.caller.sees(record.tenant):
            raise RunNotFound(f"no run '{run_id}'")
        return record

    async def exists(self, run_id: str) -> bool:
        """Whether the run (a whole or a short id) has a record this client may see."""
        try:
            run_id = await self.resolve(run_id)
        except RunNotFound:
            return False
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(self.keys.queued_run(run_id))
        pipe.hmget(self.keys.run(run_id), ["status", "tenant"])
        queued, (status, tenant) = await pipe.execute()
        if queued is not None:
            return self.caller.sees(decode_record(read_reply(run_id, queued, {}) or {}).tenant)
        return status is not None and self.caller.sees(tenant)

    async def wait(self, run_id: str, timeout: float = 60.0) -> RunRecord:
        """Wait until the run ends (or ``timeout`` seconds pass) and return its record."""
        run_id = await self.resolve(run_id)
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
        ref, run_id = run_id, await self.resolve(run_id)
        if not await self.exists(run_id):
            raise RunNotFound(f"no run '{ref}'")
        follow = Follow(self.keys)
        async for found in adrive(self.redis, self.keys, follow.until_end(run_id, after, timeout)):
            if isinstance(found, Gone):
                raise RunNotFound(f"no run '{run_id}'")
            if isinstance(found, Event):
                yield found.event_id, found.fields
