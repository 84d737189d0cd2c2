"""The HTTP gateway end to end: uvicorn serving the app against this module's fleet.

The gateway streams events through :class:`fleet.surfaces.aio.AsyncFleetClient`; that client's own
API is checked here too, against the same fleet.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from fleet.broker.queues import all_queues
from fleet.errors import InvalidSubmission, RunNotFound
from fleet.ops import launch
from fleet.scheduling.backlog import Backlog
from fleet.surfaces.aio import AsyncFleetClient
from fleet.surfaces.gateway import create_gateway

from .conftest import close_fleet, new_fleet

pytestmark = pytest.mark.integration

KEY = "gw-test-key-1"
OTHER_KEY = "gw-test-key-2"
MAX_BODY = 65_536


@dataclass
class Gateway:
    url: str
    http: httpx.Client  # carries the API key
    app: FastAPI

    def sse(self, run_id: str, last_event_id: str | None = None, timeout: float = 60.0) -> Iterator[dict]:
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        with self.http.stream("GET", f"/v1/runs/{run_id}/events", headers=headers, timeout=timeout) as resp:
            assert resp.status_code == 200, resp.read()
            assert resp.headers["content-type"].startswith("text/event-stream")
            yield from parse_sse(resp.iter_lines())


def parse_sse(lines: Iterator[str]) -> Iterator[dict]:
    """Server-sent events as dicts: id, event, data (decoded JSON)."""
    event: dict = {}
    for line in lines:
        if not line:
            if event:
                event["data"] = json.loads(event["data"]) if "data" in event else None
                yield event
            event = {}
        elif not line.startswith(":"):  # ':' starts a keep-alive comment
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            event[name] = event[name] + "\n" + value if name == "data" and name in event else value


@pytest.fixture(scope="module")
def gateway(fleet) -> Iterator[Gateway]:
    settings = fleet.settings.model_copy(update={"api_keys": f"{KEY}, {OTHER_KEY}",
                                                 "gateway_max_body_bytes": MAX_BODY})
    port = launch.free_port()
    app = create_gateway(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    launch.wait_until(lambda: server.started, 30, "gateway", interval_s=0.05)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
        yield Gateway(url, http, app)
    server.should_exit = True
    thread.join(15)
    assert not thread.is_alive(), "gateway did not stop"


def _wait_finished(fleet, run_id: str) -> None:
    assert fleet.client.wait(run_id, timeout=60).status in ("succeeded", "failed", "cancelled",
                                                            "dead_lettered", "expired")


def test_submit_then_get(gateway, fleet):
    resp = gateway.http.post("/v1/runs", json={"agent": "calculator", "input": {"question": "What is 6 * 7?"}})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["created"] is True and body["status"] in ("queued", "running") and len(body["run_id"]) == 32
    _wait_finished(fleet, body["run_id"])
    got = gateway.http.get(f"/v1/runs/{body['run_id']}")
    assert got.status_code == 200
    run = got.json()
    assert run["status"] == "succeeded" and run["result"] == "The answer is 42."
    assert run["agent"] == "calculator" and run["priority"] == "interactive"
    assert [s["key"] for s in run["steps"]] == ["plan", "act", "answer"]
    assert run["latency_s"] > 0 and run["tokens_out"] == sum(s["tokens_out"] for s in run["steps"]) > 0
    # The same timing the CLI's timeline draws.
    timeline = run["timeline"]
    assert [s["key"] for s in timeline["steps"]] == ["plan", "act", "answer"]
    assert [s["kind"] for s in timeline["steps"]] == ["llm", "tool", "llm"]
    plan, act = timeline["steps"][0], timeline["steps"][1]
    assert plan["model_s"] > 0 and plan["ttft_s"] > 0 and plan["generation_s"] >= 0 and plan["tool_s"] is None
    assert act["tool_s"] is not None and act["model_s"] is None and act["queue_s"] >= 0
    assert plan["due_at_s"] <= plan["started_at_s"] <= plan["finished_at_s"] <= act["started_at_s"]
    assert timeline["model_s"] == sum(s["model_s"] or 0 for s in timeline["steps"]) > 0


def test_a_repeated_idempotency_key_returns_the_same_run(gateway, fleet):
    sub = {"agent": "calculator", "input": {"question": "What is 2 + 3?"}, "idempotency_key": "gw-same",
           "priority": "batch"}
    first = gateway.http.post("/v1/runs", json=sub)
    second = gateway.http.post("/v1/runs", json=sub)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["created"] is True and second.json()["created"] is False
    assert second.json()["run_id"] == first.json()["run_id"]
    _wait_finished(fleet, first.json()["run_id"])
    third = gateway.http.post("/v1/runs", json=sub)
    assert third.status_code == 200 and third.json() == {"run_id": first.json()["run_id"],
                                                         "status": "succeeded", "created": False, "trace_id": None}


def test_events_stream_tokens_in_order_and_end_with_the_status(gateway, fleet):
    run_id = gateway.http.post("/v1/runs", json={"agent": "writer", "input": {"topic": "gateways"},
                                                 "stream": True}).json()["run_id"]
    events = list(gateway.sse(run_id))
    run = fleet.client.get(run_id)
    assert run.status == "succeeded"
    for step in ("draft", "critique", "revise"):
        tokens = [e["data"]["text"] for e in events if e["event"] == "token" and e["data"]["step"] == step]
        assert len(tokens) == next(s.tokens_out for s in run.steps if s.key == step)
        assert "".join(tokens).strip() == run.outputs[step]
    assert events[0]["event"] == "status" and events[0]["data"]["status"] == "queued"
    assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "succeeded"
    assert all(e["event"] == e["data"]["type"] for e in events)
    ids = [tuple(map(int, e["id"].split("-"))) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    # Resuming with Last-Event-ID gives exactly the events after that one.
    middle = len(events) // 2
    resumed = list(gateway.sse(run_id, last_event_id=events[middle]["id"]))
    assert [e["id"] for e in resumed] == [e["id"] for e in events[middle + 1:]]
    # Resuming after the end: nothing more, and the stream closes instead of hanging.
    assert list(gateway.sse(run_id, last_event_id=events[-1]["id"], timeout=10)) == []


def test_cancel_mid_generation(gateway, fleet):
    run_id = gateway.http.post("/v1/runs", json={"agent": "slow", "input": {"topic": "a very long essay"},
                                                 "stream": True}).json()["run_id"]
    tokens = 0
    cancel = None
    seen = []
    for event in gateway.sse(run_id, timeout=30):
        seen.append(event)
        tokens += event["event"] == "token"
        if tokens == 5 and cancel is None:
            cancel = gateway.http.delete(f"/v1/runs/{run_id}")
    assert cancel is not None and cancel.status_code == 200
    assert cancel.json() == {"run_id": run_id, "cancelled": True, "status": "cancelled"}
    # The stream went on to the terminal status, then ended.
    assert seen[-1]["event"] == "status" and seen[-1]["data"]["status"] == "cancelled"
    assert tokens < 1000  # nowhere near the 2000 the step asked for
    again = gateway.http.delete(f"/v1/runs/{run_id}")
    assert again.status_code == 200 and again.json()["cancelled"] is False
    assert gateway.http.get(f"/v1/runs/{run_id}").json()["status"] == "cancelled"


def test_invalid_submissions_are_422_naming_the_field(gateway, fleet):
    r = fleet.client.store.redis
    depth_before = [r.llen(q) for q in all_queues(fleet.settings)]
    cases = [
        ({"agent": "calculator", "input": {"question": "x" * 2001}}, "input.question"),  # admission
        ({"agent": "calculator", "input": {"questoin": "1 + 1"}}, None),                # admission
        ({"agent": "calculator", "input": {}, "priority": "urgent"}, "priority"),       # the body model
        ({"agent": "no_such_agent", "input": {}}, "agent"),
        ({"agent": "calculator", "input": {}, "deadline_s": -1}, "deadline_s"),
        ({"agent": "calculator", "input": {}, "budget_tokens": 0}, "budget_tokens"),
        ({"agent": "calculator", "input": {}, "budget_tokens": 2.5}, "budget_tokens"),
        ({"agent": "calculator", "input": {}, "budget_cost": -0.5}, "budget_cost"),
        ({"agent": "calculator", "input": {}, "surprise": 1}, "surprise"),
        ({"input": {}}, "agent"),
    ]
    for body, field in cases:
        resp = gateway.http.post("/v1/runs", json=body)
        assert resp.status_code == 422, (body, resp.text)
        err = resp.json()
        if field is None:
            assert err["field"].startswith("input.") and "question" in err["error"]
        else:
            assert err["field"] == field and field in err["error"], err
    broken = gateway.http.post("/v1/runs", content=b'{"agent": "calculator", ',
                               headers={"Content-Type": "application/json"})
    assert broken.status_code == 422 and broken.json()["field"] == "body"
    bad_resume = gateway.http.get(f"/v1/runs/{'0' * 32}/events", headers={"Last-Event-ID": "not-an-id"})
    assert bad_resume.status_code in (404, 422)  # unknown run or bad header: never a server error
    assert [r.llen(q) for q in all_queues(fleet.settings)] == depth_before  # nothing was queued


def test_shed_submissions_are_429_with_retry_after(redis_url, triton, session_dir):
    # Real shedding: a fleet whose batch queue is full (limit 1, no worker takes it).
    shed = new_fleet(redis_url, triton, session_dir, "g", admission_batch_max_queued=1, api_keys="shed-key")
    sub = {"agent": "calculator", "input": {"question": "1 + 1"}, "priority": "batch"}
    try:
        with TestClient(create_gateway(shed.settings), headers={"X-API-Key": "shed-key"}) as http:
            first = http.post("/v1/runs", json=sub)
            resp = http.post("/v1/runs", json=sub)
        # Batch work queued: steps in the batch queue and runs waiting in the backlog.
        depth = (shed.client.store.redis.llen(f"{shed.settings.queue_prefix}llm.batch")
                 + Backlog(shed.settings, shed.client.store.redis).size())
    finally:
        for queue in all_queues(shed.settings):
            shed.client.store.redis.delete(queue)
        close_fleet(shed)
    assert first.status_code == 201 and depth == 1  # the first run waits; the second is refused
    assert resp.status_code == 429, resp.text
    body = resp.json()
    assert int(resp.headers["retry-after"]) >= 1 and body["retry_after_s"] > 0
    assert "batch queue" in body["error"] and "limit 1" in body["error"]


def test_keys_are_required_when_set(gateway):
    sub = {"agent": "calculator", "input": {"question": "What is 1 + 1?"}}
    with httpx.Client(base_url=gateway.url, timeout=10) as anonymous:
        for method, path, kwargs in [("GET", "/v1/agents", {}), ("POST", "/v1/runs", {"json": sub}),
                                     ("GET", f"/v1/runs/{'0' * 32}", {}), ("DELETE", f"/v1/runs/{'0' * 32}", {})]:
            resp = anonymous.request(method, path, **kwargs)
            assert resp.status_code == 401, (method, path, resp.text)
            assert "API key" in resp.json()["error"]
        assert anonymous.get("/v1/agents", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert anonymous.get("/v1/agents", headers={"X-API-Key": KEY + "x"}).status_code == 401
        assert anonymous.get("/v1/agents", headers={"X-API-Key": OTHER_KEY}).status_code == 200
        assert anonymous.get("/v1/agents", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
        assert anonymous.get("/healthz").status_code == 200  # probes need no key


def test_agents_are_listed_with_schema_and_example(gateway):
    agents = {a["name"]: a for a in gateway.http.get("/v1/agents").json()["agents"]}
    assert {"calculator", "writer", "solver", "slow"} <= set(agents)
    writer = agents["writer"]
    assert [s["name"] for s in writer["steps"]] == ["draft", "critique", "revise"]
    assert writer["input_schema"]["properties"]["topic"]["maxLength"] == 500
    assert writer["example"] == {"topic": "why queues need deadlines"}
    assert agents["solver"]["steps"][0]["loop"] == "solve"


def test_bodies_over_the_limit_are_413(gateway, fleet):
    runs_before = len(list(fleet.client.store.redis.scan_iter(fleet.settings.key("run", "*"), count=1000)))
    big = {"agent": "writer", "input": {"topic": "x" * (MAX_BODY + 10)}}
    declared = gateway.http.post("/v1/runs", json=big)  # Content-Length says it is too big
    assert declared.status_code == 413 and declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed size decides
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 8192):
            yield payload[i:i + 8192]

    streamed = gateway.http.post("/v1/runs", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413
    assert len(list(fleet.client.store.redis.scan_iter(fleet.settings.key("run", "*"), count=1000))) == runs_before
    # The connection is still good for the next request.
    assert gateway.http.get("/healthz").status_code == 200


def test_unknown_runs_are_404(gateway):
    missing = "f" * 32
    for method, path in [("GET", f"/v1/runs/{missing}"), ("GET", f"/v1/runs/{missing}/events"),
                         ("DELETE", f"/v1/runs/{missing}")]:
        resp = gateway.http.request(method, path)
        assert resp.status_code == 404, (method, path)
        assert missing in resp.json()["error"]


def test_health_and_readiness(gateway):
    assert gateway.http.get("/healthz").json() == {"status": "ok"}
    ready = gateway.http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "redis": True, "triton_model": True, "model": "medium_sim"}


def test_metrics_count_requests_by_route_and_show_the_queues(gateway, fleet):
    assert gateway.http.get("/v1/agents").status_code == 200
    assert gateway.http.get(f"/v1/runs/{'0' * 32}").status_code == 404
    refused = httpx.get(f"{gateway.url}/metrics", timeout=10)  # with keys set, metrics need one too
    assert refused.status_code == 401
    body = gateway.http.get("/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in body.splitlines() if line and not line.startswith("#")}
    agents = 'fleet_gateway_requests_total{method="GET",route="/v1/agents",status="200"}'
    missing = 'fleet_gateway_requests_total{method="GET",route="/v1/runs/{run_id}",status="404"}'
    assert samples[agents] >= 1 and samples[missing] >= 1
    for queue in ("llm.interactive", "llm.batch", "tool.interactive", "tool.batch"):
        assert f'fleet_queue_depth{{queue="{fleet.settings.queue_prefix}{queue}"}}' in samples


def test_async_client_submits_follows_waits_and_cancels(fleet):
    async def scenario() -> dict:
        async with AsyncFleetClient(fleet.settings) as client:
            run_id = await client.submit("writer", {"topic": "asyncio"}, stream=True, priority="batch")
            events = [e async for e in client.events(run_id, timeout=60)]
            run = await client.wait(run_id, timeout=60)
            ended = await client.wait(run_id, timeout=0.01)  # already ended: answered at once
            with pytest.raises(RunNotFound):
                await client.get("0" * 32)
            with pytest.raises(InvalidSubmission) as invalid:
                await client.submit("writer", {"topic": "x" * 501})
            slow = await client.submit("slow", {"topic": "a long one"})
            unfinished = await client.wait(slow, timeout=0.3)  # time runs out: the record as it is
            cancelled = await client.cancel(slow)
            final = await client.wait(slow, timeout=10)
            # Two waiters on one loop, at once, on runs that end at different times.
            a = await client.submit("calculator", {"question": "What is 3 * 3?"})
            b = await client.submit("calculator", {"question": "What is 4 * 4?"})
            both = await asyncio.gather(client.wait(a, 30), client.wait(b, 30))
            return dict(events=events, run=run, ended=ended, field=invalid.value.field,
                        unfinished=unfinished, cancelled=cancelled, final=final, both=both)

    out = asyncio.run(scenario())
    run = out["run"]
    assert run.status == "succeeded" and run.priority == "batch" and out["ended"].status == "succeeded"
    tokens = "".join(e["text"] for e in out["events"] if e["type"] == "token" and e["step"] == "revise")
    assert tokens.strip() == run.result
    assert out["events"][-1] == {"type": "status", "status": "succeeded"}
    assert out["field"] == "input.topic"
    assert out["unfinished"].status in ("queued", "running") and out["cancelled"] is True
    assert out["final"].status == "cancelled"
    assert [r.result for r in out["both"]] == ["The answer is 9.", "The answer is 16."]
