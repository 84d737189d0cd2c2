"""The door: validate a submission, honour its idempotency key, create the run, send its chain.

Everything that can be wrong with a submission is found here, before anything is queued,
and reported with a message that names what is wrong.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleet import tracing
from fleet.agent import AgentDef
from fleet.budget import MAX_BUDGET_COST, MAX_BUDGET_TOKENS
from fleet.capacity import Capacity
from fleet.errors import InvalidSubmission, Overloaded
from fleet.payload import check_value
from fleet.plan import build_chain
from fleet.redis_full import RETRY_AFTER_S, is_redis_full
from fleet.routing import queue_name
from fleet.runs import RunRecord, RunStore, new_run_id
from fleet.sessions import Sessions
from fleet.settings import PriorityClass, Settings

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
    """Predicts the wait of a new run from queue depth, live capacity and recent step times.

    An interactive run whose predicted wait plus run time would pass its deadline is
    refused at once (a fast "no" beats a slow timeout for a person waiting); batch
    submissions get backpressure only when their queue is past a much higher bound.
    """

    def __init__(self, settings: Settings, capacity: Capacity, cache_s: float = 1.0) -> None:
        self.settings = settings
        self.capacity = capacity
        self.cache_s = cache_s
        self._slots: dict[str, tuple[float, int]] = {}

    def _slots_for(self, queue: str) -> int:
        now = time.monotonic()
        cached = self._slots.get(queue)
        if cached is None or now - cached[0] > self.cache_s:
            cached = (now, self.capacity.slots_for(queue))
            self._slots[queue] = cached
        return cached[1]

    def state(self, priority: PriorityClass) -> dict[str, Any]:
        """Depth, capacity and predicted wait of the class's model queue."""
        queue = queue_name(self.settings, "llm", priority)
        depth = self.capacity.redis.llen(queue)
        slots = self._slots_for(queue)
        mean = self.capacity.mean_step_time("llm", priority)
        wait = depth / slots * mean if slots and mean is not None else None
        return {"queue": queue, "depth": depth, "slots": slots, "mean_step_s": mean, "predicted_wait_s": wait}

    def check(self, agent: AgentDef, priority: PriorityClass, deadline_s: float) -> None:
        """Raise :class:`Overloaded` when the run should not be admitted now."""
        if priority == "batch":
            # Every batch submission passes here: only the depth decides, so read only that
            # unless the queue is over its bound.
            limit = self.settings.admission_batch_max_queued
            if self.capacity.redis.llen(queue_name(self.settings, "llm", "batch")) >= limit:
                st = self.state(priority)
                drain = st["predicted_wait_s"] or 0.0
                retry = max(5.0, drain * (st["depth"] - limit + 1) / max(st["depth"], 1))
                raise Overloaded(
                    f"batch queue {st['queue']} holds {st['depth']} steps (limit {limit}); "
                    f"retry in {retry:.0f}s", retry_after_s=retry)
            return
        st = self.state(priority)
        wait, mean = st["predicted_wait_s"], st["mean_step_s"]
        if wait is None or mean is None:
            return  # no measurements (or no live worker announced yet): nothing to predict from
        run_s = mean * sum(1 for s, _ in agent.iter_steps() if s.kind == "llm")
        if wait + run_s > deadline_s:
            retry = max(1.0, wait + run_s - deadline_s)
            raise Overloaded(
                f"interactive queue {st['queue']} holds {st['depth']} steps for {st['slots']} slots: "
                f"predicted wait {wait:.1f}s + run {run_s:.1f}s exceeds the {deadline_s:.0f}s deadline; "
                f"retry in {retry:.0f}s", retry_after_s=retry)


class Admission:
    """Admits submissions into one fleet."""

    def __init__(self, settings: Settings, app: Celery, agents: dict[str, AgentDef],
                 store: RunStore | None = None) -> None:
        self.settings = settings
        self.app = app
        self.agents = agents
        self.store = store or RunStore(settings)
        self.shedder = LoadShedder(settings, Capacity(settings, self.store.redis))

    def submit(self, sub: Submission) -> tuple[str, bool]:
        """Admit a submission. Returns ``(run_id, created)``; created is False for a repeat key.

        Traced, its span is the run's root (:mod:`fleet.tracing`).

        Raises:
            InvalidSubmission: what is wrong with it, naming the field.
            Overloaded: the fleet sheds load, or its Redis is full; nothing was kept.
        """
        with tracing.span(f"submit {sub.agent}", kind="producer",
                          attributes={"fleet.agent": sub.agent, "fleet.priority": sub.priority}) as span:
            run_id, created = self._admit(sub)
            span.set_attributes({"fleet.run_id": run_id, "fleet.created": created})
            return run_id, created

    def _admit(self, sub: Submission) -> tuple[str, bool]:
        try:
            return self._submit(sub)
        except (redis.exceptions.ResponseError, OperationalError) as exc:
            if not is_redis_full(exc):
                raise
            log.warning("refused a %s run of %s: Redis is full (%s)", sub.priority, sub.agent, exc)
            raise Overloaded(
                f"the fleet's Redis is full (maxmemory reached): nothing was queued; retry in {RETRY_AFTER_S:.0f}s",
                retry_after_s=RETRY_AFTER_S) from None

    def _submit(self, sub: Submission) -> tuple[str, bool]:
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
        if sub.idempotency_key is not None:
            existing = self.store.redis.get(self._key(sub.idempotency_key))
            if existing is not None:  # a repeat: answered even under load
                return existing, False
        if self.settings.scheduling == "fleet":
            self.shedder.check(agent, sub.priority, deadline_s)

        run_id = new_run_id()
        if sub.idempotency_key is not None:
            existing = self._claim_key(sub.idempotency_key, run_id)
            if existing is not None:
                return existing, False
        now = time.time()
        deadline = now + deadline_s
        turns = Sessions(self.settings, self.store.redis).turns(sub.session_id) if sub.session_id else []
        record = RunRecord(
            id=run_id, agent=agent.name, priority=sub.priority, status="queued",
            created_at=now, deadline_at=deadline, input=clean,
            idempotency_key=sub.idempotency_key, session_id=sub.session_id, session=turns,
            stream=sub.stream,
            budget_tokens=sub.budget_tokens if sub.budget_tokens is not None else agent.budget.tokens,
            budget_cost=sub.budget_cost if sub.budget_cost is not None else agent.budget.cost,
            traceparent=tracing.traceparent(),
        )
        try:
            self.store.create(record)
            build_chain(self.app, self.settings, agent, run_id, sub.priority).apply_async()
        except Exception:
            # Nothing was queued: do not leave a run that looks accepted, nor a key that
            # would return it.
            self.store.delete(run_id)
            if sub.idempotency_key is not None:
                self.store.redis.delete(self._key(sub.idempotency_key))
            raise
        log.info("run %s: accepted (agent %s, %s, deadline in %.1fs)", run_id, agent.name,
                 sub.priority, deadline - now)
        return run_id, True

    def _key(self, idempotency_key: str) -> str:
        return self.settings.keys.idempotency(idempotency_key)

    def _claim_key(self, idempotency_key: str, run_id: str) -> str | None:
        """Bind the key to ``run_id``; return the run it already names, if any."""
        key = self._key(idempotency_key)
        if self.store.redis.set(key, run_id, nx=True, ex=self.settings.run_ttl_s):
            return None
        existing = self.store.redis.get(key)
        if existing is None:  # expired between the two calls: claim it again
            return self._claim_key(idempotency_key, run_id)
        return existing

