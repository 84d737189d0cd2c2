"""How the steps of a run travel: Celery chains of immutable step signatures.

A run is one chain of step signatures, each on the queue of its kind and class. A loop
contributes one iteration of its body; the iteration's last step replaces itself with the next
iteration (Celery's ``Task.replace`` carries the rest of the chain along), so chains stay as
short as the definition however many times a loop goes round (long chains blow up in size:
celery#9202).

A parallel step travels as its branches' messages, sent side by side (no chord: Celery's needs
a result backend, and waits forever for a lost member); the branch commit that completes them
joins them in the run store, and the branches past ``max_concurrency`` are sent one per commit
(:mod:`fleet.steps.pipeline`). A wait step travels as no message at all: the run is parked
(:mod:`fleet.run.waits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from celery import Celery
from celery.canvas import Signature, chain

from fleet.broker.queues import queue_name
from fleet.run.agent import AgentDef, LlmStep, LoopStep, ParallelStep, ToolStep
from fleet.run.plan import pending_branches, remaining_steps
from fleet.run.state import RunState
from fleet.settings import PriorityClass, Settings

TASK_FOR_KIND = {"llm": "fleet.llm", "tool": "fleet.tool"}


def signature(
    app: Celery, settings: Settings, agent: AgentDef, run_id: str, priority: PriorityClass,
    step: LlmStep | ToolStep, iteration: int,
) -> Signature:
    """The immutable signature of one step of one run, on its kind's and class's queue."""
    # Flower and logs show "agent.step" instead of the generic task name.
    return _step_message(app, settings, step.kind, run_id, step.name, iteration, priority,
                         f"{agent.name}.{step.name}")


def _step_message(app: Celery, settings: Settings, kind: str, run_id: str, step: str, iteration: int,
                  priority: PriorityClass, shadow: str) -> Signature:
    return app.signature(
        TASK_FOR_KIND[kind],
        kwargs={"run_id": run_id, "step": step, "iteration": iteration},
        immutable=True,
        queue=queue_name(settings, kind, priority),
        shadow=shadow,
    )


def branch_signature(
    app: Celery, settings: Settings, agent: AgentDef, run_id: str, priority: PriorityClass,
    top: ParallelStep, index: int,
) -> Signature:
    """The signature of branch ``index`` (from 1) of a parallel step: the step's message in
    "iteration" ``index``, on the queue of the branch's kind."""
    body = top.branch_step(index)
    return _step_message(app, settings, body.kind, run_id, top.name, index, priority,
                         f"{agent.name}.{top.name}[{index}]")


@dataclass(frozen=True)
class Fanout:
    """Branch messages sent side by side (what :func:`build_chain` gives for a parallel step)."""

    signatures: list[Signature]

    def apply_async(self, **options: Any) -> None:
        for sig in self.signatures:
            sig.apply_async(**options)


def build_chain(
    app: Celery, settings: Settings, agent: AgentDef, run_id: str, priority: PriorityClass,
    start: str | None = None, iteration: int = 0, run: RunState | None = None,
) -> chain | Fanout:
    """The chain of a run, or of its rest from ``start`` (for replays); at a parallel step,
    its branch ``iteration``, or (``iteration`` 0) the branches to send now, which a map's need
    the ``run`` to know."""
    top = agent.shaped(start or agent.steps[0].name)
    if isinstance(top, ParallelStep):
        if iteration:
            indices = [iteration]
        elif run is not None:
            indices = pending_branches(top, run)
        else:
            indices = list(range(1, min(len(top.branches), top.max_concurrency) + 1))
        return Fanout([branch_signature(app, settings, agent, run_id, priority, top, i) for i in indices])
    sigs = [
        signature(app, settings, agent, run_id, priority, s, it)
        for s, it in remaining_steps(agent, start, iteration)
    ]
    return chain(*sigs)


def next_iteration_chain(
    app: Celery, settings: Settings, agent: AgentDef, run_id: str, priority: PriorityClass,
    loop: LoopStep, iteration: int,
) -> chain:
    """The body of ``loop`` for ``iteration``, as a chain."""
    return chain(*[signature(app, settings, agent, run_id, priority, s, iteration) for s in loop.body])
