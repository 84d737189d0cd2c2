"""Queue names, declarations and routing, in one place.

Queues are named by step kind and priority class: ``llm.interactive``, ``llm.batch``,
``tool.interactive``, ``tool.batch`` (behind ``FLEET_QUEUE_PREFIX``). Workers list their
queues interactive first; with ``queue_order_strategy='priority'`` the Redis transport
always drains the first non-empty queue in that order.

Each queue is declared as it is used: with a direct exchange of its own name, bound by a
routing key of its own name (:func:`declared_queues`). Left to Celery's defaults, every queue
would be bound to one exchange under one routing key, and a client publishing by exchange
and routing key would copy each message into all of them. :func:`stale_bindings` finds the
bindings such a setup left in Redis, so that workers can drop them.
"""

from __future__ import annotations

from typing import Any, Literal

from kombu import Exchange, Queue

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


def declared_queues(settings: Settings) -> list[Queue]:
    """Every queue of the fleet with its own direct exchange and routing key (both its name)."""
    return [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in all_queues(settings)]


#: How kombu's Redis transport separates the fields of a binding (routing key, pattern, queue).
BINDING_SEP = "\x06\x16"


def binding_key(exchange: str) -> str:
    """The Redis set in which kombu's Redis transport keeps an exchange's bindings."""
    return f"_kombu.binding.{exchange}"


def stale_bindings(settings: Settings, client: Any) -> dict[str, list[str]]:
    """Bindings in Redis of the fleet's exchanges to queues other than their own (exchange ->
    members of its binding set), as Celery's default declaration leaves them."""
    found: dict[str, list[str]] = {}
    for name in all_queues(settings):
        members = client.smembers(binding_key(name))
        stale = [m for m in members if m.split(BINDING_SEP)[-1] != name]
        if stale:
            found[name] = stale
    return found


def drop_stale_bindings(settings: Settings, client: Any) -> int:
    """Remove the bindings :func:`stale_bindings` finds; how many were removed."""
    removed = 0
    for exchange, members in stale_bindings(settings, client).items():
        removed += client.srem(binding_key(exchange), *members)
    return removed
