"""The Celery app, with every setting that decides a message's fate written out, and the
metadata every step message carries."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from celery import Celery
from celery.signals import before_task_publish

from fleet.broker.queues import all_queues, declared_queues
from fleet.connections import broker_tls, broker_transport_options, broker_url
from fleet.core import tracing
from fleet.settings import Settings


def create_app(settings: Settings) -> Celery:
    """A Celery app for this fleet.

    Clients send steps by task name and need nothing more; workers register the step
    tasks on it (``fleet.steps.worker``), so a client never imports the step runtime.
    """
    app = Celery("fleet", broker=broker_url(settings), set_as_current=False)
    app.conf.update(
        # JSON only: a broker message must never be able to execute code when decoded.
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        result_serializer="json",
        # Run records in Redis are the source of truth; a result backend would only add traffic.
        task_ignore_result=True,
        # Ack after the step ran, so a worker that dies mid-step leaves the message to be redelivered.
        task_acks_late=True,
        # A pool child killed mid-step (OOM, segfault) requeues its message instead of acking it.
        task_reject_on_worker_lost=True,
        # Step failures are handled by the base task (retry / dead letter); whatever still
        # escapes it is acked so that it cannot loop.
        task_acks_on_failure_or_timeout=True,
        # A worker holds only what it runs: prefetched messages would sit behind a busy
        # worker and defeat the interactive-first queue order.
        worker_prefetch_multiplier=1,
        worker_disable_prefetch=True,
        broker_transport_options={
            # Unacked messages come back after this; it exceeds the longest step's time limit
            # (checked in Settings), or a long step would be handed out twice.
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for messages whose worker died several times per visibility timeout,
            # so a lost step comes back soon after its timeout rather than minutes later.
            "unacked_restore_interval": max(1, min(10, int(settings.visibility_timeout_s / 4))),
            "unacked_restore_throttle": 1,
            # The lock around that sweep outlives a worker killed inside it (kill -9, OOM
            # kill): with kombu's default of 300 s no worker could bring any lost step back for
            # five minutes. The sweep takes milliseconds, and restoring a message twice is
            # prevented by its WATCHed transaction, so a short lock is safe.
            "unacked_mutex_expire": max(2, min(60, int(settings.visibility_timeout_s / 4))),
            # Fail fast on a dead or frozen connection instead of hanging. Acks, events and the
            # heartbeat are written from the consumer's own loop: at 30 s a frozen primary
            # stalled a worker for most of a minute and let it write on into the demoted one.
            "socket_timeout": 5,
            "socket_connect_timeout": 5,
            # kombu turns TCP keepalive off unless asked: a dead peer on an idle socket is seen.
            "socket_keepalive": True,
            "health_check_interval": 10,
            # Take queues strictly in the order the worker lists them: interactive first.
            "queue_order_strategy": "priority",
            # With Sentinels: the primary's name, and the Sentinels' own password and TLS.
            **broker_transport_options(settings),
        },
        broker_use_ssl=broker_tls(settings),
        # A publish outlasts a failover (the Sentinels' detection and the promotion): Celery's
        # default of three tries within a second failed publishes that a second later would
        # have reached the promoted replica.
        task_publish_retry_policy=publish_retry_policy(settings),
        # A Redis that refuses a command (MASTERDOWN, READONLY from a demoted primary behind a
        # plain URL) is a broker to reconnect to, not a reason for the worker to exit.
        broker_channel_error_retry=True,
        # Keep retrying the broker forever: a Redis restart must not take workers down.
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # ... every half second, so that consumers are back as soon as a failover ends.
        worker_consumer="fleet.broker.consumer:Consumer",
        # The hard limit of one step attempt (enforced by the prefork pool; gRPC deadlines
        # bound inference calls on thread pools).
        task_time_limit=settings.step_time_limit_s,
        # Events for Flower: what workers receive, start and finish. "task-sent" events are
        # off: they would cost a publish per step on the hot path and Flower does not need them.
        worker_send_task_events=True,
        task_send_sent_event=False,
        # Each queue with its own exchange and routing key (fleet.broker.queues).
        task_queues=declared_queues(settings),
        task_default_queue=all_queues(settings)[0],
        task_create_missing_queues=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    return app


def publish_retry_policy(settings: Settings) -> dict[str, float]:
    """Celery's retry of a publish that lost the broker: every half second for
    ``FLEET_REDIS_RECONNECT_WAIT_S`` (at least three tries)."""
    step = 0.5
    return {"max_retries": max(3, int(settings.redis_reconnect_wait_s / step) + 1), "interval_start": 0,
            "interval_step": step, "interval_max": step}


STEP_TASKS = frozenset({"fleet.llm", "fleet.tool"})
SENT_AT_HEADER = "fleet_sent_at"  # read by the pipeline (queue wait) and the gauges (queue age)
# The trace headers (fleet.core.tracing.MESSAGE_HEADERS) are read by the step task.


@before_task_publish.connect(weak=False)
def stamp_step_message(sender: str | None = None, headers: dict[str, Any] | None = None, **_: Any) -> None:
    """Every publish of a step (submission, next link, loop iteration, retry, reconciler
    re-send, replay) carries the time it becomes due, where queue wait and queue age start,
    and its run's trace (:func:`fleet.core.tracing.inject_message`; nothing when tracing is off).

    A retry with a countdown is due at its ETA, not when it was published.
    """
    if sender not in STEP_TASKS or headers is None:
        return
    tracing.inject_message(headers)
    due = time.time()
    eta = headers.get("eta")
    if eta:
        try:
            due = max(due, datetime.fromisoformat(eta).timestamp())
        except (TypeError, ValueError):
            pass
    headers[SENT_AT_HEADER] = due
