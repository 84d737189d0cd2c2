"""What one step in progress is: its delivery, its run and what happened so far.

The pipeline (:mod:`fleet.steps.pipeline`) makes a :class:`StepContext` per delivery and hands
it to the hooks and the step body; it holds the step's own state only. What a hook or a body
needs beyond it (a store, the inference pool, prices) is handed to it when it is built
(:func:`fleet.steps.runtime.build_runtime`), never looked up through the context.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleet.run.agent import AgentDef, LlmStep, ParallelStep, ToolStep
from fleet.run.budget import Allowance
from fleet.run.cancel import CancelScope
from fleet.run.records import StepRecord
from fleet.run.state import RunState


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

    delivery: Delivery
    run: RunState
    agent: AgentDef | None
    key: str
    deliveries: int = 0
    again: bool = False  # the same delivery run once more (after waiting out a full Redis)
    step: LlmStep | ToolStep | None = None
    parallel: ParallelStep | None = None  # the parallel step this step is a branch of
    record: StepRecord | None = None
    cancel: CancelScope | None = None
    allowance: Allowance | None = None  # what the run's budget leaves its model call (None: no budget)
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
