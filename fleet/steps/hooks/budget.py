"""Budgets: the one place a run's budget is checked before its model call (the rule is
:mod:`fleet.run.budget`'s). A model step whose run's budget is spent does not run: the run ends
``budget_exceeded``. What is left goes to the step's model call, which clips its
``max_tokens`` to it."""

from __future__ import annotations

from fleet.run.budget import allowance
from fleet.run.cost import Prices
from fleet.steps.context import StepContext
from fleet.steps.hooks import Hook


class BudgetGuard(Hook):
    def __init__(self, prices: Prices) -> None:
        self.prices = prices

    def check(self, ctx: StepContext) -> None:
        if ctx.done or ctx.step is None or ctx.step.kind != "llm":
            return  # tools cost no model time, and a committed step only advances
        ctx.allowance = allowance(ctx.run, ctx.key, self.prices)
