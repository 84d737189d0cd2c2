"""One step's life, top to bottom.

::

    a step message (run id, step, iteration)
      load      the run's state (one read)
      check     guards: terminal · known step · deadline          (fleet.steps.hooks.guards)
                a redelivered step whose output is committed goes straight to advance
      start     record "running", count this delivery, event     (one write)
      check     guard: poison (delivered too often without finishing)
      body      the step's work only, inside the run's cancel scope  (fleet.steps.bodies)
                and the hooks' contexts (a span, the step's pricing)
      commit    output + record + event once, with the hooks' commands (one write)
      advance   the one next-step rule (fleet.run.plan.next_step): go on, or end the run
    a failure   cancelled: stop · deadline: expire the run · budget spent: end it
                budget_exceeded · RetryPolicy: try again later · otherwise: dead-letter
    observers   after_commit · on_retry · on_dead_letter · on_run_end  (fleet.steps.hooks)

:class:`StepPipeline` owns this sequence; the Celery task (:mod:`fleet.steps.tasks`) only turns
its :class:`Outcome` into broker actions (send the next link, retry, replace).
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import redis

from fleet.core.redis_full import is_redis_full, wait_for_room
from fleet.errors import BudgetExceeded, DeadlineExceeded, FleetError, HandedBack, RunCancelled, RunNotFound
from fleet.run.agent import AgentDef, ParallelStep
from fleet.run.deadletter import DeadLetter
from fleet.run.plan import (
    Exhausted,
    Finished,
    StepPos,
    branch_count,
    branch_view,
    is_skipped,
    next_branch,
    pending_branches,
    result_of,
    step_index,
)
from fleet.run.records import RunStatus, StepRecord, step_key
from fleet.run.state import RunState
from fleet.run.store import Join, PipeCommand
from fleet.run.view import template_view
from fleet.run.waits import settle
from fleet.settings import PriorityClass
from fleet.steps.context import Delivery, StepContext, StopStep
from fleet.steps.hooks import Hook
from fleet.steps.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stop:
    """Nothing follows from this message: the run ended, or the step must not run."""


@dataclass(frozen=True)
class Advance:
    """The run goes on at ``pos``."""

    pos: StepPos
    agent: AgentDef
    priority: PriorityClass
    run: RunState | None = None  # what a parallel step's fan-out sends depends on it


@dataclass(frozen=True)
class RetryLater:
    """The step is tried again after ``countdown_s``."""

    countdown_s: float
    exc: BaseException


@dataclass(frozen=True)
class Resend:
    """Branches of the parallel step ``step`` are sent (again)."""

    step: str
    branches: list[int]
    agent: AgentDef
    priority: PriorityClass


Outcome = Stop | Advance | RetryLater | Resend
STOP = Stop()


class StepPipeline:
    """Runs step messages of one worker process (see the module docstring)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.store = rt.store
        self.hooks = rt.hooks
        # Only hooks that wrap the body are entered around it.
        self._around = [h for h in rt.hooks if type(h).around_body is not Hook.around_body]

    # --- the step's life ------------------------------------------------------------
    def process(self, msg: Delivery, again: bool = False) -> Outcome:
        """Run one delivery of a step message. Losing Redis raises (the message goes back);
        so does a full Redis, and the task runs the same delivery ``again`` once it has room:
        a step already committed only advances, and ``again`` is not counted as a delivery."""
        ctx = self._load(msg)
        if ctx is None:
            return STOP
        ctx.again = again
        outcome = self._process(ctx)
        if isinstance(outcome, Stop):
            # This delivery finished (it did not kill its worker).
            self.store.redis.delete(self._deliveries_key(ctx))
        return outcome

    def _process(self, ctx: StepContext) -> Outcome:
        try:
            for hook in self.hooks:
                hook.check(ctx)
        except StopStep as stop:
            log.info("run %s: %s, skipping step %s", ctx.run_id, stop, ctx.key, extra={"run_id": ctx.run_id})
            return STOP
        except FleetError as exc:
            return self._failed(ctx, exc)
        if ctx.done:
            log.info("run %s: step %s already done (redelivered); not running it again", ctx.run_id, ctx.key,
                     extra={"run_id": ctx.run_id})
            return self._branch_redelivered(ctx) if ctx.parallel is not None else self._advance(ctx)
        self._start(ctx)
        try:
            for hook in self.hooks:
                hook.check_started(ctx)
            for hook in self.hooks:
                hook.on_start(ctx)
            ctx.output = self._body(ctx)
        except BaseException as exc:  # noqa: BLE001 - every failure is classified in _failed
            if is_redis_full(exc):
                raise  # not the step's failure: the task waits for room and goes on
            if isinstance(exc, HandedBack):
                self._handed_back(ctx)
                raise  # not the step's failure: the task puts it back in its queue
            return self._failed(ctx, exc)
        self._commit(ctx)
        return self._after_branch(ctx) if ctx.parallel is not None else self._advance(ctx)

    def _after_branch(self, ctx: StepContext) -> Outcome:
        """After a branch's commit: the one that joined the branches advances the run; any
        other sends the next branch not yet sent (one per commit), if any."""
        top, committed = ctx.parallel, ctx.extra.get("committed", 0)
        assert top is not None and ctx.agent is not None  # noqa: S101 - a branch of a known step
        if not committed:  # a duplicate delivery committed first, and went on
            return self._branch_redelivered(ctx)
        if committed >= branch_count(top, ctx.run):
            log.info("run %s: parallel step %s joined (%d branches)", ctx.run_id, top.name, committed,
                     extra={"run_id": ctx.run_id})
            ctx.run = self.store.load(ctx.run_id)
            return self._advance(ctx)
        index = next_branch(top, ctx.run, committed)
        return STOP if index is None else Advance(StepPos(top.name, index), ctx.agent, ctx.run.priority, ctx.run)

    def _branch_redelivered(self, ctx: StepContext) -> Outcome:
        """A branch committed by an earlier delivery: the commit that joined went on, so this
        one sends only the branches that its crash may have left unsent (none has a record yet);
        a branch in flight finishes on its own, and a run left without any message is the
        reconciler's."""
        top = ctx.parallel
        assert top is not None and ctx.agent is not None  # noqa: S101
        if ctx.run.is_done(top.name):
            return STOP
        unsent = [i for i in pending_branches(top, ctx.run) if ctx.run.record(step_key(top.name, i)) is None]
        return Resend(top.name, unsent, ctx.agent, ctx.run.priority) if unsent else STOP

    def _load(self, msg: Delivery) -> StepContext | None:
        try:
            run = self.store.load(msg.run_id)
        except RunNotFound:
            log.warning("run %s: record gone (expired TTL?); dropping step %s", msg.run_id, msg.step,
                        extra={"run_id": msg.run_id})
            return None
        agent = self.rt.agents.get(run.agent)
        ctx = StepContext(delivery=msg, run=run, agent=agent, key=step_key(msg.step, msg.iteration))
        if agent is not None:
            try:
                ctx.step = agent.step_at(msg.step, msg.iteration)
            except KeyError:
                ctx.step = None
            top = agent.shaped(msg.step)
            ctx.parallel = top if isinstance(top, ParallelStep) else None
        return ctx

    def _start(self, ctx: StepContext) -> None:
        msg = ctx.delivery
        prior = ctx.run.record(ctx.key)
        record = prior.model_copy() if prior else StepRecord(key=ctx.key, name=msg.step, iteration=msg.iteration,
                                                             kind=ctx.step.kind if ctx.step else None)
        # The same delivery run again after a full Redis is not another attempt.
        attempts = record.attempts + (0 if ctx.again and prior is not None else 1)
        record.status, record.attempts, record.worker = "running", attempts, self.rt.worker
        record.started_at = time.time()
        record.error = None
        if msg.sent_at is not None:
            record.queue_wait_s = max(0.0, record.started_at - msg.sent_at)
        ctx.record = record
        ctx.deliveries = self.store.start_step(ctx.run_id, record, self._deliveries_key(ctx), count=not ctx.again)

    def _body(self, ctx: StepContext) -> Any:
        assert ctx.agent is not None and ctx.step is not None and ctx.record is not None  # noqa: S101
        pos = StepPos(ctx.delivery.step, ctx.delivery.iteration)
        if is_skipped(ctx.agent, ctx.run, pos):
            ctx.record.status = "skipped"
            return None
        if ctx.parallel is not None:
            view = branch_view(ctx.parallel, ctx.run, pos.iteration)
        else:
            view = template_view(ctx.run, pos.iteration, ctx.agent.loop_of(pos.name))
        with self.rt.cancellation.scope(ctx.run_id) as cancel, ExitStack() as around:
            for hook in self._around:
                around.enter_context(hook.around_body(ctx))
            ctx.cancel = cancel
            return self.rt.bodies.run(ctx, view)

    def _commit(self, ctx: StepContext) -> None:
        record = ctx.record
        assert record is not None  # noqa: S101
        record.finished_at = time.time()
        record.duration_s = record.finished_at - (record.started_at or record.finished_at)
        deliveries = self._deliveries_key(ctx)
        extra: list[PipeCommand] = [lambda pipe: pipe.delete(deliveries)]  # this delivery finished
        for hook in self.hooks:
            extra += hook.commit_with(ctx)
        top = ctx.parallel
        join = None
        if top is not None:
            starts = [r.started_at for k, r in ctx.run.records.items() if k.startswith(top.name + "#") and r.started_at]
            join = Join(top.name, branch_count(top, ctx.run), top.branch_names,
                        min([*starts, record.started_at or record.finished_at]))
        committed = self._holding(ctx, lambda: self.store.finish_step(ctx.run_id, record, ctx.output, *extra,
                                                                      join=join))
        ctx.extra["committed"] = committed
        if committed:
            ctx.run.committed(record, ctx.output)
            log.info("run %s: step %s done in %.3fs (tokens %d in / %d out)", ctx.run_id, ctx.key,
                     record.duration_s, record.tokens_in, record.tokens_out,
                     extra={"run_id": ctx.run_id, "agent": ctx.run.agent, "step": ctx.key, "status": record.status})
            for hook in self.hooks:
                hook.after_commit(ctx)
        else:
            # A duplicate delivery committed first: go on from what it stored.
            ctx.run = self.store.load(ctx.run_id)

    def _holding(self, ctx: StepContext, commit: Callable[[], int]) -> int:
        """Commit, waiting out a full Redis with the step's output in hand (its work is not
        redone); past half the step time limit the task's own wait takes over."""
        give_up_at = (ctx.record.started_at if ctx.record and ctx.record.started_at else time.time()) + \
            self.rt.settings.step_time_limit_s / 2
        while True:
            try:
                return commit()
            except redis.exceptions.ResponseError as exc:
                if not is_redis_full(exc):
                    raise
                log.warning("run %s: step %s: Redis is full (%s); holding its output until memory frees",
                            ctx.run_id, ctx.key, exc, extra={"run_id": ctx.run_id})
                if not wait_for_room(self.store.redis, give_up_at):
                    raise

    def _advance(self, ctx: StepContext) -> Outcome:
        assert ctx.agent is not None  # noqa: S101 - a done step has a known agent
        nxt = settle(self.store, ctx.agent, ctx.run)
        if isinstance(nxt, Finished):
            self._end(ctx, "succeeded", result=result_of(ctx.agent, ctx.run))
            return STOP
        if isinstance(nxt, Exhausted):
            self._end(ctx, "failed", error={"type": "LoopExhausted", "message": nxt.message})
            return STOP
        if nxt is None:  # parked: a wait step holds the run, and no worker
            return STOP
        return Advance(nxt, ctx.agent, ctx.run.priority, ctx.run)

    def _handed_back(self, ctx: StepContext) -> None:
        """The step gave its borrowed thread back to interactive work: this delivery spent no
        attempt and does not count as one that never finished (it goes back to its queue)."""
        record = ctx.record
        if record is not None:
            record.attempts = max(0, record.attempts - (0 if ctx.again else 1))
            self.store.put_step(ctx.run_id, record)
        if not ctx.again:
            self.store.redis.decr(self._deliveries_key(ctx))
        log.info("run %s: step %s handed its thread back to interactive work; it goes back to its queue",
                 ctx.run_id, ctx.key, extra={"run_id": ctx.run_id})

    # --- failures -------------------------------------------------------------------
    def _failed(self, ctx: StepContext, exc: BaseException) -> Outcome:
        record = ctx.record
        if record is not None:
            record.error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, RunCancelled):
            self._record_failure(ctx)
            self.store.emit(ctx.run_id, {"type": "step", "step": ctx.key, "status": "failed",
                                         "error": record.error if record else str(exc)})
            return STOP
        if isinstance(exc, BudgetExceeded):
            self._record_failure(ctx)
            if self._end(ctx, "budget_exceeded", error={"type": "BudgetExceeded", "message": str(exc)}):
                log.info("run %s: %s", ctx.run_id, exc, extra={"run_id": ctx.run_id})
            return STOP
        now = time.time()
        if isinstance(exc, DeadlineExceeded) or now >= ctx.run.deadline_at:
            self._record_failure(ctx)
            if self._end(ctx, "expired", error={"type": "DeadlineExceeded", "message": f"step {ctx.key}: {exc}"}):
                log.info("run %s: expired at step %s (%s)", ctx.run_id, ctx.key, exc, extra={"run_id": ctx.run_id})
            return STOP
        attempt = record.attempts if record is not None else ctx.delivery.retries + 1
        countdown = self.rt.retries.countdown_s(exc, attempt, now, ctx.run.deadline_at)
        if countdown is not None and record is not None:
            self.store.put_step(ctx.run_id, record)
            log.info("run %s: step %s attempt %d failed (%s); retrying in %.2fs", ctx.run_id, ctx.key,
                     attempt, exc, countdown, extra={"run_id": ctx.run_id})
            for hook in self.hooks:
                hook.on_retry(ctx, exc, countdown)
            return RetryLater(countdown, exc)
        if ctx.parallel is not None and ctx.parallel.on_failure == "keep" and record is not None:
            return self._keep_failed(ctx, exc)
        self._record_failure(ctx)
        self._dead_letter(ctx, exc, attempt)
        return STOP

    def _keep_failed(self, ctx: StepContext, exc: BaseException) -> Outcome:
        """A failed branch of a parallel step that keeps what succeeded: it commits its error
        as its output (``{"error": ...}``), and the join goes on without it."""
        log.info("run %s: branch %s failed (%s: %s); the parallel step keeps the others", ctx.run_id, ctx.key,
                 type(exc).__name__, exc, extra={"run_id": ctx.run_id})
        ctx.output = {"error": f"{type(exc).__name__}: {exc}"}
        self._commit(ctx)
        return self._after_branch(ctx)

    def _record_failure(self, ctx: StepContext) -> None:
        record = ctx.record
        if record is None:
            return
        record.status, record.finished_at = "failed", time.time()
        self.store.put_step(ctx.run_id, record)

    def _dead_letter(self, ctx: StepContext, exc: BaseException, attempts: int) -> None:
        msg, now, agent = ctx.delivery, time.time(), ctx.agent
        known = agent is not None and ctx.step is not None
        entry = DeadLetter(
            run_id=ctx.run_id, agent=ctx.run.agent, step=msg.step, step_key=ctx.key, iteration=msg.iteration,
            step_index=step_index(agent, msg.step) if known else -1,  # type: ignore[arg-type]
            priority=ctx.run.priority, tenant=ctx.run.tenant,
            state=template_view(ctx.run, msg.iteration, agent.loop_of(msg.step)) if known else {},  # type: ignore[union-attr]
            error_type=type(exc).__name__, error_message=str(exc),
            traceback="".join(traceback.format_exception(exc)) if exc.__traceback__ else "",
            attempts=attempts, first_failure_at=(ctx.record.started_at if ctx.record else None) or now,
            last_failure_at=now, worker=self.rt.worker,
        )
        since = self.store.epoch()
        entry.id = self.rt.dead_letters.add(entry)
        moved = self.store.end(ctx.run_id, "dead_lettered", dead_letter_id=entry.id,
                               error={"type": type(exc).__name__, "message": str(exc), "step": ctx.key})
        # The message is acknowledged next: the entry and the run's end must be on a replica.
        self.store.replicated(f"run {ctx.run_id}: dead letter {entry.id}", since)
        log.warning("run %s: step %s dead-lettered as %s: %s: %s", ctx.run_id, ctx.key, entry.id,
                    type(exc).__name__, exc, extra={"run_id": ctx.run_id})
        for hook in self.hooks:
            hook.on_dead_letter(ctx, exc, entry)
        if moved:
            self._ended(ctx)

    # --- the run's end --------------------------------------------------------------
    def _end(self, ctx: StepContext, status: RunStatus, **fields: Any) -> bool:
        """End the run with ``status`` unless it already ended; True if this step ended it."""
        for hook in self.hooks:
            hook.before_run_end(ctx, status, fields)
        if not self.store.end(ctx.run_id, status, **fields):
            return False
        self._ended(ctx)
        return True

    def _ended(self, ctx: StepContext) -> None:
        try:
            run = self.store.get(ctx.run_id)
        except RunNotFound:
            return
        for hook in self.hooks:
            hook.on_run_end(ctx, run)

    def _deliveries_key(self, ctx: StepContext) -> str:
        return self.store.keys.deliveries(ctx.run_id, ctx.key, ctx.delivery.retries)
