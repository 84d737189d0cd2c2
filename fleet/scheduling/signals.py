"""Signals to parked runs, and their timeouts: what resumes a run at a wait step.

A signal (``POST /v1/runs/{id}/signals/{name}``, :meth:`fleet.surfaces.client.FleetClient.signal`,
``fleet runs signal``) is kept in its run's record; a run parked on it resumes at once, and its
next step is sent from here (the gateway's or the client's process). The reconciler's loop calls
:meth:`Signals.fire_timeouts`: a wait past its timeout fails its run or resumes it with
``{"timed_out": true}``, as the wait step says (see :mod:`fleet.run.waits`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Celery

from fleet.broker.chains import build_chain
from fleet.core import tracing
from fleet.errors import RunNotFound
from fleet.run.agent import AgentDef, WaitStep
from fleet.run.plan import Finished, StepPos, result_of
from fleet.run.state import RunState
from fleet.run.store import RunStore
from fleet.run.waits import settle
from fleet.settings import Settings

log = logging.getLogger(__name__)


class Signals:
    """Delivers signals and fires wait timeouts for one fleet."""

    def __init__(self, settings: Settings, app: Celery, agents: dict[str, AgentDef], store: RunStore) -> None:
        self.settings, self.app, self.agents, self.store = settings, app, agents, store

    def deliver(self, run_id: str, name: str, payload: Any) -> str:
        """Deliver signal ``name`` with ``payload`` to a run: ``"resumed"`` (it was parked on it),
        ``"kept"`` (a wait to come will find it) or ``"ended"`` (the run had ended).

        Raises:
            RunNotFound: no such run.
        """
        moved = self.store.signal(run_id, name, payload)
        if moved == 1:
            self._go_on(run_id, f"signal {name!r}")
            return "resumed"
        return "ended" if moved == -2 else "kept"

    def fire_timeouts(self, now: float | None = None) -> list[str]:
        """Time out every due wait; the ids of the runs it touched."""
        now = time.time() if now is None else now
        fired: list[str] = []
        for run_id in self.store.due_waits(now):
            try:
                self._time_out(run_id)
            except RunNotFound:
                self.store.redis.zrem(self.settings.keys.waits, run_id)
                continue
            fired.append(run_id)
        return fired

    def _time_out(self, run_id: str) -> None:
        run = self.store.load(run_id)
        agent = self.agents.get(run.agent)
        step = agent.shaped(run.fields.get("waiting_step", "")) if agent is not None else None
        if isinstance(step, WaitStep) and step.on_timeout == "fail":
            self.store.end(run_id, "failed", error={"type": "WaitTimedOut", "step": step.name, "message":
                                                   f"no signal {step.signal!r} within {step.timeout_s:g}s"})
            self.store.redis.zrem(self.settings.keys.waits, run_id)
            log.info("run %s: wait %s timed out; the run failed", run_id, step.name, extra={"run_id": run_id})
            return
        if self.store.time_out(run_id) == 1:
            self._go_on(run_id, "timeout")

    def _go_on(self, run_id: str, why: str) -> None:
        """Send what a resumed run does next."""
        run = self.store.load(run_id)
        agent = self.agents.get(run.agent)
        if agent is None:
            return
        nxt = settle(self.store, agent, run)
        if isinstance(nxt, StepPos):
            self._send(agent, run, nxt)
            log.info("run %s: resumed by %s at step %s", run_id, why, nxt.key, extra={"run_id": run_id})
        elif isinstance(nxt, Finished):  # the wait was the last step
            self.store.end(run_id, "succeeded", result=result_of(agent, run))

    def _send(self, agent: AgentDef, run: RunState, pos: StepPos) -> None:
        with tracing.resumed(run.traceparent, f"resume {run.agent}", {"fleet.run_id": run.id}):
            build_chain(self.app, self.settings, agent, run.id, run.priority, start=pos.name,
                        iteration=pos.iteration, run=run).apply_async()
