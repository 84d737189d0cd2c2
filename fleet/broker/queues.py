"""Queue names and routing, in one place.

Queues are named by step kind and priority class: ``llm.interactive``, ``llm.batch``,
``tool.interactive``, ``tool.batch`` (behind ``FLEET_QUEUE_PREFIX``). Workers list their
queues interactive first; with ``queue_order_strategy='priority'`` the Redis transport
always drains the first non-empty queue in that order.
"""

from __future__ import annotations

from typing import Literal

from fleet.settings import PRIORITY_CLASSES, PriorityClass, Settings

StepKind = Literal["llm", "tool"]
STEP_KINDS: tuple[StepKind, ...] = ("llm", "tool")


def queue_name(settings: Settings, kind: StepKind, priority: PriorityClass) -> str:
    """The queue a step of this kind and class is sent to."""
    return f"{settings.queue_prefix}{kind}.{priority}"


def all_queues(settings: Settings) -> list[str]:
    """Every queue of the fleet, interactive before batch within each kind."""
    return [queue_name(settings, k, p) for k in STEP_KINDS for p in PRIORITY_CLASSES]


def worker_queues(
    settings: Settings, kind: StepKind, classes: tuple[PriorityClass, ...] = PRIORITY_CLASSES
) -> list[str]:
    """Queues a worker of this kind consumes, in the order it must prefer them."""
    ordered = [p for p in PRIORITY_CLASSES if p in classes]
    return [queue_name(settings, kind, p) for p in ordered]
