"""Step spans: the span of a step's delivery (opened by the step task, see
:mod:`fleet.tracing`) gets the run's fields and the step's outcome, with its queue wait and
its body as child spans. In the hooks only while the worker traces."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from fleet import tracing
from fleet.deadletter import DeadLetter
from fleet.hooks import Hook, StepContext
from fleet.runs import RunRecord


class StepSpans(Hook):
    def check(self, ctx: StepContext) -> None:
        tracing.current_span().set_attributes({"fleet.agent": ctx.run.agent, "fleet.priority": ctx.run.priority})

    def on_start(self, ctx: StepContext) -> None:
        record, sent_at = ctx.record, ctx.delivery.sent_at
        if record is None:
            return
        tracing.current_span().set_attribute("fleet.attempt", record.attempts)
        if sent_at is not None and record.started_at is not None:
            tracing.record_span("queue wait", sent_at, record.started_at,
                                {"fleet.queue_wait_s": record.queue_wait_s or 0.0})

    def around_body(self, ctx: StepContext) -> AbstractContextManager[Any]:
        return tracing.span("execute", attributes={"fleet.step_kind": ctx.step.kind if ctx.step else ""})

    def after_commit(self, ctx: StepContext) -> None:
        record = ctx.record
        if record is not None:
            tracing.current_span().set_attributes({
                "fleet.step_status": record.status, "fleet.tokens_in": record.tokens_in,
                "fleet.tokens_out": record.tokens_out, "fleet.cost": record.cost})

    def on_retry(self, ctx: StepContext, exc: BaseException, countdown_s: float) -> None:
        span = tracing.current_span()
        span.add_event("retry", {"fleet.retry_in_s": countdown_s})
        tracing.failed(span, exc, f"attempt failed; retried in {countdown_s:.2f}s")

    def on_dead_letter(self, ctx: StepContext, exc: BaseException, entry: DeadLetter) -> None:
        span = tracing.current_span()
        span.set_attribute("fleet.dead_letter_id", entry.id or "")
        tracing.failed(span, exc, "dead-lettered")

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        tracing.current_span().set_attributes({"fleet.run_status": run.status, "fleet.run_cost": run.cost,
                                               "fleet.run_tokens": run.tokens_in + run.tokens_out})
