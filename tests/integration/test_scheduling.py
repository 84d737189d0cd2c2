"""Interactive ahead of batch: deadlines, admission control, queue order, the batch cap.

Real Redis, real Triton (dev model), real worker processes, each test in its own namespace.
"""

from __future__ import annotations

import urllib.request

import pytest

from fleet.errors import Overloaded
from fleet.inference.replicas import ReplicaBoard

from .conftest import Fleet, close_fleet, new_fleet

pytestmark = pytest.mark.integration


@pytest.fixture
def namespace(redis_url, triton, session_dir):
    """A fresh fleet namespace with no workers yet; tests start the ones they need."""
    made: list[Fleet] = []

    def make(**overrides) -> Fleet:
        made.append(new_fleet(redis_url, triton, session_dir, "s", **overrides))
        return made[-1]

    yield make
    for f in made:
        close_fleet(f)


def _triton_requests(triton) -> float:
    """Requests Triton has received for the dev model (its own Prometheus counters)."""
    body = urllib.request.urlopen(triton.metrics_url, timeout=5).read().decode()
    total = 0.0
    for line in body.splitlines():
        if line.startswith(("nv_inference_request_success", "nv_inference_request_failure")) and 'model="medium_sim"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_a_step_past_its_deadline_never_reaches_triton(namespace, triton):
    f = namespace()
    run_id = f.client.submit("calculator", {"question": "What is 1 + 1?"}, deadline_s=0.2)
    before = _triton_requests(triton)
    f.start_worker("inference", "llm")  # starting takes longer than the 0.2 s deadline
    run = f.client.wait(run_id, timeout=30)
    assert run.status == "expired"
    assert run.error["type"] == "DeadlineExceeded" and "before the step started" in run.error["message"]
    assert run.steps == []  # the step never ran
    assert _triton_requests(triton) == before  # and Triton never saw a request


def test_a_deadline_passing_mid_generation_expires_the_run_and_cancels_the_request(namespace):
    f = namespace()
    f.start_worker("inference", "llm")
    f.start_worker("tools", "tool", "prefork", 1)
    run_id = f.client.submit("slow", {"topic": "too long for its deadline"}, deadline_s=1.0, stream=True)
    run = f.client.wait(run_id, timeout=30)
    assert run.status == "expired"
    assert "after" not in run.outputs  # the next step was never run
    tokens = [e for _, e in f.client.store.redis.xrange(f.client.store.events_key(run_id)) if e["type"] == "token"]
    assert 0 < len(tokens) < 2000  # generation stopped when the budget ran out


def test_interactive_runs_that_cannot_meet_their_deadline_are_refused(namespace):
    f = namespace(interactive_deadline_s=20)
    f.start_worker("inference", "llm", concurrency=1, classes=("interactive",))
    f.start_worker("tools", "tool", "prefork", 1)
    # Measure: one long run (2000 tokens, ~8 s) teaches admission the recent step time.
    first = f.client.submit("slow", {"topic": "warm up"})
    assert f.client.wait(first, timeout=60).status == "succeeded"
    accepted, refused = [], None
    for i in range(10):  # the single slot is busy; each queued run adds ~8 s of predicted wait
        try:
            accepted.append(f.client.submit("slow", {"topic": f"backlog {i}"}))
        except Overloaded as exc:
            refused = exc
            break
    assert refused is not None, "admission never refused"
    assert 1 <= len(accepted) <= 3
    msg = str(refused)
    assert "interactive queue" in msg and "deadline" in msg and "retry in" in msg
    assert refused.retry_after_s >= 1
    # Batch submissions are not refused at this depth, and nothing accepted was dropped.
    batch = f.client.submit("writer", {"topic": "batch still welcome"}, priority="batch")
    for run_id in accepted:
        assert f.client.get(run_id).status in ("queued", "running")
        f.client.cancel(run_id)
    assert f.client.get(batch).status == "queued"


def test_interactive_steps_go_ahead_of_a_batch_backlog(namespace):
    f = namespace()
    batch = [f.client.submit("writer", {"topic": f"backlog {i}"}, priority="batch") for i in range(20)]
    interactive = [f.client.submit("writer", {"topic": f"person waiting {i}"}) for i in range(3)]
    f.start_worker("inference", "llm", concurrency=1)  # one shared slot, interactive queue first
    done = [f.client.wait(r, timeout=60) for r in interactive]
    assert all(r.status == "succeeded" for r in done)
    last_interactive = max(r.finished_at for r in done)
    started_batch = [f.client.get(r) for r in batch]
    # Interactive work finished while most of the backlog had not even started.
    untouched = [r for r in started_batch if r.started_at is None or r.started_at > last_interactive]
    assert len(untouched) >= 15, len(untouched)
    for r in batch:
        f.client.cancel(r)


def test_a_static_cap_holds_batch_requests_at_a_replica_and_not_interactive_ones(namespace):
    f = namespace(batch_policy="static", batch_inflight_max=2)
    f.start_worker("inference", "llm", concurrency=8)
    batch = [f.client.submit("writer", {"topic": f"capped {i}"}, priority="batch") for i in range(10)]
    interactive = [f.client.submit("writer", {"topic": f"uncapped {i}"}) for i in range(6)]
    results = [f.client.wait(r, timeout=90).status for r in batch + interactive]
    assert results == ["succeeded"] * 16
    (replica,) = ReplicaBoard(f.settings, f.client.store.redis).states()
    assert replica.peak["batch"] == 2  # the cap was reached and never passed
    assert replica.peak["interactive"] > 2  # interactive requests are not held to it
    assert replica.inflight == {"interactive": 0, "batch": 0}  # every slot was given back
