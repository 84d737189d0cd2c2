"""A run's timeline and its waterfall, from a run record."""

from __future__ import annotations

from fleet.run.records import RunRecord, StepRecord
from fleet.surfaces.timeline import GENERATION, QUEUE, TOOL, TTFT, timeline, waterfall

T0 = 1_000.0


def _run() -> RunRecord:
    plan = StepRecord(key="plan", name="plan", kind="llm", status="done", attempts=2, started_at=T0 + 0.5,
                      finished_at=T0 + 2.5, duration_s=2.0, queue_wait_s=0.5, ttft_s=0.5, model_s=1.5,
                      tokens_in=30, tokens_out=12, cost=0.25, preemptions=1)
    act = StepRecord(key="act", name="act", kind="tool", status="done", attempts=1, started_at=T0 + 3.0,
                     finished_at=T0 + 4.0, duration_s=1.0, queue_wait_s=0.5)
    skipped = StepRecord(key="more#1", name="more", iteration=1, kind="tool", status="skipped", attempts=1,
                         started_at=T0 + 4.0, finished_at=T0 + 4.0, duration_s=0.0, queue_wait_s=0.0)
    return RunRecord(id="r" * 32, agent="calc", priority="interactive", status="succeeded", created_at=T0,
                     deadline_at=T0 + 30, input={}, finished_at=T0 + 4.0, steps=[plan, act, skipped],
                     budget_tokens=100, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")


def test_the_timeline_splits_each_steps_time():
    t = timeline(_run())
    plan, act, skipped = t.steps
    assert (plan.due_at_s, plan.started_at_s, plan.finished_at_s) == (0.0, 0.5, 2.5)
    assert (plan.ttft_s, plan.generation_s, plan.model_s, plan.tool_s) == (0.5, 1.0, 1.5, None)
    assert (plan.retries, plan.preemptions) == (1, 1)
    assert (act.tool_s, act.model_s, act.queue_s) == (1.0, None, 0.5)
    assert skipped.tool_s is None
    assert (t.queue_s, t.model_s, t.tool_s, t.cost, t.latency_s) == (1.0, 1.5, 1.0, 0.25, 4.0)
    assert t.trace_id == "a" * 32 and t.budget_tokens == 100


def test_the_waterfall_draws_a_row_per_step_on_one_time_axis():
    lines = waterfall(_run(), width=40)
    rows = {line.split(" ", 1)[0]: line for line in lines if "|" in line}
    assert set(rows) == {"step", "plan", "act", "more#1"}
    bar = {key: row.split("|")[1] for key, row in rows.items()}
    assert all(len(b) == 40 for b in bar.values())
    # 4 s across 40 cells: 10 cells a second.
    assert bar["plan"][:5] == QUEUE * 5 and bar["plan"][10:15] == TTFT * 5 and bar["plan"][15:25] == GENERATION * 10
    assert bar["act"][25:30] == QUEUE * 5 and bar["act"][30:40] == TOOL * 10
    assert TOOL not in bar["more#1"]  # skipped: it did no work
    assert "1/1" not in rows["plan"] and "30/12" in rows["plan"]
    assert any(line.startswith("total: queue 1.000s  model 1.500s  tool 1.000s") and "budget tokens 42/100" in line
               for line in lines)
    assert f"trace: {'a' * 32}" in lines and lines[-1].startswith("legend:")
