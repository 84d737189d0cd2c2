"""How the steps of a run travel: Celery chains of immutable step signatures.

A run is one chain of step signatures, each on the queue of its kind and class. A loop
contributes one iteration of its body; the iteration's last step replaces itself with the next
iteration (Celery's ``Task.replace`` carries the rest of the chain along), so chains stay as
short as the definition however many times a loop goes round (long chains blow up in size:
celery#9202).
"""

from __future__ import annotations

from celery import Celery
from celery.canvas import Signature, chain

from fleet.broker.queues import queue_name
from fleet.run.agent import AgentDef, LlmStep, LoopStep, ToolStep
from fleet.run.plan import remaining_steps
from fleet.settings import PriorityClass, Settings

TASK_FOR_KIND = {"llm": "fleet.llm", "tool": "fleet.tool"}


def signature(
    app: Celery, settings: Settings, agent: AgentDef, run_id: str, priority: PriorityClass,
    step: LlmStep | ToolStep, iteration: int,
) -> Signature:
    """The immutable signature of one step of one run, on its kind's and class's queue."""
    return app.signature(
        TASK_FOR_KIND[step.kind],
        kwargs={"run_id": run_id, "step": step.name, "iteration": iteration},
        immutable=True,
        queue=queue_name(settings, step.kind, priority),
        # Flower and logs show "agent.step" instead of the generic task name.
        shadow=f"{agent.name}.{step.name}",
    )


def build_chain(
    app: Celery, settings: Settings, agent: AgentDef, run_id: str, priority: PriorityClass,
    start: str | None = None, iteration: int = 0,
) -> chain:
    """The chain of a run, or of its rest from ``start`` (for replays)."""
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
