"""The run console's pages, rendered from records: every value escaped, the waterfall's bars
where the timeline puts them, the trace linked when a viewer is configured, actions for
operators only, and logins that never send a browser off-site."""

from __future__ import annotations

import re

from fleet.run.index import RunPage
from fleet.run.records import RunRecord, RunSummary, StepRecord
from fleet.surfaces.gateway.console.pages import Viewer, run_page, run_rows
from fleet.surfaces.gateway.console.routes import _safe_next
from fleet.surfaces.views import run_list

T0 = 1_000.0
EVIL = '<script>alert("x")</script>'
OPERATOR = Viewer("default", True, "tok", keyed=True)
TENANT = Viewer("acme", False, "tok", keyed=True)


def _run(status: str = "succeeded", **extra) -> RunRecord:
    plan = StepRecord(key="plan", name="plan", kind="llm", status="done", attempts=1, started_at=T0 + 1.0,
                      finished_at=T0 + 3.0, duration_s=2.0, queue_wait_s=1.0, ttft_s=0.5, model_s=1.5)
    act = StepRecord(key="act", name="act", kind="tool", status="done", attempts=2, started_at=T0 + 3.0,
                     finished_at=T0 + 4.0, duration_s=1.0, queue_wait_s=0.0)
    return RunRecord(id="ab" * 16, agent="calc", priority="interactive", tenant="acme", status=status,
                     created_at=T0, deadline_at=T0 + 30, input={"question": EVIL},
                     finished_at=None if status == "running" else T0 + 4.0, steps=[plan, act], **extra)


def test_values_from_runs_are_escaped_everywhere():
    run = _run("dead_lettered", error={"type": "PermanentError", "message": EVIL}, dead_letter_id="1-0")
    page = run_page(run, OPERATOR, None)
    assert EVIL not in page and "&lt;script&gt;" in page
    summary = RunSummary(id=run.id, agent="calc", priority="batch", status="failed", created_at=T0,
                         error={"type": "X", "message": EVIL})
    rows = run_rows(run_list(RunPage(runs=[summary], next_cursor=None, scanned=1), backlog=0), {})
    assert EVIL not in rows and "&lt;script&gt;" in rows and f'data-run="{run.id}"' in rows


def test_the_waterfall_places_each_steps_parts_on_the_runs_time_axis():
    page = run_page(_run(), TENANT, None)
    plan = re.search(r'<tr class="step" data-step="plan">(.*?)</tr>', page).group(1)
    act = re.search(r'<tr class="step" data-step="act">(.*?)</tr>', page).group(1)
    # 4 s across the track: the plan's queue wait is its first quarter, its model call 1.5 s to 3 s.
    assert 'class="seg queue" style="left:0.00%;width:25.00%"' in plan
    assert 'class="seg gen" style="left:37.50%;width:37.50%"' in plan
    assert 'class="seg ttft" style="left:37.50%;width:12.50%"' in plan
    assert 'class="seg tool" style="left:75.00%;width:25.00%"' in act and ">1</td>" in act  # one retry


def test_the_trace_is_linked_when_a_viewer_is_configured():
    traced = _run(traceparent="00-" + "c" * 32 + "-" + "d" * 16 + "-01")
    linked = run_page(traced, TENANT, "http://jaeger:16686/trace/{trace_id}")
    assert f'href="http://jaeger:16686/trace/{"c" * 32}"' in linked
    assert "jaeger" not in run_page(traced, TENANT, None) and "c" * 32 in run_page(traced, TENANT, None)


def test_actions_are_for_operators_only():
    running, dead = _run("running"), _run("dead_lettered", dead_letter_id="5-0")
    assert 'data-action="cancel"' in run_page(running, OPERATOR, None)
    assert 'data-url="/v1/dead-letters/5-0/replay"' in run_page(dead, OPERATOR, None)
    for page in (run_page(running, TENANT, None), run_page(dead, TENANT, None)):
        assert "data-action" not in page
    assert 'data-src="/v1/runs/' in run_page(running, TENANT, None)  # a live run's events stream
    assert 'data-src="/v1/runs/' not in run_page(_run(), TENANT, None)


def test_a_login_sends_the_browser_to_a_console_page_only():
    assert _safe_next("/console/runs/abc123") == "/console/runs/abc123"
    for elsewhere in ("https://evil.example/", "//evil.example/console/", "/v1/runs", "javascript:alert(1)"):
        assert _safe_next(elsewhere) == "/console/runs"
