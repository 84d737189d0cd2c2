"""Queues: their names, the order workers take them in, and their declarations (each with its
own exchange and routing key)."""

from __future__ import annotations

from fleet.broker.app import create_app
from fleet.broker.queues import (
    BINDING_SEP,
    all_queues,
    declared_queues,
    drop_stale_bindings,
    queue_name,
    stale_bindings,
    worker_queues,
)
from fleet.settings import Settings


def test_queue_names_and_worker_order():
    s = Settings(_env_file=None, queue_prefix="p.")
    assert queue_name(s, "llm", "interactive") == "p.llm.interactive"
    assert all_queues(s) == ["p.llm.interactive", "p.llm.batch", "p.tool.interactive", "p.tool.batch"]
    assert worker_queues(s, "llm") == ["p.llm.interactive", "p.llm.batch"]
    assert worker_queues(s, "llm", ("batch", "interactive")) == ["p.llm.interactive", "p.llm.batch"]
    assert worker_queues(s, "tool", ("interactive",)) == ["p.tool.interactive"]


def test_each_queue_has_its_own_exchange_and_routing_key():
    s = Settings(_env_file=None, queue_prefix="p.")
    declared = {q.name: (q.exchange.name, q.exchange.type, q.routing_key) for q in declared_queues(s)}
    assert declared == {name: (name, "direct", name) for name in all_queues(s)}
    app = create_app(s)
    try:
        # The app routes a step sent by queue name through that queue's own exchange and key.
        routed = {q.name: (q.exchange.name, q.routing_key) for q in app.amqp.queues.values()}
        assert routed == {name: (name, name) for name in all_queues(s)}
    finally:
        app.close()


class _Sets:
    """Redis sets, as far as the binding cleanup reads and writes them."""

    def __init__(self, sets: dict[str, set[str]]) -> None:
        self.sets = sets

    def smembers(self, key: str) -> set[str]:
        return set(self.sets.get(key, set()))

    def srem(self, key: str, *members: str) -> int:
        before = len(self.sets.get(key, set()))
        self.sets[key] = self.sets.get(key, set()) - set(members)
        return before - len(self.sets[key])


def test_bindings_left_by_the_default_declaration_are_found_and_dropped():
    s = Settings(_env_file=None)
    bind = lambda queue: BINDING_SEP.join(["llm.interactive", "", queue])  # noqa: E731
    # Celery's default bound every queue to the first queue's exchange, under its routing key.
    sets = _Sets({"_kombu.binding.llm.interactive": {bind(q) for q in all_queues(s)},
                  "_kombu.binding.llm.batch": {BINDING_SEP.join(["llm.batch", "", "llm.batch"])}})
    assert sorted(m.split(BINDING_SEP)[-1] for m in stale_bindings(s, sets)["llm.interactive"]) == \
        ["llm.batch", "tool.batch", "tool.interactive"]
    assert drop_stale_bindings(s, sets) == 3
    assert sets.smembers("_kombu.binding.llm.interactive") == {bind("llm.interactive")}
    assert stale_bindings(s, sets) == {}
