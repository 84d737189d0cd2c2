"""The Python client apps use: submit a run, read it, wait for it, follow its events.

::

    from fleet import FleetClient
    client = FleetClient()                       # settings from FLEET_* variables
                                                 # acts as FLEET_TENANT (or tenant=...)
    run_id = client.submit("calculator", {"question": "What is 6 * 7?"})
    run = client.wait(run_id, timeout=30)
    print(run.status, run.result)
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from typing import Any

from fleet.broker.app import create_app
from fleet.core import tracing
from fleet.errors import RunNotFound
from fleet.run.agent import AgentDef, load_agents
from fleet.run.cancel import announce
from fleet.run.deadletter import DeadLetter, DeadLetters
from fleet.run.follow import Event, Follow, Gone, drive
from fleet.run.index import run_query
from fleet.run.jobs import BatchJobs, BatchStatus
from fleet.run.records import TERMINAL, RunRecord
from fleet.run.sessions import Sessions
from fleet.run.store import RunStore
from fleet.run.tools import load_tool_modules
from fleet.run.usage import UsageKey, UsageLedger, UsageReport, model_time
from fleet.scheduling.admission import Admission
from fleet.scheduling.backlog import Backlog
from fleet.scheduling.quotas import QuotaGate
from fleet.scheduling.replay import Replayer
from fleet.scheduling.signals import Signals
from fleet.scheduling.submission import Admitted, submission
from fleet.settings import Settings
from fleet.surfaces.views import RunList, TenantReport, run_list, tenant_rows
from fleet.tenants import Caller

log = logging.getLogger(__name__)


class FleetClient:
    """Submits and follows agent runs of one fleet, as one tenant.

    What belongs to another tenant (runs, their events, sessions, dead letters, batch jobs)
    does not exist for it: reads answer :class:`RunNotFound`. An operator's client
    (``admin=True``) sees every tenant's and submits as its own.
    """

    def __init__(self, settings: Settings | None = None, *, tenant: str | None = None, admin: bool = False) -> None:
        """Args:
            settings: the fleet's settings; built from ``FLEET_*`` variables when None.
            tenant: the tenant it acts as; ``FLEET_TENANT`` when None.
            admin: an operator's client, which sees every tenant.

        Raises:
            KeyError: ``tenant`` is not one of the fleet's tenants.
        """
        self.settings = settings or Settings()
        self.caller = Caller(self.settings.tenant_registry.get(tenant or self.settings.tenant).name, admin)
        tracing.configure(self.settings, "client")
        load_tool_modules(self.settings.tool_modules)
        self.agents: dict[str, AgentDef] = load_agents(self.settings.agents_dir)
        self.app = create_app(self.settings)
        self.store = RunStore(self.settings)
        self._admission = Admission(self.settings, self.app, self.agents, self.store)
        self._signals = Signals(self.settings, self.app, self.agents, self.store)
        self.dead_letters = DeadLetters(self.settings, self.store.redis)
        self._replayer = Replayer(self.settings, self.app, self.agents, self.store, self.dead_letters)
        self.batch_jobs = BatchJobs(self.settings, self.store)

    def close(self) -> None:
        """Release connections."""
        self.store.redis.close()
        self.app.close()

    def scoped(self, caller: Caller) -> "FleetClient":
        """The same client (connections shared, not to be closed separately) acting for ``caller``."""
        view = copy.copy(self)
        view.caller = caller
        return view

    def resolve(self, run_id: str) -> str:
        """The whole id of the run ``run_id`` names: a whole id as it is, or a short one (the
        first 6 or more hex digits) that starts the id of exactly one run this client may see.

        Raises:
            InvalidSubmission: not a run id nor the start of one.
            AmbiguousRunId: it starts several runs' ids (listed in ``candidates``).
            RunNotFound: it starts none.
        """
        return self.store.resolve(run_id, self.caller.sees)

    def exists(self, run_id: str) -> bool:
        """Whether the run (a whole or a short id) has a record this client may see."""
        try:
            run_id = self.resolve(run_id)
        except RunNotFound:
            return False
        tenant = self.store.tenant(run_id)
        return tenant is not None and self.caller.sees(tenant)

    def _check_owner(self, run_id: str) -> str:
        """The run's whole id; :class:`RunNotFound` unless it exists and this caller may see it."""
        full = self.resolve(run_id)
        if not self.exists(full):
            raise RunNotFound(f"no run '{run_id}'")
        return full

    def __enter__(self) -> "FleetClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, agent: str, input: dict[str, Any] | None = None, **options: Any) -> str:
        """Submit a run of ``agent``; returns its id (the existing run's id for a repeated
        idempotency key).

        ``options`` are those of :class:`~fleet.scheduling.submission.Submission`: ``priority``
        (interactive or batch), ``deadline_s``, ``idempotency_key``, ``session_id``, ``stream``,
        ``budget_tokens`` and ``budget_cost`` (which override the agent's budget: the run ends
        ``budget_exceeded`` before a model call its budget leaves nothing for).

        Raises:
            InvalidSubmission: the agent, the input or an option is invalid (nothing queued).
            Overloaded: the fleet sheds load; retry after ``retry_after_s``.
        """
        run_id, _ = self._admission.submit(submission(agent, input, **options), self.caller.tenant)
        return run_id

    def submit_many(self, subs: list[dict[str, Any]], batch_id: str | None = None) -> list[Admitted]:
        """Submit many runs at once (each a dict of :meth:`submit`'s arguments: ``agent``,
        ``input``, ``priority``, ...); one :class:`~fleet.scheduling.submission.Admitted` per item, in order.

        A bad item gets its error (``InvalidSubmission`` naming the field, ``IdempotencyConflict``,
        ``Overloaded`` for those the batch depth had no room for); the good ones are admitted.
        Batch runs wait in the tenant's backlog. ``batch_id`` names the batch job they join
        (:meth:`batch_status`).

        Raises:
            InvalidSubmission: ``batch_id`` is not a valid id.
            Overloaded: nothing could be queued; retry after ``retry_after_s``.
        """
        if batch_id is not None:
            self.batch_jobs.open(self.caller.tenant, batch_id)
        return self._admission.submit_many(subs, self.caller.tenant, batch=batch_id)

    def batch_status(self, batch_id: str) -> BatchStatus:
        """A batch job's runs counted by status. Raises :class:`RunNotFound` for an unknown id
        or another tenant's job."""
        return self.batch_jobs.status(self.caller, batch_id)

    def get(self, run_id: str) -> RunRecord:
        """The run's record (a whole or a short id, see :meth:`resolve`). Raises :class:`RunNotFound`."""
        try:
            record = self.store.get(self.resolve(run_id))
        except RunNotFound:
            raise RunNotFound(f"no run '{run_id}'") from None
        if not self.caller.sees(record.tenant):
            raise RunNotFound(f"no run '{run_id}'")
        return record

    def runs(self, status: str | list[str] | None = None, agent: str | None = None, priority: str | None = None,
             tenant: str | None = None, since: float | None = None, until: float | None = None,
             error: str | None = None, limit: int = 50, cursor: str | None = None) -> RunList:
        """A page of the runs this client may see, newest first, filtered (each filter narrows
        the others): ``status`` (one, a list, or comma-separated), ``agent``, ``priority``
        (the class), ``tenant`` (an operator's filter; another tenant's runs never show),
        created between ``since`` and ``until`` (Unix times, seconds), ``error`` (text of the
        error, any case). ``cursor``: the ``next_cursor`` of the page before.

        Batch runs waiting in the backlog are listed once dispatched (``backlog`` counts them).

        Raises:
            InvalidSubmission: a filter is invalid (the field named).
        """
        statuses = status.split(",") if isinstance(status, str) else status
        q = run_query(status=statuses, agent=agent, priority=priority, tenant=tenant, since=since, until=until,
                      error=error, limit=limit, cursor=cursor)
        page = self.store.index.page(q, self._visible())
        waiting = {t: n for t, n in self._backlogs().items()
                   if self.caller.sees(t) and (q.tenant is None or t == q.tenant)}
        return run_list(page, backlog=sum(waiting.values()))

    def cancel(self, run_id: str) -> bool:
        """Cancel a run: its remaining steps are skipped and an in-flight model call is cancelled.

        Returns False when the run had already ended. Raises :class:`RunNotFound`.
        """
        run_id = self._check_owner(run_id)
        cancelled = self.store.end(run_id, "cancelled", error={"type": "RunCancelled", "message": "cancelled by request"})
        if cancelled:
            announce(self.store, run_id)  # workers cancel its model call now
        return cancelled

    def signal(self, run_id: str, name: str, payload: Any = None) -> str:
        """Deliver signal ``name`` with a JSON ``payload`` to a run: a run parked on it at a wait
        step resumes, and its next steps read the payload as the wait step's output; a signal
        that comes before its wait is kept for it. Returns ``"resumed"``, ``"kept"`` or
        ``"ended"`` (the run had ended). Raises :class:`RunNotFound` (another tenant's run too).
        """
        run_id = self._check_owner(run_id)
        outcome = self._signals.deliver(run_id, name, payload)
        log.info("run %s: signal %r %s", run_id, name, outcome, extra={"run_id": run_id})
        return outcome

    def wait(self, run_id: str, timeout: float = 60.0) -> RunRecord:
        """Block until the run ends (or ``timeout`` seconds pass) and return its record."""
        run_id = self.resolve(run_id)
        # Only events after the newest one seen before reading the record can end the wait:
        # an older terminal event belongs to an earlier life of a replayed run.
        after = self.store.newest_event_id(run_id)
        record = self.get(run_id)
        if record.status in TERMINAL:
            return record
        for _ in self.entries(run_id, after=after, timeout=timeout):
            pass
        return self.get(run_id)

    def events(self, run_id: str, timeout: float | None = None) -> Iterator[dict[str, str]]:
        """The run's events (status, steps, tokens when submitted with stream=True), until it ends."""
        for _, event in self.entries(run_id, timeout=timeout):
            yield event

    def entries(self, run_id: str, after: str = "0", timeout: float | None = None) -> Iterator[tuple[str, dict[str, str]]]:
        """``(stream id, event)`` pairs of the run after ``after``, until it ends (see
        :mod:`fleet.run.follow`) or ``timeout`` seconds pass. Raises :class:`RunNotFound`."""
        run_id = self._check_owner(run_id)
        follow = Follow(self.settings.keys)
        for found in drive(self.store.redis, follow.keys, follow.until_end(run_id, after, timeout)):
            if isinstance(found, Gone):
                raise RunNotFound(f"no run '{run_id}'")
            if isinstance(found, Event):
                yield found.event_id, found.fields

    def usage(self, by: UsageKey = "agent", since_s: float = 86400.0) -> UsageReport:
        """Tokens, time and estimated cost of the steps committed in the last ``since_s``
        seconds, by agent, class or tenant (see :mod:`fleet.run.usage`); a tenant's client sees
        only its own."""
        return UsageLedger(self.settings, self.store.redis).report(by, since_s, tenant=self._visible())

    def session(self, session_id: str) -> list[dict[str, Any]]:
        """The turns of one of this tenant's sessions, oldest first. Raises :class:`RunNotFound`
        when it has none (another tenant's session of the same id is another session)."""
        turns = Sessions(self.settings, self.store.redis).turns(self.caller.tenant, session_id)
        if not turns:
            raise RunNotFound(f"no session '{session_id}'")
        return turns

    def tenants(self, window_s: float = 900.0) -> TenantReport:
        """Each tenant's runs queued and in flight, backlog, model time in the last ``window_s``
        seconds and its part of batch model time, tokens today and quotas; a tenant's client
        sees only its own row."""
        registry = self.settings.tenant_registry
        quotas = QuotaGate(self.settings, self.store.redis)
        return tenant_rows({n: (registry.weight(n), registry.get(n).quotas) for n in registry.names()},
                           quotas.active(), self._backlogs(), model_time(UsageLedger(self.settings, self.store.redis),
                                                                          window_s),
                           quotas.tokens_today(), window_s, only=self._visible())

    def _backlogs(self) -> dict[str, int]:
        """tenant -> batch runs waiting in its backlog."""
        return Backlog(self.settings, self.store.redis).sizes()

    # --- dead letters ---------------------------------------------------------------
    def _visible(self) -> str | None:
        """The tenant whose entries this caller sees (None: an operator sees all)."""
        return None if self.caller.admin else self.caller.tenant

    def dlq_list(self, agent: str | None = None, step: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead-letter entries, newest first, optionally filtered by agent and step."""
        return self.dead_letters.list(limit, agent=agent, step=step, tenant=self._visible())

    def _entry(self, entry_id: str) -> DeadLetter:
        entry = self.dead_letters.get(entry_id)
        if entry is None or not self.caller.sees(entry.tenant):
            raise RunNotFound(f"no dead-letter entry '{entry_id}'")
        return entry

    def dlq_get(self, entry_id: str) -> tuple[DeadLetter, list[dict[str, Any]]]:
        """One entry and its replays (each with the run's current outcome)."""
        return self._entry(entry_id), self._replayer.replays(entry_id)

    def dlq_replay(self, entry_id: str, patch: dict[str, Any] | None = None) -> str:
        """Re-run the entry's run from its failed step, with the stored state (patched)."""
        self._entry(entry_id)
        return self._replayer.replay(entry_id, patch)

    def dlq_replay_all(self, agent: str | None = None, step: str | None = None,
                       patch: dict[str, Any] | None = None, limit: int = 10_000) -> list[str]:
        """Replay every open entry matching the filter; returns the run ids."""
        entries = [e for e in self.dlq_list(agent=agent, step=step, limit=limit) if self._replayer.is_open(e)]
        return [self._replayer.replay(e.id, patch) for e in entries]

    def dlq_purge(self, older_than_s: float | None = None) -> int:
        """Delete entries older than ``older_than_s`` seconds (all when None); a tenant's
        client deletes only its tenant's."""
        if self.caller.admin:
            return self._replayer.purge(older_than_s)
        cutoff = None if older_than_s is None else time.time() - older_than_s
        mine = [e.id for e in self.dlq_list(limit=self.settings.dead_letter_maxlen)
                if cutoff is None or e.last_failure_at < cutoff]
        return self.dead_letters.delete(mine)
