"""The one way fleet code gets a Redis connection (arq's ``connections.py``).

Every client comes from here, with the same options: decoded replies, connect and read
timeouts, keepalive and a health check, so that a connection to a Redis that went away fails
and reconnects instead of hanging. The broker's connection (kombu's) is described here too
(:func:`broker_url`, :func:`broker_transport_options`), from the same settings.

With ``FLEET_REDIS_SENTINELS`` every client asks the Sentinels for the primary when it connects
and follows a failover: a connection that fails (the primary died, or was demoted and answers
``READONLY``) is dropped, and the next attempt asks the Sentinels again. A command keeps trying
for ``FLEET_REDIS_RECONNECT_WAIT_S`` (:class:`RetryFor`), so a step in flight rides through a
failover instead of failing. Without Sentinels, ``FLEET_REDIS_URL`` names the one Redis, as it
always did.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

import redis
import redis.asyncio as aioredis
import redis.asyncio.connection
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.connection
import redis.retry
import redis.sentinel
from redis.backoff import ExponentialBackoff

if TYPE_CHECKING:  # pragma: no cover
    from fleet.settings import Settings

T = TypeVar("T")

#: A Sentinel answers from memory: one that takes longer than this is hung, and the next is asked.
SENTINEL_TIMEOUT_S = 1.0
#: Retries as redis-py counts them (its metrics read this); the deadline is what ends them.
_RETRIES = 1000


def _backoff() -> ExponentialBackoff:
    # 0.1 s, 0.2 s, 0.4 s, then every 0.5 s: a failover is seen within half a second of its end.
    return ExponentialBackoff(cap=0.5, base=0.05)


class RetryFor(redis.retry.Retry):
    """redis-py's retry of a command on a lost connection, bounded by time rather than by count:
    a failover takes seconds whatever the number of attempts (each of which asks the Sentinels)."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(_backoff(), _RETRIES)
        self.wait_s = wait_s

    def call_with_retry(self, do: Callable[[], T], fail: Callable[..., Any],
                        is_retryable: Callable[[Exception], bool] | None = None,
                        with_failure_count: bool = False) -> T:
        self._backoff.reset()
        give_up_at = time.monotonic() + self.wait_s
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                fail(error, failures) if with_failure_count else fail(error)
                pause = self._backoff.compute(failures)
                if time.monotonic() + pause > give_up_at:
                    raise error
                time.sleep(pause)


class AsyncRetryFor(redis.asyncio.retry.Retry):
    """:class:`RetryFor` for asyncio clients."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(_backoff(), _RETRIES)
        self.wait_s = wait_s

    async def call_with_retry(self, do: Callable[[], Awaitable[T]], fail: Callable[..., Any],
                              is_retryable: Callable[[Exception], bool] | None = None,
                              with_failure_count: bool = False) -> T:
        self._backoff.reset()
        give_up_at = time.monotonic() + self.wait_s
        failures = 0
        while True:
            try:
                return await do()
            except self._supported_errors as error:
                if is_retryable and not is_retryable(error):
                    raise
                failures += 1
                await (fail(error, failures) if with_failure_count else fail(error))
                pause = self._backoff.compute(failures)
                if time.monotonic() + pause > give_up_at:
                    raise error
                await asyncio.sleep(pause)


class FollowingConnection(redis.sentinel.SentinelManagedConnection):
    """A connection that asks the Sentinels where the primary is whenever it connects.

    redis-py's Sentinel connection asks them in ``connect()``, but a command sent on a
    connection whose socket was dropped (by the retry of that very command) reconnects below it,
    to the address it had: a command in flight when the primary died then retried against the
    dead primary until it gave up, and never reached the promoted one."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()
        super().send_packed_command(command, check_health)


class FollowingSSLConnection(FollowingConnection, redis.connection.SSLConnection):
    """:class:`FollowingConnection` over TLS."""


class AsyncFollowingConnection(redis.asyncio.sentinel.SentinelManagedConnection):
    """:class:`FollowingConnection` for asyncio clients."""

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self.is_connected:
            await self.connect()
        await super().send_packed_command(command, check_health)


class AsyncFollowingSSLConnection(AsyncFollowingConnection, redis.asyncio.connection.SSLConnection):
    """:class:`AsyncFollowingConnection` over TLS."""


def redis_options(socket_timeout_s: float = 10.0) -> dict[str, Any]:
    """Options every fleet Redis connection uses (sync and asyncio)."""
    return {
        "decode_responses": True,
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": 5,
        "socket_keepalive": True,
        "health_check_interval": 15,
    }


def _tls(settings: "Settings") -> dict[str, Any]:
    """TLS options of a connection to a Redis server or a Sentinel (none without FLEET_REDIS_TLS)."""
    if not settings.redis_tls:
        return {}
    options: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": "required"}
    if settings.redis_tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    return options


def sentinel_options(settings: "Settings") -> dict[str, Any]:
    """Options of a connection to a Sentinel: its own password and TLS (they are not the Redis
    servers'), short timeouts, and no retry (the next Sentinel is asked instead; redis-py's
    default of ten retries made one hung Sentinel cost half a minute). Plain values only: kombu
    and Flower (whose clients are asyncio ones) take the same dictionary."""
    options: dict[str, Any] = {"socket_timeout": SENTINEL_TIMEOUT_S, "socket_connect_timeout": SENTINEL_TIMEOUT_S,
                               "retry": None, **_tls(settings)}
    if settings.redis_sentinel_password is not None:
        options["password"] = settings.redis_sentinel_password.get_secret_value()
    return options


def _server_options(settings: "Settings") -> dict[str, Any]:
    """Options of a connection to a Redis server found through the Sentinels."""
    options: dict[str, Any] = {"db": settings.redis_db, **_tls(settings)}
    if settings.redis_password is not None:
        options["password"] = settings.redis_password.get_secret_value()
    return options


def redis_client(settings: "Settings", **overrides: Any) -> redis.Redis:
    """A Redis client of this fleet (``overrides`` win over the fleet's options)."""
    options = {**redis_options(settings.redis_socket_timeout_s), "retry": RetryFor(settings.redis_reconnect_wait_s),
               **overrides}
    if not settings.redis_sentinels:
        return redis.Redis.from_url(settings.redis_url, **options)
    sentinel = redis.sentinel.Sentinel(settings.sentinel_addresses(), sentinel_kwargs=sentinel_options(settings),
                                       **_server_options(settings))
    connection = FollowingSSLConnection if settings.redis_tls else FollowingConnection
    return sentinel.master_for(settings.redis_master_name, redis_class=redis.Redis, connection_class=connection,
                               **options)


def async_redis_client(settings: "Settings", **overrides: Any) -> aioredis.Redis:
    """An asyncio Redis client of this fleet, with the same options as :func:`redis_client`."""
    options = {**redis_options(settings.redis_socket_timeout_s),
               "retry": AsyncRetryFor(settings.redis_reconnect_wait_s), **overrides}
    if not settings.redis_sentinels:
        return aioredis.Redis.from_url(settings.redis_url, **options)
    sentinel = redis.asyncio.sentinel.Sentinel(settings.sentinel_addresses(), sentinel_kwargs=sentinel_options(settings),
                                               **_server_options(settings))
    connection = AsyncFollowingSSLConnection if settings.redis_tls else AsyncFollowingConnection
    return sentinel.master_for(settings.redis_master_name, redis_class=aioredis.Redis, connection_class=connection,
                               **options)


def redis_at(url: str, **overrides: Any) -> redis.Redis:
    """A client of the Redis at ``url`` with the fleet's options: for a server no settings name
    yet (the local stack's launcher probing the Redis it started)."""
    return redis.Redis.from_url(url, **{**redis_options(), **overrides})


def primary_address(client: redis.Redis) -> tuple[str, int] | None:
    """Where the Sentinels say the primary is now, for a client that follows them (None for a
    client of one plain URL). Asking also drops the client's idle connections to a former one."""
    pool = client.connection_pool
    if not isinstance(pool, redis.sentinel.SentinelConnectionPool):
        return None
    host, port = pool.get_master_address()
    return host, int(port)


def primary_epoch(client: redis.Redis) -> tuple[str, int] | None:
    """Which primary a client that follows the Sentinels is connected to (asked once, then what its
    connections found when they last connected); None for a client of one plain URL. A write and
    the wait for its replicas (:mod:`fleet.core.replication`) must meet the same primary: when this
    changed in between, a failover came between them."""
    pool = client.connection_pool
    if not isinstance(pool, redis.sentinel.SentinelConnectionPool):
        return None
    found = pool.master_address
    if found is None:
        found = pool.get_master_address()
    return found[0], int(found[1])


# --- the broker (kombu's Redis transport) ---------------------------------------------------

def broker_url(settings: "Settings") -> str:
    """The broker URL: ``FLEET_REDIS_URL``, or one ``sentinel://`` URL per Sentinel.

    Each Sentinel URL carries the Redis servers' password and the database: kombu also uses the
    list as its failover list, and a URL without them, once it switches to it, would connect
    without a password, or to database 0.
    """
    if not settings.redis_sentinels:
        return settings.redis_url
    password = settings.redis_password.get_secret_value() if settings.redis_password else None
    auth = f":{quote(password, safe='')}@" if password else ""
    return ";".join(f"sentinel://{auth}{_netloc(host, port)}/{settings.redis_db}"
                    for host, port in settings.sentinel_addresses())


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def broker_transport_options(settings: "Settings") -> dict[str, Any]:
    """What kombu's Sentinel transport needs on top of the URL (nothing for a plain URL)."""
    if not settings.redis_sentinels:
        return {}
    return {
        "master_name": settings.redis_master_name,
        # A Sentinel that sees no other Sentinel may be cut off from them: its answer is not taken.
        "min_other_sentinels": 1 if len(settings.redis_sentinels) > 1 else 0,
        "sentinel_kwargs": sentinel_options(settings),
    }


def broker_tls(settings: "Settings") -> dict[str, Any] | None:
    """Celery's ``broker_use_ssl`` for the Redis servers behind the Sentinels: a dictionary,
    since kombu's Sentinel transport silently ignores ``True``. None without TLS (a plain
    ``rediss://`` URL carries its own)."""
    if not (settings.redis_sentinels and settings.redis_tls):
        return None
    import ssl

    options: dict[str, Any] = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca_file is not None:
        options["ssl_ca_certs"] = str(settings.redis_tls_ca_file)
    return options
