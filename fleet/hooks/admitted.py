"""An interactive run that ends leaves the ledger of admitted runs (:mod:`fleet.admitted`)."""

from __future__ import annotations

from fleet.admitted import AdmittedRuns
from fleet.hooks import Hook, StepContext
from fleet.runs import RunRecord


class LeaveAdmitted(Hook):
    def __init__(self) -> None:
        self._ledger: AdmittedRuns | None = None

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        if run.priority != "interactive":
            return
        if self._ledger is None:
            self._ledger = AdmittedRuns(ctx.rt.settings, ctx.rt.store.redis)
        self._ledger.forget(run.id)
