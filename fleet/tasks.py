"""The step tasks and the base task that owns every cross-cutting concern.

A step body (:func:`_llm_body`, :func:`_tool_body`) only does the step's work. The base
task around it loads the run, refuses work past the deadline or after a cancel, guards
against poison messages and duplicate deliveries, records timing and tokens, commits the
output once, retries transient errors with full-jitter backoff inside the deadline,
dead-letters permanent ones, and decides what comes next (next loop iteration, finish).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import socket
import threading
import time
import traceback
from typing import Any

import redis
from celery import Celery, Task, signature
from celery.exceptions import Reject, Retry
from kombu.exceptions import OperationalError

from fleet import metrics
from fleet.agent import AgentDef, LlmStep, ToolStep, load_agents
from fleet.cancel import CancelWatcher
from fleet.capacity import Capacity
from fleet.deadletter import DeadLetter, DeadLetters
from fleet.errors import (
    DeadlineExceeded,
    PermanentError,
    RunCancelled,
    RunNotFound,
    is_retryable,
)
from fleet.plan import (
    is_last_step,
    next_iteration_chain,
    parse_tool_call,
    state_view,
    step_index,
    step_key,
)
from fleet.runs import TERMINAL, RunStore, StepRecord
from fleet.sentry import report_dead_letter
from fleet.sessions import Sessions
from fleet.settings import PriorityClass, Settings
from fleet.template import lookup, render
from fleet.tools import load_tool_modules, run_tool

log = logging.getLogger(__name__)

_INFRA_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OperationalError)

# How many times one message may be delivered without finishing (its worker died each
# time) before it is dead-lettered instead of being handed out again.
POISON_MAX_DELIVERIES = 3


class Runtime:
    """What a worker process needs to run steps, built once per process."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        load_tool_modules(settings.tool_modules)
        self.agents: dict[str, AgentDef] = load_agents(settings.agents_dir)
        self.store = RunStore(settings)
        self.dead_letters = DeadLetters(settings, self.store.redis)
        self.capacity = Capacity(settings, self.store.redis)
        self.cancels = CancelWatcher(settings, self.store.redis)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self._triton = None

    @property
    def triton(self):  # noqa: ANN201 - lazily created: tool workers never open a channel
        from fleet.triton import TritonClient

        if self._triton is None:
            self._triton = TritonClient(self.settings.triton_grpc_url, self.settings.triton_connect_wait_s)
        return self._triton


class _Stop(Exception):
    """The run must not go on; the chain is cut."""


class StepTask(Task):
    """Base of the step tasks: see the module docstring."""

    abstract = True
    # Attempts are bounded by FLEET_RETRY_MAX_ATTEMPTS and the deadline, counted in the run
    # record; Celery's own cap (3 by default) would fail the step behind our back.
    max_retries = None
    runtime: Runtime
    body: Any = None  # the step function: (runtime, run, step, view, record) -> output

    def run(self, run_id: str, step: str, iteration: int = 0) -> str | None:  # noqa: D102
        rt = self.runtime
        try:
            try:
                result = self._run(rt, run_id, step, iteration)
                self._send_next()
            except _Stop:
                self.request.chain = None  # cut the rest of the chain
                # This delivery finished: it did not kill its worker.
                rt.store.redis.delete(self._delivery_key(rt, run_id, step_key(step, iteration)))
                result = None
            return result
        except _INFRA_ERRORS as exc:
            # Redis (broker and store) went away mid-step. Nothing is lost: the message goes
            # back to its queue, or stays unacknowledged and is restored after the visibility
            # timeout; the redelivered step finds its committed output and does not redo it.
            log.warning("run %s: step %s: lost Redis (%s); handing the step back", run_id, step, exc)
            raise Reject(str(exc), requeue=True) from None

    def _send_next(self) -> None:
        """Send the next link of the chain ourselves, so that a failed publish is redelivered.

        Celery's tracer would ack the message even when publishing the next step failed,
        and the run would stop there for good.
        """
        chain = self.request.chain
        if chain:
            nxt = signature(chain[-1], app=self.app)
            nxt.apply_async(chain=chain[:-1], parent_id=self.request.id, root_id=self.request.root_id,
                            headers={"fleet_sent_at": time.time()})
            self.request.chain = None

    # --- the step's life ------------------------------------------------------------
    def _run(self, rt: Runtime, run_id: str, name: str, iteration: int) -> str | None:
        store = rt.store
        try:
            raw = store.raw_state(run_id)
        except RunNotFound:
            log.warning("run %s: record gone (expired TTL?); dropping step %s", run_id, name)
            raise _Stop from None
        agent = rt.agents.get(raw["agent"])
        key = step_key(name, iteration)
        if raw["status"] in TERMINAL:
            log.info("run %s: %s, skipping step %s", run_id, raw["status"], key)
            raise _Stop
        if agent is None:
            self._dead_letter(rt, raw, None, name, iteration, PermanentError(f"unknown agent {raw['agent']!r}"))
            raise _Stop
        step = agent.step(name)
        if not _step_done(raw, key):
            if time.time() >= float(raw["deadline_at"]):
                self._expire(rt, run_id, key, "deadline passed before the step started")
                raise _Stop
            self._execute(rt, raw, agent, step, iteration)
        else:
            log.info("run %s: step %s already done (redelivered); not running it again", run_id, key)
        return self._continue(rt, raw, agent, step, iteration)

    def _execute(self, rt: Runtime, raw: dict[str, str], agent: AgentDef,
                 step: LlmStep | ToolStep, iteration: int) -> None:
        """Run the step and commit it; ``raw`` is updated with what was committed."""
        run_id, key = raw["id"], step_key(step.name, iteration)
        store = rt.store
        prior = raw.get(f"step:{key}")
        record = StepRecord.model_validate_json(prior) if prior else StepRecord(key=key, name=step.name, iteration=iteration)
        record.status, record.attempts, record.worker = "running", record.attempts + 1, rt.worker
        record.started_at = time.time()
        sent_at = (self.request.headers or {}).get("fleet_sent_at") or getattr(self.request, "fleet_sent_at", None)
        if sent_at:
            record.queue_wait_s = max(0.0, record.started_at - float(sent_at))
        delivery_key = self._delivery_key(rt, run_id, key)
        deliveries, _ = store.start_step(run_id, record, delivery_key)
        if deliveries > POISON_MAX_DELIVERIES:
            exc = PermanentError(
                f"step was delivered {POISON_MAX_DELIVERIES} times without finishing "
                "(it keeps killing its worker)"
            )
            record.status, record.error = "failed", str(exc)
            self._dead_letter(rt, raw, agent, step.name, iteration, exc, record)
            raise _Stop
        view = state_view(agent, raw, step.name, iteration)
        try:
            output = self._skip_output(agent, step, view, iteration)
            if output is _NOT_SKIPPED:
                output = type(self).body(rt, raw, step, view, record)
            else:
                record.status = "skipped"
        except Retry:
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is classified below
            self._on_error(rt, raw, agent, step, iteration, record, exc)
            raise _Stop from None
        record.finished_at = time.time()
        record.duration_s = record.finished_at - record.started_at
        # One round trip: commit once (with its event), the step time for admission, and
        # the end of this delivery (it did not kill its worker).
        extra = [("delete", (delivery_key,))]
        if record.status != "skipped":
            extra += rt.capacity.step_time_commands(step.kind, raw["priority"], record.duration_s)  # type: ignore[arg-type]
        if store.finish_step(run_id, record, output, *extra):
            raw[f"out:{key}"], raw[f"step:{key}"] = json.dumps(output), record.model_dump_json()
            log.info("run %s: step %s done in %.3fs (tokens %d in / %d out)", run_id, key,
                     record.duration_s, record.tokens_in, record.tokens_out,
                     extra={"run_id": run_id, "agent": agent.name, "step": key, "status": record.status})
            metrics.step_committed(agent.name, step, raw["priority"], record, rt.settings.triton_model)
        else:
            # A duplicate delivery committed first: go on from what it stored.
            raw.clear()
            raw.update(store.raw_state(run_id))

    @staticmethod
    def _skip_output(agent: AgentDef, step: LlmStep | ToolStep, view: dict[str, Any], iteration: int) -> Any:
        """Inside a loop, steps after the one that gave the final answer do not run."""
        loop = agent.loop_of(step.name)
        if loop is None or step.name == loop.until:
            return _NOT_SKIPPED
        decided = view["steps"].get(loop.until)
        names = [s.name for s in loop.body]
        if names.index(step.name) > names.index(loop.until) and isinstance(decided, dict) and "final" in decided:
            return None
        return _NOT_SKIPPED

    def _continue(self, rt: Runtime, raw: dict[str, str], agent: AgentDef, step: LlmStep | ToolStep,
                  iteration: int) -> str:
        """After a step: go round the loop again, finish the run, or let the chain go on."""
        run_id = raw["id"]
        loop = agent.loop_of(step.name)
        if loop is not None and loop.body[-1].name == step.name:
            decided = json.loads(raw.get(f"out:{step_key(loop.until, iteration)}", "null"))
            if not (isinstance(decided, dict) and "final" in decided):
                if iteration < loop.max_iterations:
                    sig = next_iteration_chain(self.app, rt.settings, agent, run_id,
                                               raw["priority"], loop, iteration + 1)  # type: ignore[arg-type]
                    raise self.replace(sig)
                rt.store.transition(run_id, "failed", finished_at=repr(time.time()), error={
                    "type": "LoopExhausted",
                    "message": f"loop '{loop.name}' reached max_iterations={loop.max_iterations} without a final answer",
                })
                _summary(rt, run_id)
                raise _Stop
        if is_last_step(agent, step.name):
            view = state_view(agent, raw, step.name, 0)
            try:
                result = lookup(view, "steps." + agent.result)
            except KeyError:
                result = None
            if rt.store.transition(run_id, "succeeded", result=result, finished_at=repr(time.time())):
                if raw.get("session_id"):
                    Sessions(rt.settings, rt.store.redis).append(
                        raw["session_id"], run_id, json.loads(raw["input"]), result)
                _summary(rt, run_id)
        return run_id

    # --- failure handling -----------------------------------------------------------
    def _on_error(self, rt: Runtime, raw: dict[str, str], agent: AgentDef, step: LlmStep | ToolStep,
                  iteration: int, record: StepRecord, exc: BaseException) -> None:
        run_id, key = raw["id"], step_key(step.name, iteration)
        record.error = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, RunCancelled):
            record.status = "failed"
            rt.store.put_step(run_id, record)
            rt.store.emit(run_id, {"type": "step", "step": key, "status": "failed", "error": record.error})
            return
        if isinstance(exc, DeadlineExceeded) or time.time() >= float(raw["deadline_at"]):
            record.status = "failed"
            rt.store.put_step(run_id, record)
            self._expire(rt, run_id, key, str(exc))
            return
        if is_retryable(exc) and record.attempts < rt.settings.retry_max_attempts:
            cap = min(rt.settings.retry_backoff_max_s, rt.settings.retry_backoff_base_s * 2 ** (record.attempts - 1))
            countdown = random.uniform(0, cap)  # full jitter: retries of many runs spread out
            if time.time() + countdown < float(raw["deadline_at"]):
                rt.store.put_step(run_id, record)
                log.info("run %s: step %s attempt %d failed (%s); retrying in %.2fs",
                         run_id, key, record.attempts, exc, countdown)
                metrics.step_retried(raw["agent"], step.name)
                raise self.retry(countdown=countdown, max_retries=None, exc=exc)
        record.status = "failed"
        record.finished_at = time.time()
        rt.store.put_step(run_id, record)
        self._dead_letter(rt, raw, agent, step.name, iteration, exc, record)

    def _delivery_key(self, rt: Runtime, run_id: str, key: str) -> str:
        return rt.settings.key("run", run_id, "deliveries", f"{key}@{self.request.retries}")

    def _expire(self, rt: Runtime, run_id: str, key: str, why: str) -> None:
        if rt.store.transition(run_id, "expired", finished_at=repr(time.time()),
                               error={"type": "DeadlineExceeded", "message": f"step {key}: {why}"}):
            log.info("run %s: expired at step %s (%s)", run_id, key, why)
            _summary(rt, run_id)

    def _dead_letter(self, rt: Runtime, raw: dict[str, str], agent: AgentDef | None, name: str,
                     iteration: int, exc: BaseException, record: StepRecord | None = None) -> None:
        run_id, now = raw["id"], time.time()
        view = state_view(agent, raw, name, iteration) if agent is not None else {}
        tb = "".join(traceback.format_exception(exc)) if exc.__traceback__ else ""
        entry = DeadLetter(
            run_id=run_id, agent=raw["agent"], step=name, step_key=step_key(name, iteration),
            iteration=iteration, step_index=step_index(agent, name) if agent is not None else -1,
            priority=raw["priority"],  # type: ignore[arg-type]
            state=view, error_type=type(exc).__name__, error_message=str(exc), traceback=tb,
            attempts=record.attempts if record else self.request.retries + 1,
            first_failure_at=record.started_at or now if record else now,
            last_failure_at=now, worker=rt.worker,
        )
        entry_id = rt.dead_letters.add(entry)
        moved = rt.store.transition(
            run_id, "dead_lettered", dead_letter_id=entry_id, finished_at=repr(now),
            error={"type": type(exc).__name__, "message": str(exc), "step": entry.step_key},
        )
        log.warning("run %s: step %s dead-lettered as %s: %s: %s", run_id, entry.step_key,
                    entry_id, type(exc).__name__, exc)
        metrics.dead_lettered(raw["agent"], name)
        report_dead_letter(exc, entry, entry_id)
        if moved:
            _summary(rt, run_id)


_NOT_SKIPPED = object()


def _step_done(raw: dict[str, str], key: str) -> bool:
    rec = raw.get(f"step:{key}")
    return rec is not None and json.loads(rec).get("status") in ("done", "skipped")


def _summary(rt: Runtime, run_id: str) -> None:
    """The one line per finished run."""
    try:
        run = rt.store.get(run_id)
    except RunNotFound:
        return
    log.info("run %s ◆ %s ◆ %s ◆ %s ◆ %.3fs ◆ %d steps ◆ tokens %d in / %d out", run.id, run.agent,
             run.priority, run.status, run.latency_s or 0.0, len(run.steps), run.tokens_in, run.tokens_out,
             extra={"run_id": run.id, "agent": run.agent, "priority": run.priority, "status": run.status})
    metrics.run_finished(run)


# --- the step bodies ------------------------------------------------------------------

def _llm_body(rt: Runtime, raw: dict[str, str], step: LlmStep, view: dict[str, Any], record: StepRecord) -> Any:
    run_id = raw["id"]
    prompt = render(step.prompt, view)
    priority: PriorityClass = raw["priority"]  # type: ignore[assignment]
    on_token = None
    if raw.get("stream") == "1":
        def emit_token(text: str) -> None:
            rt.store.emit(run_id, {"type": "token", "step": record.key, "text": text})
        on_token = emit_token
    deadline_at = float(raw["deadline_at"])
    with _triton_slot(rt, priority, deadline_at):
        gen = _generate(rt, run_id, step, prompt, priority, deadline_at, record, on_token)
    record.tokens_in, record.tokens_out, record.ttft_s = gen.tokens_in, gen.tokens_out, gen.ttft_s
    text = gen.text.strip()
    return parse_tool_call(text) if step.parse == "tool_call" else text


def _triton_slot(rt: Runtime, priority: PriorityClass, deadline_at: float):  # noqa: ANN202
    if rt.settings.scheduling == "vanilla":
        return contextlib.nullcontext()
    return rt.capacity.slot(priority, deadline_at)


def _generate(rt: Runtime, run_id: str, step: LlmStep, prompt: str, priority: PriorityClass,
              deadline_at: float, record: StepRecord, on_token):  # noqa: ANN001, ANN202
    # Interactive runs stream (time to first token, prompt cancellation); batch runs take
    # one response per request unless their tokens are wanted, which saves a message per
    # token in the worker and at Triton.
    stream = priority == "interactive" or on_token is not None
    def cancelled_now() -> bool:
        return rt.store.redis.hget(rt.store.run_key(run_id), "status") == "cancelled"

    with rt.cancels.track(run_id, cancelled_now) as bind:
        return rt.triton.generate(
            prompt,
            step.sampling_parameters(),
            stream=stream,
            model=step.model or rt.settings.triton_model,
            priority=rt.settings.triton_priority(priority),
            timeout_s=deadline_at - time.time(),
            request_id=f"{run_id}:{record.key}:{record.attempts}",
            on_token=on_token,
            cancelled=_cancel_probe(rt, run_id),
            bind=bind,
        )


def _cancel_probe(rt: Runtime, run_id: str, every_s: float = 0.1):  # noqa: ANN202
    """A cheap "was the run cancelled?" for the token loop: reads Redis at most every ``every_s``."""
    checked = [0.0, False]

    def cancelled() -> bool:
        now = time.monotonic()
        if now - checked[0] >= every_s:
            checked[0] = now
            checked[1] = rt.store.redis.hget(rt.store.run_key(run_id), "status") == "cancelled"
        return bool(checked[1])

    return cancelled


def _tool_body(rt: Runtime, raw: dict[str, str], step: ToolStep, view: dict[str, Any], record: StepRecord) -> Any:
    if step.tool is not None:
        return run_tool(step.tool, render(step.input or "", view))
    call = view["steps"].get(step.tool_from)
    if not isinstance(call, dict) or "tool" not in call:
        raise PermanentError(f"step '{step.tool_from}' did not produce a tool call: {call!r}")
    if call["tool"] not in step.allowed_tools:
        raise PermanentError(
            f"model chose tool '{call['tool']}', not one of {', '.join(step.allowed_tools)}"
        )
    return run_tool(call["tool"], call["input"])


def register_tasks(app: Celery, settings: Settings) -> None:
    """Register ``fleet.llm`` and ``fleet.tool`` on ``app``."""
    runtime: dict[str, Runtime] = {}
    lock = threading.Lock()

    class _Base(StepTask):
        abstract = True

        @property
        def runtime(self) -> Runtime:  # type: ignore[override]
            # Built on first use in the worker process (after fork), then shared by its threads.
            if "rt" not in runtime:
                with lock:
                    if "rt" not in runtime:
                        runtime["rt"] = Runtime(settings)
            return runtime["rt"]

    class LlmTask(_Base):
        name = "fleet.llm"
        body = staticmethod(_llm_body)

    class ToolTask(_Base):
        name = "fleet.tool"
        body = staticmethod(_tool_body)

    app.register_task(LlmTask())
    app.register_task(ToolTask())
