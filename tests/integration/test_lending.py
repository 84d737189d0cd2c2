"""Batch on threads lent by interactive work (FLEET_INFERENCE_BORROW): the interactive-only worker
takes batch steps while idle, and hands a thread back the moment an interactive step waits: the
batch call is cancelled at Triton, its step goes back to its queue with no attempt spent, and it
is committed once when it runs again."""

from __future__ import annotations

import time

import pytest

from fleet.broker.queues import queue_name
from tests.support.waiting import wait_until

from .conftest import close_fleet, model_metrics, new_fleet

pytestmark = pytest.mark.integration


@pytest.fixture
def lending_fleet(redis_url, triton, session_dir):
    f = new_fleet(redis_url, triton, session_dir, letter="l", inference_borrow="true")
    try:
        f.start_worker("interactive", "llm", "threads", 1, classes=("interactive",))  # its only thread
        f.start_worker("tools", "tool", "prefork", 1)
        yield f
    finally:
        close_fleet(f)


def _ramble_running(f, run_id: str) -> bool:  # noqa: ANN001
    run = f.client.get(run_id)
    return bool(run.steps) and run.steps[0].status == "running"


def test_a_borrowed_thread_is_handed_back_at_once_and_its_step_commits_once(lending_fleet, triton):
    f = lending_fleet
    cancelled_before = model_metrics(triton.metrics_url).get("medium_sim:requests_cancelled_total", 0)
    batch = f.client.submit("slow", {"topic": "the sea"}, priority="batch")  # 2000 tokens: seconds of decoding
    wait_until(lambda: _ramble_running(f, batch), 30, "the batch step on the interactive worker's thread")
    time.sleep(0.5)  # well into its model call

    person = f.client.submit("oneshot", {"topic": "lunch"})
    done = f.client.wait(person, timeout=30)
    assert done.status == "succeeded"
    assert done.latency_s < 3.0, done.latency_s  # not behind the batch call's seconds of decoding
    cancelled = model_metrics(triton.metrics_url, timeout_s=5).get("medium_sim:requests_cancelled_total", 0)
    assert cancelled > cancelled_before  # the borrowed call was cancelled at Triton

    run = f.client.wait(batch, timeout=120)
    assert run.status == "succeeded"
    ramble = run.steps[0]
    assert ramble.attempts == 1  # handing back spent no attempt
    done_events = [e for _, e in f.client.store.redis.xrange(f.client.store.events_key(batch))
                   if e["type"] == "step" and e.get("step") == ramble.key and e.get("status") == "done"]
    assert len(done_events) == 1  # committed once
    assert len(run.result.split()) == 2000  # the whole output, sent again from the start


def test_a_handed_back_step_goes_to_the_head_of_its_queue(lending_fleet):
    f = lending_fleet
    first = f.client.submit("slow", {"topic": "rivers"}, priority="batch")
    wait_until(lambda: _ramble_running(f, first), 30, "the first batch step on the only thread")
    second = f.client.submit("slow", {"topic": "hills"}, priority="batch")
    queue = queue_name(f.settings, "llm", "batch")
    wait_until(lambda: f.client.store.redis.llen(queue) >= 1, 30, "the second batch step waiting in its queue")

    person = f.client.submit("oneshot", {"topic": "tea"})
    assert f.client.wait(person, timeout=30).status == "succeeded"
    runs = [f.client.wait(r, timeout=120) for r in (first, second)]
    assert [r.status for r in runs] == ["succeeded", "succeeded"]
    # handed back ahead of the step that waited behind it: the first runs again before the second
    assert runs[0].steps[0].finished_at <= runs[1].steps[0].started_at
