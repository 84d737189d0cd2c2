"""Background loops of a worker process, and fleet-wide leadership.

The reconciler, the pool monitor and the batch dispatcher run in every worker, one at a time
across the fleet: each pass, a worker takes a :class:`Leadership` lock (or renews it when it
holds it) and does the pass only then. A holder that dies lets its lock expire after
``ttl_s``, and another worker takes over.

:class:`BackgroundLoop` is the one loop they share: a pass every ``interval_s`` (with jitter,
so that workers started together do not move in step), at once again when a pass found work,
an optional leadership lock, a stop event, and a failed pass logged and tried again later
(a Redis that is away for a while must not end the loop).
"""

from __future__ import annotations

import logging
import random
import threading
import uuid
from collections.abc import Callable

import redis

from fleet.core import lua

log = logging.getLogger(__name__)

_LEAD = lua.load(__file__, "lead-1.lua")


class Leadership:
    """One worker's claim on a fleet-wide lock."""

    def __init__(self, client: redis.Redis, lock: str, ttl_s: float) -> None:
        self.client = client
        self.lock = lock
        self.ttl_s = ttl_s
        self.owner = uuid.uuid4().hex
        self.held = False

    def hold(self) -> bool:
        """Take the lock or renew it; whether this worker holds it now."""
        self.held = bool(_LEAD(self.client, keys=[self.lock], args=[self.owner, int(self.ttl_s * 1000)]))
        return self.held


class BackgroundLoop:
    """A pass of ``work`` every ``interval_s`` on a daemon thread, until stopped.

    Args:
        name: the thread's name, and how failures are logged.
        work: one pass; returns True when it found work (the next pass then comes at once).
        interval_s: the pause between passes that found nothing.
        leader: when given, a pass runs only while this worker holds the lock; the others
            look again at half its lifetime (they cannot take it over sooner).
        jitter: the pause varies by up to this fraction of itself, either way.
        failure_level: the log level of a failed pass (it is tried again after
            ``max(interval_s, 1 s)``).
    """

    def __init__(self, name: str, work: Callable[[], bool | None], interval_s: float, *,
                 leader: Leadership | None = None, jitter: float = 0.1,
                 failure_level: int = logging.WARNING) -> None:
        self.name = name
        self.work = work
        self.interval_s = interval_s
        self.leader = leader
        self.jitter = jitter
        self.failure_level = failure_level
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _pause(self, seconds: float) -> float:
        return seconds * (1 + random.uniform(-self.jitter, self.jitter)) if seconds > 0 else 0.0

    def step(self) -> float:
        """One pass (when this worker may run it); the pause before the next."""
        try:
            if self.leader is not None and not self.leader.hold():
                return self._pause(self.leader.ttl_s / 2)
            found = self.work()
            self.passes += 1
            return 0.0 if found else self._pause(self.interval_s)
        except Exception:  # noqa: BLE001 - Redis, a replica or the broker away: try again later
            log.log(self.failure_level, "%s: pass failed; trying again", self.name, exc_info=True)
            return self._pause(max(self.interval_s, 1.0))

    def run_forever(self) -> None:
        while not self._stop.is_set():
            pause = self.step()
            if pause:
                self._stop.wait(pause)

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run_forever, name=self.name, daemon=True)
        self._thread.start()
        return self._thread

    def stop(self, timeout_s: float | None = None) -> None:
        self._stop.set()
        if self._thread is not None and timeout_s is not None:
            self._thread.join(timeout_s)
