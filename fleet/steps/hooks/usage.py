"""Usage: each step's estimated cost on its record, its figures in the per-minute usage
totals (once, in its commit round trip) and in the Prometheus counters by agent and class;
at a run's end, the run and its step records that failed after a model call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fleet.ops import metrics
from fleet.run.cost import Prices
from fleet.steps.hooks import Hook, StepContext
from fleet.run.records import RunRecord
from fleet.run.usage import UsageLedger, step_figures


class Usage(Hook):
    def __init__(self) -> None:
        self._ledger: UsageLedger | None = None

    def _ledger_of(self, ctx: StepContext) -> UsageLedger:
        if self._ledger is None:  # one per worker process, on its store's connection
            self._ledger = UsageLedger(ctx.rt.settings, ctx.rt.store.redis)
        return self._ledger

    @contextmanager
    def around_body(self, ctx: StepContext) -> Iterator[Any]:
        try:
            yield
        finally:
            # Priced however the body ended: a call cut short by the budget cost money too.
            record = ctx.record
            if record is not None and record.model_s is not None:
                record.cost = Prices.from_settings(ctx.rt.settings).cost(record.tokens_in, record.tokens_out,
                                                                         record.model_s)

    def commit_with(self, ctx: StepContext) -> list[tuple[str, tuple]]:
        record, step = ctx.record, ctx.step
        if record is None or step is None or record.status == "skipped":
            return []
        return self._ledger_of(ctx).step_commands(ctx.rt.store.run_key(ctx.run_id), record, ctx.run.tenant,
                                                  ctx.run.agent, ctx.run.priority, step.kind)

    def after_commit(self, ctx: StepContext) -> None:
        record, step = ctx.record, ctx.step
        if record is not None and step is not None and record.status != "skipped":
            metrics.usage_added(ctx.run.tenant, ctx.run.agent, ctx.run.priority, step_figures(record, step.kind))

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        figures: dict[str, float] = {"runs": 1}
        for record in run.steps:
            if record.status == "failed" and record.model_s is not None:  # never committed, yet paid for
                for name, value in step_figures(record, "llm").items():
                    figures[name] = figures.get(name, 0) + value
        self._ledger_of(ctx).add(run.tenant, run.agent, run.priority, figures)
        metrics.usage_added(run.tenant, run.agent, run.priority, figures)
