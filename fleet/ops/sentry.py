"""Error reporting to Sentry, on when ``FLEET_SENTRY_DSN`` is set.

What is reported: a step that is dead-lettered (:func:`report_dead_letter`, level error,
tagged with run_id, agent, step and priority), and whatever escapes a task or is logged at
error level. What is not: expected retries. A transient failure is retried by the base task
(logged at info, ``celery.exceptions.Retry`` raised), and :func:`_before_send` drops any
event about one that reaches the client by another path; it only becomes an error when its
retries are spent and the step is dead-lettered.

Events carry no frame locals and no request bodies (prompts and inputs live there) unless
``FLEET_SENTRY_INCLUDE_DATA`` is set.

Every event from a step carries the tags of the step (set when the step starts, by the
``task_prerun`` hook), so an error logged deep in a step body is still found by its run id.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
import sentry_sdk
from celery import signals
from celery.exceptions import Retry
from sentry_sdk.integrations.celery import CeleryIntegration

from fleet.errors import TransientError
from fleet.run.deadletter import DeadLetter
from fleet.settings import Settings

log = logging.getLogger(__name__)

# Set on the event of a dead-lettered step: the one report a transient error may lead to.
_DEAD_LETTER_TAG = "dead_letter"


def init_sentry(settings: Settings, component: str) -> bool:
    """Start the Sentry client of this process when a DSN is set; whether it started.

    Workers call it before their pool starts (the Celery integration wraps task tracers as
    they are built), the gateway when it starts.
    """
    if settings.sentry_dsn is None:
        return False
    sentry_sdk.init(
        dsn=settings.sentry_dsn.get_secret_value(),
        integrations=[CeleryIntegration(propagate_traces=True)],
        before_send=_before_send,
        # Events are sent from a background thread; a stopping worker waits this long for them.
        shutdown_timeout=2,
        send_default_pii=False,
        # Frame locals and request bodies hold prompts and run inputs: an operator opts in.
        include_local_variables=settings.sentry_include_data,
        max_request_body_size="always" if settings.sentry_include_data else "never",
    )
    sentry_sdk.set_tag("component", component)
    signals.task_prerun.connect(_tag_step, weak=False)
    return True


def report_dead_letter(exc: BaseException, entry: DeadLetter, entry_id: str) -> None:
    """Report a dead-lettered step as an error, and send it now.

    Flushed here because a prefork child can be replaced without running exit handlers,
    and a dead letter is the one event an operator must not miss.
    """
    if not sentry_sdk.get_client().is_active():
        return
    sentry_sdk.capture_exception(exc, level="error", tags={
        "run_id": entry.run_id, "agent": entry.agent, "step": entry.step, "step_key": entry.step_key,
        "priority": entry.priority, _DEAD_LETTER_TAG: entry_id,
    })
    sentry_sdk.flush(timeout=2)


def _tag_step(sender: Any = None, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    """Tag the task's scope (the Celery integration opens one per task) with its run and step."""
    kwargs = kwargs or {}
    run_id, step = kwargs.get("run_id"), kwargs.get("step")
    if not run_id or not step:
        return
    sentry_sdk.set_tag("run_id", run_id)
    sentry_sdk.set_tag("step", step)
    try:
        store = sender.runtime.store
        agent, priority = store.redis.hmget(store.run_key(run_id), "agent", "priority")
    except (AttributeError, redis.RedisError):
        log.debug("run %s: could not read agent and priority for Sentry tags", run_id, exc_info=True)
        return
    if agent:
        sentry_sdk.set_tag("agent", agent)
    if priority:
        sentry_sdk.set_tag("priority", priority)


def _before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
    """Drop events about expected retries; everything else goes out."""
    exc_info = hint.get("exc_info")
    exc = exc_info[1] if exc_info else None
    if isinstance(exc, Retry):
        return None
    if isinstance(exc, TransientError) and _DEAD_LETTER_TAG not in (event.get("tags") or {}):
        return None
    return event
