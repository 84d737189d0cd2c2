"""The metric hooks the base task calls, and the endpoint when Redis is away."""

from __future__ import annotations

import urllib.request

from prometheus_client import REGISTRY

from fleet.ops import launch, metrics
from fleet.run.agent import LlmStep, ToolStep
from fleet.run.records import StepRecord
from fleet.settings import Settings


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_model_step_counts_its_tokens_and_ttft_under_its_model():
    step = LlmStep(name="u_plan", kind="llm", prompt="p", model="medium_x")
    record = StepRecord(key="u_plan", name="u_plan", status="done", duration_s=0.2, ttft_s=0.05,
                        tokens_in=11, tokens_out=7)
    before = _value("fleet_tokens_in_total", model="medium_x", priority="batch")
    metrics.step_committed("u_agent", step, "batch", record, "medium_sim")
    assert _value("fleet_tokens_in_total", model="medium_x", priority="batch") - before == 11
    assert _value("fleet_tokens_out_total", model="medium_x", priority="batch") >= 7
    assert _value("fleet_model_ttft_seconds_count", model="medium_x", priority="batch") >= 1
    assert _value("fleet_step_duration_seconds_count", agent="u_agent", step="u_plan", kind="llm",
                  priority="batch") >= 1


def test_tool_steps_have_no_model_and_skipped_steps_are_not_timed():
    tool = ToolStep(name="u_act", kind="tool", tool="word_count", input="x")
    labels = dict(agent="u_agent2", step="u_act", kind="tool", priority="interactive")
    metrics.step_committed("u_agent2", tool, "interactive", StepRecord(key="u_act", name="u_act", status="skipped"),
                           "medium_sim")
    assert _value("fleet_step_duration_seconds_count", **labels) == 0
    metrics.step_committed("u_agent2", tool, "interactive",
                           StepRecord(key="u_act", name="u_act", status="done", duration_s=0.01), "medium_sim")
    assert _value("fleet_step_duration_seconds_count", **labels) == 1


def test_the_endpoint_answers_while_redis_is_unreachable():
    port = launch.free_port()
    settings = Settings(_env_file=None, redis_url=f"redis://127.0.0.1:{launch.free_port()}/0", metrics_port=port)
    metrics.dead_lettered("u_agent3", "act")
    assert metrics.serve(settings) == port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert 'fleet_dead_letters_total{agent="u_agent3",step="act"} 1.0' in text
    assert "fleet_queue_depth" not in text
