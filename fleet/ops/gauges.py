"""Fleet-wide gauges read from Redis at scrape time: queue depth, oldest message age,
requests in flight at Triton, the batch backlog, each replica of the inference pool, and each
tenant's runs, tokens today and quotas.

Every worker's and the gateway's ``/metrics`` expose them, so Prometheus gets one copy per
process: dashboards and alerts take ``max by`` (queue or priority), never a sum. That keeps
them available as long as any process is up.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from fleet.broker.app import SENT_AT_HEADER
from fleet.broker.queues import all_queues
from fleet.connections import redis_client
from fleet.inference.replicas import ReplicaBoard, ReplicaState
from fleet.scheduling.quotas import QuotaGate
from fleet.settings import PRIORITY_CLASSES, Settings

log = logging.getLogger(__name__)


def oldest_age_s(client: redis.Redis, queue: str, now: float) -> float | None:
    """Age of the message that has waited longest in ``queue`` (None when empty)."""
    raw = client.lindex(queue, -1)  # kombu pushes on the left and pops on the right
    if raw is None:
        return None
    try:
        headers = json.loads(raw).get("headers", {})
        sent = headers.get(SENT_AT_HEADER)
    except (ValueError, AttributeError):
        return None
    return round(now - float(sent), 3) if sent else None


class FleetCollector(Collector):
    """Queue depth, oldest message age and Triton requests in flight, read from Redis per scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = redis_client(settings, socket_timeout=2, socket_connect_timeout=2)
        self.board = ReplicaBoard(settings, self.redis)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily("fleet_queue_depth", "Messages waiting in a queue.", labels=["queue"])
        age = GaugeMetricFamily("fleet_queue_oldest_age_seconds",
                                "How long the oldest waiting message of a queue has waited (0 when empty).",
                                labels=["queue"])
        inflight = GaugeMetricFamily("fleet_triton_inflight_requests",
                                     "Requests in flight at Triton, fleet-wide.", labels=["priority"])
        r_up = GaugeMetricFamily("fleet_replica_up", "1 when the replica serves the model.", labels=["replica"])
        r_cap = GaugeMetricFamily("fleet_replica_capacity_sequences",
                                  "Most sequences the replica's engine runs at once.", labels=["replica"])
        r_pipe = GaugeMetricFamily("fleet_replica_pipeline_requests",
                                   "Requests sent to the replica beyond its capacity (learned depth).",
                                   labels=["replica"])
        r_in = GaugeMetricFamily("fleet_replica_inflight_requests", "Requests in flight at the replica.",
                                 labels=["replica", "priority"])
        r_wait = GaugeMetricFamily("fleet_replica_engine_waiting_requests",
                                   "Requests waiting inside the replica's engine for a sequence slot.",
                                   labels=["replica"])
        backlog = GaugeMetricFamily("fleet_batch_backlog_runs",
                                    "Batch runs waiting in a tenant's backlog.", labels=["tenant"])
        dispatched = GaugeMetricFamily("fleet_batch_dispatched_runs",
                                       "Batch runs dispatched from the backlogs and not yet ended.")
        parked = GaugeMetricFamily("fleet_runs_parked", "Runs parked at a wait step (holding no worker).")
        r_pre = CounterMetricFamily("fleet_replica_preemptions",
                                    "Batch requests whose slot an interactive request took.", labels=["replica"])
        t_active = GaugeMetricFamily("fleet_tenant_active_runs", "A tenant's runs queued (backlog included) or "
                                     "in flight.", labels=["tenant", "priority"])
        t_tokens = GaugeMetricFamily("fleet_tenant_tokens_today", "Model tokens a tenant's steps used today (UTC).",
                                     labels=["tenant"])
        t_quota = GaugeMetricFamily("fleet_tenant_quota", "A tenant's quota (absent: no limit).",
                                    labels=["tenant", "quota"])
        t_weight = GaugeMetricFamily("fleet_tenant_weight", "A tenant's weight in the fair share of batch model time.",
                                     labels=["tenant"])
        try:
            now = time.time()
            quotas = QuotaGate(self.settings, self.redis)
            active, tokens = quotas.active(), quotas.tokens_today(now)
            for queue in all_queues(self.settings):
                depth.add_metric([queue], self.redis.llen(queue))
                age.add_metric([queue], oldest_age_s(self.redis, queue, now) or 0.0)
            states = self.board.states()
            keys = self.settings.keys
            for tenant in sorted(self.redis.smembers(keys.backlogged)):
                backlog.add_metric([tenant], self.redis.llen(keys.backlog(tenant)))
            dispatched.add_metric([], self.redis.hlen(keys.dispatched))
            parked.add_metric([], self.redis.zcard(keys.waits))
        except redis.RedisError as exc:
            # A scrape must still answer (a process's own series matter most when Redis is
            # down); missing gauges show the outage on the dashboard.
            log.warning("metrics: Redis unreachable, fleet-wide gauges left out (%s)", exc)
            return
        for priority in PRIORITY_CLASSES:
            inflight.add_metric([priority], sum(st.inflight[priority] for st in states))
        for st in states:
            r_up.add_metric([st.name], 1.0 if st.up else 0.0)
            r_cap.add_metric([st.name], st.capacity or 0)
            r_pipe.add_metric([st.name], st.pipeline)
            r_wait.add_metric([st.name], st.waiting or 0)
            r_pre.add_metric([st.name], st.preempted)
            for priority in PRIORITY_CLASSES:
                r_in.add_metric([st.name, priority], st.inflight[priority])
        registry = self.settings.tenant_registry
        for name in sorted(set(registry.names()) | {t for t, _ in active}):
            for priority in PRIORITY_CLASSES:
                t_active.add_metric([name, priority], active.get((name, priority), 0))
            t_tokens.add_metric([name], tokens.get(name, 0))
            t_weight.add_metric([name], registry.weight(name))
            if name in registry.by_name:
                for quota, limit in registry.get(name).quotas.model_dump().items():
                    if limit is not None:
                        t_quota.add_metric([name, quota], limit)
        yield from (depth, age, inflight, backlog, dispatched, parked, r_up, r_cap, r_pipe, r_in, r_wait, r_pre,
                    t_active, t_tokens, t_quota, t_weight)
        yield from routing_families(states)


def routing_families(states: list[ReplicaState]) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """Where the router sent model calls and why, and what each engine's prefix cache did."""
    calls = CounterMetricFamily("fleet_route_calls", "Model calls the router sent to a replica, by why "
                                "(hit, spill, miss, session, most_room, round_robin, preempt).",
                                labels=["replica", "reason"])
    blocks = CounterMetricFamily("fleet_route_prompt_blocks", "Prompt blocks of the calls routed to a replica "
                                 "(sent), and those the router expected in its cache (expected_hit).",
                                 labels=["replica", "kind"])
    hit = GaugeMetricFamily("fleet_replica_prefix_cache_hit_ratio", "The engine's own prefix-cache hits over "
                            "queries since it started, in tokens (vllm:prefix_cache_*).", labels=["replica"])
    usage = GaugeMetricFamily("fleet_replica_kv_cache_usage_ratio", "Share of the engine's KV cache that running "
                              "sequences hold (vllm:kv_cache_usage_perc).", labels=["replica"])
    for st in states:
        for reason, n in sorted(st.routes.items()):
            calls.add_metric([st.name, reason], n)
        blocks.add_metric([st.name, "sent"], st.route_blocks)
        blocks.add_metric([st.name, "expected_hit"], st.route_hit_blocks)
        if st.prefix_queries:
            hit.add_metric([st.name], (st.prefix_hits or 0.0) / st.prefix_queries)
        if st.kv_usage is not None:
            usage.add_metric([st.name], st.kv_usage)
    yield from (calls, blocks, hit, usage)
