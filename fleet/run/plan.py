"""What a run does next: the one next-step rule, and the steps that remain from a point.

The pipeline (after each step), the reconciler (for a run whose message vanished) and replays
all ask :func:`next_step`. How the remaining steps travel as Celery chains is
:mod:`fleet.broker.chains`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleet.run.agent import AgentDef, LlmStep, LoopStep, ParallelStep, Shaped, ToolStep
from fleet.run.records import step_key
from fleet.run.state import RunState
from fleet.run.template import lookup
from fleet.run.view import template_view


def remaining_steps(
    agent: AgentDef, start: str | None = None, iteration: int = 0
) -> list[tuple[LlmStep | ToolStep, int]]:
    """The steps (with iteration) that a chain starting at ``start`` runs, loops unrolled once.
    A chain ends before a parallel or wait step (it travels as no chain: see
    :func:`fleet.broker.chains.build_chain`)."""
    out: list[tuple[LlmStep | ToolStep, int]] = []
    started = start is None
    for top in agent.steps:
        if isinstance(top, Shaped):
            if started or top.name == start:
                return out
            continue
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


@dataclass(frozen=True)
class StepPos:
    """A step of a run: its name and loop iteration (0 outside loops)."""

    name: str
    iteration: int = 0

    @property
    def key(self) -> str:
        return step_key(self.name, self.iteration)


@dataclass(frozen=True)
class Finished:
    """Every step of the run is done: it succeeds with its result."""


@dataclass(frozen=True)
class Exhausted:
    """A loop went round ``max_iterations`` times without a final answer: the run fails."""

    loop: LoopStep

    @property
    def message(self) -> str:
        return (f"loop '{self.loop.name}' reached max_iterations={self.loop.max_iterations} "
                "without a final answer")


def _is_final(output: Any) -> bool:
    return isinstance(output, dict) and "final" in output


def next_step(agent: AgentDef, run: RunState) -> StepPos | Finished | Exhausted:
    """What a run does next, from what it has done: the one next-step rule.

    The first step whose output is not committed, in definition order. A loop is at its
    latest iteration with a record; once every body step of it is done, the loop ends if its
    ``until`` step gave a final answer, goes round again below ``max_iterations``, and is
    exhausted otherwise. The pipeline (after each step), the reconciler (for a run whose
    message vanished) and replays all ask this.
    """
    for top in agent.steps:
        if isinstance(top, LoopStep):
            last = max(run.iterations({s.name for s in top.body}), default=1)
            for inner in top.body:
                if not run.is_done(step_key(inner.name, last)):
                    return StepPos(inner.name, last)
            if not _is_final(run.output(top.until, last)):
                if last < top.max_iterations:
                    return StepPos(top.body[0].name, last + 1)
                return Exhausted(top)
        elif not run.is_done(top.name):
            return StepPos(top.name)
    return Finished()


# --- parallel steps --------------------------------------------------------------------
def branch_items(top: ParallelStep, run: RunState) -> list[Any] | None:
    """The items a map's branches run over (None for fixed branches); a missing or non-list
    output (a model that asked for no tool call) is no items."""
    if top.over is None:
        return None
    try:
        items = lookup(template_view(run), "steps." + top.over)
    except KeyError:
        return []
    return items if isinstance(items, list) else []


def branch_count(top: ParallelStep, run: RunState) -> int:
    """How many branches the parallel step runs for this run."""
    items = branch_items(top, run)
    return len(top.branches) if items is None else len(items)


def pending_branches(top: ParallelStep, run: RunState) -> list[int]:
    """The branches (from 1) to send when a run enters (or is resumed at) a parallel step: the
    first ``max_concurrency`` of those not committed."""
    todo = [i for i in range(1, branch_count(top, run) + 1) if not run.is_done(step_key(top.name, i))]
    return todo[: top.max_concurrency]


def next_branch(top: ParallelStep, run: RunState, committed: int) -> int | None:
    """The branch that the ``committed``-th branch commit sends (each count is one commit's, so
    every branch past the first ``max_concurrency`` is sent once), or None."""
    index = top.max_concurrency + committed
    return index if index <= branch_count(top, run) else None


def branch_view(top: ParallelStep, run: RunState, index: int) -> dict[str, Any]:
    """What branch ``index`` of a parallel step sees: the run's view, with ``branch`` (its
    index and, in a map, its item)."""
    items = branch_items(top, run)
    view = template_view(run)
    view["branch"] = {"index": index, "item": items[index - 1] if items and index <= len(items) else None}
    return view


def is_skipped(agent: AgentDef, run: RunState, pos: StepPos) -> bool:
    """Inside a loop, the body steps after the one that gave the final answer do not run."""
    loop = agent.loop_of(pos.name)
    if loop is None or pos.name == loop.until:
        return False
    names = [s.name for s in loop.body]
    return names.index(pos.name) > names.index(loop.until) and _is_final(run.output(loop.until, pos.iteration))


def result_of(agent: AgentDef, run: RunState) -> Any:
    """The run's result: the output the agent's ``result`` names (None when absent)."""
    try:
        return lookup(template_view(run), "steps." + agent.result)
    except KeyError:
        return None


def step_index(agent: AgentDef, name: str) -> int:
    """Position of a step among the agent's steps (a loop's body steps each, a parallel or wait
    step as one)."""
    names: list[str] = []
    for top in agent.steps:
        names += [s.name for s in top.body] if isinstance(top, LoopStep) else [top.name]
    return names.index(name)
