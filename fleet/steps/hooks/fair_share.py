"""Fair share of batch model time: each batch llm step's model seconds charged to its tenant
(once, in its commit round trip), and each ended batch run's model seconds folded into the
estimate that in-flight runs count with (see :mod:`fleet.scheduling.backlog`)."""

from __future__ import annotations

from fleet.scheduling.backlog import Backlog
from fleet.steps.hooks import Hook, StepContext
from fleet.run.records import RunRecord


class FairShare(Hook):
    def __init__(self) -> None:
        self._backlog: Backlog | None = None

    def _backlog_of(self, ctx: StepContext) -> Backlog:
        if self._backlog is None:  # one per worker process, on its store's connection
            self._backlog = Backlog(ctx.rt.settings, ctx.rt.store.redis)
        return self._backlog

    def commit_with(self, ctx: StepContext) -> list[tuple[str, tuple]]:
        record, step = ctx.record, ctx.step
        if (record is None or step is None or step.kind != "llm" or ctx.run.priority != "batch"
                or record.status == "skipped" or not record.model_s):
            return []
        return self._backlog_of(ctx).charge_commands(ctx.rt.store.run_key(ctx.run_id), record, ctx.run.tenant)

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        if run.priority != "batch":
            return
        model_s = sum(s.model_s or 0.0 for s in run.steps)
        if model_s > 0:
            self._backlog_of(ctx).record_run(model_s)
