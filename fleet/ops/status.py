"""What ``fleet status`` reports: Redis, Triton readiness, Flower, queue depths, the batch
backlog, workers."""

from __future__ import annotations

import time
from typing import Any

import redis

from fleet.broker.queues import all_queues
from fleet.connections import primary_address, redis_client
from fleet.inference.replicas import ReplicaBoard, ReplicaState
from fleet.inference.triton import TritonClient
from fleet.ops.gauges import oldest_age_s
from fleet.scheduling.backlog import Backlog
from fleet.scheduling.capacity import Capacity
from fleet.scheduling.forecast import Forecaster
from fleet.settings import PRIORITY_CLASSES, Settings


def collect(settings: Settings) -> dict[str, Any]:
    """A snapshot of the fleet, as one JSON-serializable object."""
    report: dict[str, Any] = {
        "redis": {"url": _redis_target(settings), "up": False},
        # Any replica ready is enough to serve; "pool" says which are.
        "triton": {"model": settings.triton_model, "server_ready": False, "model_ready": False},
        "pool": {"policy": settings.batch_policy, "routing": settings.routing, "replicas": []},
        "flower_url": f"http://{settings.bind_address}:{settings.flower_port}",
        "gateway_url": f"http://{settings.bind_address}:{settings.gateway_port}",
        "queues": [],
        "workers": [],
    }
    client = redis_client(settings, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
        report["redis"]["up"] = True
        primary = primary_address(client)
        if primary is not None:
            report["redis"]["primary"] = f"{primary[0]}:{primary[1]}"
        now = time.time()
        report["queues"] = [
            {"name": q, "depth": client.llen(q), "oldest_age_s": oldest_age_s(client, q, now)}
            for q in all_queues(settings)
        ]
        states = ReplicaBoard(settings, client).states()
        report["pool"]["replicas"] = [st.as_dict() for st in states]
        report["pool"]["objectives"] = objectives(settings, states)
        # The catalog's other models, each on a pool of its own (fleet.inference.catalog).
        report["models"] = {name: [st.as_dict() for st in ReplicaBoard(settings.for_model(name), client).states()]
                            for name in settings.catalog() if name != settings.triton_model}
        report["parked"] = int(client.zcard(settings.keys.waits))
        report["inflight"] = {p: sum(st.inflight[p] for st in states) for p in PRIORITY_CLASSES}
        backlog = Backlog(settings, client)
        report["backlog"] = {"queued": backlog.sizes(), "dispatched": backlog.in_flight_count(),
                             "virtual_time_s": backlog.virtual_times()}
        forecaster = Forecaster(settings, Capacity(settings, client))
        report["admission"] = {p: forecaster.forecast(p).as_dict() for p in PRIORITY_CLASSES}
    except redis.RedisError as exc:
        report["redis"]["error"] = str(exc)
    by_name = {r["name"]: r for r in report["pool"]["replicas"]}
    for spec in settings.replicas():
        entry = by_name.get(spec.name)
        if entry is None:
            entry = {"name": spec.name, "grpc_url": spec.grpc_url, "state": "unknown"}
            report["pool"]["replicas"].append(entry)
        triton = TritonClient(spec.grpc_url)
        try:
            entry["server_ready"] = triton.server_ready()
            entry["model_ready"] = entry["server_ready"] and triton.model_ready(settings.triton_model)
        finally:
            triton.close()
        report["triton"]["server_ready"] |= entry["server_ready"]
        report["triton"]["model_ready"] |= entry["model_ready"]
    if report["redis"]["up"]:
        from fleet.broker.app import create_app

        app = create_app(settings)
        try:
            replies = app.control.ping(timeout=1.0)
            report["workers"] = sorted(name for reply in replies for name in reply)
        finally:
            app.close()
    return report


def objectives(settings: Settings, states: list[ReplicaState]) -> dict[str, dict[str, float | None]]:
    """Each interactive latency objective beside what the engines measure (the worst replica's p99
    over its recent scrapes), set or not."""
    out: dict[str, dict[str, float | None]] = {}
    for name, objective in (("ttft", settings.objective_ttft_p99_s), ("tpot", settings.objective_tpot_p99_s)):
        seen = [st.measured[name] for st in states if st.up and name in st.measured]
        out[f"{name}_p99_s"] = {"objective": objective, "measured": max(seen) if seen else None}
    return out


def _redis_target(settings: Settings) -> str:
    """Where the fleet's Redis is, without its password: the URL, or the Sentinels and the name."""
    if settings.redis_sentinels:
        return f"sentinel://{','.join(settings.redis_sentinels)} (primary {settings.redis_master_name})"
    return _redact(settings.redis_url)


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
