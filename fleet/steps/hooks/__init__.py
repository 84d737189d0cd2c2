"""Concerns of a step's life, each a small object with one job (in the spirit of dramatiq's
middleware). The pipeline (:mod:`fleet.steps.pipeline`) calls them at fixed points:

=================  ==========================================================  ===================
point              what a hook may do there                                    hooks
=================  ==========================================================  ===================
``check``          stop the step before it starts (raise)                      guards, budget
``check_started``  stop the step once its delivery is counted (raise)          poison guard
``on_start``       observe a step about to run its body                        Sentry tags, spans
``around_body``    a context the body runs in, left whatever its outcome       spans, usage
``commit_with``    add Redis commands to the step's one commit round trip      step times, usage,
                                                                               fair share
``after_commit``   observe a committed step                                    metrics, usage
``on_retry``       observe an attempt that failed and goes back to its queue   metrics, spans
``on_dead_letter`` observe a step written to the dead-letter store             metrics, Sentry
``on_run_end``     observe a run that reached a terminal status                summary, usage, ...
=================  ==========================================================  ===================

Adding a concern (tenant accounting, say) means adding a hook here and to
:func:`default_hooks`, not editing the pipeline.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fleet.run.agent import AgentDef, LlmStep, ToolStep
    from fleet.run.budget import Allowance
    from fleet.run.cancel import CancelScope
    from fleet.run.records import RunRecord, RunState, StepRecord
    from fleet.steps.runtime import Runtime


@dataclass(frozen=True)
class Delivery:
    """One delivery of a step message: what the message says and what the broker adds."""

    run_id: str
    step: str
    iteration: int
    retries: int = 0
    sent_at: float | None = None


@dataclass
class StepContext:
    """What the pipeline, the hooks and the step body know about one step in progress."""

    rt: "Runtime"
    delivery: Delivery
    run: "RunState"
    agent: "AgentDef | None"
    key: str
    deliveries: int = 0
    again: bool = False  # the same delivery run once more (after waiting out a full Redis)
    step: "LlmStep | ToolStep | None" = None
    record: "StepRecord | None" = None
    cancel: "CancelScope | None" = None
    allowance: "Allowance | None" = None  # what the run's budget leaves its model call (None: no budget)
    output: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def run_id(self) -> str:
        return self.delivery.run_id

    @property
    def done(self) -> bool:
        """Whether this step's output is already committed (a redelivered message)."""
        return self.run.is_done(self.key)


class StopStep(Exception):
    """The step must not run (its run ended, or the record is gone); the chain is cut."""


class Hook:
    """Base of every hook: each point does nothing unless a hook overrides it."""

    def check(self, ctx: StepContext) -> None:
        """Before the step starts: raise to stop it (see fleet.steps.hooks.guards)."""

    def check_started(self, ctx: StepContext) -> None:
        """After the step was recorded as running and its delivery counted: raise to stop it."""

    def on_start(self, ctx: StepContext) -> None:
        """The step passed every guard and its body runs next."""

    def around_body(self, ctx: StepContext) -> AbstractContextManager[Any]:
        """A context the body runs in (entered in hook order); it is left however the body
        ends, before the step is committed or its failure handled."""
        return nullcontext()

    def commit_with(self, ctx: StepContext) -> list[tuple[str, tuple]]:
        """Redis commands ``(method, args)`` to run in the step's commit round trip."""
        return []

    def after_commit(self, ctx: StepContext) -> None:
        """The step's output was committed (once per step, whatever the deliveries)."""

    def on_retry(self, ctx: StepContext, exc: BaseException, countdown_s: float) -> None:
        """An attempt failed transiently; the step is tried again in ``countdown_s``."""

    def on_dead_letter(self, ctx: StepContext, exc: BaseException, entry_id: str) -> None:
        """The step failed for good and was written to the dead-letter store."""

    def on_run_end(self, ctx: StepContext, run: "RunRecord") -> None:
        """The run reached a terminal status in this step."""


def default_hooks() -> list[Hook]:
    """The hooks of a worker, in the order they are called (step spans only while this
    process traces: tracing off costs the step nothing)."""
    from fleet.core import tracing
    from fleet.steps.hooks.budget import BudgetGuard
    from fleet.steps.hooks.fair_share import FairShare
    from fleet.steps.hooks.guards import DeadlineGuard, KnownStepGuard, PoisonGuard, TerminalGuard
    from fleet.steps.hooks.metrics import Metrics
    from fleet.steps.hooks.sentry import SentryReports
    from fleet.steps.hooks.sessions import SessionTurns
    from fleet.steps.hooks.step_times import StepTimes
    from fleet.steps.hooks.summary import RunSummary
    from fleet.steps.hooks.tracing import StepSpans
    from fleet.steps.hooks.usage import Usage

    spans: list[Hook] = [StepSpans()] if tracing.enabled() else []
    return [*spans, TerminalGuard(), KnownStepGuard(), DeadlineGuard(), BudgetGuard(), PoisonGuard(), StepTimes(),
            Usage(), FairShare(), Metrics(), SentryReports(), SessionTurns(), RunSummary()]
