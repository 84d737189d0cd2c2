"""Fleet-wide loops that one worker runs at a time: a Redis lock its holder renews.

The pool monitor and the backlog dispatcher run in every worker; each pass, a worker takes
the lock or keeps it if it holds it, and does the pass only then. A holder that dies lets
the lock expire after ``ttl_s``, and another worker takes over.
"""

from __future__ import annotations

import uuid

import redis

# KEYS[1] the lock; ARGV: owner, ttl ms. Take the lock, or keep it when we hold it.
_LEAD = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""


class Leadership:
    """One worker's claim on a fleet-wide lock."""

    def __init__(self, client: redis.Redis, lock: str, ttl_s: float) -> None:
        self.lock = lock
        self.ttl_ms = int(ttl_s * 1000)
        self.owner = uuid.uuid4().hex
        self._lead = client.register_script(_LEAD)
        self.held = False

    def hold(self) -> bool:
        """Take the lock or renew it; whether this worker holds it now."""
        self.held = bool(self._lead(keys=[self.lock], args=[self.owner, self.ttl_ms]))
        return self.held
