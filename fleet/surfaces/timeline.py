"""Where a run's time went, step by step: the timing the gateway's run view carries and the
waterfall ``fleet runs show ID --timeline`` draws.

Times are offsets from the run's submission. A step's row: when its message was due, its
wait in the queue, then its execution; a model step's execution ends with its model call
(time to first token, then generation), a tool step's execution is tool time. Retries
and preemptions are counted per step (a step's record keeps its last attempt's times).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, Field

from fleet.run.records import RunRecord, StepRecord

QUEUE, OTHER, TTFT, GENERATION, TOOL = "░", "·", "▒", "█", "▓"
LEGEND = f"{QUEUE} queue wait  {TTFT} time to first token  {GENERATION} generation  {TOOL} tool  " \
         f"{OTHER} other (load, commit)"


class StepTiming(BaseModel):
    """One step of a run on its timeline (seconds; offsets from the run's submission)."""

    key: str
    kind: str | None = Field(description="llm, tool, parallel (a join) or wait (None: not known from the record).")
    model: str | None = Field(None, description="The model that served its model call.")
    fallback: bool = Field(False, description="Whether that was the step's fallback model.")
    status: str
    attempts: int
    retries: int = Field(description="Attempts that failed and were retried.")
    preemptions: int = Field(description="Times its model request was preempted at Triton.")
    due_at_s: float | None = Field(description="When its (last) message was due.")
    started_at_s: float | None = Field(description="When a worker picked it up.")
    finished_at_s: float | None
    queue_s: float
    execution_s: float | None
    ttft_s: float | None = Field(description="Time to the model's first token.")
    generation_s: float | None = Field(description="The model call after its first token.")
    model_s: float | None = Field(description="The model call's duration.")
    tool_s: float | None
    tokens_in: int
    tokens_out: int
    cost: float


class Timeline(BaseModel):
    """Where a run's time and money went."""

    latency_s: float | None = Field(description="Submission to the run's end, once ended.")
    queue_s: float = Field(description="Time its steps waited in queues.")
    model_s: float = Field(description="Time at the model.")
    tool_s: float = Field(description="Time in tools.")
    tokens_in: int
    tokens_out: int
    cost: float = Field(description="Estimated cost (FLEET_PRICE_*).")
    budget_tokens: int | None
    budget_cost: float | None
    trace_id: str | None = Field(description="The run's trace, when traced.")
    steps: list[StepTiming]


def _kind(s: StepRecord) -> str | None:
    if s.kind is not None:
        return s.kind
    return "llm" if s.model_s is not None or s.tokens_out else None


def _step(run: RunRecord, s: StepRecord) -> StepTiming:
    kind = _kind(s)
    started = s.started_at - run.created_at if s.started_at is not None else None
    queue = s.queue_wait_s or 0.0
    finished = s.finished_at - run.created_at if s.finished_at is not None else None
    execution = s.duration_s if s.duration_s is not None else (
        finished - started if finished is not None and started is not None else None)
    generation = s.model_s - s.ttft_s if s.model_s is not None and s.ttft_s is not None else None
    return StepTiming(
        key=s.key, kind=kind, model=s.model, fallback=s.fallback, status=s.status, attempts=s.attempts, retries=max(0, s.attempts - 1),
        preemptions=s.preemptions, due_at_s=started - queue if started is not None else None,
        started_at_s=started, finished_at_s=finished, queue_s=queue, execution_s=execution,
        ttft_s=s.ttft_s, generation_s=generation, model_s=s.model_s,
        tool_s=execution if kind == "tool" and s.status != "skipped" else None,
        tokens_in=s.tokens_in, tokens_out=s.tokens_out, cost=s.cost,
    )


def timeline(run: RunRecord) -> Timeline:
    """The run's timeline."""
    steps = [_step(run, s) for s in run.steps]
    return Timeline(
        latency_s=run.latency_s, queue_s=sum(s.queue_s for s in steps),
        model_s=sum(s.model_s or 0.0 for s in steps), tool_s=sum(s.tool_s or 0.0 for s in steps),
        tokens_in=run.tokens_in, tokens_out=run.tokens_out, cost=run.cost,
        budget_tokens=run.budget_tokens, budget_cost=run.budget_cost, trace_id=run.trace_id, steps=steps,
    )


# --- the waterfall --------------------------------------------------------------------------

def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def segments(step: StepTiming) -> list[tuple[float, float, str]]:
    """The parts of a step's row on the time axis, ``(start_s, end_s, mark)`` in drawing order
    (a later one is drawn over an earlier one): its queue wait, its execution (tool time, or
    other work), its model call's generation and, over its start, its time to first token.
    The waterfall here and the run console's draw the same parts."""
    parts: list[tuple[float, float, str]] = []
    started, finished = step.started_at_s, step.finished_at_s
    if step.due_at_s is not None and started is not None and started >= step.due_at_s:
        parts.append((step.due_at_s, started, QUEUE))
    if step.status != "skipped" and started is not None and finished is not None and finished >= started:
        # a skipped step waited for a worker, then did nothing
        parts.append((started, finished, TOOL if step.kind == "tool" else OTHER))
    if step.model_s is not None and finished is not None:
        model_start = max(started or 0.0, finished - step.model_s)
        parts.append((model_start, finished, GENERATION))
        if step.ttft_s is not None:
            parts.append((model_start, model_start + step.ttft_s, TTFT))
    return parts


def _bar(step: StepTiming, span_s: float, width: int) -> str:
    cells = [" "] * width
    for start, end, mark in segments(step):
        if end < start:
            continue
        first = min(width - 1, math.floor(start / span_s * width))
        last = max(first + 1, min(width, round(end / span_s * width)))
        cells[first:last] = mark * (last - first)
    return "".join(cells)


def waterfall(run: RunRecord, width: int = 48) -> list[str]:
    """The run's timeline drawn for a terminal: a row per step, the time axis across."""
    t = timeline(run)
    ends = [s.finished_at_s for s in t.steps if s.finished_at_s is not None]
    span_s = max([t.latency_s or 0.0, *ends, 1e-3])
    name_w = max([4, *(len(s.key) for s in t.steps)])
    lines = [f"{'':<{name_w}}  0s{'':<{width - 2 - len(f'{span_s:.3f}s')}}{span_s:.3f}s"]
    header = (f"{'step':<{name_w}} |{'':<{width}}| {'status':<8} {'queue':>8} {'ttft':>8} {'gen':>8} "
              f"{'tool':>8} {'retries':>7} {'preempt':>7} {'tokens':>11} {'cost':>9}")
    lines.append(header)
    for s in t.steps:
        lines.append(
            f"{s.key:<{name_w}} |{_bar(s, span_s, width)}| {s.status:<8} {_seconds(s.queue_s):>8} "
            f"{_seconds(s.ttft_s):>8} {_seconds(s.generation_s):>8} {_seconds(s.tool_s):>8} {s.retries:>7} "
            f"{s.preemptions:>7} {f'{s.tokens_in}/{s.tokens_out}':>11} {s.cost:>9.4g}")
    budget = []
    if t.budget_tokens is not None:
        budget.append(f"tokens {t.tokens_in + t.tokens_out}/{t.budget_tokens}")
    if t.budget_cost is not None:
        budget.append(f"cost {t.cost:.4g}/{t.budget_cost:g}")
    lines.append(f"total: queue {_seconds(t.queue_s)}  model {_seconds(t.model_s)}  tool {_seconds(t.tool_s)}  "
                 f"tokens {t.tokens_in} in / {t.tokens_out} out  cost {t.cost:.4g}"
                 + (f"  budget {', '.join(budget)}" if budget else ""))
    if t.trace_id:
        lines.append(f"trace: {t.trace_id}")
    lines.append(f"legend: {LEGEND}")
    return lines
