"""The pool monitor: brings replicas back, and keeps each engine full without a queue.

One worker of the fleet runs it at a time (a Redis lock that its holder renews). Every
``FLEET_ENGINE_POLL_INTERVAL_S`` it

- probes each replica that is down (every ``FLEET_REPLICA_PROBE_INTERVAL_S``): when it
  answers and serves the model, it is up again and waiting requests are woken;
- reads each engine's state from its Triton metrics (vLLM's names: running and waiting
  sequences, KV cache size and use, prefix-cache queries and hits), which the router
  (:mod:`fleet.inference.routing`) and ``fleet status`` read;
- under the ``preempt`` policy, sizes each replica's pipeline depth from it: the
  requests sent beyond its sequence capacity so that a new one is on its way whenever a
  sequence finishes (a request spends its first moments in transfer and tokenization,
  outside the engine's batch). The depth grows while the engine has a free slot although
  the fleet sends all it may, and shrinks as soon as requests wait inside the engine, where
  its first-come-first-served queue would put them ahead of an interactive request
  (beyond :data:`WAITING_TOLERATED`);
- learns from each engine's latency histograms how its time to first token and time per output
  token grow with its running sequences (:mod:`fleet.inference.occupancy`): the p99 it measures
  is shown by ``fleet status``, and with ``FLEET_OBJECTIVE_*`` set, the occupancy at which batch
  stops taking slots at the replica (``batch_limit`` in its hash; the slot script reads it) is the
  largest that keeps the predicted interactive p99 within the objectives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis

from fleet.core.loops import BackgroundLoop, Leadership
from fleet.inference.occupancy import OccupancyLearner
from fleet.inference.replicas import EngineMetrics, ReplicaBoard, ReplicaState, check, engine_metrics
from fleet.inference.triton import TritonClient
from fleet.settings import ReplicaSpec, Settings

log = logging.getLogger(__name__)

#: Requests waiting inside an engine that do not shrink the pipeline: one ready request keeps
#: the next free slot from idling, and an interactive request that arrives preempts the
#: youngest batch requests ahead of it (measured: ops/bench/results/scheduling-saturated.md).
WAITING_TOLERATED = 1

def next_pipeline(state: ReplicaState, running: int, waiting: int, limit: int) -> int:
    """The pipeline depth after one look at the engine (see the module docstring)."""
    depth = state.pipeline
    if waiting > WAITING_TOLERATED:
        return max(0, depth - 1)
    held = sum(state.inflight.values())
    if state.capacity is not None and running < state.capacity and held >= state.capacity + depth:
        return min(limit, depth + 1)
    return depth


class PoolMonitor:
    """Probes replicas and sizes pipelines while it holds the fleet's monitor lock."""

    def __init__(self, settings: Settings, client: redis.Redis, triton: Callable[[str], TritonClient]) -> None:
        self.settings = settings
        self.board = ReplicaBoard(settings, client)
        self.triton = triton
        self._client = client
        self._probed: dict[str, float] = {}
        self.learners: dict[str, OccupancyLearner] = {}

    def tick(self) -> bool:
        """One look at every replica (the lock holder's work)."""
        now = time.monotonic()
        for state in self.board.states():
            spec: ReplicaSpec = self.board.specs[state.name]
            if not state.up or state.capacity is None:
                if now - self._probed.get(state.name, float("-inf")) >= self.settings.replica_probe_interval_s:
                    self._probed[state.name] = now
                    check(self.settings, self.board, spec, self.triton(state.name))
            else:
                engine = engine_metrics(spec.metrics_url, self.settings.triton_model)
                if engine is None:
                    continue
                self.board.set_cache(state.name, engine)
                self._learn(state, engine)
                if self.settings.batch_policy == "preempt":
                    depth = next_pipeline(state, engine.running, engine.waiting, limit=self.settings.pipeline_max)
                    self.board.set_engine(state.name, engine.running, engine.waiting, depth)
        return False

    def _learn(self, state: ReplicaState, engine: EngineMetrics) -> None:
        """What the engine's latencies say of its occupancy: the p99 measured, and with an objective
        the occupancy at which batch stops taking slots there (:mod:`fleet.inference.occupancy`)."""
        learner = self.learners.get(state.name)
        if learner is None or learner.halflife_s != self.settings.objective_halflife_s:
            learner = self.learners[state.name] = OccupancyLearner(self.settings.objective_halflife_s)
        learner.observe(max(engine.running, sum(state.inflight.values())), dict(engine.latencies),
                        interactive=state.inflight.get("interactive", 0))
        objectives = self.settings.objectives()
        # No limit is needed where the policy's own room (capacity and pipeline) holds the objectives.
        room = (state.capacity or 0) + (state.pipeline if self.settings.batch_policy == "preempt" else 0)
        limit = learner.limit(objectives, self.settings.objective_margin, room) if objectives else None
        self.board.set_occupancy(state.name, learner.measured(), limit)

    def loop(self) -> BackgroundLoop:
        """The monitor's loop: a look at every replica each FLEET_ENGINE_POLL_INTERVAL_S, by one
        worker of the fleet at a time."""
        interval = self.settings.engine_poll_interval_s
        leader = Leadership(self._client, self.settings.keys.pool_monitor_lock, max(3 * interval, 2.0))
        # Redis or a replica away: looked at again next time, quietly (it happens in every outage).
        return BackgroundLoop("fleet-pool-monitor", self.tick, interval, leader=leader, failure_level=logging.DEBUG)
