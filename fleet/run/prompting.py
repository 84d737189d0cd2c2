"""A step's prompt, as messages: the agent's system text, the history the step carries, its own
message, and the tools its model may call (:class:`fleet.run.messages.Prompt`).

- the system message: the agent's ``system`` (a template);
- before the step's message: the session's earlier turns (each a user message and the
  agent's reply);
- the step's message: its ``prompt`` template, rendered from the run state;
- after it, inside a loop: each earlier iteration's tool call (the model's) and the tool's
  result, in order; an llm step of the body that gave text gives an assistant message;
- the tools: those the step names (``tools``), as each describes itself
  (:func:`fleet.run.tools.tool_spec`).

Tool calls get stable ids from the run and the step that made them, so the prompt of a
step is the same every time it is built (a cached prefix stays a prefix).
"""

from __future__ import annotations

from typing import Any

from fleet.run.agent import AgentDef, LlmStep, LoopStep, ToolStep
from fleet.run.messages import Message, Prompt, ToolCall, call_id
from fleet.run.records import step_key
from fleet.run.state import RunState
from fleet.run.template import as_text, render
from fleet.run.tools import tool_spec
from fleet.run.view import template_view


def session_messages(turns: list[dict[str, Any]]) -> tuple[Message, ...]:
    """A session's earlier turns as messages: what the user said, what the agent replied."""
    out: list[Message] = []
    for turn in turns:
        said = turn["input"].get("message") if isinstance(turn["input"], dict) else None
        out += [Message("user", as_text(said if said is not None else turn["input"])),
                Message("assistant", as_text(turn["result"]))]
    return tuple(out)


def _arguments(output: dict[str, Any]) -> dict[str, Any]:
    """The arguments of a committed tool call (kept as the model gave them, else rebuilt from
    the tool's one string parameter)."""
    if isinstance(output.get("arguments"), dict):
        return output["arguments"]
    try:
        parameter = next(iter(tool_spec(output["tool"]).parameters["properties"]))
    except KeyError:
        parameter = "text"
    return {parameter: output.get("input", "")}


def loop_messages(run: RunState, loop: LoopStep, iteration: int) -> tuple[Message, ...]:
    """The earlier iterations of a loop as messages: the model's tool calls and their results."""
    out: list[Message] = []
    for it in range(1, iteration):
        last_call: str | None = None
        for body in loop.body:
            if it not in run.outputs.get(body.name, {}):
                continue
            output = run.outputs[body.name][it]
            if isinstance(body, LlmStep):
                if isinstance(output, dict) and "tool" in output:
                    last_call = call_id(run.id, step_key(body.name, it))
                    out.append(Message("assistant", tool_calls=(ToolCall(last_call, output["tool"],
                                                                          _arguments(output)),)))
                else:
                    final = output.get("final") if isinstance(output, dict) else output
                    out.append(Message("assistant", as_text(final)))
            elif isinstance(body, ToolStep) and last_call is not None:
                out.append(Message("tool", as_text(output), tool_call_id=last_call))
                last_call = None
    return tuple(out)


def build_prompt(agent: AgentDef, step: LlmStep, run: RunState, iteration: int = 0,
                 view: dict[str, Any] | None = None) -> Prompt:
    """The prompt of ``step`` of ``run`` (in loop iteration ``iteration``), as messages; a
    parallel step's branch hands in its own ``view`` (:func:`fleet.run.plan.branch_view`)."""
    loop = None if view is not None else agent.loop_of(step.name)
    view = view if view is not None else template_view(run, iteration, loop)
    templates = step.prompt + agent.system
    # A chat format sends the history as messages: the templates' own transcripts go empty.
    bare = {**view, "session": {**view["session"], "transcript": ""}}
    if "loop" in view:
        bare["loop"] = {**view["loop"], "transcript": ""}
    return Prompt(
        user=render(step.prompt, view),
        bare_user=render(step.prompt, bare),
        system=render(agent.system, view) if agent.system else None,
        bare_system=render(agent.system, bare) if agent.system else None,
        history=session_messages(run.fields.get("session", [])),
        after=loop_messages(run, loop, iteration) if loop is not None else (),
        tools=tuple(tool_spec(name) for name in step.tools),
        history_placed="{session.transcript}" in templates,
        after_placed="{loop.transcript}" in templates,
    )
