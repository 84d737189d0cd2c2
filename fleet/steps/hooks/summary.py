"""The one log line per finished run (arq's ``◆`` style), carrying the run's fields."""

from __future__ import annotations

import logging

from fleet.run.records import RunRecord
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook

log = logging.getLogger(__name__)


class RunSummary(Hook):
    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        log.info("run %s ◆ %s ◆ %s ◆ %s ◆ %.3fs ◆ %d steps ◆ tokens %d in / %d out", run.id, run.agent,
                 run.priority, run.status, run.latency_s or 0.0, len(run.steps), run.tokens_in, run.tokens_out,
                 extra={"run_id": run.id, "agent": run.agent, "priority": run.priority, "status": run.status})
