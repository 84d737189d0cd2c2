"""Step spans: the span of a step's delivery (opened by the step task beside its queue wait,
see :mod:`fleet.core.tracing`) gets the run's fields and the step's outcome. In the hooks only
while the worker traces."""

from __future__ import annotations

from fleet.core import tracing
from fleet.run.deadletter import DeadLetter
from fleet.run.records import RunRecord
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook


class StepSpans(Hook):
    def on_start(self, ctx: StepContext) -> None:
        attempts = ctx.record.attempts if ctx.record is not None else 0
        tracing.current_span().set_attributes({"fleet.agent": ctx.run.agent, "fleet.priority": ctx.run.priority,
                                               "fleet.attempt": attempts})

    def on_retry(self, ctx: StepContext, exc: BaseException, countdown_s: float) -> None:
        span = tracing.current_span()
        span.add_event("retry", {"fleet.retry_in_s": countdown_s})
        tracing.failed(span, exc, f"attempt failed; retried in {countdown_s:.2f}s")

    def on_dead_letter(self, ctx: StepContext, exc: BaseException, entry: DeadLetter) -> None:
        span = tracing.current_span()
        span.set_attribute("fleet.dead_letter_id", entry.id or "")
        tracing.failed(span, exc, "dead-lettered")

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        tracing.current_span().set_attributes({"fleet.agent": run.agent, "fleet.run_status": run.status,
                                               "fleet.run_cost": run.cost,
                                               "fleet.run_tokens": run.tokens_in + run.tokens_out})
