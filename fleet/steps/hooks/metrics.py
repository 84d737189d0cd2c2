"""Prometheus series of what a worker saw (see :mod:`fleet.ops.metrics` for the series)."""

from __future__ import annotations

from fleet.ops import metrics
from fleet.run.deadletter import DeadLetter
from fleet.steps.hooks import Hook, StepContext
from fleet.run.records import RunRecord


class Metrics(Hook):
    def after_commit(self, ctx: StepContext) -> None:
        assert ctx.step is not None and ctx.record is not None  # noqa: S101 - set before a commit
        metrics.step_committed(ctx.run.agent, ctx.step, ctx.run.priority, ctx.record, ctx.rt.settings.triton_model)

    def on_retry(self, ctx: StepContext, exc: BaseException, countdown_s: float) -> None:
        metrics.step_retried(ctx.run.agent, ctx.delivery.step)

    def on_dead_letter(self, ctx: StepContext, exc: BaseException, entry: DeadLetter) -> None:
        metrics.dead_lettered(ctx.run.agent, ctx.delivery.step)

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        metrics.run_finished(run)
