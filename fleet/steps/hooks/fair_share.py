"""Fair share of batch model time: each batch llm step's model seconds charged to its tenant
(once, in its commit round trip), and each ended batch run's model seconds folded into the
estimate that in-flight runs count with (see :mod:`fleet.scheduling.backlog`)."""

from __future__ import annotations

from fleet.run.records import RunRecord
from fleet.run.store import PipeCommand
from fleet.scheduling.backlog import Backlog
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook


class FairShare(Hook):
    def __init__(self, backlog: Backlog) -> None:
        self.backlog = backlog

    def commit_with(self, ctx: StepContext) -> list[PipeCommand]:
        record, step = ctx.record, ctx.step
        if (record is None or step is None or step.kind != "llm" or ctx.run.priority != "batch"
                or record.status == "skipped" or not record.model_s):
            return []
        return [self.backlog.charge_command(ctx.run_id, record, ctx.run.tenant)]

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        if run.priority != "batch":
            return
        model_s = sum(s.model_s or 0.0 for s in run.steps)
        if model_s > 0:
            self.backlog.record_run(model_s)
