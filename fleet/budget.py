"""Budgets of a run: the most tokens, and the most estimated cost, its model calls may use.

A run's budget is its agent's (``[budget]`` in the agent's TOML: ``tokens``, ``cost``)
unless the submission sets its own (``budget_tokens``, ``budget_cost``). Tokens count in and
out; the cost is :mod:`fleet.cost`'s estimate. Before each model call, what the run used so
far (the tokens and cost on its step records) is set against its budget
(:func:`allowance`):

- nothing left: the run ends ``budget_exceeded`` before the call
  (:class:`fleet.hooks.budget.BudgetGuard`);
- less left than the step asks for: the call's ``max_tokens`` is clipped to what is left
  after its prompt (:meth:`Allowance.max_tokens`; a prompt is estimated at one token per 4
  bytes, a real tokenizer's usual rate, before the model counts it). A call cut short by
  that clip also ends the run ``budget_exceeded`` (:meth:`Allowance.check_cut`): its
  output is not a whole answer, and the budget is spent.

The time at the model is known only once a call returns, so with a price per GPU-second a
run can pass its cost budget by at most one call's seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from fleet.errors import BudgetExceeded

if TYPE_CHECKING:  # pragma: no cover
    from fleet.cost import Prices
    from fleet.runs import RunState

#: The largest token budget accepted: far above any run, low enough to stay an exact integer.
MAX_BUDGET_TOKENS = 1_000_000_000
#: The largest cost budget accepted.
MAX_BUDGET_COST = 1e9
_BYTES_PER_TOKEN = 4


class Budget(BaseModel):
    """An agent's default budget (``[budget]`` in its TOML); unset fields mean no limit."""

    model_config = ConfigDict(extra="forbid")

    tokens: int | None = Field(None, gt=0, le=MAX_BUDGET_TOKENS, description="Most tokens (in + out) per run.")
    cost: float | None = Field(None, gt=0, le=MAX_BUDGET_COST, allow_inf_nan=False,
                               description="Most estimated cost per run (FLEET_PRICE_*).")


def estimate_tokens(text: str) -> int:
    """The tokens a prompt will likely count, before the model counts them."""
    return math.ceil(len(text.encode()) / _BYTES_PER_TOKEN)


def _left(limit: float, used: float, what: str) -> str:
    return f"{what} budget of {limit:g} spent ({used:g} used)"


@dataclass(frozen=True)
class Allowance:
    """What a run's budget leaves for its next model call."""

    step: str
    budget_tokens: int | None
    budget_cost: float | None
    tokens_used: int
    cost_used: float
    prices: "Prices"

    def max_tokens(self, prompt: str, wanted: int) -> int:
        """The call's ``max_tokens``: ``wanted``, clipped to what the budget leaves after the
        prompt. Raises :class:`BudgetExceeded` when not even one token of output fits."""
        prompt_tokens = estimate_tokens(prompt)
        allowed = wanted
        if self.budget_tokens is not None:
            room = self.budget_tokens - self.tokens_used - prompt_tokens
            if room < 1:
                raise BudgetExceeded(
                    f"token budget of {self.budget_tokens} spent: {self.tokens_used} used, and step {self.step}'s "
                    f"prompt (~{prompt_tokens} tokens) leaves no room for output")
            allowed = min(allowed, room)
        if self.budget_cost is not None:
            room_by_cost = self.prices.output_tokens_for(self.budget_cost - self.cost_used, prompt_tokens)
            if room_by_cost is not None:
                if room_by_cost < 1:
                    raise BudgetExceeded(
                        f"cost budget of {self.budget_cost:g} spent: {self.cost_used:.6g} used, and step "
                        f"{self.step}'s prompt (~{prompt_tokens} tokens) leaves no room for output")
                allowed = min(allowed, room_by_cost)
        return allowed

    def check_cut(self, tokens_out: int, max_tokens: int, wanted: int) -> None:
        """Raise :class:`BudgetExceeded` when a call clipped by the budget used all of its clip
        (its output was cut short: not a whole answer)."""
        if max_tokens < wanted and tokens_out >= max_tokens:
            which = (f"token budget of {self.budget_tokens}" if self.budget_tokens is not None
                     else f"cost budget of {self.budget_cost:g}")
            raise BudgetExceeded(f"{which} spent: step {self.step}'s model call was cut at {tokens_out} tokens "
                                 f"(max_tokens clipped from {wanted} to {max_tokens})")


def allowance(run: "RunState", step: str, prices: "Prices") -> Allowance | None:
    """What ``run``'s budget leaves before the model call of ``step`` (None: no budget).

    Raises:
        BudgetExceeded: nothing is left; the message names the budget.
    """
    if run.budget_tokens is None and run.budget_cost is None:
        return None
    records = run.records.values()
    tokens = sum(r.tokens_in + r.tokens_out for r in records)
    cost = sum(r.cost for r in records)
    if run.budget_tokens is not None and tokens >= run.budget_tokens:
        raise BudgetExceeded(f"{_left(run.budget_tokens, tokens, 'token')} before step {step}")
    if run.budget_cost is not None and cost >= run.budget_cost:
        raise BudgetExceeded(f"{_left(run.budget_cost, round(cost, 6), 'cost')} before step {step}")
    return Allowance(step, run.budget_tokens, run.budget_cost, tokens, cost, prices)
