"""Tracing against real components: a real OTLP receiver collects the spans of the client
(this process), of real worker processes and of a Triton started with its OpenTelemetry
trace mode, and the tests read one run's trace out of them.

Spans are decoded with the OpenTelemetry protobufs (tests/support/otlp.py); span kinds
are OTLP's numbers: 2 server, 3 client, 4 producer, 5 consumer.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from fleet.core import tracing
from fleet.ops import launch
from fleet.surfaces.client import FleetClient

from ..support.otlp import OtlpReceiver, Span, otlp_receiver
from ..support.sentry_server import SentryRecorder, sentry_server, tags_of
from .conftest import TEST_AGENTS_AND_TOOLS, TEST_SIM_PARAMS, Fleet, TritonInfo, make_settings

pytestmark = pytest.mark.integration

SERVER, CLIENT, PRODUCER, CONSUMER = 2, 3, 4, 5
API_KEY = "trace-test-key"
ERROR = 2
# Export every few tens of milliseconds, so a trace is complete soon after its run.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with otlp_receiver() as rx:
        yield rx


@pytest.fixture(scope="module")
def sentry() -> Iterator[SentryRecorder]:
    with sentry_server() as recorder:
        yield recorder


@pytest.fixture(scope="module")
def traced_triton(receiver, session_dir) -> Iterator[TritonInfo]:
    procs = launch.Processes(session_dir / "logs" / "traced-triton")
    try:
        repo = launch.sim_repository(session_dir / "traced-models", **TEST_SIM_PARAMS)
        ep = launch.start_triton(procs, session_dir / "traced-triton", ["medium_sim"], repository=repo,
                                 trace=launch.triton_trace_args(f"{receiver.endpoint}/v1/traces", export_delay_ms=50))
        yield TritonInfo(ep.grpc_url, ep.http_url, ep.metrics_url)
    finally:
        procs.stop()


def _fleet(redis_url: str, triton: TritonInfo, session_dir, env: dict[str, str], **overrides: object) -> Fleet:
    prefix = f"tr{uuid.uuid4().hex[:8]}"
    settings, fleet_env = make_settings(redis_url, triton, prefix, **{**TEST_AGENTS_AND_TOOLS, **overrides})
    return Fleet(settings, {**fleet_env, **env}, launch.Processes(session_dir / "logs" / prefix), None)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tfleet(redis_url, traced_triton, session_dir, receiver, sentry) -> Iterator[Fleet]:
    """A fleet whose workers and client trace to the receiver, on the traced Triton."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **FAST_EXPORT}
    f = _fleet(redis_url, traced_triton, session_dir, env, retry_max_attempts=3, sentry_dsn=sentry.dsn,
               api_keys=API_KEY)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        tracing.shutdown()  # this process's client traces too, from here on
        f.client = FleetClient(f.settings)
        assert tracing.enabled()
        try:
            f.start_worker("inference", "llm", "threads", 4)
            f.start_worker("tools", "tool", "prefork", 2)
            yield f
        finally:
            f.procs.stop()
            f.client.close()
            tracing.shutdown()


def _trace(receiver: OtlpReceiver, trace_id: str, done) -> list[Span]:  # noqa: ANN001
    spans = receiver.wait_for(lambda all_: done([s for s in all_ if s.trace_id == trace_id]))
    return [s for s in spans if s.trace_id == trace_id]


def _named(spans: list[Span], name: str) -> list[Span]:
    return [s for s in spans if s.name == name]


def _children(spans: list[Span], parent: Span) -> list[Span]:
    return [s for s in spans if s.parent_id == parent.span_id]


def test_one_trace_per_run_from_submission_through_every_step_and_model_call_into_triton(tfleet, receiver):
    run_id = tfleet.client.submit("calculator", {"question": "What is 6 * 7?"})
    run = tfleet.client.wait(run_id, timeout=30)
    assert run.status == "succeeded" and run.trace_id

    def complete(spans: list[Span]) -> bool:
        return (len([s for s in spans if s.name.startswith("calculator.")]) == 3
                and len([s for s in spans if s.service == "triton" and s.name == "InferRequest"]) == 2)

    spans = _trace(receiver, run.trace_id, complete)
    # Every span the fleet made for this run is in this one trace, and in no other.
    of_run = [s for s in receiver.spans if s.attributes.get("fleet.run_id") == run_id]
    assert of_run and {s.trace_id for s in of_run} == {run.trace_id}

    [root] = _named(spans, "submit calculator")
    assert root.parent_id == "" and root.kind == PRODUCER and root.service == "fleet-client"
    assert root.attributes["fleet.run_id"] == run_id

    steps = {s.name: s for s in spans if s.name.startswith("calculator.")}
    assert set(steps) == {"calculator.plan", "calculator.act", "calculator.answer"}
    # Under the root, in time order: queue wait, execution, queue wait, execution ...
    under_root = sorted(_children(spans, root), key=lambda s: s.start_ns)
    assert [s.name for s in under_root] == ["queue wait", "calculator.plan", "queue wait", "calculator.act",
                                            "queue wait", "calculator.answer"]
    for wait, step in zip(under_root[::2], under_root[1::2]):
        assert wait.end_ns <= step.start_ns and step.kind == CONSUMER and step.service == "fleet-worker"
    for key in ("plan", "act", "answer"):
        step = steps[f"calculator.{key}"]
        assert step.attributes["fleet.step"] == key and step.attributes["fleet.attempt"] == 1
        assert step.attributes["fleet.agent"] == "calculator" and step.attributes["fleet.priority"] == "interactive"
    assert steps["calculator.answer"].attributes["fleet.run_status"] == "succeeded"
    # Each step links to the step that sent it.
    assert steps["calculator.act"].links == ((run.trace_id, steps["calculator.plan"].span_id),)
    assert steps["calculator.answer"].links == ((run.trace_id, steps["calculator.act"].span_id),)

    # Model calls under the model steps, each with Triton's own spans under it.
    for key in ("plan", "answer"):
        [call] = _children(spans, steps[f"calculator.{key}"])
        assert call.name == "text_completion medium_sim" and call.kind == CLIENT
        record = next(r for r in run.steps if r.key == key)
        assert call.attributes["gen_ai.usage.output_tokens"] == record.tokens_out
        assert call.attributes["gen_ai.usage.input_tokens"] == record.tokens_in
        [request] = _children(spans, call)
        assert request.service == "triton" and request.name == "InferRequest"
        [model] = _children(spans, request)
        assert model.name == "medium_sim" and "QUEUE_START" in model.events
        assert [c.name for c in _children(spans, model)] == ["compute"]
    # The tool call under the tool step.
    [tool] = _children(spans, steps["calculator.act"])
    assert tool.name == "execute_tool calculator" and tool.attributes["gen_ai.tool.name"] == "calculator"


def test_retries_are_visible_and_sentry_events_carry_the_trace_id(tfleet, receiver, sentry):
    run_id = tfleet.client.submit("unreliable", {"value": "x"})
    run = tfleet.client.wait(run_id, timeout=30)
    assert run.status == "dead_lettered" and run.steps[0].attempts == 3 and run.trace_id

    spans = _trace(receiver, run.trace_id, lambda s: len(_named(s, "unreliable.think")) == 3
                   and any("fleet.dead_letter_id" in x.attributes for x in s) and _named(s, "InferRequest"))
    attempts = sorted(_named(spans, "unreliable.think"), key=lambda s: s.attributes["fleet.attempt"])
    assert [s.attributes["fleet.attempt"] for s in attempts] == [1, 2, 3]
    [root] = _named(spans, "submit unreliable")
    assert all(s.parent_id == root.span_id and s.status_code == ERROR for s in attempts)
    assert ["retry" in s.events for s in attempts] == [True, True, False]
    assert attempts[-1].attributes["fleet.dead_letter_id"] == run.dead_letter_id
    assert attempts[-1].attributes["fleet.run_status"] == "dead_lettered"
    # Each attempt called the model, and Triton's spans of the calls are in the same trace
    # (Triton leaves the span of a request whose stream ended in an error open at times: it
    # never sends those).
    calls = _named(spans, "text_completion medium_sim")
    assert len(calls) == 3 and all(c.status_code == ERROR for c in calls)
    assert {s.parent_id for s in _named(spans, "InferRequest")} <= {c.span_id for c in calls}

    [event] = sentry.wait_for(lambda e: e.get("level") == "error" and tags_of(e).get("run_id") == run_id)
    assert tags_of(event)["trace_id"] == run.trace_id


def test_a_callers_traceparent_makes_a_run_submitted_over_http_part_of_its_trace(tfleet, receiver):
    from fastapi.testclient import TestClient

    from fleet.surfaces.gateway import create_gateway

    caller_trace, caller_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with TestClient(create_gateway(tfleet.settings)) as http:
        resp = http.post("/v1/runs", json={"agent": "calculator", "input": {"question": "What is 3 * 3?"}},
                         headers={"Authorization": f"Bearer {API_KEY}", "traceparent": f"00-{caller_trace}-{caller_span}-01"})
        assert resp.status_code == 201, resp.text
        run_id = resp.json()["run_id"]
        assert resp.json()["trace_id"] == caller_trace
        assert tfleet.client.wait(run_id, timeout=30).status == "succeeded"
        view = http.get(f"/v1/runs/{run_id}", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    assert view["trace_id"] == view["timeline"]["trace_id"] == caller_trace

    spans = _trace(receiver, caller_trace, lambda s: len([x for x in s if x.name.startswith("calculator.")]) == 3)
    [server] = _named(spans, "POST /v1/runs")
    assert server.parent_id == caller_span and server.kind == SERVER
    [submit] = _named(spans, "submit calculator")
    assert submit.parent_id == server.span_id and submit.attributes["fleet.run_id"] == run_id
    assert all(s.parent_id == submit.span_id for s in spans if s.name.startswith("calculator."))


def test_tracing_off_produces_no_spans(redis_url, triton, session_dir, receiver):
    """FLEET_TRACING=off, with an OTLP endpoint set all the same: no process sends a span.
    (Last in the module: it turns this process's tracing off.)"""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **FAST_EXPORT}
    f = _fleet(redis_url, triton, session_dir, env, tracing="off")
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        tracing.shutdown()
        f.client = FleetClient(f.settings)
        try:
            assert not tracing.enabled()
            f.start_worker("inference", "llm", "threads", 2)
            f.start_worker("tools", "tool", "prefork", 1)
            run = f.client.wait(f.client.submit("calculator", {"question": "What is 2 * 21?"}), timeout=30)
            assert run.status == "succeeded" and run.traceparent is None and run.trace_id is None
        finally:
            # A worker that traced would send what it holds as it exits: once they are gone,
            # everything they would ever send has arrived.
            f.procs.stop()
            f.client.close()
            tracing.shutdown()
    assert receiver.spans  # the receiver works (the tests above filled it) ...
    assert not [s for s in receiver.spans if s.attributes.get("fleet.run_id") == run.id]  # ... none of this run
