"""fleet: a message-queue driven worker fleet that runs AI agents.

Apps submit agent runs; each run is a Celery chain of steps on a Redis broker; inference
workers call NVIDIA Triton Inference Server; interactive runs go ahead of batch runs; a step
that fails for good lands in a dead-letter store for an operator to replay.

The package is cut into layers; a package may import only from those below it (the order is
written once, in ``tests/unit/test_imports.py``):

==============  ===========================================================================
``fleet``       settings, Redis key names, connections, errors, tenants, logs; this module is
                the public API (the names below, imported on first use)
``core``        primitives: Lua scripts, background loops and leadership, pub/sub, tracing,
                a full Redis, payload checks
``run``         the run model: records and their store, agents, the next-step rule, templates,
                budgets, cost, sessions, dead letters, cancellation, events, batch jobs, usage
``broker``      the Celery app and its delivery semantics, queues, chains of steps
``inference``   the pool of Triton replicas: slots, replicas, the Triton client, the monitor
``scheduling``  admission, quotas, the batch backlog and its dispatcher, capacity, the
                reconciler, replays
``ops``         metrics, gauges, Sentry, status, launching servers
``steps``       the worker: step tasks, the step pipeline, its hooks, step bodies, retries
``surfaces``    what people use: the clients, the HTTP gateway, the CLI, batch jobs, views,
                the local stack
==============  ===========================================================================
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "FleetClient",
    "AsyncFleetClient",
    "Settings",
    "RunRecord",
    "FleetError",
    "InvalidSubmission",
    "Overloaded",
    "RunNotFound",
    "TransientError",
    "PermanentError",
    "DeadlineExceeded",
]

_HOME = {
    "FleetClient": "fleet.surfaces.client",
    "AsyncFleetClient": "fleet.surfaces.aio",
    "Settings": "fleet.settings",
    "RunRecord": "fleet.run.records",
    "FleetError": "fleet.errors",
    "InvalidSubmission": "fleet.errors",
    "Overloaded": "fleet.errors",
    "RunNotFound": "fleet.errors",
    "TransientError": "fleet.errors",
    "PermanentError": "fleet.errors",
    "DeadlineExceeded": "fleet.errors",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers; the facade sits above every layer
    from fleet.errors import (
        DeadlineExceeded,
        FleetError,
        InvalidSubmission,
        Overloaded,
        PermanentError,
        RunNotFound,
        TransientError,
    )
    from fleet.run.records import RunRecord
    from fleet.settings import Settings
    from fleet.surfaces.aio import AsyncFleetClient
    from fleet.surfaces.client import FleetClient


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
