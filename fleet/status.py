"""What ``fleet status`` reports: Redis, Triton readiness, Flower, queue depths, workers."""

from __future__ import annotations

import json
import time
from typing import Any

import redis

from fleet.admission import LoadShedder
from fleet.capacity import Capacity
from fleet.gauges import oldest_age_s
from fleet.settings import PRIORITY_CLASSES

from fleet.routing import all_queues
from fleet.settings import Settings
from fleet.triton import TritonClient


def collect(settings: Settings) -> dict[str, Any]:
    """A snapshot of the fleet, as one JSON-serializable object."""
    report: dict[str, Any] = {
        "redis": {"url": _redact(settings.redis_url), "up": False},
        "triton": {"grpc_url": settings.triton_grpc_url, "model": settings.triton_model,
                   "server_ready": False, "model_ready": False,
                   "metrics_url": settings.triton_metrics_url},
        "flower_url": f"http://{settings.bind_address}:{settings.flower_port}",
        "gateway_url": f"http://{settings.bind_address}:{settings.gateway_port}",
        "queues": [],
        "workers": [],
    }
    client = settings.redis(socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
        report["redis"]["up"] = True
        now = time.time()
        report["queues"] = [
            {"name": q, "depth": client.llen(q), "oldest_age_s": oldest_age_s(client, q, now)}
            for q in all_queues(settings)
        ]
        capacity = Capacity(settings, client)
        report["inflight"] = capacity.inflight()
        report["inflight_peak"] = capacity.peak()
        report["batch_inflight_max"] = capacity.batch_limit()  # now: static, or capacity minus the reserve
        report["batch_policy"] = "static" if settings.model_max_sequences is None else "work-conserving"
        shedder = LoadShedder(settings, capacity)
        report["admission"] = {p: shedder.state(p) for p in PRIORITY_CLASSES}
    except redis.RedisError as exc:
        report["redis"]["error"] = str(exc)
    triton = TritonClient(settings.triton_grpc_url)
    try:
        report["triton"]["server_ready"] = triton.server_ready()
        report["triton"]["model_ready"] = triton.model_ready(settings.triton_model)
    finally:
        triton.close()
    if report["redis"]["up"]:
        from fleet.celery_app import create_app

        app = create_app(settings)
        try:
            replies = app.control.ping(timeout=1.0)
            report["workers"] = sorted(name for reply in replies for name in reply)
        finally:
            app.close()
    return report


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
