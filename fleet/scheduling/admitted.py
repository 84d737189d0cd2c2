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

from dataclasses import dataclass

import redis

from fleet.core import lua
from fleet.run.agent import AgentDef
from fleet.settings import PriorityClass, Settings

_ADMIT = lua.load(__file__, "admit-2.lua")


def llm_steps(agent: AgentDef) -> int:
    """Model calls a run of ``agent`` makes (a loop's body counted once)."""
    return max(1, sum(1 for s, _ in agent.iter_steps_with_branches() if s.kind == "llm"))


@dataclass(frozen=True)
class Placement:
    """Where a run stands in the ledger: admitted or not, the model steps ahead of it, and its
    predicted wait (None without a step time to predict from)."""

    admitted: bool
    ahead: int
    wait_s: float | None


class AdmittedRuns:
    """The ledger of admitted runs of one class."""

    def __init__(self, settings: Settings, client: redis.Redis, priority: PriorityClass = "interactive") -> None:
        self.key, self.steps_key = settings.keys.admitted(priority), settings.keys.admitted_steps(priority)
        self.redis = client

    def admit(self, run_id: str, agent: AgentDef, now: float, deadline_s: float, parallel: int,
              step_s: float | None, ready: int = 0, handoff_s: float = 0.0) -> Placement:
        """Add the run unless the steps ahead of it, served ``parallel`` at a time in about
        ``step_s`` each, leave it no time to finish by its deadline; when its place in a wave
        is beyond the ``ready`` threads, it also waits ``handoff_s`` for a shared worker's
        thread busy with a batch step."""
        return self._call("admit", run_id, llm_steps(agent), now, deadline_s, parallel, step_s, ready, handoff_s)

    def forecast(self, now: float, parallel: int, step_s: float | None, ready: int = 0, handoff_s: float = 0.0,
                 ahead: int | None = None) -> Placement:
        """What a new run would wait (nothing is added): behind the admitted runs, or behind
        ``ahead`` steps when given (a class without a ledger)."""
        return self._call("forecast", "", 1, now, 0.0, parallel, step_s, ready, handoff_s, ahead)

    def _call(self, mode: str, run_id: str, steps: int, now: float, deadline_s: float, parallel: int,
              step_s: float | None, ready: int, handoff_s: float, ahead: int | None = None) -> Placement:
        ok, found, wait = _ADMIT(self.redis, keys=[self.key, self.steps_key], args=[
            now, run_id, steps, now + deadline_s, max(1, parallel), step_s or 0.0, (step_s or 0.0) * steps,
            deadline_s, ready, handoff_s, mode, -1 if ahead is None else ahead])
        return Placement(bool(ok), int(found), float(wait) if wait not in ("", None) else None)

    def forget(self, run_id: str) -> None:
        """The run ended: nothing waits behind it any more."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrem(self.key, run_id)
        pipe.hdel(self.steps_key, run_id)
        pipe.execute()
