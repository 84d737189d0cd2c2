"""The batch backlog: per-tenant queues of batch runs, and who goes next by fair share.

A batch run is admitted into its tenant's backlog (a Redis list of run ids; the run itself is
a compact record, :func:`fleet.run.records.compact`) and waits there until the dispatcher
(:mod:`fleet.scheduling.dispatch`) moves it into the step queues. Queued runs cost a few hundred bytes
each, so a backlog of a million runs fits in Redis; the step queues hold only the runs that
the dispatch window lets in.

Which tenant goes next is start-time fair queuing on batch model time:

- each tenant has a virtual time, the model seconds its batch llm steps used divided by its
  weight (charged when a step commits, :mod:`fleet.steps.hooks.fair_share`);
- runs dispatched and not yet ended count with an estimate (the recent model seconds of a batch
  run): a tenant's effective time is its virtual time plus its in-flight runs' estimate over
  its weight, so one tenant cannot take the whole window in one go;
- the dispatcher takes from the backlogged tenant with the smallest effective time;
- a tenant that becomes backlogged starts no lower than the smallest virtual time of the
  tenants backlogged then (or, when none is, where the last dispatch left the clock): idle
  time earns no credit, and nobody is starved by a newcomer's old, low time. Runs of the
  others already in flight are not counted there, so the newcomer gets the slots they free
  until its own in-flight runs match theirs, and its share of the model starts at once;
- an idle tenant's share goes to the others: only backlogged tenants compete.

Popping is one Lua script: the run ids move from a backlog into the dispatched hash (the
window's count) and the dispatching set (popped, not yet created) atomically; a dispatcher
that dies before creating them leaves them in the dispatching set, and the next one sends
them (:meth:`fleet.scheduling.dispatch.Dispatcher.recover`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from fleet.core import lua
from fleet.run.codec import step_field
from fleet.run.records import StepRecord
from fleet.settings import Settings

#: The estimate of a batch run's model seconds before any batch run ended.
DEFAULT_RUN_MODEL_S = 1.0
#: Weight of a run that ends in the estimate (an exponential moving average).
ESTIMATE_ALPHA = 0.05



_PUSH = lua.load(__file__, "push-5.lua")
_POP = lua.load(__file__, "pop.lua")
_CHARGE = lua.load(__file__, "charge-2.lua")
_ESTIMATE = lua.load(__file__, "estimate-1.lua")


@dataclass(frozen=True)
class Popped:
    """A run taken from a backlog for dispatch."""

    run_id: str
    tenant: str


class Backlog:
    """The backlogs of one fleet namespace and their fair-share state."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.keys = settings.keys
        self.redis = client

    def queue_push(self, pipe: redis.client.Pipeline, tenant: str, run_ids: list[str]) -> None:
        """Queue the append of ``run_ids`` to ``tenant``'s backlog on ``pipe`` (after their
        compact records, :meth:`fleet.run.records.RunStore.queue_compact`)."""
        if run_ids:
            k = self.keys
            _PUSH(pipe, keys=[k.backlog(tenant), k.backlogged, k.fair_vtime, k.backlog_size, k.fair_clock],
                  args=[tenant, *run_ids])
            pipe.hincrby(k.backlog_runs, tenant, len(run_ids))

    def pop(self, n: int, tenants: list[str] | None = None) -> list[Popped]:
        """Take up to ``n`` runs by fair share (see the module docstring)."""
        registry = self.settings.tenant_registry
        names = sorted(set(tenants if tenants is not None else registry.names()) | set(self.backlogged()))
        k = self.keys
        args: list[object] = [repr(_now()), n, repr(self.estimate_s())]
        for name in names:
            args += [name, repr(registry.weight(name))]
        flat = _POP(self.redis, keys=[k.backlogged, k.fair_vtime, k.dispatched, k.dispatching, k.backlog_size,
                               k.fair_clock, *[k.backlog(t) for t in names]], args=args)
        return [Popped(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]

    def backlogged(self) -> set[str]:
        """Tenants whose backlog is not empty."""
        return self.redis.smembers(self.keys.backlogged)

    def size(self) -> int:
        """Runs waiting in every backlog together (cancelled ones until they are popped)."""
        return int(self.redis.get(self.keys.backlog_size) or 0)

    def sizes(self) -> dict[str, int]:
        """Runs waiting in each tenant's backlog."""
        names = sorted(self.backlogged())
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.llen(self.keys.backlog(name))
        return dict(zip(names, pipe.execute()))

    def in_flight(self) -> dict[str, str]:
        """Dispatched runs that have not ended: run id -> tenant."""
        return self.redis.hgetall(self.keys.dispatched)

    def in_flight_count(self) -> int:
        return int(self.redis.hlen(self.keys.dispatched))

    def settle(self, run_ids: list[str]) -> None:
        """Drop runs that ended (or vanished) from the dispatch window's count."""
        if run_ids:
            self.redis.hdel(self.keys.dispatched, *run_ids)

    def virtual_times(self) -> dict[str, float]:
        """Each tenant's virtual time (charged model seconds over its weight)."""
        return {t: float(v) for t, v in self.redis.zrange(self.keys.fair_vtime, 0, -1, withscores=True)}

    def estimate_s(self) -> float:
        """The model seconds a dispatched batch run is expected to use."""
        value = self.redis.hget(self.keys.fair_estimate, "run_model_s")
        return float(value) if value is not None else DEFAULT_RUN_MODEL_S

    def record_run(self, model_s: float) -> float:
        """A batch run ended having used ``model_s``: fold it into the estimate; the new one."""
        return float(_ESTIMATE(self.redis, keys=[self.keys.fair_estimate],
                                    args=[repr(model_s), ESTIMATE_ALPHA, DEFAULT_RUN_MODEL_S]))

    def charge_command(self, run_id: str, record: StepRecord, tenant: str) -> Callable[[Any], Any]:
        """A command, for a batch llm step's commit round trip, that charges its model seconds
        over the tenant's weight to the tenant's virtual time, once."""
        charge = (record.model_s or 0.0) / self.settings.tenant_registry.weight(tenant)
        keys = [self.keys.run(run_id), self.keys.fair_vtime]
        args = [step_field(record.key), record.worker or "", record.attempts, repr(record.started_at or 0.0),
                tenant, repr(charge)]
        return lambda pipe: _CHARGE(pipe, keys, args)

    def stranded(self, older_than_s: float) -> list[str]:
        """Runs popped more than ``older_than_s`` ago and still not created."""
        return self.redis.zrangebyscore(self.keys.dispatching, "-inf", _now() - older_than_s, start=0, num=1000)

    def forget_dispatching(self, run_ids: list[str]) -> None:
        if run_ids:
            self.redis.zrem(self.keys.dispatching, *run_ids)


def _now() -> float:
    return time.time()
