"""Slots of the inference pool: which requests are in flight at which replica, and who waits.

Every llm request holds a lease on one replica while it is at Triton: a member of the
replica's sorted set for its class, ``<dispatch ms>:<token>`` (``np:`` in front when it
must not be preempted), scored by its holder's last heartbeat, so a dead worker's leases
go stale within :data:`LEASE_TTL_S`. One Lua script chooses the replica and takes the slot
there: among the healthy replicas with room, the routing mode's choice (``FLEET_ROUTING``, see
:mod:`fleet.inference.routing`: the replica expected to hold the call's prompt prefix in its KV
cache, or the session's own, each within a load bound; or the one with the most room). Per
replica and policy, a class may hold (``C`` the replica's sequence capacity, ``K`` the pipeline
depth the pool monitor learned):

=========  ===================================  ==========================================
policy     batch                                interactive
=========  ===================================  ==========================================
preempt    interactive + batch < C + K, and      the same, else the youngest batch's slot,
           fewer than 2 interactive starting    else it waits (and batch waits behind it)
reserve    batch < C - reserve (recent peak)    always (the engine queues what is over C)
static     batch < FLEET_BATCH_INFLIGHT_MAX     always
=========  ===================================  ==========================================

Under every policy, with latency objectives set (``FLEET_OBJECTIVE_*``), a batch request also
finds no room at a replica once the requests in flight there reach its ``batch_limit``: the
occupancy the pool monitor learned keeps the interactive p99 within the objectives
(:mod:`fleet.inference.occupancy`). A replica without one has no such limit.

Under ``preempt`` an interactive request also preempts the youngest batch requests sent
beyond the replica's capacity, so that at most ``K - FLEET_PREEMPT_VICTIMS`` of them stay
ahead of it in the engine's first-come-first-served queue (about ``K`` find a freed
sequence while it is on its way in). A preempted request is told on the preempt channel,
cancelled at Triton and sent again later.

A request that gets no slot waits in its worker thread: releases publish on the slot
channel, and each worker process wakes one waiter (interactive first) to try again.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from fleet.core import lua
from fleet.errors import DeadlineExceeded, RunCancelled, TransientError
from fleet.inference.routing import RouteRequest
from fleet.settings import PriorityClass, Settings

log = logging.getLogger(__name__)

#: A lease whose holder has not refreshed it for this long belongs to a dead worker.
LEASE_TTL_S = 15.0
HEARTBEAT_S = LEASE_TTL_S / 3
#: A burst: while this many interactive requests at a replica have yet to produce their first
#: token, batch sends that replica nothing new, so each further interactive arrival preempts
#: a batch request already there (a running one, once those sent last are gone) instead of
#: one sent just after it. One starting request alone does not stop batch: on the saturated
#: benchmark pool that cut batch throughput from 25.7 to 13.3 runs/s.
STARTING_HOLDS_BATCH = 2
#: A waiter tries again at least this often, whatever it hears (it counts as waiting for 2 s
#: after each try, see ``_ACQUIRE``).
_RETRY_S = 0.25


_ACQUIRE = lua.load(__file__, "acquire.lua")
_RELEASE = lua.load(__file__, "release-1.lua")


@dataclass(frozen=True)
class Lease:
    """A request's slot at one replica."""

    replica: str
    priority: PriorityClass
    token: str
    member: str
    victim: str = ""  # the batch request whose slot this one took
    reason: str = "most_room"  # why this replica (fleet.inference.routing.REASONS)
    hit_blocks: int = 0  # leading blocks of the prompt the router expects cached there



@dataclass(frozen=True)
class Declined:
    """A batch call left a free slot (at ``free_at``) to other waiters, to wait for ``home``, the
    full replica that holds its prompt's prefix."""

    home: str
    free_at: str


@dataclass
class _Waiter:
    prefers: str | None
    event: threading.Event


class _Signal:
    """Wakes this process's waiting requests when a slot may have freed: every interactive
    waiter, else one batch waiter (the others try again within ``_RETRY_S``): one that waits for
    that replica, else one that waits for none, else the longest waiting."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interactive = threading.Condition(self._lock)
        self._interactive_waiting = 0
        self._batch: list[_Waiter] = []
        self.seq = 0

    def wake(self, replica: str | None = None, everyone: bool = False) -> None:
        with self._lock:
            self.seq += 1
            if everyone or self._interactive_waiting:
                self._interactive.notify_all()
            if everyone:
                for w in self._batch:
                    w.event.set()
            elif not self._interactive_waiting:
                self._set(self._pick(replica, anyone=True))

    def pass_on(self, replica: str) -> None:
        """A batch waiter left a free slot at ``replica``: wake one that would take it, if any here."""
        with self._lock:
            self.seq += 1
            self._set(self._pick(replica, anyone=False))

    def _pick(self, replica: str | None, anyone: bool) -> _Waiter | None:
        idle = [w for w in self._batch if not w.event.is_set()]
        return (next((w for w in idle if replica is not None and w.prefers == replica), None)
                or next((w for w in idle if w.prefers is None), None)
                or (idle[0] if anyone and idle else None))

    @staticmethod
    def _set(waiter: _Waiter | None) -> None:
        if waiter is not None:
            waiter.event.set()

    def wait(self, seen: int, priority: PriorityClass, timeout_s: float, prefers: str | None = None) -> None:
        with self._lock:
            if self.seq != seen:
                return
            if priority == "interactive":
                self._interactive_waiting += 1
                try:
                    self._interactive.wait(timeout_s)
                finally:
                    self._interactive_waiting -= 1
                return
            waiter = _Waiter(prefers, threading.Event())
            self._batch.append(waiter)
        try:
            waiter.event.wait(timeout_s)
        finally:
            with self._lock:
                self._batch.remove(waiter)


class Slots:
    """Leases on the pool's replicas, shared by every worker through Redis."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.replicas = [r.name for r in settings.replicas()]
        keys = settings.keys
        self._keys = [keys.slot_waiters("interactive"), keys.slot_waiters("batch"), keys.route_turn()]
        for name in self.replicas:
            self._keys += [keys.replica(name), keys.leases(name, "interactive"), keys.leases(name, "batch"),
                           keys.interactive_demand(name), keys.starting(name), keys.prefix_index(name),
                           keys.route_waiters(name)]
        self.signal = _Signal()
        self._held: dict[str, Lease] = {}
        self._held_lock = threading.Lock()
        self._heartbeat: threading.Thread | None = None

    # --- taking and giving back ---------------------------------------------------------
    def try_acquire(self, priority: PriorityClass, token: str, preemptible: bool = True,
                    route: RouteRequest | None = None, patient: bool = False) -> Lease | Declined | str:
        """One attempt: the lease, or why there is none (``'full'``, ``'down'``, or
        :class:`Declined`). ``patient``: a batch call may still wait for the full replica that
        holds its prompt's prefix."""
        s = self.settings
        now = time.time()
        route = route or RouteRequest()
        member = f"{'' if preemptible or priority == 'interactive' else 'np:'}{int(now * 1000)}:{token}"
        got = _ACQUIRE(self.redis, keys=self._keys, args=[
            now, member, priority, now - LEASE_TTL_S, s.batch_policy, s.batch_inflight_max, token,
            s.keys.preempt_channel, random.randrange(len(self.replicas)), s.interactive_reserve_min,
            s.interactive_demand_window_s, s.preempt_victims, STARTING_HOLDS_BATCH,
            s.routing, s.routing_load_bound, s.routing_cache_weight, route.affinity or token, s.prefix_index_blocks,
            1 if patient else 0, *route.blocks])
        if not got[0]:
            if got[1] == "wait":
                return Declined(self.replicas[int(got[2]) - 1], self.replicas[int(got[3]) - 1])
            return got[1]
        index, victim, reason, hit = got
        lease = Lease(self.replicas[int(index) - 1], priority, token, member, victim, reason, int(hit))
        with self._held_lock:
            self._held[token] = lease
        self._start_heartbeat()
        return lease

    def acquire(self, priority: PriorityClass, deadline_at: float, cancelled: Callable[[], bool],
                preemptible: bool = True, token: str | None = None, route: RouteRequest | None = None) -> Lease:
        """A lease on the replica the router chooses, waiting for one as long as the run may.

        Raises:
            DeadlineExceeded: the run's deadline passed first.
            RunCancelled: the run was cancelled while it waited.
            TransientError: no replica of the pool was up for ``FLEET_TRITON_CONNECT_WAIT_S``.
        """
        token = token or uuid.uuid4().hex
        down_since: float | None = None
        patient_until = time.monotonic() + self.settings.routing_patience_s
        prefers: str | None = None
        try:
            while True:
                seen = self.signal.seq
                got = self.try_acquire(priority, token, preemptible, route, time.monotonic() < patient_until)
                if isinstance(got, Lease):
                    return got
                now = time.time()
                if got == "down":
                    down_since = down_since or now
                    if now - down_since >= self.settings.triton_connect_wait_s:
                        raise TransientError(
                            f"no replica of the inference pool is up ({', '.join(self.replicas)}); "
                            f"waited {self.settings.triton_connect_wait_s:.0f}s")
                else:
                    down_since = None
                if isinstance(got, Declined):  # a slot is free elsewhere: a waiter here may take it
                    prefers = got.home
                    self.signal.pass_on(got.free_at)
                if now >= deadline_at:
                    raise DeadlineExceeded(f"deadline passed waiting for a {priority} slot in the inference pool")
                if cancelled():
                    raise RunCancelled("run cancelled while waiting for a slot in the inference pool")
                self.signal.wait(seen, priority, min(_RETRY_S, max(0.0, deadline_at - now)), prefers)
        except BaseException:
            self.redis.zrem(self.settings.keys.slot_waiters(priority), token)
            raise

    def started(self, lease: Lease) -> None:
        """An interactive request produced its first token: batch may go to its replica again."""
        try:
            if self.redis.zrem(self.settings.keys.starting(lease.replica), lease.token):
                # batch requests waiting for this replica may try again
                self.redis.publish(self.settings.keys.slot_channel, lease.replica)
        except redis.RedisError:
            log.debug("could not record a start at %s (it expires)", lease.replica, exc_info=True)

    def release(self, lease: Lease) -> None:
        """Give the slot back (a no-op when it was preempted or went stale)."""
        with self._held_lock:
            self._held.pop(lease.token, None)
        if lease.priority == "interactive":
            self.started(lease)
        try:
            _RELEASE(self.redis, keys=[self.settings.keys.leases(lease.replica, lease.priority)],
                          args=[lease.member, self.settings.keys.slot_channel, lease.replica])
        except redis.RedisError:
            # The lease goes stale without heartbeats and frees itself.
            log.warning("could not release a %s slot at %s; it frees in %.0fs", lease.priority, lease.replica,
                        LEASE_TTL_S, exc_info=True)

    # --- heartbeats ---------------------------------------------------------------------
    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            with self._held_lock:
                if self._heartbeat is None:
                    self._heartbeat = threading.Thread(target=self._beat, name="fleet-leases", daemon=True)
                    self._heartbeat.start()

    def _beat(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)  # a period, not a wait for an event
            with self._held_lock:
                held = list(self._held.values())
            if not held:
                continue
            try:
                pipe = self.redis.pipeline(transaction=False)
                now = time.time()
                for lease in held:
                    pipe.zadd(self.settings.keys.leases(lease.replica, lease.priority), {lease.member: now}, xx=True)
                pipe.execute()
            except redis.RedisError:
                log.debug("lease heartbeat failed", exc_info=True)
