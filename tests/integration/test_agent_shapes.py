"""Agents that fan out and wait, end to end on real Redis, Triton and workers: several tool
calls from one model reply run at once, a map over a list joins once even when a worker is
killed mid fan-out, and a run parks on a wait step until a signal resumes it."""

from __future__ import annotations

import os
import signal
import time
import uuid

import httpx
import pytest

from fleet.ops import launch
from fleet.scheduling.recount import Recount

from .conftest import close_fleet, new_fleet, running_fleet, served_gateway, tally

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sfleet(redis_url, triton, session_dir):
    yield from running_fleet(redis_url, triton, session_dir, "s", step_time_limit_s=10, visibility_timeout_s=12, stall_after_s=15,
                             reconcile_interval_s=0.5)


def _done_events(client, run_id: str) -> list[str]:
    return [e["step"] for e in client.events(run_id, timeout=1) if e["type"] == "step" and e["status"] == "done"]


def test_several_tool_calls_from_one_reply_run_in_parallel_and_join_once(sfleet):
    run_id = sfleet.client.submit("multicalc", {"question": "What are 12 * 7 and 3 + 4 and 100 / 8?"})
    assert tally(sfleet.client, [run_id], 60)["completed"] == 1
    run = sfleet.client.get(run_id)
    assert run.status == "succeeded", run.error
    assert [c["input"] for c in run.outputs["plan"]["calls"]] == ["12 * 7", "3 + 4", "100 / 8"]
    assert run.outputs["act"] == [84, 7, 12.5]
    assert [run.outputs[f"act#{i}"] for i in (1, 2, 3)] == [84, 7, 12.5]
    assert sorted(_done_events(sfleet.client, run_id)) == ["act", "act#1", "act#2", "act#3", "answer", "plan"]
    kinds = {s.key: s.kind for s in run.steps}
    assert kinds["act"] == "parallel" and kinds["act#2"] == "tool"
    join = next(s for s in run.steps if s.key == "act")
    assert join.started_at <= min(s.started_at for s in run.steps if s.key.startswith("act#"))
    assert join.duration_s is not None and join.finished_at >= max(s.finished_at for s in run.steps
                                                                    if s.key.startswith("act#"))


def test_a_failed_branch_is_kept_as_its_error_when_the_step_keeps_what_succeeded(sfleet):
    run_id = sfleet.client.submit("multicalc", {"question": "What are 1 / 0 and 2 + 2?"})
    tally(sfleet.client, [run_id], 60)
    run = sfleet.client.get(run_id)
    assert run.status == "succeeded", run.error
    assert run.outputs["act"][1] == 4 and "division by zero" in run.outputs["act"][0]["error"]


def test_a_worker_killed_mid_fan_out_loses_nothing_and_the_join_runs_once(sfleet):
    items = "; ".join(f"topic {i}" for i in range(12))
    ids = [sfleet.client.submit("fanout", {"items": items}, priority="batch") for _ in range(4)]
    for event in sfleet.client.events(ids[0], timeout=60):
        if event["type"] == "step" and event["status"] == "done" and event["step"].startswith("summarize#"):
            break
    worker = sfleet.procs.children.pop("inference")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    sfleet.start_worker("inference", "llm", "threads", 8)
    counts = tally(sfleet.client, ids, timeout=120)
    assert counts["completed"] == len(ids) and counts["lost"] == 0, (
        counts, [sfleet.client.get(r).error for r in ids])
    redelivered = sum(s.attempts > 1 for r in ids for s in sfleet.client.get(r).steps if s.key.startswith("summarize#"))
    assert redelivered > 0  # the kill hit branches in flight
    for run_id in ids:
        run = sfleet.client.get(run_id)
        assert run.status == "succeeded", (run_id, run.error)
        done = _done_events(sfleet.client, run_id)
        assert done.count("summarize") == 1, done  # joined once
        assert sorted(d for d in done if d.startswith("summarize#")) == sorted(f"summarize#{i}" for i in range(1, 13))
        assert len(run.outputs["summarize"]) == 12 and all(isinstance(o, str) for o in run.outputs["summarize"])


def _until(predicate, timeout_s: float = 30.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_a_run_parks_at_a_wait_holding_no_worker_and_resumes_on_its_signal_over_http(sfleet):
    run_id = sfleet.client.submit("approval", {"request": "Refund order 42"}, deadline_s=120)
    _until(lambda: sfleet.client.get(run_id).status == "waiting")
    run = sfleet.client.get(run_id)
    assert run.waiting_for == "approve" and run.wait_until > time.time() + 3600
    assert sfleet.client.store.parked() >= 1
    assert run_id not in sfleet.client.store.stalled(time.time() + 3600)  # nothing for the reconciler to resend
    recounted = Recount(sfleet.settings, sfleet.client.store.redis, sfleet.client.agents).run()
    assert not recounted.places  # a parked run keeps its tenant's place
    assert run_id not in sfleet.client.store.redis.zrange(sfleet.settings.keys.admitted("interactive"), 0, -1)
    with served_gateway(sfleet.settings) as url:
        with httpx.Client(base_url=url) as http:
            wrong = http.post(f"/v1/runs/{run_id}/signals/other", json={"x": 1})
            assert wrong.json()["outcome"] == "kept" and wrong.json()["status"] == "waiting"
            sent = http.post(f"/v1/runs/{run_id}/signals/approve", json={"note": "ok, refund it"})
            assert sent.status_code == 200, sent.text
            assert sent.json()["outcome"] == "resumed"
            assert http.post(f"/v1/runs/{uuid.uuid4().hex}/signals/approve", json={}).status_code == 404
    done = sfleet.client.wait(run_id, timeout=60)
    assert done.status == "succeeded", done.error
    assert done.outputs["approval"] == {"note": "ok, refund it"}
    wait = next(s for s in done.steps if s.key == "approval")
    assert wait.kind == "wait" and wait.status == "done" and wait.duration_s > 0.1  # parked since it started


def test_a_signal_before_its_wait_is_kept_and_a_timeout_follows_the_declared_path(sfleet):
    early = sfleet.client.submit("hold", {"text": "abc"})
    assert sfleet.client.signal(early, "go", "early bird") in ("kept", "resumed")
    assert sfleet.client.wait(early, timeout=30).result == "drib ylrae"
    late = sfleet.client.submit("hold", {"text": "abc"})
    _until(lambda: sfleet.client.get(late).status in ("waiting", "succeeded"))
    run = sfleet.client.wait(late, timeout=30)  # the reconciler's loop times it out after 2 s
    assert run.status == "succeeded" and run.outputs["pause"] == {"timed_out": True}
    assert sfleet.client.signal(late, "go", 1) == "ended"


def test_cancelling_a_run_mid_fan_out_stops_its_branches_and_it_never_joins(sfleet):
    items = "; ".join(f"slow topic {i}" for i in range(24))
    run_id = sfleet.client.submit("fanout", {"items": items}, priority="batch")
    for event in sfleet.client.events(run_id, timeout=60):
        if event["type"] == "step" and event["status"] == "done" and event["step"].startswith("summarize#"):
            break
    assert sfleet.client.cancel(run_id)
    time.sleep(3)  # whatever was in flight gives up or finishes
    run = sfleet.client.get(run_id)
    assert run.status == "cancelled"
    assert "summarize" not in run.outputs and "combine" not in run.outputs
    branches = [s for s in run.steps if s.key.startswith("summarize#")]
    assert len(branches) < 24  # the branches not yet sent were never sent


def test_a_lost_branch_message_is_sent_again_and_the_join_still_runs_once(redis_url, triton, session_dir):
    # Celery's chord would wait forever for a lost member; here the reconciler resends it.
    f = new_fleet(redis_url, triton, session_dir, "l", step_time_limit_s=1, visibility_timeout_s=1.5,
                  stall_after_s=2, reconcile_interval_s=0.5)
    try:
        run_id = f.client.submit("fanout", {"items": "alpha; beta; gamma; delta"}, deadline_s=60)
        queue, r = f"{f.settings.key_prefix}.llm.interactive", f.client.store.redis
        f.start_worker("tools", "tool", "threads", 2)  # splits the list and sends the 4 branches
        launch.wait_until(lambda: r.llen(queue) == 4, 30, "the branches sent")
        r.rpop(queue)  # one branch's message disappears, as in a crash mid-delivery
        f.start_worker("inference", "llm", "threads", 4)
        run = f.client.wait(run_id, timeout=60)
        assert run.status == "succeeded", run.error
        assert len(run.outputs["summarize"]) == 4 and all(isinstance(o, str) for o in run.outputs["summarize"])
        assert _done_events(f.client, run_id).count("summarize") == 1
        log = "".join((f.procs.log_dir / f"{name}.log").read_text() for name in ("tools", "inference"))
        assert f"run {run_id}: no step message in flight" in log
    finally:
        close_fleet(f)


def test_a_parked_batch_run_holds_no_place_in_the_dispatch_window(sfleet):
    run_id = sfleet.client.submit("approval", {"request": "Refund order 9"}, priority="batch", deadline_s=300)
    _until(lambda: sfleet.client.get(run_id).status == "waiting", 60)
    assert run_id not in sfleet.client.store.redis.hkeys(sfleet.settings.keys.dispatched)
    assert sfleet.client.signal(run_id, "approve", {"note": "later"}) == "resumed"
    assert sfleet.client.wait(run_id, timeout=60).status == "succeeded"


def test_a_failed_branch_dead_letters_the_run_and_its_replay_finishes_the_join(sfleet):
    run_id = sfleet.client.submit("brittle", {"exprs": "1 + 1; 2 * 3; 7 / 0; 4 - 1"})
    run = sfleet.client.wait(run_id, timeout=60)
    assert run.status == "dead_lettered", run.status
    entry, _ = sfleet.client.dlq_get(run.dead_letter_id)
    assert (entry.step, entry.iteration, entry.error_type) == ("each", 3, "PermanentError")
    assert entry.step_index == 1
    # The list the map ran over, fixed: the failed branch and those never sent run; the others stay.
    sfleet.client.dlq_replay(run.dead_letter_id, {"steps": {"split": ["1 + 1", "2 * 3", "7 / 1", "4 - 1"]}})
    replayed = sfleet.client.wait(run_id, timeout=60)
    assert replayed.status == "succeeded", replayed.error
    assert replayed.result == [2, 6, 7, 3]
