"""Tracing without a server: when a process traces, that it costs nothing when it does not,
and how the context travels (message headers, gRPC metadata, stored roots, HTTP)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from fleet.core import tracing
from fleet.settings import Settings


@pytest.mark.parametrize(("mode", "env", "on"), [
    ("auto", {}, False),
    ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ("auto", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ("auto", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ("off", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ("on", {}, True),
])
def test_a_process_traces_when_the_setting_and_the_otel_variables_say_so(mode, env, on):
    assert tracing.wanted(mode, env) is on


def test_the_traces_url_follows_the_otel_variables():
    assert tracing.traces_url({}) == "http://localhost:4318/v1/traces"
    assert tracing.traces_url({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    assert tracing.traces_url({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:9/x"}) == "http://t:9/x"


def test_off_nothing_is_imported_and_every_call_returns_at_once():
    code = """
import json, sys
from fleet.core import tracing
from fleet.steps.runtime import build_runtime
from fleet.settings import Settings
import fleet.surfaces.client, fleet.surfaces.gateway, fleet.steps.worker, fleet.steps.bodies, fleet.inference.triton
on = tracing.configure(Settings(_env_file=None), "probe", environ={})
headers = {}
tracing.inject_message(headers)
with tracing.span("x") as s, tracing.delivery("d", lambda h: None) as d, tracing.model_call("m", 8) as m:
    same = s is d is m is tracing.NOOP_SPAN
# (redis-py loads OpenTelemetry's metrics API for itself: only tracing's modules count here)
tracing_modules = [m for m in sys.modules if m.startswith("opentelemetry")
                   and any(part in m for part in ("trace", "exporter", "propagat"))]
print(json.dumps({"on": on, "otel": sorted(tracing_modules),
                  "headers": headers, "metadata": tracing.grpc_metadata(), "same": same,
                  "hooks": [type(h).__name__ for h in build_runtime(Settings(_env_file=None)).hooks]}))
"""
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True, env=env)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["on"] is False and got["otel"] == [] and got["headers"] == {} and got["metadata"] is None
    assert got["same"] is True and "StepSpans" not in got["hooks"] and "Usage" in got["hooks"]


@pytest.fixture
def memory() -> Iterator:
    """Tracing on in this process, its spans kept in memory."""
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    tracing.shutdown()
    assert tracing.configure(Settings(_env_file=None, tracing="on"), "unit", environ={"OTEL_TRACES_EXPORTER": "console"})
    exporter = InMemorySpanExporter()
    provider = tracing._on.provider  # noqa: SLF001 - a test looks at what the process records
    provider._active_span_processor._span_processors = ()  # noqa: SLF001 - nothing to stdout
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield exporter
    finally:
        tracing.shutdown()


def test_a_step_publishes_its_runs_root_and_names_itself_as_the_sender(memory):
    submit_headers: dict = {}
    with tracing.span("submit a", kind="producer") as root:
        tracing.inject_message(submit_headers)
        stored = tracing.traceparent()
    assert submit_headers["traceparent"] == stored and "fleet_sent_by" not in submit_headers
    next_headers: dict = {}
    sent_at = time.time() - 0.25
    with tracing.delivery("a.plan", submit_headers.get, sent_at, {"fleet.step": "plan"}) as step:
        with tracing.model_call("m", 16) as call:
            metadata = dict(tracing.grpc_metadata() or [])
        tracing.inject_message(next_headers)  # inside a step: the root travels on, not the step
    with tracing.delivery("a.act", next_headers.get) as act:
        pass
    with tracing.resumed(stored, "replay a"):
        pass
    with tracing.server("POST /v1/runs", {"traceparent": stored}):
        pass

    by_name = {s.name: s for s in memory.get_finished_spans()}
    root_ctx, step_ctx = root.get_span_context(), step.get_span_context()
    assert by_name["a.plan"].parent.span_id == root_ctx.span_id
    # Its queue wait beside it, from when its message was due to when the step began.
    wait = by_name["queue wait"]
    assert wait.parent.span_id == root_ctx.span_id and wait.start_time == pytest.approx(sent_at * 1e9, abs=2e6)
    assert wait.end_time <= by_name["a.plan"].start_time and wait.end_time - wait.start_time >= 0.25e9
    assert by_name["text_completion m"].parent.span_id == step_ctx.span_id
    assert metadata["traceparent"].split("-")[2] == f"{call.get_span_context().span_id:016x}"
    assert next_headers["traceparent"] == stored  # the run's root ...
    assert next_headers["fleet_sent_by"].split("-")[1] == f"{step_ctx.span_id:016x}"  # ... sent by this step
    assert by_name["a.act"].parent.span_id == root_ctx.span_id
    assert [link.context.span_id for link in by_name["a.act"].links] == [step_ctx.span_id]
    assert act.get_span_context().trace_id == root_ctx.trace_id
    assert by_name["replay a"].parent.span_id == root_ctx.span_id
    assert by_name["POST /v1/runs"].parent.span_id == root_ctx.span_id


def test_a_step_without_a_traced_submission_becomes_the_runs_root(memory):
    headers: dict = {}
    with tracing.delivery("a.plan", lambda h: None) as first:
        tracing.inject_message(headers)
    with tracing.delivery("a.act", headers.get):
        pass
    by_name = {s.name: s for s in memory.get_finished_spans()}
    assert by_name["a.plan"].parent is None
    assert by_name["a.act"].parent.span_id == first.get_span_context().span_id


def test_triton_is_told_to_trace_every_request_to_the_same_endpoint():
    from fleet.ops import launch

    args = launch.triton_trace_args(tracing.traces_url({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}),
                                    export_delay_ms=100)
    assert args[::2] == ["--trace-config"] * (len(args) // 2)
    configs = set(args[1::2])
    assert {"mode=opentelemetry", "rate=1", "count=-1", "level=TIMESTAMPS", "opentelemetry,url=http://c:4318/v1/traces",
            "opentelemetry,resource=service.name=triton", "opentelemetry,bsp_schedule_delay=100"} == configs
