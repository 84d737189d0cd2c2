"""The replicas of the inference pool as the fleet sees them: up or down, capacity, engine state.

Each replica has a hash in Redis (:meth:`fleet.keys.Keys.replica`) that the slot script
(:mod:`fleet.inference.slots`) reads on every acquire, and admission, ``fleet status`` and the
gauges read too. Workers write it: a model call that cannot reach a replica marks it down
at once (its requests go to the others); the pool monitor (:mod:`fleet.inference.monitor`) probes
replicas that are down and brings them back when they answer, and reads each engine's
running and waiting sequences.

A replica's capacity (most sequences its engine runs at once) comes from its entry in
``FLEET_TRITON_REPLICAS``, else the model's ``max_num_seqs`` config parameter, else
``FLEET_MODEL_MAX_SEQUENCES``; a replica whose capacity is unknown is not used.
"""

from __future__ import annotations

import logging
import math
import re
import time
import urllib.request
from dataclasses import dataclass, field

import redis

from fleet.errors import ReplicaUnavailable
from fleet.inference.occupancy import Histogram
from fleet.inference.slots import LEASE_TTL_S
from fleet.inference.triton import TritonClient
from fleet.settings import PRIORITY_CLASSES, ReplicaSpec, Settings

log = logging.getLogger(__name__)

_METRIC_LINE = re.compile(
    r'^(vllm:(?:num_requests_running|num_requests_waiting|kv_cache_usage_perc|prefix_cache_queries_total'
    r'|prefix_cache_hits_total|cache_config_info))\{([^}]*)\}\s+([0-9.eE+-]+)$', re.MULTILINE)
_HISTOGRAM_LINE = re.compile(
    r'^vllm:(time_to_first_token|time_per_output_token)_seconds_(bucket|sum|count)\{([^}]*)\}\s+([0-9.eE+-]+)$',
    re.MULTILINE)
#: The engine's latency histograms by the names the occupancy learner gives them.
_LATENCY = {"time_to_first_token": "ttft", "time_per_output_token": "tpot"}
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class EngineMetrics:
    """One engine's state, as its Triton metrics port tells it (vLLM's names)."""

    running: int
    waiting: int
    kv_usage: float | None = None  # vllm:kv_cache_usage_perc (0..1)
    prefix_queries: float | None = None  # vllm:prefix_cache_queries_total, in tokens
    prefix_hits: float | None = None  # vllm:prefix_cache_hits_total, in tokens
    kv_blocks: int | None = None  # num_gpu_blocks of vllm:cache_config_info
    block_size: int | None = None  # block_size of vllm:cache_config_info
    latencies: dict[str, Histogram] = field(default_factory=dict)  # 'ttft', 'tpot': the engine's histograms


@dataclass
class ReplicaState:
    """One replica, as the fleet last saw it."""

    name: str
    grpc_url: str
    up: bool = False
    known: bool = False  # probed at least once
    since: float | None = None
    reason: str = ""
    capacity: int | None = None
    pipeline: int = 0
    running: int | None = None
    waiting: int | None = None
    inflight: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PRIORITY_CLASSES})
    peak: dict[str, int] = field(default_factory=lambda: {p: 0 for p in PRIORITY_CLASSES})
    preempted: int = 0
    kv_blocks: int | None = None
    kv_usage: float | None = None
    prefix_queries: float | None = None
    prefix_hits: float | None = None
    routes: dict[str, int] = field(default_factory=dict)  # calls routed here, by reason
    route_blocks: int = 0  # prompt blocks of the calls routed here
    route_hit_blocks: int = 0  # of which the router expected cached here
    batch_limit: int | None = None  # most requests in flight at which batch may take a slot (objectives)
    measured: dict[str, float] = field(default_factory=dict)  # engine latencies, p99 over recent scrapes

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "grpc_url": self.grpc_url, "state": "up" if self.up else "down",
                "since": self.since, "reason": self.reason or None, "capacity": self.capacity,
                "pipeline": self.pipeline, "engine_running": self.running, "engine_waiting": self.waiting,
                "inflight": self.inflight, "inflight_peak": self.peak, "preempted": self.preempted,
                "kv_blocks": self.kv_blocks, "kv_usage": self.kv_usage,
                "prefix_hit_rate": (self.prefix_hits / self.prefix_queries) if self.prefix_queries else None,
                "routes": self.routes, "route_expected_hit_rate":
                    (self.route_hit_blocks / self.route_blocks) if self.route_blocks else None,
                "batch_limit": self.batch_limit, "measured_p99_s": self.measured}


class ReplicaBoard:
    """Reads and writes the replicas' state in Redis."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.settings = settings
        self.redis = client
        self.specs = {r.name: r for r in settings.replicas()}

    def states(self) -> list[ReplicaState]:
        """Every replica's state and its requests in flight, in one round trip."""
        keys, now = self.settings.keys, time.time()
        pipe = self.redis.pipeline(transaction=False)
        for name in self.specs:
            pipe.hgetall(keys.replica(name))
            for p in PRIORITY_CLASSES:
                pipe.zcount(keys.leases(name, p), now - LEASE_TTL_S, "+inf")
        replies = pipe.execute()
        out = []
        step = 1 + len(PRIORITY_CLASSES)
        for i, (name, spec) in enumerate(self.specs.items()):
            h, counts = replies[i * step], replies[i * step + 1:(i + 1) * step]
            st = ReplicaState(name=name, grpc_url=spec.grpc_url, known=bool(h), up=h.get("state") == "up",
                              since=_float(h.get("since")), reason=h.get("reason", ""),
                              capacity=_int(h.get("capacity")), pipeline=_int(h.get("pipeline")) or 0,
                              running=_int(h.get("running")), waiting=_int(h.get("waiting")),
                              preempted=_int(h.get("preempted")) or 0, kv_blocks=_int(h.get("kv_blocks")),
                              kv_usage=_float(h.get("kv_usage")), prefix_queries=_float(h.get("prefix_queries")),
                              prefix_hits=_float(h.get("prefix_hits")), route_blocks=_int(h.get("route_blocks")) or 0,
                              route_hit_blocks=_int(h.get("route_hit_blocks")) or 0,
                              batch_limit=_int(h.get("batch_limit")))
            st.measured = {k[len("p99_"):]: float(v) for k, v in h.items() if k.startswith("p99_")}
            st.routes = {k[len("route_"):]: int(v) for k, v in h.items()
                         if k.startswith("route_") and k not in ("route_blocks", "route_hit_blocks")}
            st.inflight = dict(zip(PRIORITY_CLASSES, counts))
            st.peak = {p: _int(h.get(f"peak_{p}")) or 0 for p in PRIORITY_CLASSES}
            out.append(st)
        return out

    def healthy_capacity(self) -> int:
        """Sequences the replicas that are up can run at once."""
        return sum(s.capacity or 0 for s in self.states() if s.up)

    def mark_up(self, name: str, capacity: int) -> bool:
        """The replica answers and runs ``capacity`` sequences; True when it was not up."""
        key = self.settings.keys.replica(name)
        was = self.redis.hget(key, "state")
        if was == "down":  # it may have restarted: what the router remembers of its cache is gone
            self.redis.delete(self.settings.keys.prefix_index(name))
        self.redis.hset(key, mapping={"state": "up", "capacity": capacity, "reason": "",
                                      **({} if was == "up" else {"since": time.time()})})
        if was != "up":
            log.info("replica %s is up (capacity %d sequences)", name, capacity)
            self.redis.publish(self.settings.keys.slot_channel, f"up:{name}")
        return was != "up"

    def mark_down(self, name: str, reason: str) -> bool:
        """The replica cannot serve; True when it was up (or never seen) before."""
        key = self.settings.keys.replica(name)
        was = self.redis.hget(key, "state")
        if was == "down":
            return False
        self.redis.hset(key, mapping={"state": "down", "since": time.time(), "reason": reason[:500]})
        log.warning("replica %s is down: %s", name, reason)
        return True

    def set_engine(self, name: str, running: int, waiting: int, pipeline: int) -> None:
        """What the replica's engine runs and queues now, and the pipeline depth to use."""
        self.redis.hset(self.settings.keys.replica(name),
                        mapping={"running": running, "waiting": waiting, "pipeline": pipeline})

    def set_cache(self, name: str, engine: EngineMetrics) -> None:
        """What the replica's engine reports of its KV cache (the router sizes its index by it)."""
        found = {"kv_blocks": engine.kv_blocks, "kv_usage": engine.kv_usage,
                 "prefix_queries": engine.prefix_queries, "prefix_hits": engine.prefix_hits}
        found = {k: v for k, v in found.items() if v is not None and not (k == "kv_blocks" and v <= 0)}
        if found:
            self.redis.hset(self.settings.keys.replica(name), mapping=found)


    def set_occupancy(self, name: str, measured: dict[str, float], batch_limit: int | None) -> None:
        """The engine's latencies as measured (p99 by ``'ttft'``, ``'tpot'``), and the most requests
        in flight at which batch may take a slot there (None: no such limit)."""
        key = self.settings.keys.replica(name)
        pipe = self.redis.pipeline(transaction=False)
        if measured:
            pipe.hset(key, mapping={f"p99_{k}": round(v, 6) for k, v in measured.items()})
        if batch_limit is None:
            pipe.hdel(key, "batch_limit")
        else:
            pipe.hset(key, "batch_limit", batch_limit)
        pipe.execute()


def probe(settings: Settings, spec: ReplicaSpec, client: TritonClient) -> int:
    """Check that a replica serves the model and find its capacity.

    Raises:
        ReplicaUnavailable: it does not answer, or the model is not ready there.
        ValueError: its capacity is known from nowhere.
    """
    model = settings.triton_model
    if not client.server_ready() or not client.model_ready(model):
        raise ReplicaUnavailable(f"triton at {spec.grpc_url} is not ready to serve {model}")
    capacity = spec.max_sequences or client.model_capacity(model) or settings.model_max_sequences
    if capacity is None:
        raise ValueError(
            f"replica {spec.name}: capacity unknown: give it max_sequences in FLEET_TRITON_REPLICAS, "
            f"declare a max_num_seqs parameter in {model}'s config.pbtxt, or set FLEET_MODEL_MAX_SEQUENCES")
    return capacity


def check(settings: Settings, board: ReplicaBoard, spec: ReplicaSpec, client: TritonClient) -> bool:
    """Probe a replica and record what was found; True when it is up."""
    try:
        board.mark_up(spec.name, probe(settings, spec, client))
        return True
    except ReplicaUnavailable as exc:
        board.mark_down(spec.name, str(exc))
    except ValueError as exc:
        if board.mark_down(spec.name, str(exc)):
            log.error("%s", exc)  # a configuration to fix, not an outage
    return False


def engine_metrics(metrics_url: str, model: str, timeout_s: float = 1.0) -> EngineMetrics | None:
    """The engine's state for ``model`` from its Triton metrics, under vLLM's names (the medium
    model's Triton exports them: ``triton_models/medium/1/model.py``); None when its running and
    waiting sequences cannot be read. Series of several engine instances add up."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8", "replace")
    except OSError:
        return None
    found: dict[str, float] = {}
    info: dict[str, str] = {}
    for name, labels, value in _METRIC_LINE.findall(text):
        named = dict(_LABEL.findall(labels))
        if model not in (named.get("model"), named.get("model_name")):
            continue
        if name == "vllm:cache_config_info":
            info = named
        else:
            found[name] = found.get(name, 0.0) + float(value)
    if "vllm:num_requests_running" not in found or "vllm:num_requests_waiting" not in found:
        return None
    return EngineMetrics(
        latencies=latency_histograms(text, model),
        running=int(found["vllm:num_requests_running"]), waiting=int(found["vllm:num_requests_waiting"]),
        kv_usage=found.get("vllm:kv_cache_usage_perc"), prefix_queries=found.get("vllm:prefix_cache_queries_total"),
        prefix_hits=found.get("vllm:prefix_cache_hits_total"),
        kv_blocks=_int(info.get("num_gpu_blocks")) if info.get("num_gpu_blocks", "None") != "None" else None,
        block_size=_int(info.get("block_size")) if info.get("block_size", "None") != "None" else None)


def latency_histograms(text: str, model: str) -> dict[str, Histogram]:
    """The engine's TTFT and TPOT histograms for ``model`` in a metrics page (vLLM's names), by
    ``'ttft'`` and ``'tpot'``; series of several engine instances add up."""
    parts: dict[str, dict[str, dict[float, float]]] = {}
    for metric, kind, labels, value in _HISTOGRAM_LINE.findall(text):
        named = dict(_LABEL.findall(labels))
        if model not in (named.get("model"), named.get("model_name")):
            continue
        where = parts.setdefault(_LATENCY[metric], {"bucket": {}, "sum": {}, "count": {}})
        le = float(named["le"]) if kind == "bucket" else 0.0  # float("+Inf") is inf
        where[kind][le] = where[kind].get(le, 0.0) + float(value)
    out = {}
    for name, p in parts.items():
        if not p["count"] or not p["bucket"]:
            continue
        bounds = sorted(p["bucket"])
        finite = tuple(b for b in bounds if math.isfinite(b))
        out[name] = Histogram(finite, tuple(p["bucket"][b] for b in bounds), p["sum"].get(0.0, 0.0), p["count"][0.0])
    return out


def engine_state(metrics_url: str, model: str, timeout_s: float = 1.0) -> tuple[int, int] | None:
    """The engine's running and waiting sequences for ``model`` (see :func:`engine_metrics`)."""
    found = engine_metrics(metrics_url, model, timeout_s)
    return None if found is None else (found.running, found.waiting)


def _int(value: str | None) -> int | None:
    return int(float(value)) if value not in (None, "") else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None
