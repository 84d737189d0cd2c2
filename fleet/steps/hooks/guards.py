"""Guards: checks before a step body runs, each raising to stop the step.

- :class:`TerminalGuard`: the run already ended (succeeded, failed, cancelled, expired,
  dead-lettered): the step is skipped and the chain cut.
- :class:`KnownStepGuard`: the run's agent, or this step, is not defined in this worker:
  a permanent error (dead-lettered), never a loop.
- :class:`DeadlineGuard`: the run is past its deadline: the step is not executed and the
  run expires; no model call is made for an answer nobody waits for.
- :class:`PoisonGuard`: the step's message was delivered ``max_deliveries`` times without
  finishing (it keeps killing its worker): dead-lettered instead of looping.

A redelivered step whose output is already committed is not stopped by the deadline or
poison guards: the pipeline goes straight on to what follows it.
"""

from __future__ import annotations

import time

from fleet.errors import DeadlineExceeded, PermanentError
from fleet.steps.context import StepContext, StopStep
from fleet.steps.hooks import Hook

# How many times one message may be delivered without finishing (its worker died each
# time) before it is dead-lettered instead of being handed out again.
POISON_MAX_DELIVERIES = 3


class TerminalGuard(Hook):
    def check(self, ctx: StepContext) -> None:
        if ctx.run.ended:
            raise StopStep(f"run {ctx.run.status}")


class KnownStepGuard(Hook):
    def check(self, ctx: StepContext) -> None:
        if ctx.agent is None:
            raise PermanentError(f"unknown agent {ctx.run.agent!r}")
        if ctx.step is None:
            raise PermanentError(f"agent {ctx.agent.name!r} has no step {ctx.delivery.step!r}")


class DeadlineGuard(Hook):
    def check(self, ctx: StepContext) -> None:
        if not ctx.done and time.time() >= ctx.run.deadline_at:
            raise DeadlineExceeded("deadline passed before the step started")


class PoisonGuard(Hook):
    def __init__(self, max_deliveries: int = POISON_MAX_DELIVERIES) -> None:
        self.max_deliveries = max_deliveries

    def check_started(self, ctx: StepContext) -> None:
        if ctx.deliveries > self.max_deliveries:
            raise PermanentError(
                f"step was delivered {self.max_deliveries} times without finishing "
                "(it keeps killing its worker)"
            )
