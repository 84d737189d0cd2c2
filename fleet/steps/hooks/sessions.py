"""Sessions: a run that succeeds adds its turn (input and result) to its session, before its end
can be seen, so that the next turn a client sends once it has the answer sees this one."""

from __future__ import annotations

from typing import Any

from fleet.run.sessions import Sessions
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook


class SessionTurns(Hook):
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def before_run_end(self, ctx: StepContext, status: str, fields: dict[str, Any]) -> None:
        run = ctx.run
        if status == "succeeded" and run.session_id:
            self.sessions.append(run.tenant, run.session_id, run.id, run.input, fields.get("result"))
