"""Sessions: a run that succeeded adds its turn (input and result) to its session."""

from __future__ import annotations

from fleet.steps.hooks import Hook, StepContext
from fleet.run.records import RunRecord
from fleet.run.sessions import Sessions


class SessionTurns(Hook):
    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        if run.status == "succeeded" and run.session_id:
            Sessions(ctx.rt.settings, ctx.rt.store.redis).append(run.tenant, run.session_id, run.id, run.input, run.result)
