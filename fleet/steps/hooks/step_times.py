"""Step times for admission: each committed step's duration, in its commit round trip."""

from __future__ import annotations

from fleet.run.store import PipeCommand
from fleet.scheduling.capacity import Capacity
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook


class StepTimes(Hook):
    def __init__(self, capacity: Capacity) -> None:
        self.capacity = capacity

    def commit_with(self, ctx: StepContext) -> list[PipeCommand]:
        record, step = ctx.record, ctx.step
        if record is None or step is None or record.status == "skipped":
            return []
        return [self.capacity.step_time_command(step.kind, ctx.run.priority, record.duration_s or 0.0)]
