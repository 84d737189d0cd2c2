"""The step bodies: only each step's work. Everything around them is the pipeline's.

A body takes the step's context and returns the step's output (JSON-serializable), or
raises: :class:`~fleet.errors.TransientError` to be retried, anything else to be
dead-lettered (see :mod:`fleet.errors`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fleet.core import tracing
from fleet.run.agent import LlmStep, ToolStep
from fleet.errors import PermanentError
from fleet.steps.hooks import StepContext
from fleet.run.plan import parse_tool_call
from fleet.run.template import render
from fleet.run.tools import run_tool


def llm(ctx: StepContext, step: LlmStep, view: dict[str, Any]) -> Any:
    """Render the prompt, call the model (within what the run's budget leaves), parse its output."""
    record, run, allowance = ctx.record, ctx.run, ctx.allowance
    assert record is not None and ctx.cancel is not None  # noqa: S101 - set by the pipeline
    on_token = None
    if run.stream:
        def on_token(text: str) -> None:
            ctx.rt.store.emit(run.id, {"type": "token", "step": record.key, "text": text})
    prompt, sampling = render(step.prompt, view), step.sampling_parameters()
    clip = allowance.clip(prompt, step.max_tokens) if allowance is not None else None
    if clip is not None:
        sampling["max_tokens"] = clip.max_tokens
    model = step.model or ctx.rt.settings.triton_model
    with tracing.model_call(model, sampling["max_tokens"]) as span:
        gen = ctx.rt.pool.generate(
            prompt, sampling, model=model, priority=run.priority,
            deadline_at=run.deadline_at, request_id=f"{run.id}:{record.key}:{record.attempts}",
            cancel=ctx.cancel, on_token=on_token,
        )
        tracing.model_result(span, gen)
    record.tokens_in, record.tokens_out, record.ttft_s = gen.tokens_in, gen.tokens_out, gen.ttft_s
    record.replica, record.preemptions, record.failovers = gen.replica or None, gen.preemptions, gen.failovers
    record.model_s, record.prompt_bytes = gen.duration_s, len(prompt.encode())
    if clip is not None:
        clip.check(gen.tokens_out)
    text = gen.text.strip()
    return parse_tool_call(text) if step.parse == "tool_call" else text


def tool(ctx: StepContext, step: ToolStep, view: dict[str, Any]) -> Any:
    """Run the step's tool, or the tool a model step chose among the allowed ones."""
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


BODIES: dict[str, Callable[..., Any]] = {"llm": llm, "tool": tool}
