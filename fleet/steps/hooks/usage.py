"""Usage: each step's figures in the per-minute usage totals (once, in its commit round trip),
and at a run's end, the run and its step records that failed after a model call (see
:mod:`fleet.run.usage`). A step is priced by its body, where its model call returns."""

from __future__ import annotations

from fleet.run.records import RunRecord
from fleet.run.store import PipeCommand
from fleet.run.usage import UsageLedger, run_end_figures
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook


class Usage(Hook):
    def __init__(self, ledger: UsageLedger) -> None:
        self.ledger = ledger

    def commit_with(self, ctx: StepContext) -> list[PipeCommand]:
        record, step = ctx.record, ctx.step
        if record is None or step is None or record.status == "skipped":
            return []
        return [self.ledger.step_command(ctx.run_id, record, ctx.run.tenant, ctx.run.agent, ctx.run.priority,
                                         step.kind)]

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        self.ledger.add(run.tenant, run.agent, run.priority, run_end_figures(run))
