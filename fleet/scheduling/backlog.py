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
from dataclasses import dataclass

import redis

from fleet.run.records import StepRecord, step_field
from fleet.settings import Settings

#: The estimate of a batch run's model seconds before any batch run ended.
DEFAULT_RUN_MODEL_S = 1.0
#: Weight of a run that ends in the estimate (an exponential moving average).
ESTIMATE_ALPHA = 0.05

# Append run ids to a tenant's backlog; a tenant that was not backlogged starts at the
# smallest virtual time of those that are (the clock when none is).
# KEYS: the tenant's backlog, backlogged set, virtual times, backlog size, clock.
# ARGV: tenant, then run ids.
_PUSH = """
local ids = {}
for i = 2, #ARGV do table.insert(ids, ARGV[i]) end
redis.call('RPUSH', KEYS[1], unpack(ids))
redis.call('INCRBY', KEYS[4], #ids)
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  local low = nil
  for _, t in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if t ~= ARGV[1] then
      local v = tonumber(redis.call('ZSCORE', KEYS[3], t) or '0')
      if low == nil or v < low then low = v end
    end
  end
  if low == nil then low = tonumber(redis.call('GET', KEYS[5]) or '0') end
  redis.call('ZADD', KEYS[3], 'GT', low, ARGV[1])
end
return #ids
"""

# Pop up to n runs, each from the backlogged tenant with the smallest effective time.
# KEYS: backlogged set, virtual times, dispatched hash, dispatching set, backlog size, clock,
# then one backlog per candidate tenant.
# ARGV: now, n, estimate (model seconds of a run), then name and weight per candidate.
# Returns run id, tenant, run id, tenant, ...
_POP = """
local n = tonumber(ARGV[2])
local e = tonumber(ARGV[3])
local inflight = {}
for _, t in ipairs(redis.call('HVALS', KEYS[3])) do inflight[t] = (inflight[t] or 0) + 1 end
local tenants = {}
for i = 7, #KEYS do
  local name = ARGV[4 + 2 * (i - 7)]
  local w = tonumber(ARGV[5 + 2 * (i - 7)])
  if redis.call('SISMEMBER', KEYS[1], name) == 1 then
    local v = tonumber(redis.call('ZSCORE', KEYS[2], name) or '0')
    table.insert(tenants, {name = name, w = w, key = KEYS[i], v = v, eff = v + (inflight[name] or 0) * e / w})
  end
end
local out = {}
while #out < 2 * n and #tenants > 0 do
  local best = 1
  for i = 2, #tenants do
    if tenants[i].eff < tenants[best].eff then best = i end
  end
  local t = tenants[best]
  local id = redis.call('LPOP', t.key)
  if id then
    redis.call('DECR', KEYS[5])
    redis.call('HSET', KEYS[3], id, t.name)
    redis.call('ZADD', KEYS[4], ARGV[1], id)
    redis.call('SET', KEYS[6], tostring(t.v))
    table.insert(out, id)
    table.insert(out, t.name)
    t.eff = t.eff + e / t.w
  end
  if redis.call('LLEN', t.key) == 0 then
    redis.call('SREM', KEYS[1], t.name)
    table.remove(tenants, best)
  end
end
return out
"""

# Charge a committed step's model seconds over the weight to its tenant, if the commit that
# stored the step's record is this delivery's (same worker, attempt and start).
# KEYS: run hash, virtual times. ARGV: the step record's field, worker, attempts, started_at,
# tenant, charge.
_CHARGE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec['worker'] ~= ARGV[2] or tonumber(rec['attempts']) ~= tonumber(ARGV[3])
   or tonumber(rec['started_at']) ~= tonumber(ARGV[4]) then return 0 end
redis.call('ZINCRBY', KEYS[2], ARGV[6], ARGV[5])
return 1
"""

# Fold one ended run's model seconds into the estimate. KEYS: estimate hash.
# ARGV: the run's model seconds, alpha, the default.
_ESTIMATE = """
local old = tonumber(redis.call('HGET', KEYS[1], 'run_model_s') or ARGV[3])
local new = old + tonumber(ARGV[2]) * (tonumber(ARGV[1]) - old)
redis.call('HSET', KEYS[1], 'run_model_s', tostring(new))
return tostring(new)
"""


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
        self._push = client.register_script(_PUSH)
        self._pop = client.register_script(_POP)
        self._estimate = client.register_script(_ESTIMATE)

    def queue_push(self, pipe: redis.client.Pipeline, tenant: str, run_ids: list[str]) -> None:
        """Queue the append of ``run_ids`` to ``tenant``'s backlog on ``pipe`` (after their
        compact records, :meth:`fleet.run.records.RunStore.queue_compact`)."""
        if run_ids:
            k = self.keys
            self._push(keys=[k.backlog(tenant), k.backlogged, k.fair_vtime, k.backlog_size, k.fair_clock],
                       args=[tenant, *run_ids], client=pipe)

    def pop(self, n: int, tenants: list[str] | None = None) -> list[Popped]:
        """Take up to ``n`` runs by fair share (see the module docstring)."""
        registry = self.settings.tenant_registry
        names = sorted(set(tenants if tenants is not None else registry.names()) | set(self.backlogged()))
        k = self.keys
        args: list[object] = [repr(_now()), n, repr(self.estimate_s())]
        for name in names:
            args += [name, repr(registry.weight(name))]
        flat = self._pop(keys=[k.backlogged, k.fair_vtime, k.dispatched, k.dispatching, k.backlog_size,
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
        return float(self._estimate(keys=[self.keys.fair_estimate],
                                    args=[repr(model_s), ESTIMATE_ALPHA, DEFAULT_RUN_MODEL_S]))

    def charge_commands(self, run_key: str, record: StepRecord, tenant: str) -> list[tuple[str, tuple]]:
        """Redis commands, for a batch llm step's commit round trip, that charge its model
        seconds over the tenant's weight to the tenant's virtual time, once."""
        charge = (record.model_s or 0.0) / self.settings.tenant_registry.weight(tenant)
        args = [step_field(record.key), record.worker or "", record.attempts, repr(record.started_at or 0.0),
                tenant, repr(charge)]
        return [("eval", (_CHARGE, 2, run_key, self.keys.fair_vtime, *args))]

    def stranded(self, older_than_s: float) -> list[str]:
        """Runs popped more than ``older_than_s`` ago and still not created."""
        return self.redis.zrangebyscore(self.keys.dispatching, "-inf", _now() - older_than_s, start=0, num=1000)

    def forget_dispatching(self, run_ids: list[str]) -> None:
        if run_ids:
            self.redis.zrem(self.keys.dispatching, *run_ids)


def _now() -> float:
    return time.time()
