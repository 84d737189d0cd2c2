"""Routing by cached prefix over two real Triton replicas of the dev model, whose engines keep
prompt prefixes as vLLM does: a session's second turn is served where its first was and hits
that engine's cache; a replica with no room sends the call to the other; a replica killed with a
call in flight loses nothing, its sessions move, and their next turns hit the new replica's cache.

This module runs its own two Triton servers (so that killing one disturbs no other test).
"""

from __future__ import annotations

import time
import uuid

import pytest

from fleet.inference.replicas import ReplicaBoard
from fleet.ops import launch

from .conftest import close_fleet, tally
from .test_pool import Replicas, board, pool_fleet, wait_for

pytestmark = pytest.mark.integration

# Calls long enough to be caught in flight (24 tokens at 40 ms), prefill cheap.
ROUTING_SIM = {"ttft_ms": 20, "prefill_ms_per_token": 0.05, "tpot_ms": 40, "load_factor": 0, "max_num_seqs": 4}


@pytest.fixture(scope="module")
def replicas(session_dir):
    root = session_dir / f"routing-{uuid.uuid4().hex[:6]}"
    procs = launch.Processes(root / "logs")
    pair = Replicas(root, procs, launch.sim_repository(root / "models", **ROUTING_SIM))
    try:
        for i in range(2):
            pair.ports.append((launch.free_port(), launch.free_port(), launch.free_port()))
            pair.start(i)
        yield pair
    finally:
        procs.stop()


@pytest.fixture
def routed(redis_url, replicas, session_dir):
    f = pool_fleet(redis_url, replicas, session_dir, routing="cache", pipeline_max=0)
    try:
        yield f
    finally:
        close_fleet(f)


def first_message(session: str) -> str:
    """A long first message of its own (about 450 of the dev model's tokens), so that where a
    session's context is cached shows in the engines' own counters."""
    return f"Session {session} asks about its order. " + " ".join(f"d{k}" for k in range(440))


def turn(f, session: str, message: str) -> object:  # noqa: ANN001
    run_id = f.client.submit("chat", {"message": message}, session_id=session)
    run = f.client.wait(run_id, timeout=60)
    assert run.status == "succeeded", run.error
    return run


def engine_hits(pair: Replicas, live: tuple[int, ...] = (0, 1)) -> dict[str, tuple[float, float]]:
    """Each live replica's engine counters: (prefix-cache hits, queries), in tokens."""
    out = {}
    for i in live:
        c = pair.model_counters(i)
        out[f"r{i}"] = (c.get("vllm:prefix_cache_hits_total", 0.0), c.get("vllm:prefix_cache_queries_total", 0.0))
    return out


def successes(pair: Replicas, live: tuple[int, ...] = (0, 1)) -> dict[str, float]:
    return {f"r{i}": pair.model_counters(i).get("vllm:request_success_total", 0.0) for i in live}


def hits_of_next_call(f, pair: Replicas, session: str, message: str, live: tuple[int, ...] = (0, 1)):  # noqa: ANN001, ANN201
    """A session's next turn: the replica that served it, and that engine's prefix-cache hits and
    queries for it (the turns run one at a time, so the counters' change is this call's)."""
    before, done = engine_hits(pair, live), successes(pair, live)
    run = turn(f, session, message)
    served = run.steps[0].replica
    after: dict[str, tuple[float, float]] = {}

    def counted() -> bool:  # the engine publishes its counters every 50 ms
        nonlocal after
        after = engine_hits(pair, live)
        return successes(pair, live)[served] >= done[served] + 1

    wait_for(counted, "the engine's counters")
    return served, after[served][0] - before[served][0], after[served][1] - before[served][1]


def test_a_sessions_next_turn_is_served_where_its_context_is_cached(routed, replicas):
    sessions = [f"s{k}-{uuid.uuid4().hex[:4]}" for k in range(4)]
    homes = {s: turn(routed, s, first_message(s)).steps[0].replica for s in sessions}
    assert set(homes.values()) <= {"r0", "r1"}
    for s in sessions:
        served, hits, queries = hits_of_next_call(routed, replicas, s, "And when does it arrive?")
        assert served == homes[s], (s, homes, served)
        # The first turn (its long message) was cached there: only the reply and the new message are not.
        assert queries > 400 and hits >= 0.8 * queries, (hits, queries)
    states = {st.name: st.routes for st in ReplicaBoard(routed.settings, routed.client.store.redis).states()}
    assert sum(r.get("hit", 0) for r in states.values()) >= len(sessions)


def test_a_replica_with_no_room_sends_the_call_to_the_other(routed, replicas):
    session = f"full-{uuid.uuid4().hex[:4]}"
    home = turn(routed, session, first_message(session)).steps[0].replica
    other = "r1" if home == "r0" else "r0"
    keys, rds = routed.settings.keys, routed.client.store.redis
    # Its replica fills up: four interactive requests of other workers hold its four sequences
    # (leases as a worker's requests hold them; nothing is sent beyond capacity in this fleet).
    now = time.time()
    fillers = {f"{int(now * 1000)}:{uuid.uuid4().hex}": now for _ in range(4)}
    rds.zadd(keys.leases(home, "interactive"), fillers)
    try:
        spills = {st.name: st.routes.get("spill", 0) for st in ReplicaBoard(routed.settings, rds).states()}
        run = turn(routed, session, "Is there any news?")
        assert run.steps[0].replica == other
        after = {st.name: st.routes for st in ReplicaBoard(routed.settings, rds).states()}
        assert after[other].get("spill", 0) == spills[other] + 1
    finally:
        rds.zrem(keys.leases(home, "interactive"), *fillers)


def test_a_killed_replicas_sessions_move_lose_nothing_and_hit_the_cache_again(routed, replicas, reliability_report):
    sessions = [f"k{k}-{uuid.uuid4().hex[:4]}" for k in range(4)]
    # Four conversations start at once: with nothing cached for them, load spreads them over both.
    firsts = {s: routed.client.submit("chat", {"message": first_message(s)}, session_id=s) for s in sessions}
    homes = {s: routed.client.wait(r, timeout=60).steps[0].replica for s, r in firsts.items()}
    moved = [s for s in sessions if homes[s] == "r1"]
    assert len(moved) == 2, homes
    # Every session's second turn at once; r1 is killed while its calls are in flight.
    runs = {s: routed.client.submit("chat", {"message": "Where is it now?"}, session_id=s) for s in sessions}
    wait_for(lambda: board(routed)["r1"].inflight["interactive"] >= 1, "calls in flight at r1")
    in_flight = board(routed)["r1"].inflight["interactive"]
    replicas.kill(1)
    try:
        counts = tally(routed.client, list(runs.values()), timeout=60)
        reliability_report("kill -9 replica mid-conversation (cache routing)", counts["submitted"],
                           counts["completed"], counts["dead_lettered"], counts["lost"],
                           f"{in_flight} call(s) in flight there; its sessions moved")
        assert counts["completed"] == len(sessions) and counts["lost"] == 0, counts
        second = {s: routed.client.get(r) for s, r in runs.items()}
        assert all(v.steps[0].replica == "r0" for v in second.values())
        assert sum(v.steps[0].failovers for v in second.values()) >= 1
        # Their next turns go where the last ones ran, and hit the context cached there.
        for s in moved:
            served, hits, queries = hits_of_next_call(routed, replicas, s, "Thanks. Anything else?", live=(0,))
            assert served == "r0" and hits >= 0.8 * queries, (hits, queries)
    finally:
        replicas.start(1)
