"""A Redis that can lose its primary, on this machine: a primary, its replicas and the Sentinels
that watch them, every one a real ``redis-server`` (Sentinels are ``redis-server --sentinel``,
from the same Debian package).

Used by ``fleet up --ha``, by the failover tests and by the failover benchmark. Every server
listens on loopback only and has a password: the Redis servers one (``requirepass``, and
``masterauth`` so that a replica can follow any of them), the Sentinels another. The primary
is found by asking the Sentinels, never assumed: after a failover it is another server.

With ``tls`` (the ``tls-*-file`` directives of a certificate for 127.0.0.1 and its CA), every
server and Sentinel speaks TLS only, to its clients and to each other.

A server killed here can be started again (:meth:`RedisHA.restart`): it comes back as a replica
of the primary of the moment, as a repaired host would, and the topology is whole again once it
has caught up (:meth:`RedisHA.wait_whole`).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from fleet.ops import launch

log = logging.getLogger(__name__)

#: How long the Sentinels wait without an answer before they call the primary down. The failover
#: follows: agreement, election, promotion; on this machine about two seconds more.
DOWN_AFTER_MS = 2000


@dataclass
class RedisNode:
    """One Redis server of the topology."""

    name: str
    port: int
    data_dir: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class RedisHA:
    """A running topology: its Redis servers, its Sentinels and their passwords."""

    procs: launch.Processes
    master_name: str
    password: str
    sentinel_password: str
    nodes: list[RedisNode]
    sentinel_ports: list[int]
    down_after_ms: int
    tls: dict[str, str] | None = None
    killed: list[RedisNode] = field(default_factory=list)

    @property
    def sentinels(self) -> list[str]:
        """The Sentinels' addresses (``FLEET_REDIS_SENTINELS``)."""
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    def env(self) -> dict[str, str]:
        """The ``FLEET_*`` variables that point a fleet at this topology."""
        env = {"FLEET_REDIS_SENTINELS": ",".join(self.sentinels), "FLEET_REDIS_MASTER_NAME": self.master_name,
               "FLEET_REDIS_PASSWORD": self.password, "FLEET_REDIS_SENTINEL_PASSWORD": self.sentinel_password}
        if self.tls:
            env.update(FLEET_REDIS_TLS="true", FLEET_REDIS_TLS_CA_FILE=self.tls["tls-ca-cert-file"])
        return env

    def server(self, node: RedisNode) -> redis.Redis:
        """A direct client of one server (not through the Sentinels)."""
        return _probe(node.port, self.password, self.tls)

    def sentinel(self, port: int) -> redis.Redis:
        return _probe(port, self.sentinel_password, self.tls)

    def primary(self) -> RedisNode:
        """The server the Sentinels name as the primary now (the first Sentinel that answers)."""
        for port in self.sentinel_ports:
            try:
                _, found = self.sentinel(port).sentinel_get_master_addr_by_name(self.master_name)
            except redis.RedisError:
                continue
            return next(n for n in self.nodes if n.port == int(found))
        raise RuntimeError("no Sentinel answers")

    def kill_primary(self) -> RedisNode:
        """``kill -9`` the primary (no shutdown, no last write); the server killed."""
        node = self.primary()
        self.procs.stop(node.name, sig=signal.SIGKILL)
        self.killed.append(node)
        log.info("killed the primary %s (%s)", node.name, node.address)
        return node

    def restart(self, node: RedisNode) -> None:
        """Start a killed server again, as a replica of the primary of the moment."""
        primary = self.primary()
        _start_server(self.procs, node, self.password, replica_of=primary.port, tls=self.tls)
        if node in self.killed:
            self.killed.remove(node)

    def whole(self) -> bool:
        """Every server up, the primary with all the others as replicas in sync, and every
        Sentinel agreeing on it and knowing the replicas and the other Sentinels."""
        primary = self.primary()
        info = self.server(primary).info("replication")
        online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                  and v.get("state") == "online"]
        if info.get("role") != "master" or len(online) != len(self.nodes) - 1:
            return False
        offset = info.get("master_repl_offset", 0)
        if any(int(v.get("offset", 0)) < offset - 1024 * 1024 for v in online):
            return False
        for port in self.sentinel_ports:
            s = self.sentinel(port)
            master = s.sentinel_master(self.master_name)
            if int(master["port"]) != primary.port or "down" in master.get("flags", ""):
                return False
            replicas = [r for r in s.sentinel_slaves(self.master_name) if "down" not in r.get("flags", "")
                        and r.get("master-link-status") == "ok"]
            if len(replicas) != len(self.nodes) - 1 or int(master.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1:
                return False
        return True

    def wait_whole(self, timeout_s: float = 60.0) -> None:
        """Until :meth:`whole` holds (the Sentinels see a replica come back within seconds)."""
        launch.wait_until(self.whole, timeout_s, "the Redis topology whole again", interval_s=0.2)

    def stop(self) -> None:
        for port in self.sentinel_ports:
            self.procs.stop(f"sentinel-{port}")
        for node in self.nodes:
            self.procs.stop(node.name)


def _probe(port: int, password: str, tls: dict[str, str] | None) -> redis.Redis:
    """A direct client of one server or Sentinel of the topology."""
    extra = {"ssl": True, "ssl_ca_certs": tls["tls-ca-cert-file"]} if tls else {}
    return redis.Redis(port=port, password=password, decode_responses=True, socket_timeout=2,
                       socket_connect_timeout=2, **extra)


def _tls_directives(port: int, tls: dict[str, str] | None) -> dict[str, str]:
    """Where to listen: the plain port, or with ``tls`` only a TLS one (links to the others too)."""
    if not tls:
        return {"port": str(port)}
    return {"port": "0", "tls-port": str(port), "tls-replication": "yes", "tls-auth-clients": "no",
            **{k: v for k, v in tls.items() if k.endswith("-file")}}


def _start_server(procs: launch.Processes, node: RedisNode, password: str, replica_of: int | None,
                  tls: dict[str, str] | None = None) -> None:
    node.data_dir.mkdir(parents=True, exist_ok=True)
    directives = {
        **_tls_directives(node.port, tls), "bind": "127.0.0.1", "protected-mode": "yes", "daemonize": "no",
        "dir": str(node.data_dir.resolve()), "appendonly": "yes", "appendfsync": "everysec", "save": '""',
        "requirepass": password, "masterauth": password,
        # A replica that comes back syncs at once over the socket, not after five seconds' wait
        # for others to share a dump written to disk.
        "repl-diskless-sync": "yes", "repl-diskless-sync-delay": "0",
        **({"replicaof": f"127.0.0.1 {replica_of}"} if replica_of else {}),
    }
    conf = launch.write_private(node.data_dir / "redis.conf", "".join(f"{k} {v}\n" for k, v in directives.items()))
    proc = procs.start(node.name, [launch.redis_server_binary(), str(conf)])
    probe = _probe(node.port, password, tls)
    launch.wait_until(lambda: probe.ping(), 20, f"redis-server {node.name} on port {node.port}", proc)


def _start_sentinel(procs: launch.Processes, root: Path, port: int, master_name: str, primary: int,
                    password: str, sentinel_password: str, down_after_ms: int, quorum: int,
                    tls: dict[str, str] | None = None) -> None:
    folder = root / f"sentinel-{port}"
    folder.mkdir(parents=True, exist_ok=True)
    # A Sentinel rewrites its own file as it learns the topology: it must be writable, and is
    # readable only by its owner (the passwords are in it).
    lines = [
        *(f"{k} {v}" for k, v in _tls_directives(port, tls).items()), "bind 127.0.0.1", "protected-mode yes", "daemonize no", f"dir {folder.resolve()}",
        f"requirepass {sentinel_password}", f"sentinel sentinel-pass {sentinel_password}",
        f"sentinel monitor {master_name} 127.0.0.1 {primary} {quorum}",
        f"sentinel auth-pass {master_name} {password}",
        f"sentinel down-after-milliseconds {master_name} {down_after_ms}",
        # A failover that has not finished in this long is tried again, by another Sentinel.
        f"sentinel failover-timeout {master_name} {max(10000, 5 * down_after_ms)}",
        f"sentinel parallel-syncs {master_name} 1",
    ]
    conf = launch.write_private(folder / "sentinel.conf", "\n".join(lines) + "\n")
    proc = procs.start(f"sentinel-{port}", [launch.redis_server_binary(), str(conf), "--sentinel"])
    probe = _probe(port, sentinel_password, tls)
    launch.wait_until(lambda: probe.ping(), 20, f"sentinel on port {port}", proc)


def start_redis_ha(procs: launch.Processes, root: Path, replicas: int = 2, sentinels: int = 3,
                   master_name: str = "fleet", password: str | None = None, sentinel_password: str | None = None,
                   down_after_ms: int = DOWN_AFTER_MS, timeout_s: float = 60.0,
                   tls: dict[str, str] | None = None) -> RedisHA:
    """Start a primary, ``replicas`` replicas and ``sentinels`` Sentinels (a majority of them
    must agree that the primary is down); return once the Sentinels see them all. ``tls``: the
    ``tls-cert-file``, ``tls-key-file`` and ``tls-ca-cert-file`` to serve TLS only with."""
    password = password or launch.new_secret()
    sentinel_password = sentinel_password or launch.new_secret()
    nodes = [RedisNode(f"redis-{i}", launch.free_port(), root / f"redis-{i}") for i in range(replicas + 1)]
    _start_server(procs, nodes[0], password, None, tls)
    for node in nodes[1:]:
        _start_server(procs, node, password, nodes[0].port, tls)
    ports = [launch.free_port() for _ in range(sentinels)]
    for port in ports:
        _start_sentinel(procs, root, port, master_name, nodes[0].port, password, sentinel_password,
                        down_after_ms, sentinels // 2 + 1, tls)
    ha = RedisHA(procs, master_name, password, sentinel_password, nodes, ports, down_after_ms, tls)
    started = time.monotonic()
    ha.wait_whole(timeout_s)
    log.info("redis topology whole in %.1fs: primary %s, %d replicas, %d sentinels", time.monotonic() - started,
             nodes[0].address, replicas, sentinels)
    return ha
