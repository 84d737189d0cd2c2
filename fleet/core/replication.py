"""Writes that must survive a failover wait until a replica has them (Redis ``WAIT``).

Redis replicates asynchronously: a write the primary acknowledged can be gone after Sentinel
promotes a replica that had not received it. Most such losses heal themselves (a step message
comes back, a step runs again and commits once). Some do not: a run whose id the caller was
given and whose record is gone, a step message published after the commit it follows was lost
(kombu retries a publish until it reaches the promoted replica, which then holds the message but
not the commit), a dead letter whose entry vanished after its message was acknowledged. So
before the fleet acts on such a write (answers the caller, publishes the next step, sends a
dispatched run's chain, acknowledges the message), it waits for ``FLEET_REDIS_WAIT_REPLICAS``
replicas to hold it.

``WAIT`` counts the replicas that hold the *connection's* last write, and answers falsely inside
``MULTI`` and not at all from Lua. So the wait is a barrier: a write of its own
(:attr:`fleet.keys.Keys.replication_barrier`) then ``WAIT``, at the end of a non-transactional
pipeline or in a round trip of their own. Replication is one ordered stream, so a replica that
has the barrier has everything the primary did before it, whichever connection did it (kombu's
publishes included).

The barrier must meet the primary that took the writes it covers. A write that went to a primary
which then died, and a barrier that reached the promoted replica, prove nothing: so the barrier
notes which primary the client follows before the writes (:func:`fleet.connections.primary_epoch`)
and raises :class:`PrimaryChanged` (a lost connection, to the callers) when it follows another
after them. A write in the same pipeline as its barrier needs no such check: a pipeline that lost
its connection runs again, whole, on the promoted replica.

A replica that does not answer within ``FLEET_REDIS_WAIT_TIMEOUT_MS`` is not waited for longer:
the write is kept and the fleet goes on (a fleet whose replicas are all gone keeps working,
as it would with none), and the shortfall is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import redis
from redis.client import Pipeline

from fleet.connections import primary_epoch

if TYPE_CHECKING:  # pragma: no cover
    from fleet.settings import Settings

log = logging.getLogger(__name__)

#: A shortfall is logged at most this often per process (it lasts while a replica is away).
_LOG_EVERY_S = 10.0


class PrimaryChanged(redis.exceptions.ConnectionError):
    """A failover came between writes and the wait for their replicas: they may be lost."""


class ReplicaWait:
    """How many replicas a write waits for, and for how long."""

    def __init__(self, barrier_key: str, replicas: int, timeout_ms: int) -> None:
        self.barrier_key = barrier_key
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.waits = 0
        self.shortfalls = 0
        self._logged = 0.0
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: "Settings") -> "ReplicaWait":
        return cls(settings.keys.replication_barrier, settings.wait_replicas(), settings.redis_wait_timeout_ms)

    @property
    def enabled(self) -> bool:
        return self.replicas > 0

    def queue(self, pipe: Pipeline) -> int:
        """Queue the barrier at the end of a non-transactional pipeline; how many replies it adds."""
        if not self.enabled:
            return 0
        if pipe.transaction:
            raise ValueError("WAIT inside MULTI answers for the connection's earlier writes: use "
                             "a non-transactional pipeline, or confirm() after the transaction")
        pipe.incr(self.barrier_key)
        pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
        return 2

    def check(self, acked: Any, what: str) -> bool:
        """Whether enough replicas acknowledged (the reply of the barrier's WAIT); a shortfall
        is counted and logged."""
        with self._lock:
            self.waits += 1
            if isinstance(acked, int) and acked >= self.replicas:
                return True
            self.shortfalls += 1
            now = time.monotonic()
            quiet = now - self._logged < _LOG_EVERY_S
            if not quiet:
                self._logged = now
        if not quiet:
            log.warning("%s: %s of %d replicas acknowledged within %d ms; going on without them (a failover "
                        "before they catch up would lose it)", what, acked, self.replicas, self.timeout_ms)
        return False

    def epoch(self, client: redis.Redis) -> tuple[str, int] | None:
        """The primary ``client`` follows now: take it before the writes :meth:`confirm` covers."""
        return primary_epoch(client) if self.enabled else None

    def confirm(self, client: redis.Redis, what: str, since: tuple[str, int] | None = None) -> bool:
        """Wait, in a round trip of its own, until the replicas hold everything this process (or
        any other, kombu's publishes included) wrote before now; whether they do.

        Raises:
            PrimaryChanged: ``client`` follows another primary than ``since`` (its :meth:`epoch`
                before the writes): a failover came between, and the writes may be lost.
        """
        if not self.enabled:
            return True
        pipe = client.pipeline(transaction=False)
        self.queue(pipe)
        acked = pipe.execute()[-1]
        now = primary_epoch(client)
        if since is not None and now != since:
            raise PrimaryChanged(f"{what}: the primary changed from {since[0]}:{since[1]} to {now} "
                                 "between the write and its replicas' acknowledgement; it may be lost")
        return self.check(acked, what)


def no_wait() -> ReplicaWait:
    """A ReplicaWait that waits for nothing (a fleet without replicas, tests of one Redis)."""
    return ReplicaWait("", 0, 1)
