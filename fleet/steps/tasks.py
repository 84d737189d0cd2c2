"""The step tasks: Celery's side of a step. The step's life is :mod:`fleet.steps.pipeline`'s.

A task turns its message into a :class:`~fleet.steps.hooks.Delivery`, lets the pipeline run it,
and turns the outcome into broker actions: send the next link of the chain itself (so a
failed publish is redelivered instead of acked), replace itself with the next loop
iteration, start a chain from another step, retry with a countdown, or cut the chain.
Losing Redis mid-step hands the message back.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import redis
from celery import Celery, Task, signature
from celery.exceptions import Ignore, Reject, Retry
from kombu.exceptions import OperationalError

from fleet.broker.app import SENT_AT_HEADER
from fleet.broker.chains import build_chain, next_iteration_chain
from fleet.broker.consumer import TO_THE_HEAD
from fleet.core import tracing
from fleet.core.redis_full import is_redis_full, wait_for_room
from fleet.errors import HandedBack
from fleet.run.plan import StepPos
from fleet.run.records import step_key
from fleet.settings import Settings
from fleet.steps.context import Delivery
from fleet.steps.pipeline import Advance, Outcome, Resend, RetryLater, StepPipeline
from fleet.steps.runtime import runtime_for

log = logging.getLogger(__name__)

_INFRA_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)


class StepTask(Task):
    """Base of the step tasks: see the module docstring."""

    abstract = True
    # Attempts are bounded by the retry policy (FLEET_RETRY_MAX_ATTEMPTS and the deadline),
    # counted in the run record; Celery's own cap (3 by default) would fail the step behind
    # our back.
    max_retries = None
    pipeline: StepPipeline

    def run(self, run_id: str, step: str, iteration: int = 0) -> None:  # noqa: D102
        msg = Delivery(run_id, step, iteration, retries=self.request.retries, sent_at=_sent_at(self.request))
        # The span's name is Flower's for the task ("agent.step"), with the loop iteration.
        name = (self.request.shadow or self.name) + (f"#{iteration}" if iteration else "")
        with tracing.delivery(name, lambda header: _header(self.request, header), msg.sent_at,
                              {"fleet.run_id": run_id, "fleet.step": step_key(step, iteration)}):
            self._run(msg)

    def _run(self, msg: Delivery) -> None:
        run_id, step = msg.run_id, msg.step
        give_up_at = time.time() + self.pipeline.rt.settings.step_time_limit_s / 2
        again = False
        try:
            while True:
                try:
                    outcome = self.pipeline.process(msg, again=again)
                    self._act_replicated(msg, outcome)
                    return
                except (redis.exceptions.ResponseError, OperationalError) as exc:
                    if not is_redis_full(exc):
                        raise
                    # Redis is at its memory limit: keep this step's work and wait for room
                    # (a committed output only advances when the delivery runs again).
                    log.warning("run %s: step %s: Redis is full (%s); waiting for memory to free", run_id, step,
                                exc, extra={"run_id": run_id})
                    if not wait_for_room(self.pipeline.store.redis, give_up_at):
                        raise Reject(f"Redis full for too long: {exc}", requeue=True) from None
                    log.info("run %s: step %s: Redis has room again; going on", run_id, step,
                             extra={"run_id": run_id})
                    again = True
        except HandedBack as exc:
            # Its thread was borrowed from interactive work, which wants it back: the step goes
            # back to the head of its queue, to run again from the start (committed once).
            if self.request.id:
                TO_THE_HEAD.add(self.request.id)
            raise Reject(str(exc), requeue=True) from None
        except _INFRA_ERRORS as exc:
            # Redis (broker and store) went away mid-step. Nothing is lost: the message goes
            # back to its queue, or stays unacknowledged and is restored after the visibility
            # timeout; the redelivered step finds its committed output and does not redo it.
            log.warning("run %s: step %s: lost Redis (%s); handing the step back", run_id, step, exc,
                        extra={"run_id": run_id})
            raise Reject(str(exc), requeue=True) from None

    def _act_replicated(self, msg: Delivery, outcome: Outcome) -> None:
        """:meth:`_act`, then wait until what it published is on a replica: this message is
        acknowledged next, and a next step's message lost in a failover would leave its run
        with none (a failover in between hands this message back instead)."""
        store = self.pipeline.store
        since = store.epoch()
        what = f"run {msg.run_id}: what follows step {step_key(msg.step, msg.iteration)}"
        try:
            self._act(msg, outcome)
        except (Retry, Ignore):  # a retry or the next loop iteration was published
            store.replicated(what, since)
            raise
        if isinstance(outcome, (Advance, Resend)):
            store.replicated(what, since)

    def _act(self, msg: Delivery, outcome: Outcome) -> None:
        """Turn the pipeline's outcome into broker actions."""
        if isinstance(outcome, RetryLater):
            raise self.retry(countdown=outcome.countdown_s, max_retries=None, exc=outcome.exc)
        if isinstance(outcome, Advance):
            self._go_on(msg, outcome)
        elif isinstance(outcome, Resend):
            self.request.chain = None
            for index in outcome.branches:
                build_chain(self.app, self.pipeline.rt.settings, outcome.agent, msg.run_id, outcome.priority,
                            start=outcome.step, iteration=index).apply_async()
        else:
            self.request.chain = None  # cut the rest of the chain

    def _go_on(self, msg: Delivery, advance: Advance) -> None:
        """Send what the run does next: the chain's next link when it is that step, else the
        next loop iteration (carrying the rest of the chain), else a chain from that step."""
        pos, agent, settings = advance.pos, advance.agent, self.pipeline.rt.settings
        chain = self.request.chain
        if chain and _position(chain[-1]) == pos:
            nxt = signature(chain[-1], app=self.app)
            nxt.apply_async(chain=chain[:-1], parent_id=self.request.id, root_id=self.request.root_id)
            self.request.chain = None
            return
        loop = agent.loop_of(pos.name)
        if loop is not None and loop is agent.loop_of(msg.step) and pos.iteration == msg.iteration + 1:
            raise self.replace(next_iteration_chain(self.app, settings, agent, msg.run_id, advance.priority,
                                                    loop, pos.iteration))
        self.request.chain = None
        build_chain(self.app, settings, agent, msg.run_id, advance.priority, start=pos.name,
                    iteration=pos.iteration, run=advance.run).apply_async()


def _position(link: dict[str, Any]) -> StepPos:
    kwargs = link.get("kwargs") or {}
    return StepPos(kwargs.get("step", ""), int(kwargs.get("iteration", 0)))


def _header(request: Any, name: str) -> Any:
    """A custom header of the step message (Celery keeps them on the request, or nested
    under ``headers`` for some publishes)."""
    return (request.headers or {}).get(name) or getattr(request, name, None)


def _sent_at(request: Any) -> float | None:
    sent = _header(request, SENT_AT_HEADER)
    return float(sent) if sent else None


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register ``fleet.llm`` and ``fleet.tool`` on ``app`` (workers only)."""
    built: dict[int, StepPipeline] = {}
    lock = threading.Lock()

    class _Base(StepTask):
        abstract = True

        @property
        def pipeline(self) -> StepPipeline:  # type: ignore[override]
            # On the process's runtime, built on first use (a pool child after the fork builds
            # its own), then shared by the process's threads.
            pid = os.getpid()
            if pid not in built:
                with lock:
                    if pid not in built:
                        built[pid] = StepPipeline(runtime_for(settings))
            return built[pid]

    class LlmTask(_Base):
        name = "fleet.llm"

    class ToolTask(_Base):
        name = "fleet.tool"

    app.register_task(LlmTask())
    app.register_task(ToolTask())
