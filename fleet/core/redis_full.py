"""A Redis at its memory limit (``maxmemory`` with ``noeviction``, as every fleet Redis runs).

Redis then refuses every command that could grow its data (``OOM command not allowed``) and
keeps serving reads and deletes. The fleet's answer, in each place:

- admission refuses new runs with :class:`~fleet.errors.Overloaded` saying why (nothing of
  a refused run is kept; retry later);
- a step in flight waits (:func:`wait_for_room`) and goes on when memory frees: its work is
  not thrown away, nothing is dead-lettered for it, and its output commits once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

log = logging.getLogger(__name__)

RETRY_AFTER_S = 30.0


def is_redis_full(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write at its memory limit (raised by redis-py, or
    re-raised by kombu as an ``OperationalError`` with the same message)."""
    return isinstance(exc, redis.exceptions.OutOfMemoryError) or "command not allowed when used memory" in str(exc)


def has_room(client: redis.Redis) -> bool:
    """Whether Redis takes writes again: under its ``maxmemory`` (or without one)."""
    info = client.info("memory")
    limit = int(info.get("maxmemory", 0))
    return limit == 0 or int(info["used_memory"]) < limit


def wait_for_room(client: redis.Redis, give_up_at: float, on_wait: Callable[[], None] | None = None) -> bool:
    """Wait until Redis has room (True) or ``give_up_at`` passes (False), backing off from
    0.1 s to 2 s between looks (nothing announces that memory freed)."""
    pause = 0.1
    while time.time() < give_up_at:
        try:
            if has_room(client):
                return True
        except redis.RedisError:
            pass  # unreachable for a moment: look again
        if on_wait is not None:
            on_wait()
        time.sleep(min(pause, max(0.0, give_up_at - time.time())))
        pause = min(2.0, pause * 2)
    return False
