"""The lender takes a borrowed thread back only when interactive work waits, one at a time."""

from __future__ import annotations

from fleet.inference import lending
from fleet.inference.lending import Lender


class FakePool:
    def __init__(self, borrowed: int) -> None:
        self.live = borrowed
        self.handed = 0

    def borrowed(self) -> int:
        return self.live

    def hand_back_youngest(self) -> bool:
        if not self.live:
            return False
        self.live -= 1
        self.handed += 1
        return True


class FakeRedis:
    def __init__(self, waiting: int) -> None:
        self.waiting = waiting
        self.looked = 0

    def llen(self, _queue: str) -> int:
        self.looked += 1
        return self.waiting


def test_nothing_is_handed_back_while_no_interactive_step_waits():
    pool, client = FakePool(3), FakeRedis(0)
    lender = Lender(client, pool, "q.llm.interactive")  # type: ignore[arg-type]
    for _ in range(5):
        lender.tick()
    assert pool.handed == 0 and client.looked == 5


def test_one_thread_back_per_settling_time_and_no_look_without_borrowed_calls(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(lending.time, "monotonic", lambda: now[0])
    pool, client = FakePool(2), FakeRedis(1)
    lender = Lender(client, pool, "q.llm.interactive")  # type: ignore[arg-type]
    lender.tick()
    lender.tick()  # the freed thread has not taken the step yet: leave the next one alone
    assert pool.handed == 1
    now[0] += lending.SETTLE_S
    lender.tick()
    assert pool.handed == 2 and lender.taken_back == 2
    looked = client.looked
    now[0] += lending.SETTLE_S
    lender.tick()  # nothing borrowed any more: Redis is not even asked
    assert client.looked == looked
