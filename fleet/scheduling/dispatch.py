"""The dispatcher: moves batch runs from the backlog into the step queues, by fair share.

One worker of the fleet dispatches at a time (a Redis lock that its holder renews,
:mod:`fleet.core.loops`). Every ``FLEET_BATCH_DISPATCH_INTERVAL_S``, and at once again while it
finds work, it

- counts the batch runs dispatched and not yet ended; below the window
  (``FLEET_BATCH_DISPATCH_WINDOW``, by default twice the threads of the live workers that take
  batch model steps: each thread has a run in hand and one ready, as a run spends part of its
  life between steps and in tool steps) it pops runs by fair share (:mod:`fleet.scheduling.backlog`);
- creates each popped run (its hash, its status event, its place in the active index) from
  its compact record, and sends its chain, as admission does for a direct submission
  (:meth:`fleet.scheduling.admission.Admission.send`). A run cancelled in the backlog is skipped, a run
  whose deadline passed there ends ``expired``;
- sends again the runs a dispatcher that died left popped and not created, and drops from the
  window the runs that ended without saying so (their record expired).

A run is created before its chain is sent: a dispatcher that dies in between leaves a run in
the active index with no message, which the reconciler (:mod:`fleet.scheduling.reconcile`) sends again.
"""

from __future__ import annotations

import logging
import time

from celery import Celery

from fleet.broker.queues import queue_name
from fleet.core import tracing
from fleet.core.loops import BackgroundLoop, Leadership
from fleet.core.replication import PrimaryChanged
from fleet.run.agent import AgentDef
from fleet.run.records import TERMINAL, RunRecord
from fleet.run.sessions import Sessions
from fleet.run.store import RunStore
from fleet.scheduling.admission import Admission
from fleet.scheduling.backlog import Backlog, Popped
from fleet.scheduling.capacity import Capacity
from fleet.settings import Settings

log = logging.getLogger(__name__)

#: Most runs popped in one round trip.
POP_MAX = 200
#: A popped run not created after this long was left by a dispatcher that died.
STRANDED_AFTER_S = 10.0
#: How often the window's count is checked against the runs' records.
AUDIT_EVERY_S = 10.0
#: The window without live batch workers (runs wait in the queue for the first to come).
MIN_WINDOW = 4


class Dispatcher:
    """Dispatches the batch backlog while it holds the fleet's dispatch lock."""

    def __init__(self, settings: Settings, app: Celery, agents: dict[str, AgentDef], store: RunStore) -> None:
        self.settings = settings
        self.agents = agents
        self.store = store
        self.backlog = Backlog(settings, store.redis)
        self.admission = Admission(settings, app, agents, store)
        self.capacity = Capacity(settings, store.redis)
        self._window: tuple[float, int] | None = None
        self._audited = 0.0
        self.dispatched = 0

    # --- one pass -------------------------------------------------------------------
    def window(self) -> int:
        """Batch runs that may be dispatched and unfinished at once."""
        if self.settings.batch_dispatch_window is not None:
            return self.settings.batch_dispatch_window
        now = time.monotonic()
        if self._window is None or now - self._window[0] > 2.0:
            threads = self.capacity.slots_for(queue_name(self.settings, "llm", "batch"))
            self._window = (now, max(MIN_WINDOW, 2 * threads))
        return self._window[1]

    def tick(self) -> int:
        """Dispatch what the window allows; how many runs were popped."""
        now = time.monotonic()
        if now - self._audited > AUDIT_EVERY_S:
            self._audited = now
            self.recover()
            self.audit()
        free = self.window() - self.backlog.in_flight_count()
        if free <= 0:
            return 0
        popped = self.backlog.pop(min(free, POP_MAX))
        if popped:
            self.dispatch(popped)
        return len(popped)

    def dispatch(self, popped: list[Popped]) -> int:
        """Create the popped runs and send their chains; how many were sent."""
        ids = [p.run_id for p in popped]
        records = self.store.compact_records(ids)
        gone = [run_id for run_id, rec in zip(ids, records) if rec is None]
        if gone:
            # Ended in the backlog (cancelled) or created already (by a dispatcher before us).
            self.backlog.forget_dispatching(gone)
            ended = [r for r, s in zip(gone, self.store.statuses(gone)) if s is None or s in TERMINAL]
            self.backlog.settle(ended)
        ready = [rec for rec in records if rec is not None]
        now = time.time()
        for rec in ready:
            agent = self.agents.get(rec.agent)
            if rec.deadline_at <= now:
                rec.status, rec.error = "expired", {"type": "DeadlineExceeded",
                                                    "message": "the deadline passed in the backlog"}
            elif agent is None:
                rec.status, rec.error = "failed", {"type": "UnknownAgent",
                                                   "message": f"agent '{rec.agent}' is no longer defined"}
            elif rec.session_id:
                rec.session = Sessions(self.settings, self.store.redis).turns(rec.tenant, rec.session_id)
        created = self.store.promote(ready, now)
        since = self.store.epoch()
        to_send = []
        for rec, ok in zip(ready, created):
            if not ok or rec.status in TERMINAL:
                if rec.status in TERMINAL and ok:
                    log.info("run %s: %s in the backlog", rec.id, rec.status, extra={"run_id": rec.id})
                continue
            self._send(rec)
            to_send.append(rec)
        self._replicated(to_send, since)
        self.dispatched += len(to_send)
        return len(to_send)

    def _replicated(self, sent: list[RunRecord], since: tuple[str, int] | None) -> None:
        """Wait until the chains just sent are on a replica. Their runs left the backlog for good
        (their records are on a replica already, see :meth:`RunStore.promote`): a chain lost in a
        failover would leave its run with no message until the reconciler's stall time. So when
        a failover came between, they are sent again (a step that arrives twice commits once)."""
        if not sent:
            return
        try:
            self.store.replicated(f"{len(sent)} dispatched runs' chains", since)
        except PrimaryChanged as exc:
            log.warning("%s; sending the %d chains again", exc, len(sent))
            for rec in sent:
                self._send(rec)
            self.store.replicated(f"{len(sent)} dispatched runs' chains, sent again")

    def _send(self, record: RunRecord) -> None:
        with tracing.resumed(record.traceparent, f"dispatch {record.agent}", {"fleet.run_id": record.id}):
            self.admission.send(record, self.agents[record.agent])
        log.debug("run %s: dispatched from tenant %s's backlog", record.id, record.tenant,
                  extra={"run_id": record.id})

    def recover(self, older_than_s: float = STRANDED_AFTER_S) -> int:
        """Send the runs a dispatcher that died popped and did not create (popped more than
        ``older_than_s`` ago); how many."""
        stranded = self.backlog.stranded(older_than_s)
        if not stranded:
            return 0
        tenants = self.backlog.in_flight()
        popped = [Popped(r, tenants.get(r, "")) for r in stranded]
        log.warning("%d batch run(s) popped from the backlog by a dispatcher that stopped; sending them",
                    len(popped))
        return self.dispatch(popped)

    def audit(self) -> int:
        """Drop from the window runs that ended without the window hearing of it (a record
        that expired); how many."""
        tenants = self.backlog.in_flight()
        ids = list(tenants)
        stale = [r for r, s in zip(ids, self.store.statuses(ids)) if s is None or s in TERMINAL]
        self.backlog.settle(stale)
        return len(stale)

    # --- the loop -------------------------------------------------------------------
    def loop(self) -> BackgroundLoop:
        """The dispatcher's loop: a pass every FLEET_BATCH_DISPATCH_INTERVAL_S, at once again
        while it finds work, by one worker of the fleet at a time."""
        interval = self.settings.batch_dispatch_interval_s
        leader = Leadership(self.store.redis, self.settings.keys.dispatch_lock, max(3 * interval, 2.0))
        return BackgroundLoop("fleet-dispatcher", lambda: self.tick() > 0, interval, leader=leader)
