"""The router's choices against a real Redis: a call goes where its prompt's prefix was sent, a
load bound spills it to the next best, the index is trimmed as the engine evicts and forgotten
when a replica comes back; session affinity and round robin; every choice counted.

No Triton here (replica states are written as the pool monitor writes them); the module
``test_routing_replicas`` runs the same choices end to end against real Triton replicas.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest

from fleet.inference.replicas import ReplicaBoard
from fleet.inference.routing import RouteRequest, prefix_blocks
from fleet.inference.slots import Declined, Lease, Slots

from .test_slots import pool  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

FOUR = json.dumps([{"name": f"gpu-{i}", "grpc_url": f"10.0.0.{i}:8001"} for i in range(4)])
SYSTEM = "You are the support agent of a large shop. " * 40  # about 1,700 bytes: 27 blocks


def prompt(session: str, turns: int) -> str:
    """A conversation's prompt: the shared system text, its turns so far (20 blocks each), a new message."""
    said = "".join(f"\nUser: question {t} of {session}\nAgent: " + f"answer {t} of {session}. " * 50
                   for t in range(turns))
    return SYSTEM + said + "\nUser: next\nAgent:"


def route(text: str, affinity: str = "") -> RouteRequest:
    return RouteRequest(affinity, prefix_blocks("medium_sim", text))


def call(slots: Slots, text: str, priority: str = "interactive", affinity: str = "") -> Lease:
    got = slots.try_acquire(priority, uuid.uuid4().hex, route=route(text, affinity))
    assert isinstance(got, Lease), got
    return got


def test_blocks_chain_so_only_a_shared_prefix_matches() -> None:
    a, b = prefix_blocks("m", "x" * 64 + "y" * 64), prefix_blocks("m", "z" * 64 + "y" * 64)
    assert len(a) == 2 and a[1] != b[1]  # the same second block under another first one
    assert prefix_blocks("m", "x" * 64 + "y" * 60) == a[:1]  # only full blocks
    assert prefix_blocks("other", "x" * 64) != a[:1]  # models never share
    ids = list(range(40))
    assert len(prefix_blocks("m", "", ids)) == 2 and prefix_blocks("m", "", ids)[:1] == prefix_blocks("m", "", ids[:16])


def shared_blocks(a: str, b: str) -> int:
    x, y = prefix_blocks("medium_sim", a), prefix_blocks("medium_sim", b)
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))


def test_a_conversation_goes_back_to_the_replica_that_has_its_prefix(pool):  # noqa: F811
    slots = pool(capacity=8, triton_replicas=FOUR)
    first = {s: call(slots, prompt(s, 1)) for s in ("anna", "ben", "carl", "dora")}
    # All four in flight at once: the load bound spread them although they share the system text
    # (with the fourth counted, each replica's share is ceil(1.25 * 4 / 4) = 2).
    placed = [lease.replica for lease in first.values()]
    assert len(set(placed[:3])) == 3 and max(placed.count(r) for r in placed) <= 2
    for lease in first.values():
        slots.release(lease)
    again = {s: call(slots, prompt(s, 2)) for s in first}
    assert {s: lease.replica for s, lease in again.items()} == {s: lease.replica for s, lease in first.items()}
    for s, lease in again.items():
        assert lease.reason == "hit" and lease.hit_blocks == shared_blocks(prompt(s, 1), prompt(s, 2))
    assert shared_blocks(prompt("anna", 2), prompt("ben", 2)) < shared_blocks(prompt("anna", 1), prompt("anna", 2))
    counts = {st.name: st.routes for st in ReplicaBoard(slots.settings, slots.redis).states()}
    reasons = [lease.reason for lease in [*first.values(), *again.values()]]
    assert {r: sum(c.get(r, 0) for c in counts.values()) for r in set(reasons)} == \
        {r: reasons.count(r) for r in set(reasons)}


def test_the_load_bound_spills_a_call_to_the_next_best_replica(pool):  # noqa: F811
    slots = pool(capacity=8, triton_replicas=FOUR)
    home = call(slots, prompt("anna", 1))
    # One request in flight in the pool, at anna's replica: with this call counted, each replica's
    # share is ceil(1.25 * 2 / 4) = 1, which anna's replica already holds.
    spilled = call(slots, prompt("anna", 2))
    assert spilled.replica != home.replica and (spilled.reason, spilled.hit_blocks) == ("spill", 0)
    # Without the bound, the same call goes home.
    loose = pool(capacity=8, triton_replicas=FOUR, routing_load_bound=100)
    home = call(loose, prompt("anna", 1))
    stays = call(loose, prompt("anna", 2))
    assert stays.replica == home.replica and stays.reason == "hit"


def test_a_full_replica_sends_the_call_to_the_next_best(pool):  # noqa: F811
    slots = pool(capacity=2, routing_load_bound=100)
    home = call(slots, prompt("anna", 1))
    slots.release(home)
    filler = [call(slots, prompt("anna", 1), "batch") for _ in range(2)]  # no bound: both go home
    assert [f.replica for f in filler] == [home.replica] * 2
    elsewhere = call(slots, prompt("anna", 2), "batch")
    assert elsewhere.replica != home.replica and elsewhere.reason == "spill"


def test_the_index_is_trimmed_to_the_engines_cache_and_forgotten_when_the_replica_returns(pool):  # noqa: F811
    slots = pool(capacity=8)
    board = ReplicaBoard(slots.settings, slots.redis)
    short, longest = prefix_blocks("medium_sim", prompt("anna", 1)), prefix_blocks("medium_sim", prompt("anna", 2))
    size = (len(short) + len(longest)) // 2
    assert len(short) < size < len(longest)
    for name in slots.replicas:  # the engine's cache size, as the pool monitor reads it
        slots.redis.hset(slots.settings.keys.replica(name), "kv_blocks", size)
    lease = call(slots, prompt("anna", 1))
    slots.release(lease)
    index = slots.settings.keys.prefix_index(lease.replica)
    assert slots.redis.zcard(index) == len(short)
    again = call(slots, prompt("anna", 2))
    slots.release(again)
    assert again.replica == lease.replica and slots.redis.zcard(index) == size
    # What went first: the older prompt's own blocks, then the newer one's tail.
    assert set(slots.redis.zrange(index, 0, -1)) == set(longest[:size])
    board.mark_down(lease.replica, "killed")
    board.mark_up(lease.replica, 8)
    assert slots.redis.zcard(index) == 0


def test_session_routing_keeps_a_session_on_one_replica_and_round_robin_takes_turns(pool):  # noqa: F811
    slots = pool(capacity=8, triton_replicas=FOUR, routing="session")
    homes: dict[str, str] = {}
    for turn in range(3):
        for s in (f"session-{k}" for k in range(12)):
            lease = call(slots, f"turn {turn}", affinity=s)
            assert homes.setdefault(s, lease.replica) == lease.replica and lease.reason == "session"
            slots.release(lease)
    assert len(set(homes.values())) > 1
    rr = pool(capacity=8, triton_replicas=FOUR, routing="round_robin")
    seen = []
    for _ in range(8):
        lease = call(rr, "same prompt " * 20)
        assert lease.reason == "round_robin"
        seen.append(lease.replica)
        rr.release(lease)
    assert seen[:4] == seen[4:] and len(set(seen)) == 4


def test_most_room_ignores_caches(pool):  # noqa: F811
    slots = pool(capacity=8, routing="most_room")
    held = call(slots, prompt("anna", 1))  # one in flight at its replica
    nxt = call(slots, prompt("anna", 2))
    assert nxt.replica != held.replica and nxt.reason == "most_room"


def test_a_batch_call_waits_for_its_full_replica_only_while_others_would_take_the_free_slot(pool):  # noqa: F811
    slots = pool(capacity=2, routing_load_bound=100)
    home = call(slots, prompt("anna", 1))
    slots.release(home)
    filler = [call(slots, prompt("anna", 1), "batch") for _ in range(2)]  # anna's replica is full
    assert {f.replica for f in filler} == {home.replica}
    keys = slots.settings.keys
    other = next(r for r in slots.replicas if r != home.replica)
    # With another batch call waiting, it leaves the free slot to it and waits for its own replica...
    slots.redis.zadd(keys.slot_waiters("batch"), {"someone-else": 1e12})
    assert slots.try_acquire("batch", "patient", route=route(prompt("anna", 2)), patient=True) == \
        Declined(home.replica, other)
    assert slots.redis.zrange(keys.route_waiters(home.replica), 0, -1) == ["patient"]
    # (another call that waits for that same replica would not take the free slot: it does not count)
    slots.redis.zadd(keys.route_waiters(home.replica), {"someone-else": 1e12})
    assert isinstance(slots.try_acquire("batch", "third", route=route(prompt("anna", 2)), patient=True), Lease)
    slots.redis.zrem(keys.route_waiters(home.replica), "someone-else")
    slots.release(slots._held["third"])
    slots.redis.delete(keys.prefix_index(other))
    board = ReplicaBoard(slots.settings, slots.redis)
    assert {st.name: st.routes.get("waited", 0) for st in board.states()} == {home.replica: 1, other: 0}
    # ... until its patience runs out;
    late = slots.try_acquire("batch", "patient", route=route(prompt("anna", 2)), patient=False)
    assert isinstance(late, Lease) and late.replica == other and late.reason == "spill"
    assert slots.redis.zcard(keys.route_waiters(home.replica)) == 0
    slots.release(late)
    slots.redis.delete(keys.prefix_index(other))  # (what that call left there)
    # and alone, it takes the free slot elsewhere at once: nobody else would.
    slots.redis.zrem(keys.slot_waiters("batch"), "someone-else")
    alone = slots.try_acquire("batch", "alone", route=route(prompt("anna", 2)), patient=True)
    assert isinstance(alone, Lease) and alone.replica == other and alone.reason == "spill"


def test_an_interactive_call_preempts_at_the_replica_holding_its_prefix(pool):  # noqa: F811
    slots = pool(capacity=2, routing_load_bound=100)
    home = call(slots, prompt("anna", 1))
    slots.release(home)
    other = next(r for r in slots.replicas if r != home.replica)
    mine, theirs = [], []
    for group, who in ((mine, "anna"), (theirs, "ben")):  # ben's are the pool's youngest
        for _ in range(2):
            group.append(call(slots, prompt(who, 1), "batch"))
            time.sleep(0.002)  # distinct dispatch times (milliseconds in the lease)
    assert {m.replica for m in mine} == {home.replica} and {t.replica for t in theirs} == {other}
    taken = call(slots, prompt("anna", 2))
    assert taken.replica == home.replica and taken.reason == "preempt" and taken.victim == mine[-1].member
