"""Sentry: every event from a step carries the step's run, agent, step and class (and the
run's trace id when traced); a dead-lettered step is reported as an error (retries never are)."""

from __future__ import annotations

import sentry_sdk

from fleet.core import tracing
from fleet.ops.sentry import report_dead_letter
from fleet.run.deadletter import DeadLetter
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook


class SentryReports(Hook):
    def on_start(self, ctx: StepContext) -> None:
        if sentry_sdk.get_client().is_active():
            # The Celery integration opens a scope per task: these tags stay with this step.
            for name, value in (("run_id", ctx.run_id), ("agent", ctx.run.agent), ("step", ctx.delivery.step),
                                ("priority", ctx.run.priority)):
                sentry_sdk.set_tag(name, value)
            trace_id = tracing.trace_id()
            if trace_id:  # the run's trace, to go from an error to the run's waterfall
                sentry_sdk.set_tag("trace_id", trace_id)

    def on_dead_letter(self, ctx: StepContext, exc: BaseException, entry: DeadLetter) -> None:
        report_dead_letter(exc, entry, entry.id)
