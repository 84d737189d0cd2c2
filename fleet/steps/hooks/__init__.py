"""Concerns of a step's life, each a small object with one job (in the spirit of dramatiq's
middleware), handed what it needs when it is built (:func:`fleet.steps.runtime.build_runtime`).
The pipeline (:mod:`fleet.steps.pipeline`) calls them at fixed points:

=================  ==========================================================  ===================
point              what a hook may do there                                    hooks
=================  ==========================================================  ===================
``check``          stop the step before it starts (raise)                      guards, budget
``check_started``  stop the step once its delivery is counted (raise)          poison guard
``on_start``       observe a step about to run its body                        Sentry tags, spans
``around_body``    a context the body runs in, left whatever its outcome       (none built in)
``commit_with``    add Redis commands to the step's one commit round trip      step times, usage,
                                                                               fair share
``after_commit``   observe a committed step                                    metrics
``on_retry``       observe an attempt that failed and goes back to its queue   metrics, spans
``on_dead_letter`` observe a step written to the dead-letter store             metrics, Sentry
``before_run_end`` write what must exist once the run's end can be seen        session turns
``on_run_end``     observe a run that reached a terminal status                summary, usage, ...
=================  ==========================================================  ===================

Adding a concern means adding a hook here and to :func:`fleet.steps.runtime.build_runtime`,
not editing the pipeline.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from fleet.run.deadletter import DeadLetter
from fleet.run.records import RunRecord
from fleet.run.store import PipeCommand
from fleet.steps.context import StepContext


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

    def commit_with(self, ctx: StepContext) -> list[PipeCommand]:
        """Commands to run in the step's commit round trip (each queues itself on the pipeline)."""
        return []

    def after_commit(self, ctx: StepContext) -> None:
        """The step's output was committed (once per step, whatever the deliveries)."""

    def on_retry(self, ctx: StepContext, exc: BaseException, countdown_s: float) -> None:
        """An attempt failed transiently; the step is tried again in ``countdown_s``."""

    def on_dead_letter(self, ctx: StepContext, exc: BaseException, entry: DeadLetter) -> None:
        """The step failed for good and was written to the dead-letter store."""

    def before_run_end(self, ctx: StepContext, status: str, fields: dict[str, Any]) -> None:
        """The step is about to end the run with ``status`` (and ``fields``, e.g. its result): what a
        client that sees the end reads next must be written here (it may be written again, should
        the worker die before the end is)."""

    def on_run_end(self, ctx: StepContext, run: RunRecord) -> None:
        """The run reached a terminal status in this step."""
