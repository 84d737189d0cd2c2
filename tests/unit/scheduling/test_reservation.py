"""What a refused submission gives back: everything its gates took, last taken first, once."""

from __future__ import annotations

import pytest

from fleet.errors import Overloaded
from fleet.scheduling.reservation import Reservation


def test_a_refusal_gives_back_everything_taken_in_reverse_order():
    given: list[tuple[str, int]] = []
    with pytest.raises(Overloaded):
        with Reservation("run r1") as held:
            held.took("quota", lambda n: given.append(("quota", n)), 1)
            held.took("ledger", lambda n: given.append(("ledger", n)))
            raise Overloaded("pool full", retry_after_s=1.0)
    assert given == [("ledger", 1), ("quota", 1)]


def test_a_submission_that_gets_through_keeps_everything():
    given: list[str] = []
    with Reservation() as held:
        held.took("quota", lambda n: given.append("quota"))
        held.commit()
    assert given == []


def test_leaving_without_commit_gives_back_as_a_repeat_answer_does():
    given: list[str] = []

    def admit() -> str:
        with Reservation() as held:
            held.took("quota", lambda n: given.append("quota"))
            return "existing-run"  # the idempotency key named a run meanwhile

    assert admit() == "existing-run" and given == ["quota"]


def test_part_kept_part_given_back():
    given: list[int] = []
    with Reservation() as held:
        places = held.took("batch places", given.append, 10)
        places.keep(7)
    assert given == [3]


def test_a_give_back_that_fails_does_not_hide_the_refusal_nor_stop_the_others():
    given: list[str] = []

    def broken(n: int) -> None:
        raise ConnectionError("Redis went away")

    with pytest.raises(Overloaded, match="pool full"):
        with Reservation() as held:
            held.took("quota", lambda n: given.append("quota"))
            held.took("ledger", broken)
            raise Overloaded("pool full", retry_after_s=1.0)
    assert given == ["quota"]
