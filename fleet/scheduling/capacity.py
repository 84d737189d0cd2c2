"""What the fleet's workers can do: live worker capacity per queue and recent step times.
Admission and ``fleet status`` read it; the inference pool's replicas and slots are
:mod:`fleet.inference.replicas` and :mod:`fleet.inference.slots`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import redis

from fleet.core.loops import BackgroundLoop
from fleet.settings import PriorityClass, Settings

log = logging.getLogger(__name__)

_STEP_TIMES_KEPT = 200


class Capacity:
    """Worker presence and step times in Redis, shared by workers, admission and status."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client

    def step_times_key(self, kind: str, priority: PriorityClass) -> str:
        return self.settings.keys.step_times(kind, priority)

    # --- step times -------------------------------------------------------------------
    def step_time_command(self, kind: str, priority: PriorityClass, seconds: float) -> Callable[[Any], Any]:
        """A command that records a step time (to run on the caller's pipeline)."""
        key = self.step_times_key(kind, priority)

        def record(pipe: Any) -> None:
            pipe.lpush(key, f"{seconds:.4f}")
            pipe.ltrim(key, 0, _STEP_TIMES_KEPT - 1)

        return record

    def step_times(self, kind: str, priority: PriorityClass) -> list[float]:
        """The recent step times of this kind and class (newest first)."""
        return [float(v) for v in self.redis.lrange(self.step_times_key(kind, priority), 0, -1)]

    def mean_step_time(self, kind: str, priority: PriorityClass) -> float | None:
        """Mean of the recent step times of this kind and class, or None before any."""
        values = self.step_times(kind, priority)
        return sum(values) / len(values) if values else None

    # --- workers ----------------------------------------------------------------------
    def workers_key(self, node: str) -> str:
        return self.settings.keys.worker(node)

    def announce(self, node: str, queues: list[str], concurrency: int, ttl_s: float) -> None:
        """A worker says it is alive, which queues it takes and how many at once."""
        self.redis.set(self.workers_key(node), json.dumps({"queues": queues, "concurrency": concurrency}),
                       px=int(ttl_s * 1000))

    def workers(self) -> dict[str, dict]:
        """Live workers: node -> {queues, concurrency}."""
        out: dict[str, dict] = {}
        prefix = self.settings.keys.workers_prefix
        for key in self.redis.scan_iter(prefix + "*", count=500):
            raw = self.redis.get(key)
            if raw:
                out[key[len(prefix):]] = json.loads(raw)
        return out

    def slots_for(self, queue: str) -> int:
        """Threads or processes of live workers that consume ``queue``."""
        return sum(w["concurrency"] for w in self.workers().values() if queue in w["queues"])


class Presence:
    """Keeps a worker's announcement fresh while the worker lives."""

    def __init__(self, capacity: Capacity, node: str, queues: list[str], concurrency: int,
                 every_s: float = 5.0) -> None:
        self.capacity, self.node, self.queues, self.concurrency = capacity, node, queues, concurrency
        self.every_s = every_s
        self._loop = BackgroundLoop("fleet-presence", self._announce, every_s, jitter=0.0,
                                    failure_level=logging.DEBUG)

    def _announce(self) -> bool:
        self.capacity.announce(self.node, self.queues, self.concurrency, ttl_s=self.every_s * 3)
        return False

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()
        try:
            self.capacity.redis.delete(self.capacity.workers_key(self.node))
        except redis.RedisError:
            pass
