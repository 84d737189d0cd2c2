"""The door: a submission passes a short sequence of gates, or is refused with what is wrong.

::

    tenant        the caller's tenant exists
    validate      the agent, the input (size, schema), the options        InvalidSubmission
    idempotency   a key used before answers its run (even under load)     IdempotencyConflict
    quota         the tenant's places, submissions per second, tokens     QuotaExceeded
    capacity      interactive: the predicted wait fits the deadline       Overloaded
                  batch: the batch depth is under its bound
    claim         the idempotency key is bound to the new run
    record        the run's record (a batch run: a compact record in its tenant's backlog)
    queue         the run's chain is sent (a batch run: the dispatcher sends it later)

What a gate takes (quota places, a place in the ledger of admitted runs, the key, the record)
is held by a :class:`~fleet.scheduling.reservation.Reservation`: a later gate that refuses gives
all of it back, so nothing of a refused submission is kept and no tenant is left a place
tighter.

An interactive run is created and its chain sent at once. A batch run (with the fleet's own
scheduling) goes into its tenant's backlog as a compact record (:mod:`fleet.scheduling.backlog`);
the dispatcher (:mod:`fleet.scheduling.dispatch`) later creates it and sends its chain through
:meth:`Admission.send`. :meth:`Admission.submit_many` admits many at once: each is validated on
its own, and the good ones are written in pipelined chunks.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

from fleet.broker.chains import build_chain
from fleet.core import lua, tracing
from fleet.core.redis_full import RETRY_AFTER_S, is_redis_full
from fleet.errors import FleetError, IdempotencyConflict, InvalidSubmission, Overloaded
from fleet.run.agent import AgentDef
from fleet.run.records import RunRecord, new_run_id
from fleet.run.sessions import Sessions
from fleet.run.store import RunStore
from fleet.scheduling.backlog import Backlog
from fleet.scheduling.capacity import Capacity
from fleet.scheduling.forecast import Forecaster
from fleet.scheduling.idempotency import IdempotencyKeys, named_run
from fleet.scheduling.quotas import Claim, QuotaGate
from fleet.scheduling.reservation import Held, Reservation
from fleet.scheduling.submission import Admitted, Submission, fingerprint, parse_submission
from fleet.settings import PriorityClass, Settings
from fleet.tenants import DEFAULT_TENANT

log = logging.getLogger(__name__)

_CHUNK = 1000  # submissions written per round trip


@dataclass
class _Checked:
    """A submission that passed validation, ready to be stored."""

    index: int
    sub: Submission
    agent: AgentDef
    input: dict[str, Any]
    deadline_s: float
    print_: str


class Admission:
    """Admits submissions into one fleet."""

    def __init__(self, settings: Settings, app: Celery, agents: dict[str, AgentDef],
                 store: RunStore | None = None) -> None:
        self.settings = settings
        self.app = app
        self.agents = agents
        self.store = store or RunStore(settings)
        self.forecaster = Forecaster(settings, Capacity(settings, self.store.redis))
        self.backlog = Backlog(settings, self.store.redis)
        self.quotas = QuotaGate(settings, self.store.redis)
        self.keys = IdempotencyKeys(settings, self.store.redis)
        self.sessions = Sessions(settings, self.store.redis)

    # --- one submission -------------------------------------------------------------
    def submit(self, sub: Submission, tenant: str = DEFAULT_TENANT) -> tuple[str, bool]:
        """Admit a tenant's submission. Returns ``(run_id, created)``; created is False for a
        repeated idempotency key.

        Traced, its span is the run's root (:mod:`fleet.core.tracing`).

        Raises:
            InvalidSubmission: what is wrong with it, naming the field.
            IdempotencyConflict: its idempotency key names a run of a different submission.
            Overloaded: the fleet sheds load, or its Redis is full; nothing was kept
                (:class:`QuotaExceeded`: the tenant is over a quota).
        """
        with tracing.span(f"submit {sub.agent}", kind="producer",
                          attributes={"fleet.agent": sub.agent, "fleet.priority": sub.priority,
                                      "fleet.tenant": tenant}) as span:
            what = f"a {sub.priority} run of {sub.agent}"
            run_id, created = self._full_redis(lambda: self._gates(sub, tenant), what)
            span.set_attributes({"fleet.run_id": run_id, "fleet.created": created})
            return run_id, created

    def _gates(self, sub: Submission, tenant: str) -> tuple[str, bool]:
        """The gates of one submission, top to bottom (see the module docstring)."""
        self._tenant(tenant)
        c = self._validate(0, sub)
        repeat = self.keys.seen(tenant, sub.idempotency_key, c.print_)
        if repeat is not None:  # answered even under load
            return repeat, False
        if self._backlogged(sub):
            return self._to_backlog(c, tenant)
        run_id = new_run_id()
        with Reservation(f"run {run_id}") as held:
            _, places = self._quota(held, tenant, sub.priority, 1, run_id)
            self._capacity(held, c, run_id)
            repeat = self._claim(held, tenant, c, run_id)
            if repeat is not None:  # the same key, claimed meanwhile by another submission
                return repeat, False
            record = self._record(c, tenant, run_id, time.time(), turns=self._turns(tenant, sub))
            since = self.store.epoch()
            self._store(held, record, places)
            self.send(record, c.agent)
            # The caller is given the run's id next: its record and its first step message must
            # be on a replica, or a failover could leave an id that names nothing (a failover in
            # between refuses the submission: the caller's retry, same key, admits it again).
            self.store.replicated(f"run {run_id}: admission", since)
            held.commit()
        log.info("run %s: accepted (tenant %s, agent %s, %s, deadline in %.1fs)", run_id, tenant, c.agent.name,
                 sub.priority, c.deadline_s)
        return run_id, True

    def _to_backlog(self, c: _Checked, tenant: str) -> tuple[str, bool]:
        """A batch run's gates past idempotency: quota, batch depth, into the backlog."""
        with Reservation(f"a batch run of {c.agent.name}") as held:
            _, places = self._quota(held, tenant, "batch", 1)
            self.forecaster.batch_room(1)
            [result] = self._queue([c], tenant, None, places)
            if result.created:
                held.commit()
        if result.error is not None:
            raise result.error
        assert result.run_id is not None  # noqa: S101 - set whenever there is no error
        return result.run_id, result.created

    # --- the gates ------------------------------------------------------------------
    def _tenant(self, tenant: str) -> None:
        try:
            self.settings.tenant_registry.get(tenant)
        except KeyError as exc:
            raise InvalidSubmission(f"tenant: {exc.args[0]}", "tenant") from None

    def _validate(self, index: int, sub: Submission) -> _Checked:
        agent = self.agents.get(sub.agent)
        if agent is None:
            known = ", ".join(sorted(self.agents)) or "none"
            raise InvalidSubmission(f"agent: unknown agent '{sub.agent}' (known: {known})", "agent")
        size = len(json.dumps(sub.input))
        if size > self.settings.max_input_bytes:
            raise InvalidSubmission(
                f"input: {size} bytes is over the {self.settings.max_input_bytes}-byte limit", "input"
            )
        clean = agent.validate_input(sub.input)
        deadline_s = sub.deadline_s or self.settings.deadline_s(sub.priority)
        return _Checked(index, sub, agent, clean, deadline_s, fingerprint(sub))

    def _quota(self, held: Reservation, tenant: str, priority: PriorityClass, n: int,
               token: str = "") -> tuple[Held, Claim]:
        """Count ``n`` runs of the class as the tenant's, or raise QuotaExceeded; the claim that
        the runs' records settle."""
        claim = self.quotas.take(tenant, priority, n, token=token)
        return held.took(f"{n} {priority} quota places of tenant {tenant}",
                         lambda left: self.quotas.give_back(tenant, priority, left, claim), n), claim

    def _capacity(self, held: Reservation, c: _Checked, run_id: str) -> None:
        """An interactive run joins the ledger of admitted runs if its predicted wait fits its
        deadline (with the fleet's own scheduling), or Overloaded."""
        if self.settings.scheduling != "fleet":
            return
        self.forecaster.admit(run_id, c.agent, c.deadline_s)
        held.took("its place among the admitted runs", lambda _: self.forecaster.admitted.forget(run_id))

    def _claim(self, held: Reservation, tenant: str, c: _Checked, run_id: str) -> str | None:
        key = c.sub.idempotency_key
        if key is None:
            return None
        repeat = self.keys.claim(tenant, key, run_id, c.print_)
        if repeat is None:
            held.took(f"idempotency key {key!r}", lambda _: self.keys.release(tenant, key))
        return repeat

    def _turns(self, tenant: str, sub: Submission) -> list[dict[str, Any]]:
        return self.sessions.turns(tenant, sub.session_id) if sub.session_id else []

    def _store(self, held: Reservation, record: RunRecord, places: Claim) -> None:
        self.store.create(record, self.quotas.settle(places, 1))
        held.took("its run record", lambda _: self.store.delete(record.id))

    def send(self, record: RunRecord, agent: AgentDef) -> None:
        """Send the chain of a run whose record is stored (a new run, or one dispatched from
        the backlog)."""
        build_chain(self.app, self.settings, agent, record.id, record.priority).apply_async()

    # --- many submissions -----------------------------------------------------------
    def submit_many(self, subs: list[Submission | dict[str, Any]], tenant: str = DEFAULT_TENANT,
                    batch: str | None = None) -> list[Admitted]:
        """Admit many submissions of a tenant at once: one :class:`Admitted` per item, in order.

        Each item is validated on its own: a bad one gets its error (InvalidSubmission naming
        the field, IdempotencyConflict), the good ones are admitted. Batch runs go into the
        tenant's backlog in pipelined chunks; ``batch`` names the batch job they belong to.
        When the batch depth leaves room for only some, the rest get :class:`Overloaded`.

        Raises:
            Overloaded: nothing could be queued (the fleet sheds batch work, the tenant is over
                a quota, or Redis is full); nothing was kept.
        """
        self._tenant(tenant)
        results: list[Admitted | None] = [None] * len(subs)
        checked: list[_Checked] = []
        for i, item in enumerate(subs):
            try:
                sub = item if isinstance(item, Submission) else parse_submission(item)
                checked.append(self._validate(i, sub))
            except InvalidSubmission as exc:
                results[i] = Admitted(error=exc)
        backlogged = [c for c in checked if self._backlogged(c.sub)]
        if backlogged:
            self._many_to_backlog(backlogged, tenant, batch, results)
        for c in checked:
            if not self._backlogged(c.sub):
                try:
                    run_id, created = self.submit(c.sub, tenant)
                    results[c.index] = Admitted(run_id, created)
                except FleetError as exc:
                    results[c.index] = Admitted(error=exc)
        return [r if r is not None else Admitted(error=FleetError("not admitted")) for r in results]

    def _many_to_backlog(self, backlogged: list[_Checked], tenant: str, batch: str | None,
                         results: list[Admitted | None]) -> None:
        """Batch items into the backlog: places for all of them, then as many as the batch
        depth has room for, in chunks; places of items that made no new run are given back."""
        with Reservation(f"{len(backlogged)} batch runs") as held:
            places, claim = self._quota(held, tenant, "batch", len(backlogged))
            room = self.forecaster.batch_room(len(backlogged))
            for c in backlogged[room:]:
                results[c.index] = Admitted(error=Overloaded(
                    f"batch work queued is at its limit ({self.settings.admission_batch_max_queued}); "
                    "retry later", retry_after_s=5.0))
            for start in range(0, room, _CHUNK):
                chunk = backlogged[start:min(room, start + _CHUNK)]
                try:
                    queued = self._full_redis(lambda: self._queue(chunk, tenant, batch, claim), "a chunk of batch runs")
                except Overloaded as exc:
                    if start == 0:
                        raise
                    # Earlier chunks are queued: their items keep their runs, the rest are told.
                    for c in backlogged[start:room]:
                        results[c.index] = Admitted(error=exc)
                    break
                for c, result in zip(chunk, queued):
                    results[c.index] = result
            places.keep(sum(1 for c in backlogged if (r := results[c.index]) is not None and r.created))

    def _queue(self, chunk: list[_Checked], tenant: str, batch: str | None, places: Claim) -> list[Admitted]:
        """Put checked batch submissions into the tenant's backlog: claim their idempotency keys
        (one round trip), then write the new runs' compact records, their backlog entries and
        the batch job's run list (one transaction: all or nothing)."""
        r, now = self.store.redis, time.time()
        ids = [new_run_id() for _ in chunk]
        keyed = [(c, run_id) for c, run_id in zip(chunk, ids) if c.sub.idempotency_key is not None]
        replies = self.keys.claim_many(r.pipeline(transaction=False), tenant,
                                       [(c.sub.idempotency_key, run_id, c.print_) for c, run_id in keyed])
        failed = [x for x in replies if isinstance(x, Exception)]
        if failed:  # Redis full, say: the keys claimed must not name runs that will not exist
            self.keys.release(tenant, *[c.sub.idempotency_key for (c, _), ok in zip(keyed, replies) if ok is True])
            raise failed[0]
        claimed = dict(zip((run_id for _, run_id in keyed), replies))
        held = [(c, run_id) for c, run_id in keyed if not claimed[run_id]]
        pipe = r.pipeline(transaction=False)
        for c, _ in held:
            pipe.get(self.keys.key(tenant, c.sub.idempotency_key))
        repeats = dict(zip((run_id for _, run_id in held), pipe.execute()))
        out: list[Admitted] = []
        new: list[RunRecord] = []
        for c, run_id in zip(chunk, ids):
            if run_id in repeats:
                out.append(self._repeat_of(c, repeats[run_id]))
                continue
            new.append(self._record(c, tenant, run_id, now, batch=batch))
            out.append(Admitted(run_id, True))
        if new:
            self._write_backlog(new, tenant, batch, places)
        return out

    @staticmethod
    def _repeat_of(c: _Checked, held: str | None) -> Admitted:
        if held is None:  # expired between the two calls
            return Admitted(error=Overloaded("idempotency key changed while admitting; retry", retry_after_s=1.0))
        try:
            return Admitted(named_run(c.sub.idempotency_key or "", held, c.print_), False)
        except IdempotencyConflict as exc:
            return Admitted(error=exc)

    def _write_backlog(self, new: list[RunRecord], tenant: str, batch: str | None, places: Claim) -> None:
        since = self.store.epoch()
        write = self.store.redis.pipeline(transaction=True)
        for record in new:
            self.store.queue_compact(write, record)
        self.quotas.settle(places, len(new))(write)
        self.backlog.queue_push(write, tenant, [rec.id for rec in new])
        if batch is not None:
            write.rpush(self.settings.keys.batch_runs(tenant, batch), *[rec.id for rec in new])
            write.expire(self.settings.keys.batch_runs(tenant, batch), self.settings.run_ttl_s)
        try:
            lua.execute(write)
        except Exception:
            # Nothing was queued: the keys must not name runs that do not exist.
            self.keys.release(tenant, *[rec.idempotency_key for rec in new if rec.idempotency_key])
            raise
        self.store.replicated(f"{len(new)} batch runs of tenant {tenant}: admission", since)
        log.info("%d batch run(s) of tenant %s queued in its backlog%s", len(new), tenant,
                 f" (batch {batch})" if batch else "")

    # --- helpers --------------------------------------------------------------------
    def _record(self, c: _Checked, tenant: str, run_id: str, now: float, batch: str | None = None,
                turns: list[dict[str, Any]] | None = None) -> RunRecord:
        sub, agent = c.sub, c.agent
        return RunRecord(
            id=run_id, agent=agent.name, priority=sub.priority, tenant=tenant, status="queued",
            created_at=now, deadline_at=now + c.deadline_s, input=c.input,
            idempotency_key=sub.idempotency_key, batch=batch, session_id=sub.session_id, session=turns or [],
            stream=sub.stream,
            budget_tokens=sub.budget_tokens if sub.budget_tokens is not None else agent.budget.tokens,
            budget_cost=sub.budget_cost if sub.budget_cost is not None else agent.budget.cost,
            traceparent=tracing.traceparent(),
        )

    def _backlogged(self, sub: Submission) -> bool:
        """Whether a submission waits in the backlog: batch work, with the fleet's scheduling."""
        return sub.priority == "batch" and self.settings.scheduling == "fleet"

    def _full_redis(self, admit: Any, what: str) -> Any:
        """``admit()``, with a full Redis turned into :class:`Overloaded` (nothing was kept)."""
        try:
            return admit()
        except (redis.exceptions.ResponseError, OperationalError) as exc:
            if not is_redis_full(exc):
                raise
            log.warning("refused %s: Redis is full (%s)", what, exc)
            raise Overloaded(
                f"the fleet's Redis is full (maxmemory reached): nothing was queued; retry in {RETRY_AFTER_S:.0f}s",
                retry_after_s=RETRY_AFTER_S) from None
