"""Prometheus series of what a worker saw (see :mod:`fleet.ops.metrics` for the series): steps,
retries, dead letters, runs, and the usage counters by tenant, agent and class."""

from __future__ import annotations

from fleet.ops import metrics
from fleet.run.deadletter import DeadLetter
from fleet.run.records import RunRecord
from fleet.run.usage import run_end_figures, step_figures
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook


class Metrics(Hook):
    def __init__(self, default_model: str) -> None:
        self.default_model = default_model

    def after_commit(self, ctx: StepContext) -> None:
        record, step = ctx.record, ctx.step
        assert step is not None and record is not None  # noqa: S101 - set before a commit
        metrics.step_committed(ctx.run.agent, step, ctx.run.priority, record, self.default_model)
        if record.status != "skipped":
            metrics.usage_added(ctx.run.tenant, ctx.run.agent, ctx.run.priority, step_figures(record, step.kind))

    def on_retry(self, ctx: StepContext, exc: BaseException, countdown_s: float) -> None:
        metrics.step_retried(ctx.run.agent, ctx.delivery.step)

    def on_dead_letter(self, ctx: StepContext, exc: BaseException, entry: DeadLetter) -> None:
        metrics.dead_lettered(ctx.run.agent, ctx.delivery.step)

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        metrics.run_finished(run)
        metrics.usage_added(run.tenant, run.agent, run.priority, run_end_figures(run))
