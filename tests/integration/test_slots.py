"""Slots of the inference pool against a real Redis: routing by load, per-replica limits of
each policy, preemption of the youngest batch requests, waiting, stale leases.

No Triton here: replica states are written as the pool monitor writes them.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from fleet.connections import redis_client
from fleet.errors import DeadlineExceeded
from fleet.inference.replicas import ReplicaBoard
from fleet.inference.slots import LEASE_TTL_S, Lease, Slots
from tests.support.waiting import wait_until

from .conftest import TritonInfo, make_settings

pytestmark = pytest.mark.integration

TWO = json.dumps([{"name": "gpu-0", "grpc_url": "10.0.0.1:8001"}, {"name": "gpu-1", "grpc_url": "10.0.0.2:8001"}])
ONE = json.dumps([{"name": "gpu-0", "grpc_url": "10.0.0.1:8001"}])


@pytest.fixture
def pool(redis_url):
    """Slots over replicas (two of 4 sequences each, unless told), all up, in a namespace of their own."""
    made = []

    def make(capacity: int = 4, pipeline: int = 0, **overrides: object) -> Slots:
        overrides.setdefault("triton_replicas", TWO)
        settings, _ = make_settings(redis_url, TritonInfo("127.0.0.1:1", "127.0.0.1:2"), f"p{uuid.uuid4().hex[:8]}",
                                    **overrides)
        slots = Slots(settings, redis_client(settings))
        board = ReplicaBoard(settings, slots.redis)
        for name in slots.replicas:
            board.mark_up(name, capacity)
            board.set_engine(name, 0, 0, pipeline)
        made.append(slots)
        return slots

    yield make
    for slots in made:
        for key in slots.redis.scan_iter(slots.settings.key("*")):
            slots.redis.delete(key)


def take(slots: Slots, priority: str, n: int, preemptible: bool = True) -> list[Lease]:
    got = [slots.try_acquire(priority, uuid.uuid4().hex, preemptible) for _ in range(n)]
    assert all(isinstance(g, Lease) for g in got), got
    return got  # type: ignore[return-value]


def per_replica(leases: list[Lease]) -> dict[str, int]:
    return {name: sum(1 for lease in leases if lease.replica == name) for name in ("gpu-0", "gpu-1")}


def test_requests_go_to_the_replica_with_the_most_room_and_batch_stops_at_capacity(pool):
    slots = pool(capacity=4)
    held = take(slots, "batch", 8)
    assert per_replica(held) == {"gpu-0": 4, "gpu-1": 4}  # spread by load, never past a replica's 4
    assert slots.try_acquire("batch", uuid.uuid4().hex) == "full"
    slots.release(held[0])
    again = slots.try_acquire("batch", uuid.uuid4().hex)
    assert isinstance(again, Lease) and again.replica == held[0].replica  # the slot that freed


def test_an_interactive_request_at_a_full_pool_takes_the_youngest_batch_slot_and_tells_its_holder(pool):
    slots = pool(capacity=4)
    held = []
    for _ in range(8):
        held += take(slots, "batch", 1)
        time.sleep(0.002)  # distinct dispatch times (milliseconds in the lease)
    pubsub = slots.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(slots.settings.keys.preempt_channel)
    lease = slots.try_acquire("interactive", uuid.uuid4().hex)
    assert isinstance(lease, Lease)
    youngest = held[-1]
    assert lease.victim == youngest.member and lease.replica == youngest.replica
    message = wait_until(lambda: pubsub.get_message(timeout=0.5), 5, "the preemption on the preempt channel",
                         interval_s=0)
    assert message["data"] == youngest.token
    states = {s.name: s for s in ReplicaBoard(slots.settings, slots.redis).states()}
    assert states[youngest.replica].inflight == {"interactive": 1, "batch": 3}  # never past its capacity
    assert states[youngest.replica].preempted == 1


def test_with_requests_beyond_capacity_an_interactive_one_preempts_one_more(pool):
    slots = pool(capacity=4, pipeline=2, triton_replicas=ONE, preempt_victims=2)
    held = []
    for _ in range(6):  # capacity 4 + pipeline 2
        held += take(slots, "batch", 1)
        time.sleep(0.002)
    lease = slots.try_acquire("interactive", uuid.uuid4().hex)
    assert isinstance(lease, Lease)
    (state,) = ReplicaBoard(slots.settings, slots.redis).states()
    assert state.preempted == 2 and state.inflight == {"interactive": 1, "batch": 4}
    left = set(slots.redis.zrange(slots.settings.keys.leases(lease.replica, "batch"), 0, -1))
    assert left == {h.member for h in held[:4]}  # the two youngest went


def test_an_interactive_request_with_room_still_preempts_what_would_queue_ahead_of_it(pool):
    slots = pool(capacity=4, pipeline=2, triton_replicas=ONE, preempt_victims=2)
    held = []
    for _ in range(5):  # one beyond capacity, one slot of the pipeline free
        held += take(slots, "batch", 1)
        time.sleep(0.002)
    lease = slots.try_acquire("interactive", uuid.uuid4().hex)
    assert isinstance(lease, Lease) and lease.victim == held[-1].member
    (state,) = ReplicaBoard(slots.settings, slots.redis).states()
    assert state.preempted == 1 and state.inflight == {"interactive": 1, "batch": 4}
    # Within capacity, nothing is preempted: nothing queues ahead of it in the engine.
    calm = pool(capacity=4, pipeline=2, triton_replicas=ONE, preempt_victims=2)
    take(calm, "batch", 3)
    other = calm.try_acquire("interactive", uuid.uuid4().hex)
    assert isinstance(other, Lease) and other.victim == ""


def test_while_a_burst_of_interactive_requests_starts_at_a_replica_batch_sends_it_nothing_new(pool):
    slots = pool(capacity=8)
    first, second = take(slots, "interactive", 2)
    assert first.replica != second.replica  # one starting at each replica: batch still goes
    assert isinstance(slots.try_acquire("batch", "b1"), Lease)
    third = slots.try_acquire("interactive", uuid.uuid4().hex)
    assert isinstance(third, Lease)
    busy = third.replica  # two starting there now
    placed = [slots.try_acquire("batch", uuid.uuid4().hex) for _ in range(3)]
    assert all(isinstance(p, Lease) and p.replica != busy for p in placed)
    for lease in (first, second, third):
        slots.started(lease)  # their first tokens came
    assert busy in {slots.try_acquire("batch", uuid.uuid4().hex).replica for _ in range(4)}  # type: ignore[union-attr]


def test_a_batch_call_whose_tokens_stream_is_never_preempted_and_interactive_then_waits(pool):
    slots = pool(capacity=1, triton_replicas=ONE)
    (streaming,) = take(slots, "batch", 1, preemptible=False)
    assert slots.try_acquire("interactive", "i1") == "full"
    # An interactive request waiting for a slot keeps batch requests from taking one first.
    slots.release(streaming)
    assert slots.try_acquire("batch", "b1") == "full"
    assert isinstance(slots.try_acquire("interactive", "i1"), Lease)


def test_a_waiting_request_gets_the_slot_released_while_it_waits_and_gives_up_at_its_deadline(pool):
    slots = pool(capacity=1, triton_replicas=ONE)
    (held,) = take(slots, "batch", 1)
    with pytest.raises(DeadlineExceeded):
        slots.acquire("batch", time.time() + 0.3, lambda: False)
    got: list[Lease] = []
    waiter = threading.Thread(target=lambda: got.append(slots.acquire("batch", time.time() + 30, lambda: False)))
    waiter.start()
    slots.release(held)
    slots.signal.wake()  # what the worker's listener does when it hears the slot channel
    waiter.join(10)
    assert got and got[0].replica == held.replica


def test_replicas_that_are_down_get_nothing(pool):
    slots = pool(capacity=4)
    board = ReplicaBoard(slots.settings, slots.redis)
    board.mark_down("gpu-1", "test: gone")
    assert per_replica(take(slots, "batch", 4)) == {"gpu-0": 4, "gpu-1": 0}
    board.mark_down("gpu-0", "test: gone too")
    assert slots.try_acquire("interactive", "i") == "down"


def test_leases_of_a_holder_that_stopped_beating_go_stale(pool):
    slots = pool(capacity=1, triton_replicas=ONE)
    (held,) = take(slots, "batch", 1)
    key = slots.settings.keys.leases(held.replica, "batch")
    slots.redis.zadd(key, {held.member: time.time() - LEASE_TTL_S - 1})  # its worker died long ago
    assert isinstance(slots.try_acquire("batch", "next"), Lease)


def test_static_and_reserve_policies_cap_batch_per_replica(pool):
    static = pool(capacity=8, batch_policy="static", batch_inflight_max=2,
                  triton_replicas=ONE)
    take(static, "batch", 2)
    assert static.try_acquire("batch", "b") == "full"
    assert len(take(static, "interactive", 9)) == 9  # interactive is never held back (nor preempts)

    reserve = pool(capacity=8, batch_policy="reserve", interactive_reserve_min=2,
                   triton_replicas=ONE)
    interactive = take(reserve, "interactive", 3)
    take(reserve, "batch", 5)  # 8 - a reserve of the 3 interactive in flight
    assert reserve.try_acquire("batch", "b") == "full"
    for lease in interactive:
        reserve.release(lease)
    assert reserve.try_acquire("batch", "b") == "full"  # the recent peak of 3 still holds its reserve


def test_batch_stops_at_the_occupancy_the_objectives_allow_and_interactive_never_does(pool):
    slots = pool(capacity=8, triton_replicas=ONE)
    key = slots.settings.keys.replica("gpu-0")
    slots.redis.hset(key, "batch_limit", 3)
    slots.started(take(slots, "interactive", 1)[0])
    take(slots, "batch", 2)  # 1 + 2 in flight: the limit of 3
    assert slots.try_acquire("batch", "b") == "full"
    more = take(slots, "interactive", 2)  # interactive is never held by it
    for lease in more:
        slots.started(lease)  # (interactive requests still starting would keep batch away)
    slots.redis.hset(key, "batch_limit", 6)
    assert isinstance(slots.try_acquire("batch", "b"), Lease)  # 6 in flight now
    assert slots.try_acquire("batch", "c") == "full"
    slots.redis.hdel(key, "batch_limit")  # no objective: the policy's room alone (8)
    take(slots, "batch", 2)
    assert slots.try_acquire("batch", "d") == "full"
