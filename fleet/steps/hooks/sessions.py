"""Sessions: a run that succeeded adds its turn (input and result) to its session."""

from __future__ import annotations

from fleet.run.records import RunRecord
from fleet.run.sessions import Sessions
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook


class SessionTurns(Hook):
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        if run.status == "succeeded" and run.session_id:
            self.sessions.append(run.tenant, run.session_id, run.id, run.input, run.result)
