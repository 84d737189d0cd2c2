"""The step bodies: only each step's work. Everything around them is the pipeline's.

A body takes the step's context and the view its templates render from, and returns the
step's output (JSON-serializable), or raises: :class:`~fleet.errors.TransientError` to be
retried, anything else to be dead-lettered (see :mod:`fleet.errors`). A model step's record
gets what its call used (tokens, time at the model, replica) and its price, where the call
returns: a call cut short by its run's budget cost money too.
"""

from __future__ import annotations

import logging
from typing import Any

from fleet.core import tracing
from fleet.errors import PermanentError, ReplicaUnavailable, TransientError
from fleet.inference.catalog import ModelCatalog
from fleet.inference.formats import Formats
from fleet.run.agent import LlmStep, ToolStep
from fleet.run.prompting import build_prompt
from fleet.run.store import RunStore
from fleet.run.template import render
from fleet.run.tools import run_tool
from fleet.steps.context import StepContext

log = logging.getLogger(__name__)


class StepBodies:
    """The bodies of a worker's steps, with what they call."""

    def __init__(self, models: ModelCatalog, store: RunStore, formats: Formats) -> None:
        self.models = models
        self.store = store
        self.formats = formats

    def run(self, ctx: StepContext, view: dict[str, Any]) -> Any:
        """The body of the step in ``ctx``."""
        step = ctx.step
        if isinstance(step, LlmStep):
            return self.llm(ctx, step, view)
        assert isinstance(step, ToolStep)  # noqa: S101 - guarded by KnownStepGuard
        return self.tool(step, view)

    def llm(self, ctx: StepContext, step: LlmStep, view: dict[str, Any]) -> Any:
        """Call the step's model (or its fallback, see :mod:`fleet.inference.catalog`) and read its
        output (a tool call, or every tool call, when the step asks for them)."""
        record, run = ctx.record, ctx.run
        assert record is not None  # noqa: S101 - set by the pipeline
        own = self.models.resolve(step.model)
        fallback = self.models.resolve(step.fallback) if step.fallback else None
        model = self.models.choose(own, fallback, run.priority, run.deadline_at)
        try:
            text, form = self._generate(ctx, step, view, model)
        except (ReplicaUnavailable, TransientError) as exc:
            if fallback is None or model == fallback or not self.models.is_down(model):
                raise
            log.info("run %s: step %s: model %s went down (%s); falling back to %s", run.id, record.key, model,
                     exc, fallback, extra={"run_id": run.id})
            model = fallback
            text, form = self._generate(ctx, step, view, model)
        record.fallback = model != own
        if step.parse == "tool_calls":
            return form.parse_tool_calls(text)
        return form.parse_tool_call(text) if step.parse == "tool_call" else text

    def _generate(self, ctx: StepContext, step: LlmStep, view: dict[str, Any], model: str) -> tuple[str, Any]:
        """Build the prompt's messages, render them in the model's format, call the model (within
        what the run's budget leaves); the output's text and the format."""
        record, run, allowance, agent = ctx.record, ctx.run, ctx.allowance, ctx.agent
        assert record is not None and ctx.cancel is not None and agent is not None  # noqa: S101 - set by the pipeline
        on_token = None
        if run.stream:
            def on_token(text: str) -> None:
                self.store.emit(run.id, {"type": "token", "step": record.key, "text": text})
        form = self.formats.of(model)
        prompt = build_prompt(agent, step, run, ctx.delivery.iteration,
                              view=view if ctx.parallel is not None else None)
        rendered = form.render(prompt)
        sampling = {**step.sampling_parameters(), **form.sampling(prompt)}
        clip = allowance.clip(rendered.text, step.max_tokens, form.count(rendered)) if allowance is not None else None
        if clip is not None:
            sampling["max_tokens"] = clip.max_tokens
        record.model = model
        with tracing.model_call(model, sampling["max_tokens"]) as span:
            gen = self.models.pool(model).generate(
                rendered.text, sampling, model=model, priority=run.priority,
                deadline_at=run.deadline_at, request_id=f"{run.id}:{record.key}:{record.attempts}",
                cancel=ctx.cancel, on_token=on_token, token_ids=rendered.token_ids, affinity=run.session_id or run.id,
            )
            tracing.model_result(span, gen.tokens_in, gen.tokens_out, gen.finish_reason, gen.ttft_s)
            tracing.model_route(span, gen.replica, gen.route, gen.hit_blocks, gen.prompt_blocks)
        self.models.observed(model, gen.duration_s)
        record.tokens_in, record.tokens_out, record.ttft_s = gen.tokens_in, gen.tokens_out, gen.ttft_s
        record.replica, record.preemptions, record.failovers = gen.replica or None, gen.preemptions, gen.failovers
        record.model_s, record.prompt_bytes = gen.duration_s, len(rendered.text.encode())
        record.cost = self.models.prices[model].cost(gen.tokens_in, gen.tokens_out, gen.duration_s)
        if clip is not None:
            clip.check(gen.tokens_out)
        return gen.text.strip(), form

    @staticmethod
    def tool(step: ToolStep, view: dict[str, Any]) -> Any:
        """Run the step's tool, or the tool a model step chose among the allowed ones."""
        if step.tool is not None:
            return run_tool(step.tool, render(step.input or "", view))
        if step.tool_from == "item":  # a map's branch: its item is the tool call
            call = view.get("branch", {}).get("item")
        else:
            call = view["steps"].get(step.tool_from)
        if not isinstance(call, dict) or "tool" not in call:
            raise PermanentError(f"step '{step.tool_from}' did not produce a tool call: {call!r}")
        if call["tool"] not in step.allowed_tools:
            raise PermanentError(
                f"model chose tool '{call['tool']}', not one of {', '.join(step.allowed_tools)}"
            )
        return run_tool(call["tool"], call["input"])
