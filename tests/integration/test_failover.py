"""A Redis that loses its primary: a primary, two replicas and three Sentinels (real
``redis-server`` processes), real workers and Triton, and the primary killed with ``kill -9``
while interactive and batch runs are in flight, three times.

This module runs its own Redis topology, so that killing its servers disturbs no other test.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import pytest
import redis

from fleet.connections import async_redis_client, primary_address, redis_client
from fleet.core import lua
from fleet.core.listener import Listener
from fleet.core.loops import BackgroundLoop, Leadership
from fleet.core.replication import PrimaryChanged, ReplicaWait
from fleet.inference.replicas import ReplicaBoard
from fleet.ops import launch, redis_ha
from fleet.run.records import TERMINAL
from fleet.settings import PRIORITY_CLASSES
from fleet.surfaces.client import FleetClient
from tests.support.failover import SteadyLoad, commit_census, status_counts
from tests.support.tls import tls_files
from tests.support.waiting import poll, wait_until

from .conftest import Fleet, make_settings, tally

pytestmark = pytest.mark.integration

KILLS = 3
#: The target: steps commit again within this long of the primary's death.
RECOVERY_TARGET_S = 10.0


@pytest.fixture(scope="module")
def ha(session_dir, triton):
    root = session_dir / f"failover-{uuid.uuid4().hex[:6]}"
    procs = launch.Processes(root / "logs")
    topology = redis_ha.start_redis_ha(procs, root / "redis")
    prefix = f"f{uuid.uuid4().hex[:8]}"
    overrides = {k.removeprefix("FLEET_").lower(): v for k, v in topology.env().items()}
    settings, env = make_settings("redis://127.0.0.1:1/0", triton, prefix, step_time_limit_s=5,
                                  visibility_timeout_s=6, stall_after_s=10, reconcile_interval_s=1, recount_interval_s=2,
                                  **overrides)
    client = FleetClient(settings, admin=True)
    fleet = Fleet(settings, env, procs, client)
    try:
        fleet.start_worker("inference", "llm", "threads", 8)
        fleet.start_worker("tools", "tool", "prefork", 2)
        yield fleet, topology
    finally:
        procs.stop()
        client.close()


def _unfinished(fleet: Fleet, load: SteadyLoad) -> dict[str, int]:
    """Runs of each class accepted and not ended."""
    out = {}
    for priority in PRIORITY_CLASSES:
        ids = load.ids(priority)[-200:]  # the load is steady: older runs have ended
        out[priority] = sum(s not in TERMINAL for s in fleet.client.store.statuses(ids)) if ids else 0
    return out


def _resumed(fleet: Fleet, load: SteadyLoad, killed_at: float) -> float | None:
    """When both kinds of worker were consuming again after a kill: the later of the first model
    step and the first tool step committed of runs accepted after it (their messages were
    published after the failover, so a consumer took them from the promoted primary)."""
    census = commit_census(fleet.client, load.accepted_after(killed_at))
    llm, tool = census.first_after(killed_at, {"plan"}), census.first_after(killed_at, {"act"})
    return None if llm is None or tool is None else max(llm, tool)


def _kill(fleet: Fleet, topology: redis_ha.RedisHA, load: SteadyLoad) -> dict[str, float]:
    """Kill the primary while runs of both classes are in flight; wait for the fleet to serve
    again and for the killed server to come back as a replica. What it saw."""
    in_flight = wait_until(lambda: (lambda u: u if min(u.values()) > 0 else None)(_unfinished(fleet, load)),
                           30, "runs of both classes in flight")
    killed = topology.kill_primary()
    killed_at = time.time()  # the primary is gone (reaped): whatever commits now commits elsewhere
    # Steps in flight commit once the promoted replica answers (their commands retry meanwhile).
    first = poll(lambda: commit_census(fleet.client, load.ids()).first_after(killed_at), bool, 30, 0.2)
    resumed = poll(lambda: _resumed(fleet, load, killed_at), bool, 30, 0.2)
    dead = {n: p.returncode for n, p in fleet.procs.children.items() if n in ("inference", "tools") and p.poll() is not None}
    assert not dead, f"workers exited after the primary's death: {dead}"
    topology.restart(killed)  # the host comes back, as a replica of the new primary
    topology.wait_whole(60)
    return {"killed_at": killed_at, "in_flight": sum(in_flight.values()), "first_commit_s": (first or float("inf")) - killed_at,
            "resumed_s": (resumed or float("inf")) - killed_at}


def test_kill_9_of_the_primary_under_load_loses_no_run_and_commits_no_step_twice(ha, reliability_report):
    fleet, topology = ha
    workers = {name: proc.pid for name, proc in fleet.procs.children.items() if name in ("inference", "tools")}
    load = SteadyLoad(fleet.client, interactive_per_s=4, batch_per_s=2).start()
    kills: list[dict[str, float]] = []
    try:
        for _ in range(KILLS):
            kills.append(_kill(fleet, topology, load))
    finally:
        load.stop()
    ids = load.ids()
    counts = tally(fleet.client, ids, timeout=120)
    census = commit_census(fleet.client, ids)
    redone = census.steps_redone(fleet.client, ids)
    expired = status_counts(fleet.client, load.ids("interactive"))["expired"]
    resumed = [k["resumed_s"] for k in kills]
    reliability_report(
        f"Redis primary killed (Sentinel) x{len(kills)}", **counts,
        note=f"{sum(k['in_flight'] for k in kills)} runs unfinished at the kills; steps in flight committed "
             f"after {max(k['first_commit_s'] for k in kills):.1f} s, new runs' steps after "
             f"{', '.join(f'{s:.1f}' for s in resumed)} s; {census.duplicates()} steps committed twice; "
             f"{redone} steps ran twice; {expired} interactive runs expired")
    assert load.failed == []
    assert len(kills) == KILLS and all(k["in_flight"] > 0 for k in kills)  # each kill hit work in flight
    assert counts["lost"] == 0 and counts["dead_lettered"] == 0, counts
    assert counts["completed"] == counts["submitted"] == len(ids) > 0
    assert census.duplicates() == 0
    assert census.total() == sum(len(fleet.client.get(r).steps) for r in ids)  # every step committed once
    assert max(resumed) <= RECOVERY_TARGET_S, (resumed, kills, load.trouble)
    # The workers followed the new primaries: the same processes served every run.
    assert {n: p.pid for n, p in fleet.procs.children.items() if n in workers} == workers
    assert all(fleet.procs.children[n].poll() is None for n in workers)


def test_after_the_failovers_nothing_is_left_held(ha):
    """The kombu unacked index, the inference pool's leases and the tenants' counts come back to
    what the runs say: nothing in flight, nothing counted (the runs of the test above all ended)."""
    fleet, _ = ha
    r = fleet.client.store.redis
    keys = fleet.settings.keys
    # Messages whose acknowledgement was lost come back after the visibility timeout, find
    # their step committed and end there.
    unacked = poll(lambda: r.hlen("unacked"), lambda n: n == 0, 60, 0.5)
    queued = sum(r.llen(q) for q in fleet.client.app.amqp.queues)
    board = ReplicaBoard(fleet.settings, r)
    inflight = poll(lambda: sum(st.inflight[p] for st in board.states() for p in PRIORITY_CLASSES),
                    lambda n: n == 0, 30, 0.5)
    # The reconciler recounts the tenants' places and the admitted ledger from the run records.
    active = poll(lambda: {f: int(v) for f, v in r.hgetall(keys.tenant_active).items() if int(v)},
                  lambda counts: not counts, 30, 0.5)
    admitted = r.zcard(keys.admitted("interactive"))
    left = {"claims": r.hgetall(keys.quota_claims), "backlog": r.hgetall(keys.backlog_runs),
            "runs": {i: r.hmget(keys.run(i), "status", "tenant", "priority") for i in r.zrange(keys.active_runs, 0, -1)}}
    assert (unacked, queued, inflight, active, admitted) == (0, 0, 0, {}, 0), left


def test_commands_in_flight_subscriptions_and_loops_follow_the_promoted_primary(ha):
    """What the workers rely on, one kill: a blocking command in flight at the primary's death
    is answered by the promoted replica (redis-py alone retried it against the dead address
    until it gave up), an asyncio client's too, a subscriber hears what is published after the
    failover, and a background loop holding a leadership lock goes on passing, the lock held."""
    fleet, topology = ha
    settings, key = fleet.settings, f"{fleet.settings.key_prefix}:follow:{uuid.uuid4().hex}"
    blocked, heard, in_async = {}, threading.Event(), {}

    def blpop() -> None:
        client = redis_client(settings)
        client.ping()
        blocked["ready"] = True
        blocked["got"] = client.blpop([key], timeout=8)

    async def apop() -> None:
        client = async_redis_client(settings)
        await client.ping()
        in_async["got"] = await client.blpop([key + ":a"], timeout=8)
        await client.aclose()

    listener = Listener(redis_client(settings))
    listener.on(key + ":ch", lambda message: heard.set() if message == "after" else None)
    listener.start()
    passes = BackgroundLoop("follow-loop", lambda: False, 0.1,
                            leader=Leadership(redis_client(settings), key + ":lock", 2.0))
    passes.start()
    popper = threading.Thread(target=blpop)
    popper.start()
    apopper = threading.Thread(target=lambda: asyncio.run(apop()))
    apopper.start()
    wait_until(lambda: blocked.get("ready") and passes.passes > 0, 10, "a command blocked, a loop passing")
    before = primary_address(redis_client(settings))
    barrier_client, wait = redis_client(settings), ReplicaWait.from_settings(settings)
    since = wait.epoch(barrier_client)
    barrier_client.set(key + ":w", "before the kill")
    killed = topology.kill_primary()
    writer = redis_client(settings)
    writer.lpush(key, "after")  # waits for the promoted replica
    writer.lpush(key + ":a", "after")
    after = primary_address(writer)
    popper.join(30)
    apopper.join(30)
    # A wait that reaches the promoted replica proves nothing about a write made before the kill.
    with pytest.raises(PrimaryChanged):
        wait.confirm(barrier_client, "a write before the kill", since)
    # The subscription moved too: a message published on the new primary is heard.
    wait_until(lambda: writer.publish(key + ":ch", "after") and heard.wait(0.5), 20, "the listener hearing it")
    since = passes.passes
    wait_until(lambda: passes.passes > since + 3, 10, "the loop passing on the new primary")
    passes.stop(5)
    topology.restart(killed)
    topology.wait_whole(60)
    assert before != after and killed.port == before[1]
    assert blocked["got"] == (key, "after") and in_async["got"] == (key + ":a", "after")
    assert passes.leader.held and writer.get(key + ":lock") == passes.leader.owner


def test_a_fleet_over_tls_with_passwords_behind_sentinels(session_dir, triton):
    """Every link TLS only (the servers, the Sentinels, replication), a password for the servers
    and another for the Sentinels: the workers' broker (kombu's Sentinel transport) and every
    fleet client find the primary and serve a run; neither plain text nor the Sentinels' own
    password gets into a server."""
    root = session_dir / f"failover-tls-{uuid.uuid4().hex[:6]}"
    procs = launch.Processes(root / "logs")
    try:
        topology = redis_ha.start_redis_ha(procs, root / "redis", replicas=1, tls=tls_files(root / "tls"))
        primary = topology.primary()
        with pytest.raises((redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)):
            redis.Redis(port=primary.port, password=topology.password, socket_timeout=3).ping()
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis(port=primary.port, password=topology.sentinel_password, ssl=True,
                        ssl_ca_certs=topology.tls["tls-ca-cert-file"], socket_timeout=3).ping()
        overrides = {k.removeprefix("FLEET_").lower(): v for k, v in topology.env().items()}
        settings, env = make_settings("redis://127.0.0.1:1/0", triton, f"s{uuid.uuid4().hex[:8]}", **overrides)
        fleet = Fleet(settings, env, procs, FleetClient(settings))
        fleet.start_worker("inference", "llm", "threads", 2)
        fleet.start_worker("tools", "tool", "prefork", 1)
        run = fleet.client.wait(fleet.client.submit("calculator", {"question": "What is 6 * 7?"}), timeout=60)
        assert settings.redis_tls and (run.status, run.result) == ("succeeded", "The answer is 42.")
        assert fleet.client.app.conf.broker_use_ssl["ssl_ca_certs"] == topology.tls["tls-ca-cert-file"]
        fleet.client.close()
    finally:
        procs.stop()


def test_a_write_waits_for_its_replicas_in_its_own_round_trip(ha):
    """The barrier rides at the end of the write's pipeline (its replies are the caller's only),
    also in the round trip that runs scripts Redis forgot again; a wait for more replicas than
    answer gives up after its timeout, keeps the write and counts the shortfall; a transaction
    cannot carry it (WAIT inside MULTI answers for earlier writes)."""
    fleet, topology = ha
    r, key = fleet.client.store.redis, f"{fleet.settings.key_prefix}:w:{uuid.uuid4().hex}"
    wait = ReplicaWait.from_settings(fleet.settings)
    # A script no background loop of the fleet runs (the leadership scripts are, every second, and
    # one of them could load itself again between the flush and this write).
    append = next(s for s in lua.scripts() if s.name == "append_turn-1")
    r.script_flush()
    pipe = r.pipeline(transaction=False)
    append(pipe, [key], ["me", json.dumps({"run_id": "me"}), 10, 600])
    pipe.incr(key + ":n")
    replies = lua.execute(pipe, wait=wait, what="a test write")
    primary = topology.primary()
    on_replicas = [json.loads(turn)["run_id"] for n in topology.nodes if n != primary  # read right away
                   for turn in topology.server(n).lrange(key, 0, -1)]
    too_many = ReplicaWait(fleet.settings.keys.replication_barrier, 3, 200)  # two replicas answer
    kept = too_many.confirm(r, "a write three replicas should hold")
    with pytest.raises(ValueError, match="MULTI"):
        wait.queue(r.pipeline(transaction=True))
    assert replies == [1, 1] and "me" in on_replicas
    assert (wait.waits, wait.shortfalls) == (2, 0)  # the first round trip and the one after NOSCRIPT
    assert kept is False and (too_many.waits, too_many.shortfalls) == (1, 1)

