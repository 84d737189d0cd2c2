"""fleet: a message-queue driven worker fleet that runs AI agents.

Apps submit agent runs; each run is a Celery chain of steps on a Redis broker; inference
workers call NVIDIA Triton Inference Server; interactive runs go ahead of batch runs; a
step that fails for good lands in a dead-letter store for an operator to replay.

The names below are imported on first use, so that importing a leaf module (the Triton
model imports ``fleet.simulator`` inside Triton's python stub) does not pull in Celery.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__all__ = [
    "FleetClient",
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
    "FleetClient": "fleet.client",
    "Settings": "fleet.settings",
    "RunRecord": "fleet.runs",
    "FleetError": "fleet.errors",
    "InvalidSubmission": "fleet.errors",
    "Overloaded": "fleet.errors",
    "RunNotFound": "fleet.errors",
    "TransientError": "fleet.errors",
    "PermanentError": "fleet.errors",
    "DeadlineExceeded": "fleet.errors",
}

if TYPE_CHECKING:  # pragma: no cover
    from fleet.client import FleetClient
    from fleet.errors import (
        DeadlineExceeded,
        FleetError,
        InvalidSubmission,
        Overloaded,
        PermanentError,
        RunNotFound,
        TransientError,
    )
    from fleet.runs import RunRecord
    from fleet.settings import Settings


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
