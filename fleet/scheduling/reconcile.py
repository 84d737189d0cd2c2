"""The run reconciler: no accepted run is ever silently lost.

Celery's Redis transport moves a message from its queue to the unacked set in two
commands; a Redis crash between them, or a publish that never reached Redis, leaves a run
with no message anywhere. Every unfinished run is indexed by the time of its last
progress. A worker process periodically (one at a time, under a Redis lock) looks at runs
that made no progress for ``FLEET_STALL_AFTER_S``; a run whose step message is neither in a
queue nor unacknowledged is sent again from its first unfinished step. A message that does
exist (a long batch backlog) just refreshes the run's index entry. The same pass drops from
the runs index the runs whose record expired (:meth:`fleet.run.index.RunIndex.trim`), and times
out the waits of parked runs that are due (:meth:`fleet.scheduling.signals.Signals.fire_timeouts`).

A re-dispatch can at worst duplicate a step message; steps commit once, so it is safe.

Every ``FLEET_RECOUNT_INTERVAL_S``, and in the first pass after a failover (the primary it
follows changed), a pass also recounts the tenants' places and the ledger of admitted runs from
the run records (:mod:`fleet.scheduling.recount`): what a fault left wrong there is put right.
"""

from __future__ import annotations

import logging
import re
import time

from celery import Celery

from fleet.broker.chains import build_chain
from fleet.broker.queues import all_queues
from fleet.connections import primary_epoch
from fleet.core import tracing
from fleet.core.loops import BackgroundLoop, Leadership
from fleet.errors import RunNotFound
from fleet.run.agent import AgentDef
from fleet.run.plan import StepPos, next_step, remaining_steps
from fleet.run.state import RunState
from fleet.run.store import RunStore
from fleet.run.waits import settle
from fleet.scheduling.recount import Recount
from fleet.scheduling.signals import Signals
from fleet.settings import Settings

log = logging.getLogger(__name__)

_RUN_ID_IN_MESSAGE = re.compile(r"run_id['\"]?:\s*['\"]([0-9a-f]{32})")
_CHUNK = 1000


def resume_point(agent: AgentDef, run: RunState, store: RunStore | None = None) -> StepPos | None:
    """Where a run whose message vanished starts again: the next-step rule's answer (settled in
    ``store``: None when that parks the run), or, for a run whose steps are all done but which
    never ended, its first step (a done step only advances, which ends the run)."""
    nxt = settle(store, agent, run) if store is not None else next_step(agent, run)
    if isinstance(nxt, StepPos) or nxt is None:
        return nxt
    first, iteration = remaining_steps(agent)[0]
    return StepPos(first.name, iteration)


class Reconciler:
    """Finds runs with no message in flight and sends them again."""

    def __init__(self, settings: Settings, app: Celery, agents: dict[str, AgentDef], store: RunStore) -> None:
        self.settings, self.app, self.agents, self.store = settings, app, agents, store
        self.recount = Recount(settings, store.redis, agents)
        self.signals = Signals(settings, app, agents, store)
        self._recounted: tuple[float, tuple[str, int] | None] | None = None  # when, and on which primary

    def messages_in_flight(self) -> set[str]:
        """Run ids that have a step message in a queue or unacknowledged."""
        found: set[str] = set()
        r = self.store.redis
        for queue in all_queues(self.settings):
            start = 0
            while True:
                chunk = r.lrange(queue, start, start + _CHUNK - 1)
                for message in chunk:
                    found.update(_RUN_ID_IN_MESSAGE.findall(message))
                if len(chunk) < _CHUNK:
                    break
                start += _CHUNK
        for _, message in r.hscan_iter("unacked", count=_CHUNK):
            found.update(_RUN_ID_IN_MESSAGE.findall(message))
        return found

    def sweep(self) -> list[str]:
        """One pass; returns the ids of the runs sent again."""
        stalled = self.store.stalled(time.time() - self.settings.stall_after_s)
        if not stalled:
            return []
        present = self.messages_in_flight()
        resent: list[str] = []
        for run_id in stalled:
            if run_id in present:
                self.store.touch(run_id)
                continue
            try:
                run = self.store.load(run_id)
            except RunNotFound:  # the record expired: nothing to resume
                self.store.forget(run_id)
                continue
            agent = self.agents.get(run.agent)
            if run.ended or agent is None:
                self.store.forget(run_id)
                continue
            pos = resume_point(agent, run, self.store)
            if pos is None:  # parked at a wait step: no message is due
                continue
            with tracing.resumed(run.traceparent, f"resend {run.agent}", {"fleet.run_id": run_id}):
                build_chain(self.app, self.settings, agent, run_id, run.priority,
                            start=pos.name, iteration=pos.iteration, run=run).apply_async()
            self.store.touch(run_id)
            log.warning("run %s: no step message in flight for %.0fs; sent again from step %s",
                        run_id, self.settings.stall_after_s, pos.key, extra={"run_id": run_id})
            resent.append(run_id)
        return resent

    def loop(self) -> BackgroundLoop:
        """The reconciler's loop: a sweep every FLEET_RECONCILE_INTERVAL_S, by one worker of the
        fleet at a time."""
        interval = self.settings.reconcile_interval_s
        leader = Leadership(self.store.redis, self.settings.keys.reconcile_lock, 3 * interval)
        return BackgroundLoop("fleet-reconciler", self._pass, interval, leader=leader, failure_level=logging.DEBUG)

    def _pass(self) -> bool:
        self.sweep()
        self.signals.fire_timeouts()
        self.store.index.trim()
        self.maybe_recount()
        return False  # the next sweep comes after the interval, whatever this one found

    def maybe_recount(self, now: float | None = None) -> bool:
        """Recount when one is due, or when the primary changed since the last (a failover may
        have kept a count's change and lost its run's, or the reverse); whether it did."""
        now = time.monotonic() if now is None else now
        primary = primary_epoch(self.store.redis)
        last = self._recounted
        if last is not None and now - last[0] < self.settings.recount_interval_s and primary == last[1]:
            return False
        self.recount.run()
        self._recounted = (now, primary)
        return True
