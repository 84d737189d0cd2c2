"""Budgets: a model step whose run's budget is spent does not run; the run ends
``budget_exceeded`` (see :mod:`fleet.run.budget`). What is left goes to the step's model call,
which clips its ``max_tokens`` to it."""

from __future__ import annotations

from fleet.run.budget import allowance
from fleet.run.cost import Prices
from fleet.steps.hooks import Hook, StepContext


class BudgetGuard(Hook):
    def check(self, ctx: StepContext) -> None:
        if ctx.done or ctx.step is None or ctx.step.kind != "llm":
            return  # tools cost no model time, and a committed step only advances
        ctx.allowance = allowance(ctx.run, ctx.key, Prices.from_settings(ctx.rt.settings))
