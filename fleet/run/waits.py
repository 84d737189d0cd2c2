"""Steps that need no worker: a wait step parks its run, an empty map joins at once.

:func:`settle` is what the pipeline (after each step), the reconciler and a signal's delivery
ask instead of :func:`fleet.run.plan.next_step` alone: it commits, in the run store, what follows
without a worker (an empty map's join; a wait whose signal came first) and parks a run at a
wait step, then answers where the run goes on (None: parked, no message to send).

A parked run holds no worker thread and no message: its status is ``waiting`` (for the signal
it names, until ``wait_until``), it is out of the index of runs in progress and in a sorted
set of waits by timeout (:meth:`fleet.keys.Keys.waits`), all in Redis, so it survives worker
and Redis restarts. A signal (``RunStore.signal``) is kept in the run hash whether or not the
run waits for it yet; one the run waits for resumes it. The reconciler's loop times out due
waits (:meth:`fleet.scheduling.signals.Signals.fire_timeouts`): the wait step's ``on_timeout``
says whether the run fails or goes on with ``{"timed_out": true}``.
"""

from __future__ import annotations

import logging
import time

from fleet.run.agent import AgentDef, ParallelStep, WaitStep
from fleet.run.plan import Exhausted, Finished, StepPos, branch_count, next_step
from fleet.run.records import StepRecord
from fleet.run.state import RunState
from fleet.run.store import RunStore

log = logging.getLogger(__name__)

Next = StepPos | Finished | Exhausted | None


def settle(store: RunStore, agent: AgentDef, run: RunState) -> Next:
    """Where ``run`` goes on (see the module docstring); ``run`` is reloaded in place when this
    commits anything. None: the run is parked (or ended meanwhile)."""
    for _ in range(len(agent.steps) + 1):
        nxt = next_step(agent, run)
        if not isinstance(nxt, StepPos):
            return nxt
        top = agent.shaped(nxt.name)
        if isinstance(top, ParallelStep) and branch_count(top, run) == 0:
            now = time.time()
            record = StepRecord(key=top.name, name=top.name, kind="parallel", started_at=now, finished_at=now,
                                duration_s=0.0)
            store.finish_step(run.id, record, {} if top.branch_names else [])
        elif isinstance(top, WaitStep):
            record = StepRecord(key=top.name, name=top.name, kind="wait", started_at=time.time())
            parked = store.park(run.id, record, top.signal, time.time() + top.timeout_s)
            if parked != 2:
                if parked == 1:
                    log.info("run %s: waiting for signal %r at step %s (at most %.0fs)", run.id, top.signal,
                             top.name, top.timeout_s, extra={"run_id": run.id})
                return None
        else:
            return nxt
        fresh = store.load(run.id)
        run.__dict__.update(fresh.__dict__)
    raise RuntimeError(f"run {run.id}: no settled next step")  # a definition is finite: unreachable
