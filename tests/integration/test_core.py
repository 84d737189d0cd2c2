"""The core primitives against a real Redis: scripts called by SHA and loaded again when Redis
forgets them, fleet-wide leadership, and the background loop that survives a failing pass."""

from __future__ import annotations

import threading
import uuid

import pytest
import redis

from fleet.connections import redis_at
from fleet.core import lua
from fleet.core.loops import BackgroundLoop, Leadership
from fleet.run.store import _TRANSITION

pytestmark = pytest.mark.integration


@pytest.fixture
def r(redis_url: str) -> redis.Redis:
    return redis_at(redis_url)


def _lead_script():
    return next(s for s in lua.scripts() if s.name == "lead-1")


def test_a_script_is_called_by_sha_and_loaded_again_after_redis_forgot_it(r):
    lead, lock = _lead_script(), f"t:{uuid.uuid4().hex}"
    assert lead.numkeys == 1 and len(lead.sha) == 40
    r.script_flush()
    assert r.script_exists(lead.sha) == [False]
    assert lead(r, [lock], ["me", 10_000]) == 1  # NOSCRIPT, loaded, called again: once
    assert r.script_exists(lead.sha) == [True] and r.get(lock) == "me"
    with pytest.raises(ValueError, match="takes 1 keys"):
        lead(r, [lock, "another"], ["me", 1])


def test_script_calls_on_a_pipeline_run_once_after_redis_forgot_them(r):
    lead = _lead_script()
    a, b = f"t:{uuid.uuid4().hex}", f"t:{uuid.uuid4().hex}"
    r.script_flush()
    pipe = r.pipeline(transaction=False)
    lead(pipe, [a], ["one", 10_000])
    pipe.incr(f"{a}:plain")  # a plain command beside them runs once too
    lead(pipe, [b], ["two", 10_000])
    assert lua.execute(pipe) == [1, 1, 1]
    assert (r.get(a), r.get(b), r.get(f"{a}:plain")) == ("one", "two", "1")
    # A script's text carries its shared fragments and the constants Python gives it.
    assert "local TERMINAL = {" in _TRANSITION.script and "local function active_field" in _TRANSITION.script


def test_one_worker_at_a_time_holds_a_lock_and_another_takes_over_when_it_lapses(r):
    lock = f"t:{uuid.uuid4().hex}"
    first, second = Leadership(r, lock, ttl_s=30), Leadership(r, lock, ttl_s=30)
    assert first.hold() and not second.hold() and first.hold()  # renewed by its holder
    r.delete(lock)  # the holder died and its lock lapsed
    assert second.hold() and not first.hold()


def test_a_background_loop_goes_on_past_a_failing_pass_and_stops_when_asked():
    calls: list[int] = []
    done = threading.Event()

    def work() -> bool:
        calls.append(len(calls))
        if len(calls) == 1:
            raise redis.ConnectionError("Redis away for a moment")
        if len(calls) == 3:
            done.set()
        return len(calls) < 3  # work found: the next pass at once

    loop = BackgroundLoop("test-loop", work, interval_s=0.01)
    loop.start()
    assert done.wait(10)
    loop.stop(timeout_s=10)
    assert calls[:3] == [0, 1, 2] and loop.passes >= 2
