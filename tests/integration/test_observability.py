"""What operators see: Prometheus metrics from the workers, Sentry events, Flower.

One fleet namespace whose workers serve /metrics on ports of their own and report to a
Sentry endpoint served here (a small HTTP server that records the envelopes it receives).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleet.broker.queues import all_queues
from fleet.ops import launch
from fleet.surfaces.client import FleetClient

from ..support.sentry_server import SentryRecorder, sentry_server, tags_of
from .conftest import TEST_AGENTS_AND_TOOLS, Fleet, make_settings

pytestmark = pytest.mark.integration

FLOWER_AUTH = "ops:flower-test-pw"


# --- a Sentry endpoint ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sentry() -> Iterator[SentryRecorder]:
    with sentry_server() as recorder:
        yield recorder


@dataclass
class ObservedFleet(Fleet):
    metrics_urls: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def ofleet(redis_url, triton, tmp_path_factory, sentry) -> Iterator[ObservedFleet]:
    prefix = f"o{uuid.uuid4().hex[:8]}"
    settings, env = make_settings(redis_url, triton, prefix, **TEST_AGENTS_AND_TOOLS,
                                  retry_max_attempts=3, sentry_dsn=sentry.dsn)
    procs = launch.Processes(tmp_path_factory.mktemp(prefix) / "logs")
    client = FleetClient(settings)
    f = ObservedFleet(settings, env, procs, client)
    try:
        f.metrics_urls = [f.start_metered_worker("inference", "llm", "threads", 4),
                          f.start_metered_worker("tools", "tool", "prefork", 2)]
        yield f
    finally:
        procs.stop()
        client.close()


# --- metrics ----------------------------------------------------------------------------------

def _scrape(urls: list[str]) -> dict[tuple[str, frozenset], list[float]]:
    """Every sample of every endpoint: (name, labels) -> one value per endpoint that has it."""
    samples: dict[tuple[str, frozenset], list[float]] = {}
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples.setdefault((s.name, frozenset(s.labels.items())), []).append(s.value)
    return samples


def _scrape_until(urls: list[str], done, timeout_s: float = 10.0) -> dict:  # noqa: ANN001
    """Scrape until ``done(samples)``: a worker counts a run just after the run's status changed."""
    found: list[dict] = []

    def check() -> bool:
        found.append(_scrape(urls))
        return done(found[-1])

    launch.wait_until(check, timeout_s, "metrics", interval_s=0.1)
    return found[-1]


def _total(samples: dict, name: str, **labels: str) -> float:
    """Sum over endpoints and over the labels not given."""
    want = set(labels.items())
    return sum(sum(v) for (n, ls), v in samples.items() if n == name and want <= ls)


def test_workers_export_run_step_model_and_queue_metrics(ofleet):
    before = _scrape(ofleet.metrics_urls)
    questions = ["What is 6 * 7?", "What is 12 * 7 + 3?", "What is 2 + 2?"]
    ok = [ofleet.client.submit("calculator", {"question": q}) for q in questions]
    doomed = ofleet.client.submit("doomed", {"value": "x"}, priority="batch")
    assert all(ofleet.client.wait(r, timeout=30).status == "succeeded" for r in ok)
    assert ofleet.client.wait(doomed, timeout=30).status == "dead_lettered"
    n = len(questions)
    after = _scrape_until(ofleet.metrics_urls, lambda now: (
        _total(now, "fleet_runs_total") - _total(before, "fleet_runs_total") >= n + 1))

    def delta(name: str, **labels: str) -> float:
        return _total(after, name, **labels) - _total(before, name, **labels)

    assert delta("fleet_runs_total", agent="calculator", priority="interactive", status="succeeded") == n
    assert delta("fleet_run_latency_seconds_count", agent="calculator", status="succeeded") == n
    assert delta("fleet_runs_total", agent="doomed", priority="batch", status="dead_lettered") == 1
    assert delta("fleet_dead_letters_total", agent="doomed", step="act") == 1
    # Tool steps ran in prefork children: their values reach the parent's endpoint.
    assert delta("fleet_step_duration_seconds_count", agent="calculator", step="act", kind="tool",
                 priority="interactive") == n
    assert delta("fleet_step_duration_seconds_count", agent="calculator", step="plan", kind="llm") == n
    assert delta("fleet_model_ttft_seconds_count", model="medium_sim", priority="interactive") == 2 * n
    assert delta("fleet_tokens_in_total", model="medium_sim", priority="interactive") > 0
    assert delta("fleet_tokens_out_total", model="medium_sim", priority="interactive") > 0
    assert delta("fleet_tokens_out_total", model="medium_sim", priority="batch") > 0  # doomed's think

    # Fleet-wide gauges: every worker exports one per queue and per class.
    for url in ofleet.metrics_urls:
        one = _scrape([url])
        for queue in all_queues(ofleet.settings):
            assert ("fleet_queue_depth", frozenset({("queue", queue)})) in one, (url, queue)
            assert ("fleet_queue_oldest_age_seconds", frozenset({("queue", queue)})) in one, (url, queue)
        for priority in ("interactive", "batch"):
            assert ("fleet_triton_inflight_requests", frozenset({("priority", priority)})) in one


# --- Sentry -----------------------------------------------------------------------------------

def _of_run(run_id: str):  # noqa: ANN202
    return lambda e: e.get("level") == "error" and tags_of(e).get("run_id") == run_id


def test_a_dead_lettered_step_is_reported_with_its_run(ofleet, sentry):
    run_id = ofleet.client.submit("doomed", {"value": "boom"})
    run = ofleet.client.wait(run_id, timeout=30)
    assert run.status == "dead_lettered"
    [event] = sentry.wait_for(_of_run(run_id))
    tags = tags_of(event)
    assert (tags["agent"], tags["step"], tags["priority"]) == ("doomed", "act", "interactive")
    assert tags["dead_letter"] == run.dead_letter_id
    [exc] = event["exception"]["values"]
    assert exc["type"] == "PermanentError" and "always_fails refuses 'boom'" in exc["value"]
    frames = exc["stacktrace"]["frames"]
    assert frames and not any("vars" in f for f in frames)  # no locals: prompts and inputs stay here


def test_retries_are_not_reported_only_the_dead_letter_they_end_in(ofleet, sentry):
    before = _scrape(ofleet.metrics_urls)
    run_id = ofleet.client.submit("unreliable", {"value": "x"})
    run = ofleet.client.wait(run_id, timeout=30)
    assert run.status == "dead_lettered"
    assert run.steps[0].attempts == ofleet.settings.retry_max_attempts == 3
    # The dead letter is flushed after every earlier event of the same worker: had a retry
    # been reported, it would be here by now.
    events = sentry.wait_for(_of_run(run_id))
    assert [e["exception"]["values"][-1]["type"] for e in events] == ["TransientError"]
    assert tags_of(events[0])["step"] == "think"
    after = _scrape_until(ofleet.metrics_urls, lambda now: (
        _total(now, "fleet_runs_total", agent="unreliable") - _total(before, "fleet_runs_total", agent="unreliable")))
    retried = (_total(after, "fleet_step_retries_total", agent="unreliable", step="think")
               - _total(before, "fleet_step_retries_total", agent="unreliable", step="think"))
    assert retried == 2
    # Across this namespace: one error event per dead letter, none for anything else.
    dead = {d.run_id for d in ofleet.client.dlq_list()}
    errors = sentry.wait_for(lambda e: e.get("level") == "error", lambda found: len(found) >= len(dead))
    assert sorted(tags_of(e)["run_id"] for e in errors) == sorted(dead)
    assert all("dead_letter" in tags_of(e) for e in errors)


# --- Flower -----------------------------------------------------------------------------------

def _flower_get(url: str) -> dict:
    req = urllib.request.Request(url, headers={
        "Authorization": "Basic " + base64.b64encode(FLOWER_AUTH.encode()).decode()})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_flower_lists_the_workers_and_tasks_named_agent_dot_step(ofleet):
    port = launch.free_port()
    flower = launch.start_flower(ofleet.procs, port, "127.0.0.1", FLOWER_AUTH, env=ofleet.env)
    url = f"http://127.0.0.1:{port}"
    launch.wait_until(lambda: urllib.request.urlopen(url + "/healthcheck", timeout=1).status == 200,
                      30, "flower", flower, 0.2)
    # The login is not on Flower's command line (ps shows every process's), and it is needed.
    assert FLOWER_AUTH.split(":")[1] not in " ".join(psutil.Process(flower.pid).cmdline())
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "/api/workers", timeout=10)
    assert refused.value.code == 401
    workers = _flower_get(url + "/api/workers?refresh=1")  # asks the workers (a broadcast)
    assert set(ofleet.nodes.values()) <= set(workers), workers.keys()
    # Flower's task list comes from the event stream: it is listening once the workers'
    # heartbeats (every 2 s) show up in its view.
    launch.wait_until(lambda: set(ofleet.nodes.values()) <= {
        w["hostname"] for w in _flower_get(url + "/workers?json=1")["data"] if w.get("status")},
        20, "flower events", flower, 0.2)

    run_id = ofleet.client.submit("calculator", {"question": "What is 9 * 9?"})
    assert ofleet.client.wait(run_id, timeout=30).status == "succeeded"

    def run_tasks() -> dict[str, dict]:
        tasks = _flower_get(url + "/api/tasks")
        return {t["name"]: t for t in tasks.values() if run_id in str(t.get("kwargs"))}

    # Flower learns of tasks from the event stream, a moment after they ran.
    launch.wait_until(lambda: {t.get("state") for t in run_tasks().values()} == {"SUCCESS"}
                      and len(run_tasks()) == 3, 20, "flower tasks", flower, 0.2)
    tasks = run_tasks()
    assert set(tasks) == {"calculator.plan", "calculator.act", "calculator.answer"}
    assert tasks["calculator.act"]["worker"] == ofleet.nodes["tools"]
    assert tasks["calculator.plan"]["worker"] == ofleet.nodes["inference"]
