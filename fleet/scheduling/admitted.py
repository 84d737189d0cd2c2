"""Interactive runs admitted and not yet ended: what a new interactive run would wait behind.

A sorted set per class (:meth:`fleet.keys.Keys.admitted`) of run ids scored by each run's
deadline, beside a hash of each run's llm steps. Admission checks and adds in one Lua call, so concurrent
submissions (a burst through several gateway processes) cannot all slip under the same
limit; a run leaves in the same step that ends it (:meth:`fleet.run.records.RunStore.transition`),
whatever ends it (its last step, a cancel, its deadline), or, should its record vanish,
when its deadline passes.
Counting admitted runs, rather than model steps in queues and slots, also counts the steps
a worker has taken from the queue but not yet given a slot.
"""

from __future__ import annotations

import redis

from fleet.run.agent import AgentDef
from fleet.settings import PriorityClass, Settings

# KEYS: the class's admitted runs (sorted set), their llm steps (hash). ARGV: now, run id,
# its llm steps, deadline (absolute), parallel, step time (s), the new run's time (s), its
# deadline (s from now), threads of workers that are free or take only this class, the
# wait for a shared worker's thread to free (s); a step time of 0 admits without a
# prediction. Returns {admitted (0/1), llm steps ahead of it}.
_ADMIT = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #gone > 0 then
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
end
local ahead = 0
local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
if #ids > 0 then
  for _, n in ipairs(redis.call('HMGET', KEYS[2], unpack(ids))) do ahead = ahead + (tonumber(n) or 1) end
end
local step = tonumber(ARGV[6])
if step > 0 then
  local wait = math.floor(ahead / tonumber(ARGV[5])) * step
  -- its place in a wave falls on a thread of a shared worker, busy with a batch step
  if ahead % tonumber(ARGV[5]) >= tonumber(ARGV[9]) then wait = wait + tonumber(ARGV[10]) end
  if wait + tonumber(ARGV[7]) > tonumber(ARGV[8]) then return {0, ahead} end
end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return {1, ahead}
"""


def llm_steps(agent: AgentDef) -> int:
    """Model calls a run of ``agent`` makes (a loop's body counted once)."""
    return max(1, sum(1 for s, _ in agent.iter_steps() if s.kind == "llm"))


class AdmittedRuns:
    """The ledger of admitted runs of one class."""

    def __init__(self, settings: Settings, client: redis.Redis, priority: PriorityClass = "interactive") -> None:
        self.key, self.steps_key = settings.keys.admitted(priority), settings.keys.admitted_steps(priority)
        self.redis = client
        self._admit = client.register_script(_ADMIT)

    def admit(self, run_id: str, agent: AgentDef, now: float, deadline_s: float, parallel: int,
              step_s: float | None, ready: int = 0, handoff_s: float = 0.0) -> tuple[bool, int]:
        """Add the run unless the steps ahead of it, served ``parallel`` at a time in about
        ``step_s`` each, leave it no time to finish by its deadline; when its place in a wave
        is beyond the ``ready`` threads, it also waits ``handoff_s`` for a shared worker's
        thread busy with a batch step. Returns (admitted, steps ahead)."""
        run_s = (step_s or 0.0) * llm_steps(agent)
        ok, ahead = self._admit(keys=[self.key, self.steps_key], args=[
            now, run_id, llm_steps(agent), now + deadline_s, max(1, parallel), step_s or 0.0, run_s, deadline_s,
            ready, handoff_s])
        return bool(ok), int(ahead)

    def ahead(self, now: float) -> int:
        """Model steps of the admitted runs that have not ended."""
        ids = self.redis.zrangebyscore(self.key, now, "+inf")
        return sum(int(n or 1) for n in self.redis.hmget(self.steps_key, ids)) if ids else 0

    def forget(self, run_id: str) -> None:
        """The run ended: nothing waits behind it any more."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.key, run_id)
        pipe.hdel(self.steps_key, run_id)
        pipe.execute()
