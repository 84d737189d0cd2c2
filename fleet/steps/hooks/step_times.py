"""Step times for admission: each committed step's duration, in its commit round trip."""

from __future__ import annotations

from fleet.steps.hooks import Hook, StepContext


class StepTimes(Hook):
    def commit_with(self, ctx: StepContext) -> list[tuple[str, tuple]]:
        record, step = ctx.record, ctx.step
        if record is None or step is None or record.status == "skipped":
            return []
        return ctx.rt.capacity.step_time_commands(step.kind, ctx.run.priority, record.duration_s or 0.0)
