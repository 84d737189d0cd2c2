"""The one way fleet code gets a Redis connection (arq's ``connections.py``).

Every client comes from here, with the same options: decoded replies, connect and read
timeouts, keepalive and a health check, so that a connection to a Redis that went away fails
and reconnects instead of hanging.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

if TYPE_CHECKING:  # pragma: no cover
    from fleet.settings import Settings


def redis_options(socket_timeout_s: float = 10.0) -> dict[str, Any]:
    """Options every fleet Redis connection uses (sync and asyncio)."""
    return {
        "decode_responses": True,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 15,
    }


def redis_client(settings: "Settings", **overrides: Any) -> redis.Redis:
    """A Redis client of this fleet (``overrides`` win over the fleet's options)."""
    return redis_at(settings.redis_url, **{"socket_timeout": settings.redis_socket_timeout_s, **overrides})


def async_redis_client(settings: "Settings", **overrides: Any) -> aioredis.Redis:
    """An asyncio Redis client of this fleet, with the same options as :func:`redis_client`."""
    return aioredis.Redis.from_url(settings.redis_url,
                                   **{**redis_options(settings.redis_socket_timeout_s), **overrides})


def redis_at(url: str, **overrides: Any) -> redis.Redis:
    """A client of the Redis at ``url`` with the fleet's options: for a server no settings name
    yet (the local stack's launcher probing the Redis it started)."""
    return redis.Redis.from_url(url, **{**redis_options(), **overrides})
