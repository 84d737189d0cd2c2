"""The load-shedding forecast: when a new run would finish, from the inference pool's capacity
and what occupies it.

An interactive run's llm steps wait behind those of the interactive runs admitted before it;
the pool serves ``parallel`` of them at once (the sequence capacity of the replicas that are
up, or fewer when fewer worker threads take interactive work), each in at most about the
recent p99 interactive llm step time (the slow tail, not the mean: a second wave that lands on
the deadline misses it). Threads of shared workers busy with batch steps take interactive work
as soon as they free: a run whose place in a wave falls on one also waits half a batch step.
The formula lives once, in the ledger's Lua script (:mod:`fleet.scheduling.admitted`), which
both admits and forecasts. Batch submissions get backpressure only when their queue is past a
much higher bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from fleet.broker.queues import queue_name
from fleet.errors import Overloaded
from fleet.inference.replicas import ReplicaBoard
from fleet.run.agent import AgentDef
from fleet.scheduling.admitted import AdmittedRuns, llm_steps
from fleet.scheduling.capacity import Capacity
from fleet.settings import PriorityClass, Settings


@dataclass(frozen=True)
class Forecast:
    """A class's model queue as admission sees it."""

    queue: str
    depth: int  # step messages in the queue
    in_flight: int  # model calls of the class at the pool's replicas
    waiting_for_slot: int  # model calls of the class waiting in workers for a slot
    steps_ahead: int  # model steps a new run would wait behind
    pool_capacity: int  # sequences of the replicas that are up
    replicas_up: int
    replicas: int
    replicas_probed: int
    threads: int  # worker threads that take the class's model steps
    threads_free: int  # of those, not held by batch steps
    parallel: int  # model steps served at once
    step_p99_s: float | None  # the recent p99 of the class's model steps
    handoff_s: float  # the wait for a shared worker's thread busy with a batch step
    predicted_wait_s: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Forecaster:
    """Forecasts waits and refuses what would miss its deadline (see the module docstring)."""

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

    def _threads(self, queue: str, batch_queue: str, priority: PriorityClass) -> tuple[int, int]:
        """Worker threads that take the class's steps: those of workers that take only this
        class, and those of shared workers (interactive first), which take interactive work
        only once their batch step ends."""
        only = shared = 0
        for w in self._live_workers().values():
            if queue in w["queues"]:
                if batch_queue in w["queues"] and priority == "interactive":
                    shared += w["concurrency"]
                else:
                    only += w["concurrency"]
        return only, shared

    def _inputs(self, priority: PriorityClass) -> dict[str, Any]:
        """Everything a forecast needs but the placement in the ledger."""
        s, r = self.settings, self.capacity.redis
        queue, batch_queue = queue_name(s, "llm", priority), queue_name(s, "llm", "batch")
        pipe = r.pipeline(transaction=False)
        pipe.llen(queue)
        pipe.zcount(s.keys.slot_waiters(priority), time.time(), "+inf")
        pipe.zcount(s.keys.slot_waiters("batch"), time.time(), "+inf")
        depth, waiting, batch_waiting = pipe.execute()
        replicas = self.board.states()
        up = [st for st in replicas if st.up]
        pool = sum(st.capacity or 0 for st in up)
        inflight = sum(st.inflight[priority] for st in replicas)
        only, shared = self._threads(queue, batch_queue, priority)
        busy = min(shared, sum(st.inflight["batch"] for st in replicas) + batch_waiting)
        threads, ready = only + shared, only + shared - busy
        times = sorted(self.capacity.step_times("llm", priority))
        batch_times = sorted(self.capacity.step_times("llm", "batch")) if busy else []
        return dict(queue=queue, depth=depth, in_flight=inflight, waiting_for_slot=waiting, pool_capacity=pool,
                    replicas_up=len(up), replicas=len(replicas), replicas_probed=sum(st.known for st in replicas),
                    threads=threads, threads_free=ready, parallel=max(1, min(pool, threads) if pool else threads),
                    step_p99_s=times[min(len(times) - 1, int(0.99 * len(times)))] if times else None,
                    handoff_s=batch_times[len(batch_times) // 2] / 2 if batch_times else 0.0)

    def forecast(self, priority: PriorityClass) -> Forecast:
        """Depth, capacity and predicted wait of the class's model queue."""
        i = self._inputs(priority)
        ahead = None if priority == "interactive" else i["depth"] + i["in_flight"] + i["waiting_for_slot"]
        place = self.admitted.forecast(time.time(), i["parallel"], i["step_p99_s"], i["threads_free"],
                                       i["handoff_s"], ahead)
        return Forecast(**i, steps_ahead=place.ahead, predicted_wait_s=place.wait_s)

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
        f = self.forecast("batch")
        step_s, parallel = f.step_p99_s or 0.0, max(1, f.parallel)
        retry = max(5.0, (queued - limit + 1) / parallel * step_s)
        raise Overloaded(
            f"batch queue {f.queue} holds {f.depth} steps and the backlog {queued - int(depth)} runs "
            f"(limit {limit}); retry in {retry:.0f}s", retry_after_s=retry)

    def _unserved(self, agent: AgentDef) -> str | None:
        """What no replica serves among the models the agent's model steps need (a step is
        served by its model or its fallback), e.g. ``"0 of 2 of medium_sim"``; None when all are."""
        up: dict[str, tuple[int, int, bool]] = {}

        def served(ref: str | None) -> bool:
            name = self.settings.resolve_model(ref)
            if name not in up:
                board = self.board if name == self.settings.triton_model else \
                    ReplicaBoard(self.settings.for_model(name), self.capacity.redis)
                states = board.states()
                up[name] = (sum(st.up for st in states), len(states), all(st.known for st in states))
            n_up, n, probed = up[name]
            return n_up > 0 or not probed

        for step, _ in agent.iter_steps_with_branches():
            if step.kind == "llm" and not served(step.model) and not (step.fallback and served(step.fallback)):
                name = self.settings.resolve_model(step.model)
                return f"0 of {up[name][1]}" + ("" if name == self.settings.triton_model else f" of {name}")
        return None

    def admit(self, run_id: str, agent: AgentDef, deadline_s: float) -> None:
        """Admit an interactive run into the ledger of admitted runs, or raise :class:`Overloaded`
        (nothing added) with a Retry-After for when enough of the pool will have drained."""
        i = self._inputs("interactive")
        down = self._unserved(agent)
        if down is not None:
            retry = max(1.0, 2 * self.settings.replica_probe_interval_s)
            raise Overloaded(f"no replica of the inference pool is up ({down}); "
                             f"retry in {retry:.0f}s", retry_after_s=retry)
        step_s, parallel = i["step_p99_s"], i["parallel"]
        placed = self.admitted.admit(run_id, agent, time.time(), deadline_s, parallel, step_s, i["threads_free"],
                                     i["handoff_s"])
        if placed.admitted or not step_s or placed.wait_s is None:  # without a step time every run goes
            return
        run_s = step_s * llm_steps(agent)
        # The pool drains a wave of `parallel` steps every step_s: retry once enough are gone.
        retry = max(1.0, math.ceil((placed.wait_s + run_s - deadline_s) / step_s) * step_s)
        raise Overloaded(
            f"interactive queue {i['queue']}: {placed.ahead} model steps of admitted runs ahead, served "
            f"{parallel} at a time ({i['pool_capacity']} sequences on {i['replicas_up']} of {i['replicas']} "
            f"replicas up, p99 step {step_s:.2f}s): predicted wait {placed.wait_s:.2f}s + run {run_s:.2f}s exceeds "
            f"the {deadline_s:g}s deadline; retry in {retry:.0f}s", retry_after_s=retry)
