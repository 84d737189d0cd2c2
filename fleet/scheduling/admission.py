"""The door: validate a submission, honour its idempotency key, create the run, send its chain.

Everything that can be wrong with a submission is found here, before anything is queued,
and reported with a message that names what is wrong.

An interactive run is created and its chain sent at once. A batch run (with the fleet's own
scheduling) goes into its tenant's backlog as a compact record (:mod:`fleet.scheduling.backlog`); the
dispatcher (:mod:`fleet.scheduling.dispatch`) later creates it and sends its chain through
:meth:`Admission.send`, as a direct submission does. :meth:`Admission.submit_many` admits
many at once: each is validated on its own, and the good ones are written in pipelined chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet.core import tracing
from fleet.scheduling.admitted import AdmittedRuns, llm_steps
from fleet.run.agent import AgentDef
from fleet.scheduling.backlog import Backlog
from fleet.run.budget import MAX_BUDGET_COST, MAX_BUDGET_TOKENS
from fleet.scheduling.capacity import Capacity
from fleet.errors import FleetError, IdempotencyConflict, InvalidSubmission, Overloaded
from fleet.core.payload import check_value
from fleet.run.plan import build_chain
from fleet.scheduling.quotas import QuotaGate
from fleet.core.redis_full import RETRY_AFTER_S, is_redis_full
from fleet.inference.replicas import ReplicaBoard
from fleet.broker.queues import queue_name
from fleet.run.records import RunRecord, RunStore, new_run_id
from fleet.run.sessions import Sessions
from fleet.settings import PriorityClass, Settings
from fleet.tenants import DEFAULT_TENANT

log = logging.getLogger(__name__)


class Submission(BaseModel):
    """What an app asks for."""

    model_config = ConfigDict(extra="forbid")

    agent: str = Field(min_length=1, max_length=128)
    input: dict[str, Any] = Field(default_factory=dict)
    priority: PriorityClass = "interactive"
    deadline_s: float | None = Field(None, gt=0, le=7 * 86400, description="Overrides the class default.")
    idempotency_key: str | None = Field(None, min_length=1, max_length=256)
    session_id: str | None = Field(None, min_length=1, max_length=256)
    stream: bool = Field(False, description="Publish model tokens as run events.")
    budget_tokens: int | None = Field(
        None, gt=0, le=MAX_BUDGET_TOKENS,
        description="Most tokens (in + out) the run's model calls may use; overrides the agent's budget.")
    budget_cost: float | None = Field(
        None, gt=0, le=MAX_BUDGET_COST, allow_inf_nan=False,
        description="Most estimated cost (FLEET_PRICE_*) the run's model calls may use; overrides the agent's.")


    @field_validator("input", mode="before")
    @classmethod
    def _carryable(cls, value: Any) -> Any:
        check_value(value, "input")  # deep nesting, lone surrogates, NUL, overflowing numbers
        return value


def parse_submission(data: dict[str, Any]) -> Submission:
    """Validate the envelope of a submission; :class:`InvalidSubmission` names the field."""
    try:
        return Submission.model_validate(data)
    except InvalidSubmission:
        raise
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "submission"
        raise InvalidSubmission(f"{field}: {err['msg']}", field) from None


class LoadShedder:
    """Predicts when a new run would finish from the inference pool's capacity and what
    occupies it, and refuses what would miss its deadline.

    An interactive run's llm steps wait behind those of the interactive runs admitted before
    it; the pool serves ``parallel`` of them at once (the sequence capacity of the replicas
    that are up, or fewer when fewer worker threads take interactive work), each in at most
    about the recent p99 interactive llm step time (the slow tail, not the mean: a second wave
    that lands on the deadline misses it), so a new one starts after ``ahead // parallel``
    such waves. Threads of shared workers busy with batch steps take interactive work as
    soon as they free: a run whose place in a wave falls on one also waits half a batch step. A run predicted to miss its deadline is
    refused at once (a fast "no" beats a slow timeout for a person waiting), with a
    Retry-After for when the pool will have drained enough for it. Batch submissions get
    backpressure only when their queue is past a much higher bound.
    """

    def __init__(self, settings: Settings, capacity: Capacity, cache_s: float = 1.0) -> None:
        self.settings = settings
        self.capacity = capacity
        self.board = ReplicaBoard(settings, capacity.redis)
        self.admitted = AdmittedRuns(settings, capacity.redis)
        self.cache_s = cache_s
        self._workers: tuple[float, dict[str, dict]] | None = None

    def _live_workers(self) -> dict[str, dict]:
        now = time.monotonic()
        if self._workers is None or now - self._workers[0] > self.cache_s:
            self._workers = (now, self.capacity.workers())
        return self._workers[1]

    def state(self, priority: PriorityClass) -> dict[str, Any]:
        """Depth, capacity and predicted wait of the class's model queue."""
        s, r = self.settings, self.capacity.redis
        queue = queue_name(s, "llm", priority)
        batch_queue = queue_name(s, "llm", "batch")
        pipe = r.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.zcount(s.keys.slot_waiters(priority), time.time(), "+inf")
        pipe.zcount(s.keys.slot_waiters("batch"), time.time(), "+inf")
        depth, waiting, batch_waiting = pipe.execute()
        replicas = self.board.states()
        up = [st for st in replicas if st.up]
        pool = sum(st.capacity or 0 for st in up)
        inflight = sum(st.inflight[priority] for st in replicas)
        # Worker threads that take this class's steps: those of workers that take only this
        # class, and those of shared workers (interactive first), of which the ones held by
        # batch steps are free only once their step ends.
        only = shared = 0
        for w in self._live_workers().values():
            if queue in w["queues"]:
                if batch_queue in w["queues"] and priority == "interactive":
                    shared += w["concurrency"]
                else:
                    only += w["concurrency"]
        busy = min(shared, sum(st.inflight["batch"] for st in replicas) + batch_waiting)
        threads, ready = only + shared, only + shared - busy
        parallel = max(1, min(pool, threads) if pool else threads)
        times = sorted(self.capacity.step_times("llm", priority))
        step_s = times[min(len(times) - 1, int(0.99 * len(times)))] if times else None
        batch_times = sorted(self.capacity.step_times("llm", "batch")) if busy else []
        handoff_s = batch_times[len(batch_times) // 2] / 2 if batch_times else 0.0
        ahead = self.admitted.ahead(time.time()) if priority == "interactive" else depth + inflight + waiting
        wait = None
        if step_s is not None:
            wait = (ahead // parallel) * step_s + (handoff_s if ahead % parallel >= ready else 0.0)
        return {"queue": queue, "depth": depth, "in_flight": inflight, "waiting_for_slot": waiting,
                "steps_ahead": ahead,
                "pool_capacity": pool, "replicas_up": len(up), "replicas": len(replicas),
                "replicas_probed": sum(st.known for st in replicas), "threads": threads, "threads_free": ready,
                "parallel": parallel, "step_p99_s": step_s, "handoff_s": handoff_s, "predicted_wait_s": wait}

    def batch_room(self, n: int) -> int:
        """How many of ``n`` batch runs may be queued now (at least one), or :class:`Overloaded`.

        Every batch submission passes here: only the depth decides (the batch queue's steps
        and the backlog's runs), so read only that unless it is over its bound."""
        limit = self.settings.admission_batch_max_queued
        pipe = self.capacity.redis.pipeline(transaction=False)
        pipe.llen(queue_name(self.settings, "llm", "batch"))
        pipe.get(self.settings.keys.backlog_size)
        depth, backlog = pipe.execute()
        queued = int(depth) + max(0, int(backlog or 0))
        if queued < limit:
            return min(n, limit - queued)
        st = self.state("batch")
        step_s, parallel = st["step_p99_s"] or 0.0, max(1, st["parallel"])
        retry = max(5.0, (queued - limit + 1) / parallel * step_s)
        raise Overloaded(
            f"batch queue {st['queue']} holds {st['depth']} steps and the backlog {queued - int(depth)} runs "
            f"(limit {limit}); retry in {retry:.0f}s", retry_after_s=retry)

    def check(self, agent: AgentDef, priority: PriorityClass, deadline_s: float, run_id: str) -> None:
        """Admit ``run_id`` (an interactive one joins the ledger of admitted runs) or raise
        :class:`Overloaded`."""
        if priority == "batch":
            self.batch_room(1)
            return
        st = self.state(priority)
        if st["replicas_up"] == 0 and st["replicas_probed"] == st["replicas"]:
            retry = max(1.0, 2 * self.settings.replica_probe_interval_s)
            raise Overloaded(f"no replica of the inference pool is up (0 of {st['replicas']}); "
                             f"retry in {retry:.0f}s", retry_after_s=retry)
        step_s, parallel = st["step_p99_s"], st["parallel"]
        ok, ahead = self.admitted.admit(run_id, agent, time.time(), deadline_s, parallel, step_s,
                                        st["threads_free"], st["handoff_s"])
        if ok or not step_s:  # without a step time every run is admitted
            return
        run_s = step_s * llm_steps(agent)
        wait = (ahead // parallel) * step_s + (st["handoff_s"] if ahead % parallel >= st["threads_free"] else 0.0)
        # The pool drains a wave of `parallel` steps every step_s: retry once enough are gone.
        retry = max(1.0, math.ceil((wait + run_s - deadline_s) / step_s) * step_s)
        raise Overloaded(
            f"interactive queue {st['queue']}: {ahead} model steps of admitted runs ahead, served "
            f"{parallel} at a time ({st['pool_capacity']} sequences on {st['replicas_up']} of {st['replicas']} "
            f"replicas up, p99 step {step_s:.2f}s): predicted wait {wait:.2f}s + run {run_s:.2f}s exceeds the "
            f"{deadline_s:g}s deadline; retry in {retry:.0f}s", retry_after_s=retry)


@dataclass(frozen=True)
class Admitted:
    """One item of :meth:`Admission.submit_many`: its run, or why it was not admitted."""

    run_id: str | None = None
    created: bool = False
    error: FleetError | None = None


@dataclass
class _Checked:
    """A submission that passed validation, ready to be stored."""

    index: int
    sub: Submission
    agent: AgentDef
    input: dict[str, Any]
    deadline_s: float
    print_: str


_CHUNK = 1000  # submissions written per round trip


class Admission:
    """Admits submissions into one fleet."""

    def __init__(self, settings: Settings, app: Celery, agents: dict[str, AgentDef],
                 store: RunStore | None = None) -> None:
        self.settings = settings
        self.app = app
        self.agents = agents
        self.store = store or RunStore(settings)
        self.shedder = LoadShedder(settings, Capacity(settings, self.store.redis))
        self.backlog = Backlog(settings, self.store.redis)
        self.quotas = QuotaGate(settings, self.store.redis)

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
            run_id, created = self._full_redis(lambda: self._submit(sub, tenant), what)
            span.set_attributes({"fleet.run_id": run_id, "fleet.created": created})
            return run_id, created

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
        results: list[Admitted | None] = [None] * len(subs)
        checked: list[_Checked] = []
        for i, item in enumerate(subs):
            try:
                sub = item if isinstance(item, Submission) else parse_submission(item)
                checked.append(self._check(i, sub))
            except InvalidSubmission as exc:
                results[i] = Admitted(error=exc)
        backlogged = [c for c in checked if self._backlogged(c.sub)]
        direct = [c for c in checked if not self._backlogged(c.sub)]
        if backlogged:
            self._quota(tenant, "batch", len(backlogged))
            try:
                room = self.shedder.batch_room(len(backlogged))
            except Overloaded:
                self.quotas.give_back(tenant, "batch", len(backlogged))
                raise
            for c in backlogged[room:]:
                results[c.index] = Admitted(error=Overloaded(
                    f"batch work queued is at its limit ({self.settings.admission_batch_max_queued}); "
                    "retry later", retry_after_s=5.0))
            for start in range(0, room, _CHUNK):
                chunk = backlogged[start:min(room, start + _CHUNK)]
                try:
                    queued = self._full_redis(lambda: self._queue(chunk, tenant, batch), "a chunk of batch runs")
                except Overloaded as exc:
                    if start == 0:
                        self.quotas.give_back(tenant, "batch", len(backlogged))
                        raise
                    # Earlier chunks are queued: their items keep their runs, the rest are told.
                    for c in backlogged[start:room]:
                        results[c.index] = Admitted(error=exc)
                    break
                for c, result in zip(chunk, queued):
                    results[c.index] = result
            # Places were taken for every backlogged item: give back those of the items that
            # made no new run (repeats, conflicts, no room).
            unused = sum(1 for c in backlogged if not (results[c.index] and results[c.index].created))
            if unused:
                self.quotas.give_back(tenant, "batch", unused)
        for c in direct:
            try:
                run_id, created = self.submit(c.sub, tenant)
                results[c.index] = Admitted(run_id, created)
            except FleetError as exc:
                results[c.index] = Admitted(error=exc)
        return [r if r is not None else Admitted(error=FleetError("not admitted")) for r in results]

    def _quota(self, tenant: str, priority: PriorityClass, n: int) -> None:
        """Raise QuotaExceeded when the tenant may not queue n more runs of the class (else count them)."""
        self.quotas.take(tenant, priority, n)

    def send(self, record: RunRecord, agent: AgentDef) -> None:
        """Send the chain of a run whose record is stored (a new run, or one dispatched from
        the backlog)."""
        build_chain(self.app, self.settings, agent, record.id, record.priority).apply_async()

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

    def _backlogged(self, sub: Submission) -> bool:
        """Whether a submission waits in the backlog: batch work, with the fleet's scheduling."""
        return sub.priority == "batch" and self.settings.scheduling == "fleet"

    def _check(self, index: int, sub: Submission) -> _Checked:
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

    def _submit(self, sub: Submission, tenant: str) -> tuple[str, bool]:
        c = self._check(0, sub)
        if self._backlogged(sub):
            if sub.idempotency_key is not None:
                existing = self.store.redis.get(self._key(tenant, sub.idempotency_key))
                if existing is not None:  # a repeat: answered even under load
                    return self._repeat(sub.idempotency_key, existing, c.print_), False
            self._quota(tenant, "batch", 1)
            try:
                self.shedder.batch_room(1)
                [result] = self._queue([c], tenant, None)
            except Exception:
                self.quotas.give_back(tenant, "batch")
                raise
            if not result.created:
                self.quotas.give_back(tenant, "batch")
            if result.error is not None:
                raise result.error
            assert result.run_id is not None  # noqa: S101 - set whenever there is no error
            return result.run_id, result.created
        if sub.idempotency_key is not None:
            existing = self.store.redis.get(self._key(tenant, sub.idempotency_key))
            if existing is not None:  # a repeat: answered even under load
                return self._repeat(sub.idempotency_key, existing, c.print_), False
        run_id = new_run_id()
        self._quota(tenant, sub.priority, 1)
        try:
            if self.settings.scheduling == "fleet":
                self.shedder.check(c.agent, sub.priority, c.deadline_s, run_id)
            if sub.idempotency_key is not None:
                existing = self._claim_key(tenant, sub.idempotency_key, f"{run_id} {c.print_}")
                if existing is not None:
                    self.shedder.admitted.forget(run_id)
                    self.quotas.give_back(tenant, sub.priority)
                    return self._repeat(sub.idempotency_key, existing, c.print_), False
        except Overloaded:
            self.quotas.give_back(tenant, sub.priority)
            raise
        now = time.time()
        turns = Sessions(self.settings, self.store.redis).turns(tenant, sub.session_id) if sub.session_id else []
        record = self._record(c, tenant, run_id, now, turns=turns)
        try:
            self.store.create(record)
            self.send(record, c.agent)
        except Exception:
            # Nothing was queued: do not leave a run that looks accepted, nor a key that
            # would return it.
            self.store.delete(run_id)
            self.shedder.admitted.forget(run_id)
            self.quotas.give_back(tenant, sub.priority)
            if sub.idempotency_key is not None:
                self.store.redis.delete(self._key(tenant, sub.idempotency_key))
            raise
        log.info("run %s: accepted (tenant %s, agent %s, %s, deadline in %.1fs)", run_id, tenant, c.agent.name,
                 sub.priority, c.deadline_s)
        return run_id, True

    def _queue(self, chunk: list[_Checked], tenant: str, batch: str | None) -> list[Admitted]:
        """Put checked batch submissions into the tenant's backlog: claim their idempotency keys
        (one round trip), then write the new runs' compact records, their backlog entries and
        the batch job's run list (one transaction: all or nothing)."""
        r, now = self.store.redis, time.time()
        ids = [new_run_id() for _ in chunk]
        pipe = r.pipeline(transaction=False)
        keyed = [(c, run_id) for c, run_id in zip(chunk, ids) if c.sub.idempotency_key is not None]
        for c, run_id in keyed:
            pipe.set(self._key(tenant, c.sub.idempotency_key), f"{run_id} {c.print_}", nx=True,
                     ex=self.settings.run_ttl_s)
        replies = pipe.execute(raise_on_error=False)
        failed = [x for x in replies if isinstance(x, Exception)]
        if failed:  # Redis full, say: the keys claimed must not name runs that will not exist
            taken = [self._key(tenant, c.sub.idempotency_key) for (c, _), ok in zip(keyed, replies) if ok is True]
            if taken:
                r.delete(*taken)
            raise failed[0]
        claimed = dict(zip((run_id for _, run_id in keyed), replies))
        held = [(c, run_id) for c, run_id in keyed if not claimed[run_id]]
        for c, _ in held:
            pipe.get(self._key(tenant, c.sub.idempotency_key))
        repeats = dict(zip((run_id for _, run_id in held), pipe.execute()))
        out: list[Admitted] = []
        new: list[RunRecord] = []
        for c, run_id in zip(chunk, ids):
            if run_id in repeats:
                try:
                    existing = repeats[run_id]
                    if existing is None:  # expired between the two calls: a new run after all
                        raise KeyError(run_id)
                    out.append(Admitted(self._repeat(c.sub.idempotency_key, existing, c.print_), False))
                except IdempotencyConflict as exc:
                    out.append(Admitted(error=exc))
                except KeyError:
                    out.append(Admitted(error=Overloaded("idempotency key changed while admitting; retry",
                                                         retry_after_s=1.0)))
                continue
            new.append(self._record(c, tenant, run_id, now, batch=batch))
            out.append(Admitted(run_id, True))
        if not new:
            return out
        write = r.pipeline(transaction=True)
        for record in new:
            self.store.queue_compact(write, record)
        self.backlog.queue_push(write, tenant, [rec.id for rec in new])
        if batch is not None:
            write.rpush(self.settings.keys.batch_runs(tenant, batch), *[rec.id for rec in new])
            write.expire(self.settings.keys.batch_runs(tenant, batch), self.settings.run_ttl_s)
        try:
            write.execute()
        except Exception:
            # Nothing was queued: the keys must not name runs that do not exist.
            keys = [self._key(tenant, rec.idempotency_key) for rec in new if rec.idempotency_key]
            if keys:
                r.delete(*keys)
            raise
        log.info("%d batch run(s) of tenant %s queued in its backlog%s", len(new), tenant,
                 f" (batch {batch})" if batch else "")
        return out

    def _key(self, tenant: str, idempotency_key: str) -> str:
        return self.settings.keys.idempotency(tenant, idempotency_key)

    def _claim_key(self, tenant: str, idempotency_key: str, value: str) -> str | None:
        """Bind the key to ``value`` (run id and fingerprint); return what it already holds, if any."""
        key = self._key(tenant, idempotency_key)
        if self.store.redis.set(key, value, nx=True, ex=self.settings.run_ttl_s):
            return None
        existing = self.store.redis.get(key)
        if existing is None:  # expired between the two calls: claim it again
            return self._claim_key(tenant, idempotency_key, value)
        return existing

    @staticmethod
    def _repeat(idempotency_key: str, held: str, print_: str) -> str:
        """The run a repeated key names, if the submission is the same as the one that made it."""
        run_id, _, made_by = held.partition(" ")
        if made_by and made_by != print_:
            raise IdempotencyConflict(
                f"idempotency key '{idempotency_key}' already names run {run_id}, made by a different "
                "submission (agent, input or options differ): use a new key for a new run")
        return run_id


def fingerprint(sub: Submission) -> str:
    """What makes two submissions the same run: everything but the idempotency key, hashed."""
    body = sub.model_dump(exclude={"idempotency_key"})
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:24]

