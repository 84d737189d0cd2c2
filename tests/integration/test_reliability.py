"""Failed steps: retries, dead letters, replays, poison steps, and a worker killed mid-step.

Every scenario counts runs submitted, completed, dead-lettered and lost (must be 0); the
counts are printed at the end of the test session (see tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from fleet.ops import launch
from tests.support.dev_engine import engine

generate = engine.generate
from fleet.inference.formats import TextFormat
from fleet.run.prompting import build_prompt

from .conftest import Fleet, close_fleet, new_fleet, running_fleet, tally

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rfleet(redis_url, triton, session_dir):
    """A fleet with short timeouts and few attempts."""
    yield from running_fleet(redis_url, triton, session_dir, "r", step_time_limit_s=5,
                             visibility_timeout_s=6, retry_max_attempts=3)


def test_permanent_error_is_dead_lettered_after_one_attempt(rfleet, reliability_report):
    run_id = rfleet.client.submit("doomed", {"value": "x"})
    reliability_report("permanent error", **tally(rfleet.client, [run_id], 30))  # counted before asserting
    run = rfleet.client.get(run_id)
    assert run.status == "dead_lettered"
    assert run.dead_letter_id and run.error["type"] == "PermanentError"
    entry, replays = rfleet.client.dlq_get(run.dead_letter_id)
    assert replays == []
    assert (entry.run_id, entry.agent, entry.step, entry.step_index) == (run_id, "doomed", "act", 1)
    assert entry.attempts == 1 and entry.priority == "interactive"
    assert entry.error_type == "PermanentError" and "always_fails refuses 'x'" in entry.error_message
    assert "Traceback" in entry.traceback and entry.worker
    assert entry.state["input"] == {"value": "x"}
    assert entry.state["steps"]["think"] == run.outputs["think"]
    assert [s.attempts for s in run.steps] == [1, 1]


def test_transient_errors_retry_with_backoff_then_dead_letter(rfleet, reliability_report):
    run_id = rfleet.client.submit("unreliable", {"value": "x"})
    counts = tally(rfleet.client, [run_id], 30)
    run = rfleet.client.get(run_id)
    attempts = max((s.attempts for s in run.steps), default=0)
    reliability_report("transient errors, retries spent", **counts, note=f"{attempts} attempts")
    assert attempts > 1  # the fault hit the step, which was retried
    assert run.status == "dead_lettered"
    entry, _ = rfleet.client.dlq_get(run.dead_letter_id)
    assert entry.error_type == "TransientError" and "simulated transient failure" in entry.error_message
    assert entry.attempts == rfleet.settings.retry_max_attempts == 3
    running = [e for e in rfleet.client.events(run_id, timeout=1) if e.get("status") == "running" and e["type"] == "step"]
    assert len(running) == 3


def test_a_step_that_kills_its_worker_is_dead_lettered_and_the_worker_serves_on(rfleet, reliability_report):
    run_id = rfleet.client.submit("crasher", {"value": "x"})
    crashed = tally(rfleet.client, [run_id], 60)
    run = rfleet.client.get(run_id)
    # The same tool worker still serves other runs.
    ok = rfleet.client.submit("calculator", {"question": "What is 5 * 5?"})
    served = tally(rfleet.client, [ok], 30)
    reliability_report("step crashes its worker", **{k: crashed[k] + served[k] for k in crashed},
                       note="+ a run served after it")
    assert run.status == "dead_lettered"
    entry, _ = rfleet.client.dlq_get(run.dead_letter_id)
    assert "delivered 3 times without finishing" in entry.error_message
    deliveries = [e for e in rfleet.client.events(run_id, timeout=1) if e["type"] == "step" and e.get("step") == "act"]
    # Three deliveries ran and crashed their worker; the fourth was refused and dead-lettered.
    assert [e["attempt"] for e in deliveries] == ["1", "2", "3", "4"]
    assert entry.attempts == 4
    assert rfleet.client.get(ok).result == "The answer is 25."
    assert rfleet.procs.children["tools"].poll() is None


def test_replay_with_a_patch_that_fixes_the_input_completes_the_run(rfleet, reliability_report):
    run_id = rfleet.client.submit("strict", {"value": "seven"})
    run = rfleet.client.wait(run_id, timeout=30)
    assert run.status == "dead_lettered"
    think_before = run.outputs["think"]
    replayed = rfleet.client.dlq_replay(run.dead_letter_id, {"input": {"value": "7"}})
    reliability_report("replay with a patch", **tally(rfleet.client, [run_id], 30))
    run = rfleet.client.get(run_id)
    assert replayed == run_id
    assert run.status == "succeeded" and run.result == 7
    # The step before the failed one is not run again; its output is kept.
    assert run.outputs["think"] == think_before
    assert [s.key for s in run.steps if s.status == "done"] == ["think", "act"]
    _, replays = rfleet.client.dlq_get(run.dead_letter_id or _entry_of(rfleet, run_id))
    assert replays[0]["patch"] == {"input": {"value": "7"}} and replays[0]["outcome"] == "succeeded"
    with pytest.raises(Exception, match="input.value"):
        rfleet.client.dlq_replay(_entry_of(rfleet, run_id), {"input": {"value": 7.5, "extra": 1}})


def _entry_of(f: Fleet, run_id: str) -> str:
    return next(e.id for e in f.client.dlq_list(limit=1000) if e.run_id == run_id)


def test_bulk_replay_and_the_dlq_cli(rfleet, reliability_report):
    ids = [rfleet.client.submit("strict", {"value": v}) for v in ("a", "b")]
    assert [rfleet.client.wait(r, timeout=30).status for r in ids] == ["dead_lettered"] * 2
    env = {**os.environ, **rfleet.env}
    cli = [sys.executable, "-m", "fleet.surfaces.cli"]
    listed = json.loads(subprocess.run([*cli, "dlq", "list", "--agent", "strict", "--json"], env=env,
                                       capture_output=True, text=True, check=True).stdout)
    assert {e["run_id"] for e in listed["entries"]} >= set(ids)
    shown = subprocess.run([*cli, "dlq", "show", _entry_of(rfleet, ids[0]), "--json"], env=env,
                           capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["state"]["input"] == {"value": "a"}
    bad = subprocess.run([*cli, "dlq", "replay", "--all", "--agent", "strict", "--patch", "{nope"],
                         env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--patch is not valid JSON" in bad.stderr
    out = subprocess.run([*cli, "dlq", "replay", "--all", "--agent", "strict", "--patch",
                          '{"input": {"value": "11"}}', "--json"], env=env, capture_output=True, text=True, check=True)
    counts = tally(rfleet.client, ids, 30)
    reliability_report("bulk replay", **counts)
    assert set(ids) <= set(json.loads(out.stdout)["replayed"])
    assert [rfleet.client.get(r).result for r in ids] == [11, 11]
    purged = subprocess.run([*cli, "dlq", "purge", "--older-than", "1h", "--json"], env=env,
                            capture_output=True, text=True, check=True)
    assert json.loads(purged.stdout)["purged"] == 0  # every entry here is younger than an hour


def test_kill_9_of_an_inference_worker_mid_step_loses_nothing_and_applies_nothing_twice(rfleet, reliability_report):
    topics = [f"worker death {i}" for i in range(24)]
    ids = [rfleet.client.submit("writer", {"topic": t}, priority="batch") for t in topics]
    # Kill as soon as the first step finishes somewhere: the other threads are mid-step.
    for event in rfleet.client.events(ids[0], timeout=30):
        if event["type"] == "step" and event["status"] == "done":
            break
    # As if the worker died inside the sweep that restores lost messages: its lock stays
    # behind for as long as the fleet lets it (kombu's default would be 300 s).
    expire = rfleet.client.app.conf.broker_transport_options["unacked_mutex_expire"]
    rfleet.client.store.redis.set("unacked_mutex", "a-killed-worker", ex=expire)
    worker = rfleet.procs.children.pop("inference")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    rfleet.start_worker("inference", "llm", "threads", 8)
    counts = tally(rfleet.client, ids, timeout=90)
    redelivered = sum(any(s.attempts > 1 for s in rfleet.client.get(r).steps) for r in ids)
    reliability_report("kill -9 inference worker", **counts, note=f"{redelivered} runs had a step redelivered")
    assert redelivered > 0  # the kill hit steps in flight
    assert counts["completed"] == len(ids) and counts["lost"] == 0
    agent = rfleet.client.agents["writer"]
    for run_id, topic in zip(ids, topics):
        run = rfleet.client.get(run_id)
        done = [e["step"] for e in rfleet.client.events(run_id, timeout=1) if e["type"] == "step" and e["status"] == "done"]
        assert sorted(done) == ["critique", "draft", "revise"], (run_id, done)  # each committed once
        prompt = TextFormat().render(build_prompt(agent, agent.step("revise"), rfleet.client.store.load(run_id))).text
        expected = "".join(generate(prompt, {"max_tokens": 48})[0]).strip()
        assert run.result == expected


def test_a_run_whose_message_vanished_is_sent_again(redis_url, triton, session_dir, reliability_report):
    f = new_fleet(redis_url, triton, session_dir, "v", step_time_limit_s=1, visibility_timeout_s=1.5,
                  stall_after_s=2, reconcile_interval_s=0.5)
    prefix = f.settings.key_prefix
    try:
        lost = f.client.submit("writer", {"topic": "a message lost between queue and worker"}, priority="batch")
        waiting = f.client.submit("writer", {"topic": "a message waiting in its queue"}, priority="batch")
        queue = f"{prefix}.llm.batch"
        r = f.client.store.redis
        # Batch runs wait in the backlog until a worker's dispatcher sends them: the tool
        # worker's sends both (it takes no model steps, so their messages stay queued).
        f.start_worker("tools", "tool", "prefork", 1)
        launch.wait_until(lambda: r.llen(queue) == 2, 30, "both runs dispatched")
        r.rpop(queue)  # the oldest message (the first run's) disappears, as in a crash mid-delivery
        # The sweeper must not resend a run whose message is still queued: only `lost` goes again.
        f.start_worker("inference", "llm", "threads", 4)
        counts = tally(f.client, [lost, waiting], timeout=30)
        log = "".join((f.procs.log_dir / f"{name}.log").read_text() for name in ("tools", "inference"))
        resent = log.count("no step message in flight")
        reliability_report("message vanished (reconciler)", **counts, note=f"{resent} run sent again")
        assert counts == {"submitted": 2, "completed": 2, "dead_lettered": 0, "lost": 0}
        assert f"run {lost}: no step message in flight" in log
        assert f"run {waiting}: no step message in flight" not in log
    finally:
        close_fleet(f)
