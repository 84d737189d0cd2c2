"""What the fleet can do right now: requests in flight at Triton per class, the batch cap,
live worker capacity, and recent step times. Admission and ``fleet status`` read it.

In flight: a sorted set per class of request tokens scored by their expiry, so a worker
that dies holding a slot frees it when the lease runs out. Batch requests must take a slot
before they reach Triton; interactive ones are only counted. Triton's vLLM backend ignores
request priority, so these slots are what keeps room in the model for interactive requests
however large the batch backlog grows. Two policies:

- static (default): at most ``FLEET_BATCH_INFLIGHT_MAX`` batch requests in flight;
- work-conserving (``FLEET_MODEL_MAX_SEQUENCES`` set to the model's sequence capacity):
  batch requests use every slot but a reserve for interactive ones, sized from recent
  interactive demand (``FLEET_INTERACTIVE_RESERVE_MIN``, the most interactive requests in
  flight within ``FLEET_INTERACTIVE_DEMAND_WINDOW_S``).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import redis

from fleet.errors import DeadlineExceeded
from fleet.settings import PRIORITY_CLASSES, PriorityClass, Settings

log = logging.getLogger(__name__)

# KEYS[1] the class's in-flight set, KEYS[2] its high-water mark;
# ARGV: now, token, lease expiry, cap (0 = none).
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local cap = tonumber(ARGV[4])
local n = redis.call('ZCARD', KEYS[1])
if cap > 0 and n >= cap then return 0 end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
if n + 1 > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n + 1) end
return 1
"""
# Work-conserving slots (with FLEET_MODEL_MAX_SEQUENCES): an interactive request is always
# admitted and counted, and leaves a demand sample; a batch request is admitted while batch
# in flight stays under capacity minus the reserve, the reserve being the largest of its
# floor, the interactive requests in flight now and the most seen in the demand window.
# KEYS: own in-flight set, own high-water mark, the other class's set, the demand samples.
# ARGV: now, token, lease expiry, class, capacity, reserve floor, demand window (s).
_ACQUIRE_SHARED = """
local now = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - tonumber(ARGV[7]))
local n = redis.call('ZCARD', KEYS[1])
if ARGV[4] == 'batch' then
  local reserve = math.max(tonumber(ARGV[6]), redis.call('ZCARD', KEYS[3]))
  for _, sample in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    local seen = tonumber(string.match(sample, '^(%d+):'))
    if seen and seen > reserve then reserve = seen end
  end
  if n >= tonumber(ARGV[5]) - reserve then return 0 end
else
  redis.call('ZADD', KEYS[4], now, (n + 1) .. ':' .. ARGV[2])
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
if n + 1 > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n + 1) end
return 1
"""
_STEP_TIMES_KEPT = 200


class Capacity:
    """Fleet-wide counters in Redis, shared by workers, admission and status."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self._acquire = client.register_script(_ACQUIRE)
        self._acquire_shared = client.register_script(_ACQUIRE_SHARED)

    def inflight_key(self, priority: PriorityClass) -> str:
        return self.settings.keys.inflight(priority)

    def peak_key(self, priority: PriorityClass) -> str:
        return self.settings.keys.inflight_peak(priority)

    def peak(self) -> dict[str, int]:
        """The most requests ever in flight at once per class."""
        return {p: int(self.redis.get(self.peak_key(p)) or 0) for p in PRIORITY_CLASSES}

    def step_times_key(self, kind: str, priority: PriorityClass) -> str:
        return self.settings.keys.step_times(kind, priority)

    # --- Triton slots -----------------------------------------------------------------
    @contextmanager
    def slot(self, priority: PriorityClass, deadline_at: float) -> Iterator[None]:
        """Hold an in-flight slot at Triton for one request (waits for a batch slot)."""
        token = uuid.uuid4().hex
        key = self.inflight_key(priority)
        lease_s = self.settings.step_time_limit_s
        while True:
            now = time.time()
            if self._take(priority, key, token, now, now + lease_s):
                break
            if now >= deadline_at:
                raise DeadlineExceeded("deadline passed waiting for a batch slot at Triton")
            # A slot frees when a request ends; poll with jitter so waiters do not stampede.
            time.sleep(random.uniform(0.005, 0.025))
        try:
            yield
        finally:
            self.redis.zrem(key, token)

    def _take(self, priority: PriorityClass, key: str, token: str, now: float, expiry: float) -> bool:
        s = self.settings
        if s.model_max_sequences is None:  # the static cap
            cap = s.batch_inflight_max if priority == "batch" else 0
            return bool(self._acquire(keys=[key, self.peak_key(priority)], args=[now, token, expiry, cap]))
        other: PriorityClass = "interactive" if priority == "batch" else "batch"
        return bool(self._acquire_shared(
            keys=[key, self.peak_key(priority), self.inflight_key(other), s.keys.interactive_demand],
            args=[now, token, expiry, priority, s.model_max_sequences, s.interactive_reserve_min,
                  s.interactive_demand_window_s]))

    def batch_limit(self) -> int:
        """Batch requests that may be in flight now: the static cap, or capacity minus the
        interactive reserve (see ``_ACQUIRE_SHARED``)."""
        s = self.settings
        if s.model_max_sequences is None:
            return s.batch_inflight_max
        now = time.time()
        samples = self.redis.zrangebyscore(s.keys.interactive_demand, now - s.interactive_demand_window_s, "+inf")
        seen = [int(m.split(":", 1)[0]) for m in samples]
        reserve = max([s.interactive_reserve_min, self.inflight()["interactive"], *seen])
        return max(0, s.model_max_sequences - reserve)

    def inflight(self) -> dict[str, int]:
        """Requests in flight at Triton per class (expired leases not counted)."""
        now = time.time()
        return {p: self.redis.zcount(self.inflight_key(p), now, "+inf") for p in PRIORITY_CLASSES}

    # --- step times -------------------------------------------------------------------
    def step_time_commands(self, kind: str, priority: PriorityClass, seconds: float) -> list[tuple[str, tuple]]:
        """Redis commands that record a step time (to run on the caller's pipeline)."""
        key = self.step_times_key(kind, priority)
        return [("lpush", (key, f"{seconds:.4f}")), ("ltrim", (key, 0, _STEP_TIMES_KEPT - 1))]

    def mean_step_time(self, kind: str, priority: PriorityClass) -> float | None:
        """Mean of the recent step times of this kind and class, or None before any."""
        values = [float(v) for v in self.redis.lrange(self.step_times_key(kind, priority), 0, -1)]
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
        self._stop = threading.Event()

    def _loop(self) -> None:
        while True:
            try:
                self.capacity.announce(self.node, self.queues, self.concurrency, ttl_s=self.every_s * 3)
            except redis.RedisError:
                log.debug("could not announce worker %s", self.node, exc_info=True)
            if self._stop.wait(self.every_s):
                return

    def start(self) -> None:
        threading.Thread(target=self._loop, name="fleet-presence", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        try:
            self.capacity.redis.delete(self.capacity.workers_key(self.node))
        except redis.RedisError:
            pass

