"""Where the fleet's Redis clients and its broker connection point, from the settings alone
(no server needed: clients connect lazily)."""

from __future__ import annotations

import ssl

import pytest
import redis.sentinel
from kombu.utils.url import url_to_parts
from pydantic import ValidationError

from fleet import connections
from fleet.broker.app import create_app
from fleet.settings import Settings


def _sentinel_settings(**extra: object) -> Settings:
    return Settings(_env_file=None, redis_sentinels="s-0:26379, s-1:26380,s-2:26381", redis_master_name="prod",
                    redis_password="p@ss/word:1", redis_sentinel_password="sentinel-pw", redis_db=2, **extra)

def test_sentinels_are_read_as_a_list_or_json_and_a_bad_one_names_the_field():
    assert _sentinel_settings().sentinel_addresses() == [("s-0", 26379), ("s-1", 26380), ("s-2", 26381)]
    assert Settings(_env_file=None, redis_sentinels='["a:1", "b:2"]').sentinel_addresses() == [("a", 1), ("b", 2)]
    with pytest.raises(ValidationError, match="redis_sentinels") as exc:
        Settings(_env_file=None, redis_sentinels="s-0:26379,s-1")
    assert "'s-1' is not host:port" in str(exc.value)
    # Waiting for a replica is on with Sentinels, off with one plain Redis, unless set.
    assert _sentinel_settings().wait_replicas() == 1 and Settings(_env_file=None).wait_replicas() == 0
    assert _sentinel_settings(redis_wait_replicas=0).wait_replicas() == 0

def test_every_client_follows_the_primary_through_the_sentinels():
    s = _sentinel_settings()
    client = connections.redis_client(s)
    pool = client.connection_pool
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool) and pool.service_name == "prod"
    assert pool.connection_class is connections.FollowingConnection
    assert pool.connection_kwargs["password"] == "p@ss/word:1" and pool.connection_kwargs["db"] == 2
    sentinels = pool.sentinel_manager.sentinels
    assert [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
            for c in sentinels] == s.sentinel_addresses()
    # The Sentinels' own password, short timeouts, no retries against a hung one.
    kwargs = sentinels[0].connection_pool.connection_kwargs
    assert kwargs["password"] == "sentinel-pw" and kwargs["socket_timeout"] == connections.SENTINEL_TIMEOUT_S
    assert sentinels[0].connection_pool.make_connection().retry.get_retries() == 0
    aio = connections.async_redis_client(s).connection_pool
    assert aio.connection_class is connections.AsyncFollowingConnection and aio.service_name == "prod"
    plain = connections.redis_client(Settings(_env_file=None, redis_url="redis://h:1/3")).connection_pool
    assert not isinstance(plain, redis.sentinel.SentinelConnectionPool) and plain.connection_kwargs["db"] == 3

def test_the_broker_url_carries_the_password_and_database_on_every_sentinel():
    s = _sentinel_settings()
    urls = connections.broker_url(s).split(";")
    parts = [url_to_parts(u) for u in urls]
    assert [(p.scheme, p.hostname, p.port) for p in parts] == [("sentinel", "s-0", 26379), ("sentinel", "s-1", 26380),
                                                              ("sentinel", "s-2", 26381)]
    # kombu switches to the next URL on a failed connection: each must carry the password and db.
    assert {p.password for p in parts} == {"p@ss/word:1"} and {p.path for p in parts} == {"2"}
    options = create_app(s).conf.broker_transport_options
    assert options["master_name"] == "prod" and options["sentinel_kwargs"]["password"] == "sentinel-pw"
    assert options["socket_timeout"] == 5 and options["socket_keepalive"] is True
    assert create_app(s).conf.task_publish_retry_policy["max_retries"] * 0.5 >= s.redis_reconnect_wait_s

def test_tls_is_a_dictionary_for_the_servers_and_on_for_the_sentinels():
    s = _sentinel_settings(redis_tls=True, redis_tls_ca_file="/etc/fleet/ca.crt")
    tls = create_app(s).conf.broker_use_ssl
    # kombu's Sentinel transport ignores broker_use_ssl=True: it must be a dictionary.
    assert tls == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/fleet/ca.crt"}
    sentinel = connections.broker_transport_options(s)["sentinel_kwargs"]
    assert sentinel["ssl"] is True and sentinel["ssl_ca_certs"] == "/etc/fleet/ca.crt"
    assert connections.redis_client(s).connection_pool.connection_class is connections.FollowingSSLConnection
    assert create_app(Settings(_env_file=None)).conf.broker_use_ssl is None
