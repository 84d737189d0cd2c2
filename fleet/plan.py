"""How an agent definition becomes Celery chains, and what a step sees of the run.

A run is one chain of immutable step signatures. A loop contributes one iteration of its
body; the iteration's last step replaces itself with the next iteration (Celery's
``Task.replace`` carries the rest of the chain along), so chains stay as short as the
definition however many times a loop goes round.
"""

from __future__ import annotations

import json
from typing import Any

from celery import Celery
from celery.canvas import Signature, chain

from fleet.agent import AgentDef, LlmStep, LoopStep, ToolStep
from fleet.routing import queue_name
from fleet.sessions import transcript
from fleet.settings import PriorityClass, Settings
from fleet.template import as_text

TASK_FOR_KIND = {"llm": "fleet.llm", "tool": "fleet.tool"}


def step_key(name: str, iteration: int) -> str:
    """The key of a step's output and record in the run hash."""
    return f"{name}#{iteration}" if iteration else name


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


def remaining_steps(
    agent: AgentDef, start: str | None = None, iteration: int = 0
) -> list[tuple[LlmStep | ToolStep, int]]:
    """The steps (with iteration) that a chain starting at ``start`` runs, loops unrolled once."""
    out: list[tuple[LlmStep | ToolStep, int]] = []
    started = start is None
    for top in agent.steps:
        if isinstance(top, LoopStep):
            names = [s.name for s in top.body]
            if not started and start in names:
                started = True
                out += [(s, iteration or 1) for s in top.body[names.index(start):]]
            elif started:
                out += [(s, 1) for s in top.body]
        else:
            if not started and top.name == start:
                started = True
            if started:
                out.append((top, 0))
    if not started:
        raise KeyError(start)
    return out


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


def is_last_step(agent: AgentDef, name: str) -> bool:
    """Whether nothing follows this step in the definition (loop iterations aside)."""
    last = agent.steps[-1]
    if isinstance(last, LoopStep):
        return last.body[-1].name == name
    return last.name == name


def step_index(agent: AgentDef, name: str) -> int:
    """Position of a step among the agent's executable steps."""
    return [s.name for s, _ in agent.iter_steps()].index(name)


def state_view(agent: AgentDef, raw: dict[str, str], step: str, iteration: int) -> dict[str, Any]:
    """What a step's templates see: ``input``, ``steps`` (latest outputs) and ``loop``."""
    outputs: dict[str, dict[int, Any]] = {}
    for field, value in raw.items():
        if field.startswith("out:"):
            name, _, it = field[4:].partition("#")
            outputs.setdefault(name, {})[int(it or 0)] = json.loads(value)
    latest: dict[str, Any] = {}
    for name, by_iteration in outputs.items():
        usable = [i for i in by_iteration if iteration == 0 or i <= iteration]
        if usable:
            latest[name] = by_iteration[max(usable)]
    turns = json.loads(raw.get("session", "[]"))
    view: dict[str, Any] = {
        "input": json.loads(raw.get("input", "{}")),
        "steps": latest,
        "session": {"id": raw.get("session_id", ""), "transcript": transcript(turns)},
    }
    loop = agent.loop_of(step)
    if loop is not None:
        lines: list[str] = []
        for it in range(1, iteration):
            for body_step in loop.body:
                label = body_step.transcript_label
                if label and it in outputs.get(body_step.name, {}):
                    lines.append(f"{label}: {as_text(outputs[body_step.name][it])}")
        view["loop"] = {"iteration": iteration, "transcript": "\n".join(lines)}
    return view


def parse_tool_call(text: str) -> dict[str, Any]:
    """A model output as a tool call ``{tool, input}``, or ``{final}`` when it is not one."""
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        try:
            call = json.loads(text[start : end + 1])
        except ValueError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("tool"), str) and "input" in call:
            return {"tool": call["tool"], "input": as_text(call["input"])}
    return {"final": text.strip()}
